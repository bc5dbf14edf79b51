"""Requests decoded together by the serving engine (coordinator/batching.py): each gets transformers' own tokens,
whatever runs beside it; sampling per request; stop tokens, cancelling, beam search; the prompt service batching
its clients; a worker failing under several requests."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from conftest import runtime_leftovers
from fiddler_moe.coordinator.batching import CACHE_ROOM, BatchEngine, SamplingParams, roomy_cache
from fiddler_moe.coordinator.dispatch import WorkerFailed
from fiddler_moe.launch.cluster import Cluster
from fiddler_moe.protocol import messages as m
from fiddler_moe.protocol.transport import Client

# Distinct prompts of different lengths (token ids of the tiny presets' 512-entry vocabulary).
PROMPTS = [[1, 40, 41, 42, 43, 44, 45], [1, 50], [1, 60, 61, 62], [1, *range(70, 84)], [7] * 20, [1, 9]]
# The shared cluster of test_exactness' "mixed" case: hot experts on the coordinator, cold ones on three workers.
MIXED = pytest.mark.cluster("tiny", workers=3, hot_experts=5)


def generated(model, prompt: list[int], new_tokens: int, **kwargs) -> list[int]:
    """transformers' generate (greedy unless told)."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             **{"do_sample": False, **kwargs})
    return out[0, len(prompt):].tolist()


def forward_passes(cluster: Cluster) -> int:
    stats = cluster.coordinator.dispatcher.stats
    return stats.layer_calls // len(cluster.coordinator.layout.moe_layers)


@MIXED
def test_concurrent_requests_get_their_solo_tokens_and_transformers_in_shared_steps(cluster, checkpoints, reference):
    want = [generated(reference(checkpoints["tiny"]), p, 24, min_new_tokens=24) for p in PROMPTS]
    engine = cluster.engine
    solo = [engine.submit(p, SamplingParams(max_new_tokens=24, ignore_eos=True)).result() for p in PROMPTS]
    before = forward_passes(cluster)
    lengths = [24 - 3 * i for i in range(len(PROMPTS))]  # they finish at different steps and leave the batch
    handles = []
    for i, (prompt, length) in enumerate(zip(PROMPTS, lengths)):
        handles.append(engine.submit(prompt, SamplingParams(max_new_tokens=length, ignore_eos=True)))
        if i >= 2:  # the first three are read in one prefill; later ones join the running batch between its steps
            time.sleep(0.02)
    together = [h.result(timeout_s=120) for h in handles]
    passes = forward_passes(cluster) - before

    assert solo == want
    assert together == [w[:n] for w, n in zip(want, lengths)]
    assert all(h.finish_reason == "length" for h in handles)
    # one forward pass per prefill, then decoding steps shared by all: far fewer than one pass per token
    assert passes <= len(PROMPTS) + max(lengths)
    assert passes < sum(lengths)
    assert engine.stats().running == 0 and engine.stats().waiting == 0


@MIXED
def test_sampling_is_per_request_and_a_seed_gives_transformers_tokens_beside_others(cluster, checkpoints, reference):
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=40, top_p=0.9, seed=1234, ignore_eos=True)
    torch.manual_seed(1234)
    want = generated(reference(checkpoints["tiny"]), PROMPTS[0], 12, do_sample=True, temperature=0.8, top_k=40,
                  top_p=0.9, min_new_tokens=12)
    engine = cluster.engine
    alone = engine.submit(PROMPTS[0], params).result()
    others = [engine.submit(p, SamplingParams(max_new_tokens=12, temperature=1.5, ignore_eos=True))
              for p in PROMPTS[1:4]]
    beside = engine.submit(PROMPTS[0], params)
    assert alone == want
    assert beside.result() == want
    assert all(len(h.result()) == 12 for h in others)


@MIXED
def test_stop_tokens_min_tokens_cancel_and_bad_requests(cluster):
    engine = cluster.engine
    free = engine.submit(PROMPTS[3], SamplingParams(max_new_tokens=16, ignore_eos=True)).result()
    at = next(i for i, t in enumerate(free) if i >= 2 and t not in free[:i])  # a token not seen before it
    stopped = engine.submit(PROMPTS[3], SamplingParams(max_new_tokens=16, stop_token_ids=(free[at],)))
    assert stopped.result() == free[: at + 1] and stopped.finish_reason == "stop"
    # min_tokens masks the stop token until that many are made
    later = engine.submit(PROMPTS[3], SamplingParams(max_new_tokens=16, stop_token_ids=(free[at],),
                                                     min_tokens=at + 2))
    assert len(later.result()) > at + 1 and free[at] not in later.result()[: at + 2]

    # a cancelled request leaves at once; the one beside it goes on to the end
    long = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=400, ignore_eos=True))
    short = engine.submit(PROMPTS[1], SamplingParams(max_new_tokens=30, ignore_eos=True))
    first = next(iter(long.tokens(timeout_s=60)))
    long.cancel()
    assert long.result(timeout_s=60)[0] == first and long.finish_reason == "cancelled" and len(long.result()) < 400
    assert len(short.result(timeout_s=120)) == 30 and short.finish_reason == "length"

    for prompt, params, message in [
        ([], SamplingParams(), "empty"),
        ([1, 512], SamplingParams(), "not in the vocabulary"),
        ([1], SamplingParams(top_p=0), "--top-p"),
        ([1], SamplingParams(num_beams=0), "--num-beams"),
        ([1], SamplingParams(num_beams=2, temperature=1.0), "greedy"),
        ([1], SamplingParams(stop_token_ids=(9999,)), "stop token"),
        ([1], SamplingParams(min_tokens=-1), "min_tokens"),
        ([1] * 10, SamplingParams(max_new_tokens=10**6), "context"),
    ]:
        with pytest.raises(ValueError, match=message):
            engine.submit(prompt, params)
    assert engine.stats().running == 0
    with pytest.raises(RuntimeError, match="coordinator.engine"):  # one engine, one loop thread per model
        BatchEngine(cluster.coordinator)


