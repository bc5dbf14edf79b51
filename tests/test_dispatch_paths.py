"""A decoding step's layer call counts the same in the dispatcher's statistics whether it goes through C
(shm_call.c) or through Python, and gives the same tokens."""

from __future__ import annotations

import json

import pytest
import torch

from fiddler_moe.coordinator.dispatch import DispatchStats
from fiddler_moe.launch.cluster import Cluster
from fiddler_moe.launch.synthetic import write_checkpoint
from fiddler_moe.native import kernels


@pytest.mark.skipif(not kernels.available(), reason="the kernel library is not built on this machine")
def test_decoding_counts_the_same_through_c_and_through_python(tmp_path, avx2_bfloat16_path):
    folder = write_checkpoint("tiny", tmp_path / "tiny-bf16", dtype=torch.bfloat16)
    prompt = [1, 40, 41, 42, 43]
    with Cluster(folder, workers=1, device="cpu", quiet=True) as cluster:
        dispatcher = cluster.coordinator.dispatcher
        link = dispatcher.workers[0]
        # A batch's step (8 rows here) takes the C path too when no scheduler may move experts: the same bits.
        config = json.loads((folder / "config.json").read_text())
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(8, config["hidden_size"], generator=generator).to(torch.bfloat16)
        index = torch.stack([torch.randperm(config["num_local_experts"], generator=generator)[:2] for _ in range(8)])
        weights = torch.rand(8, 2, generator=generator).softmax(dim=-1)
        layer = next(iter(dispatcher.sole_worker))
        assert not dispatcher._shm_calls  # nothing has been decoded yet
        with cluster.engine.exclusive(), torch.inference_mode():
            through_c = dispatcher.forward(layer, hidden, index, weights)
            assert dispatcher._shm_calls, "the 8-row call went through shm_call.c"
            sole, dispatcher.sole_worker = dispatcher.sole_worker, {}
            through_python = dispatcher.forward(layer, hidden, index, weights)
            dispatcher.sole_worker = sole
        assert torch.equal(through_c, through_python)
        counted = []
        for through_c in (True, False):
            if not through_c:
                dispatcher.sole_worker = {}  # every call takes the Python path
            dispatcher.stats = DispatchStats()
            link.requests, link.busy_seconds = 0, 0.0
            tokens = cluster.generate(prompt, max_new_tokens=4, ignore_eos=True).token_ids
            s = dispatcher.stats
            assert s.wait_seconds > 0 and s.round_trip_seconds > 0 and s.worker_compute_seconds > 0
            assert s.dispatch_seconds >= s.wait_seconds and link.busy_seconds > 0
            counted.append((tokens, dict(s.routed), s.cold_pairs, s.hot_pairs, s.layer_calls, s.tokens,
                            link.requests))
            if through_c:
                assert dispatcher._shm_calls, "the decoding steps went through shm_call.c"
                assert link.channel is not None
    assert counted[0] == counted[1]
    _, routed, cold_pairs, _, layer_calls, tokens, requests = counted[0]
    assert sum(routed.values()) == cold_pairs > 0 and requests == layer_calls and tokens == len(prompt) + 3
