"""Moving cold experts to the coordinator's device for a layer call: the workers share their shards through one
/dev/shm file each, the coordinator maps it read-only and unlinks it, and the result is transformers' whatever the
scheduler decides (each decision forced here; on this CPU-only machine "moving" computes on the coordinator's CPU
from a staging copy, the same path as on a GPU)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from conftest import shm_files
from fiddler_moe.benchmarks.quant_accuracy import check_logits, logit_errors, quantized_reference
from fiddler_moe.coordinator.scheduling import CostModel, Curve, Scheduler
from fiddler_moe.experts import quant
from fiddler_moe.experts.quant import QuantizedExpertWeights
from fiddler_moe.experts.shard import load_shard, load_shard_shared
from fiddler_moe.launch.cluster import Cluster

PROMPT = [1, 5, 9, 30, 44, 12, 7, 7, 8, 100, 3, 17, 64, 2, 90, 33]


def shard_maps(pid: int | str = "self") -> list[str]:
    """The lines of a process's memory map that are shared shards."""
    return [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if "fiddler-shard" in line]


def shard_files() -> list[str]:
    """This session's shared shards in /dev/shm."""
    return sorted(name for name in shm_files() if name.startswith("fiddler-shard"))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def transformers_answer(ref, new_tokens: int) -> tuple[torch.Tensor, list[int]]:
    """transformers' logits for PROMPT and its greedy continuation."""
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        logits = ref(input_ids=ids).logits
        tokens = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False)
    return logits, tokens[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2-moe"])
def test_moving_every_cold_expert_gives_transformers_logits(checkpoints, reference, preset):
    folder = checkpoints[preset]
    want_logits, want_tokens = transformers_answer(reference(folder), 12)
    with Cluster(folder, workers=2, hot_experts=3, device="cpu", scheduling="always", quiet=True) as cluster:
        coordinator = cluster.coordinator
        # each worker's shard lives in its shared file, mapped read-write there and read-only here; no name is left
        assert sorted(coordinator.mapped) == [0, 1]
        assert shard_files() == []
        for pid in cluster.worker_pids:
            (line,) = shard_maps(pid)
            assert line.split()[1] == "rw-s" and line.endswith("(deleted)")
        mine = [line for line in shard_maps() if line.split()[1] == "r--s"]
        assert len(mine) >= 2
        assert set(coordinator.reachable) == set(coordinator.placement.owner)
        assert coordinator.cold_expert_tensors_held() == 0  # views of the workers' pages, not copies

        got_logits = cluster.logits(torch.tensor([PROMPT]))
        stats = coordinator.dispatcher.stats
        assert stats.moved_pairs > 0 and stats.moved_experts > 0
        got = cluster.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
        assert stats.cold_pairs > 0  # decoding rows stayed on the workers

        before = stats.moved_pairs
        cluster.logits(torch.tensor([[PROMPT[0]]]))  # one token: decode never moves
        assert stats.moved_pairs == before
    assert relative_error(got_logits, want_logits) < 1e-5
    assert got.token_ids == want_tokens
    assert shard_files() == []


@pytest.mark.cluster("tiny", workers=3, hot_experts=5)
def test_on_the_cpu_nothing_moves_and_nothing_is_mapped(checkpoints, reference, cluster):
    """The default scheduler on a CPU-only machine: no device to move to, so "move none", and it says so."""
    want_logits, want_tokens = transformers_answer(reference(checkpoints["tiny"]), 8)
    coordinator = cluster.coordinator
    assert coordinator.mapped == {} and coordinator.reachable == {}
    assert all(shard_maps(pid) == [] for pid in cluster.worker_pids)  # private memory, as without a scheduler
    assert "scheduler: off" in coordinator.scheduling_line and "runs on the CPU" in coordinator.scheduling_line
    stats = coordinator.dispatcher.stats
    moved_before, cold_before = stats.moved_pairs, stats.cold_pairs
    got_logits = cluster.logits(torch.tensor([PROMPT]))
    got = cluster.generate(PROMPT, max_new_tokens=8, ignore_eos=True)
    assert stats.moved_pairs == moved_before == 0 and stats.cold_pairs > cold_before
    assert relative_error(got_logits, want_logits) < 1e-5
    assert got.token_ids == want_tokens


def test_the_scheduler_decides_per_call_and_stays_exact(checkpoints, reference):
    """The cost-model Scheduler wired into the dispatcher, with a cost table that makes moving pay for experts
    with many rows (as a GPU would): busy experts move, the others stay, and the logits do not change."""
    folder = checkpoints["tiny"]
    long_prompt = torch.tensor([list(range(1, 120))])
    with torch.inference_mode():
        want = reference(folder)(input_ids=long_prompt).logits
    gpu_like = CostModel(worker=Curve.line(1e-3, 1e-4), device=Curve.line(1e-4, 1e-6), copy_seconds=2e-3)
    with Cluster(folder, workers=2, hot_experts=0, device="cpu", scheduling="always", quiet=True) as cluster:
        coordinator = cluster.coordinator
        placement = coordinator.placement
        scheduler = Scheduler(gpu_like, placement.owner, placement.num_workers, staging_slots=8)
        coordinator.dispatcher.scheduler = scheduler
        got = cluster.logits(long_prompt)
        stats = coordinator.dispatcher.stats
        assert scheduler.calls > 0 and scheduler.moved_experts == stats.moved_experts > 0
        assert stats.moved_pairs > 0 and stats.cold_pairs > 0  # some experts moved, some stayed
    assert relative_error(got, want) < 1e-5


def test_shared_shard_holds_what_the_private_shard_holds(checkpoints, reference, tmp_path):
    """Per-expert and fused checkpoints: the shared file's tensors equal load_shard's, and the file is removed
    when the shard is closed."""
    source = checkpoints["tiny-qwen3-moe"]
    fused = tmp_path / "fused"
    fused.mkdir()
    for f in source.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, fused / f.name)
    save_file({k: v.contiguous() for k, v in reference(source).state_dict().items()}, fused / "model.safetensors",
              metadata={"format": "pt"})
    from fiddler_moe.coordinator.loading import inspect

    for folder in (source, fused):
        _, layout = inspect(folder, "float32")
        sources = [layout.experts[key] for key in sorted(layout.experts)[::3]]
        private = load_shard(folder, sources, "float32")
        shared_weights, shared = load_shard_shared(folder, sources, "float32")
        try:
            assert os.path.exists(shared.path) and shared.path.startswith("/dev/shm/fiddler-shard")
            assert all(t.offset % 4096 == 0 for t in shared.tensors)
            assert set(shared_weights) == set(private)
            for key, weights in private.items():
                assert torch.equal(shared_weights[key].gate_up, weights.gate_up)
                assert torch.equal(shared_weights[key].down, weights.down)
        finally:
            shared_weights.clear()
            shared.close()
        assert not os.path.exists(shared.path)