@pytest.mark.cluster("tiny", workers=1, hot_experts=0)
def test_beam_search_is_transformers_beam_search(cluster, checkpoints, reference):
    for prompt in PROMPTS[1:3]:
        want = generated(reference(checkpoints["tiny"]), prompt, 10, num_beams=3)
        got = cluster.generate(prompt, max_new_tokens=10, num_beams=3)
        assert got.token_ids == want
    # beside greedy requests: they run before and after it, each with its own answer
    greedy_one = cluster.engine.submit(PROMPTS[3], SamplingParams(max_new_tokens=8, ignore_eos=True))
    beams = cluster.engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=10, num_beams=3))
    assert beams.result(timeout_s=120) == generated(reference(checkpoints["tiny"]), PROMPTS[0], 10, num_beams=3)
    assert len(greedy_one.result(timeout_s=120)) == 8
    # a beam search waiting for the batch to empty can be cancelled there
    running = cluster.engine.submit(PROMPTS[3], SamplingParams(max_new_tokens=30, ignore_eos=True))
    next(iter(running.tokens(timeout_s=60)))
    waiting = cluster.engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=10, num_beams=3))
    waiting.cancel()
    assert waiting.result(timeout_s=60) == [] and waiting.finish_reason == "cancelled"
    assert len(running.result(timeout_s=120)) == 30


def test_prompt_service_decodes_its_clients_together(launched):
    """Three clients at once through fiddler-launch's endpoint: each gets what it gets alone."""
    prompts = ["The mixture of experts", "Hello", "Offloading experts to the CPU saves memory bandwidth"]

    def ask(prompt: str, answers: dict, **fields) -> None:
        client = Client(launched.address)
        try:
            client.send(m.GenerateRequest(prompt, max_new_tokens=12, **fields))
            chunks = []
            while True:
                msg = client.receive(timeout_s=120)
                assert msg is not None, "no answer"
                if isinstance(msg, m.TokenChunk):
                    chunks += msg.token_ids
                else:
                    answers[prompt] = (msg, chunks)
                    return
        finally:
            client.close()

    solo: dict = {}
    for p in prompts:
        ask(p, solo)
    together: dict = {}
    threads = [threading.Thread(target=ask, args=(p, together)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    for p in prompts:
        done, chunks = together[p]
        assert isinstance(done, m.GenerateDone), done
        assert done.token_ids == chunks == solo[p][0].token_ids
    beams: dict = {}
    ask(prompts[0], beams, num_beams=2)
    assert isinstance(beams[prompts[0]][0], m.GenerateDone) and beams[prompts[0]][0].token_ids


def test_a_worker_dying_under_several_requests_fails_them_all_and_is_restarted_once(checkpoints):
    with Cluster(checkpoints["tiny"], workers=2, device="cpu", quiet=True) as cluster:
        engine = cluster.engine
        handles = [engine.submit(p, SamplingParams(max_new_tokens=3000, ignore_eos=True)) for p in PROMPTS[:3]]
        for handle in handles:  # all three in the batch
            next(iter(handle.tokens(timeout_s=60)))
        victim = cluster.worker_pids[1]
        os.kill(victim, signal.SIGKILL)
        for handle in handles:
            with pytest.raises(WorkerFailed, match="worker-1"):
                handle.result(timeout_s=60)
            assert handle.finish_reason == "error"
        assert cluster.restarts == [0, 1]
        assert len(cluster.generate(PROMPTS[1], max_new_tokens=4, ignore_eos=True).token_ids) == 4
    assert runtime_leftovers() == []


def test_the_engine_s_cache_writes_each_step_into_its_room_and_holds_what_transformers_cache_holds():
    """Step after step, through rows leaving (the engine's `keep`, or a slice) and transformers' crop, the roomy cache
    returns the keys and values DynamicCache returns; a step writes in place while the room lasts, then takes new
    room."""
    from transformers import DynamicCache

    roomy, plain = roomy_cache(), DynamicCache()
    g = torch.Generator().manual_seed(0)

    def step(rows: int, positions: int = 1):
        k, v = (torch.randn(rows, 2, positions, 8, generator=g).to(torch.bfloat16) for _ in range(2))
        for layer in range(2):
            got, want = roomy.update(k, v, layer), plain.update(k.clone(), v.clone(), layer)
            assert all(torch.equal(a, b) for a, b in zip(got, want))

    step(3, positions=5)
    room = roomy.layers[0]._key_room
    for _ in range(CACHE_ROOM):
        step(3)
    assert roomy.layers[0]._key_room is room and roomy.get_seq_length() == plain.get_seq_length() == 5 + CACHE_ROOM
    step(3)
    assert roomy.layers[0]._key_room is not room, "full: new room"
    for cache in (roomy, plain):  # the engine's `keep`: rows 0 and 2 stay, the first 4 positions go
        for layer in cache.layers:
            layer.keys = layer.keys.index_select(0, torch.tensor([0, 2]))[:, :, 4:]
            layer.values = layer.values.index_select(0, torch.tensor([0, 2]))[:, :, 4:]
    step(2)
    for cache in (roomy, plain):  # a row cut off by slicing: the room's beginning, but not all of its rows
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:1], layer.values[:1]
    step(1)
    roomy.crop(-3), plain.crop(-3)
    for _ in range(3):
        step(1)
    assert roomy.get_seq_length() == plain.get_seq_length() == 5 + CACHE_ROOM + 1 - 4 + 1 + 1