@pytest.mark.parametrize("name", list(quant.FORMATS))
def test_a_moved_quantized_expert_travels_in_its_format_and_computes_the_formats_function(checkpoints, name):
    """--quantize with every cold expert moved: the workers share their quantized shards, a move copies the
    format's bytes and dequantizes them where the coordinator computes, and the cluster still computes the
    format's reference (quant_accuracy.quantized_reference): the dequantized experts, inputs quantized per block."""
    folder = checkpoints["tiny"]
    ref = quantized_reference(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), name)
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        want_logits = ref(input_ids=ids).logits
        want_tokens = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                                   do_sample=False)[0, len(PROMPT):].tolist()
    with Cluster(folder, workers=2, device="cpu", quantize=name, scheduling="always", quiet=True) as cluster:
        coordinator = cluster.coordinator
        assert sorted(coordinator.mapped) == [0, 1] and shard_files() == []
        assert coordinator.cold_expert_tensors_held() == 0
        staging = coordinator.dispatcher.staging
        # what moves is the worker's quantized expert: its codes and scales, the format's bytes
        assert staging.format == name and staging.copy_nbytes == coordinator.layout.cold_expert_bytes(name)
        key, shared = next(iter(coordinator.reachable.items()))
        assert isinstance(shared, QuantizedExpertWeights)
        # the moved expert's rows against its worker's kernel on the same quantized weights
        x = torch.randn(16, shared.hidden)
        slot, moved = staging.load(shared)
        got, want = coordinator.dispatcher.kernel.forward(moved, x), coordinator.dispatcher.kernel.forward(shared, x)
        staging.release(slot)
        check_logits(got, want)

        got_logits = cluster.logits(ids)
        stats = coordinator.dispatcher.stats
        assert stats.moved_pairs > 0 and stats.moved_experts > 0
        got_tokens = cluster.generate(PROMPT, max_new_tokens=12, ignore_eos=True).token_ids
        assert stats.cold_pairs > 0  # decoding rows stayed on the workers
        assert f"of {name}, dequantized on the device" in coordinator.scheduling_line
    print("moved against worker %.1e (median %.1e), logits against the reference %.1e (median %.1e)"
          % (*logit_errors(got, want), *logit_errors(got_logits[0], want_logits[0])))
    check_logits(got_logits[0], want_logits[0])
    assert got_tokens == want_tokens
    assert shard_files() == []
