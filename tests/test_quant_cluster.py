"""A cluster with --quantize: its workers hold int8 or int4 experts, quantized once from the checkpoint and mapped
from the cache afterwards, and the cluster computes transformers' model with those experts' weights dequantized and
each expert product's input quantized per block as the kernels quantize it (experts/quant.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fiddler_moe.benchmarks.quant_accuracy import check_logits, logit_errors, quantized_reference
from fiddler_moe.experts import quant
from fiddler_moe.launch.cluster import Cluster
from fiddler_moe.launch.synthetic import TINY_VOCAB, Preset, write_checkpoint

PROMPTS = ["The mixture of experts", "Hello", "Offloading experts to the CPU saves memory bandwidth on small GPUs"]


def dequantized_reference(folder: Path, name: str, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' model of `folder` in `dtype`, its routed experts' weights replaced by their `name`
    quantization, dequantized (quantized from the checkpoint's values, as the workers do, when it is stored in
    `dtype`), rounded to `dtype`, and each expert product's input quantized as the workers quantize it."""
    return quantized_reference(AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval(), name)


def batch(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def on_the_grid(folder: Path, name: str) -> Path:
    """Rewrite a checkpoint's expert weights as values the format `name` holds exactly and bfloat16 too: each block
    of 32 a power-of-two scale d times codes, one of them the format's extreme (127 for int8, -8 for int4), so
    that quantizing gives back d and the codes, and d * code needs at most 8 significant bits."""
    from safetensors.torch import load_file, save_file

    top = 127 if name == "int8" else 8
    for path in folder.glob("*.safetensors"):
        tensors = load_file(path)
        for key, w in tensors.items():
            if ".experts." not in key:
                continue
            blocks = w.float().reshape(-1, 32)
            d = torch.exp2(torch.round(torch.log2(blocks.abs().amax(dim=1, keepdim=True) / top)))
            codes = torch.round(blocks / d).clamp(-top, top - 1 if name == "int4" else top)
            codes[:, 0] = -top  # the extreme code: the quantizer finds this very d again
            tensors[key] = (codes * d).reshape(w.shape).to(w.dtype)
        save_file(tensors, path, metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("name", list(quant.FORMATS))
@pytest.mark.parametrize("preset, dtype", [("tiny", "float32"), ("tiny-qwen3-moe", "float32"), ("tiny", "bfloat16")])
def test_a_quantized_cluster_is_transformers_with_the_dequantized_experts(checkpoints, tmp_path, preset, dtype, name):
    """float32: any checkpoint. bfloat16: transformers holds weights in bfloat16, which cannot hold d * code in
    general, so the checkpoint's experts are put on a grid both hold exactly (`on_the_grid`): then quantizing
    changes nothing and transformers runs the very weights the workers hold."""
    torch_dtype = getattr(torch, dtype)
    folder = checkpoints[preset]
    if dtype == "bfloat16":
        folder = on_the_grid(write_checkpoint(preset, tmp_path / preset, dtype=torch.bfloat16), name)
    ref = dequantized_reference(folder, name, torch_dtype)
    input_ids, mask = batch(folder)
    prompt = input_ids[2:3]
    with torch.inference_mode():
        want_logits = ref(input_ids=input_ids, attention_mask=mask).logits
        if dtype == "bfloat16":  # nothing was lost to quantizing the weights
            plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).eval()
            assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), ref.parameters(), strict=True))
        want_tokens = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                                   min_new_tokens=32, do_sample=False)[0, prompt.shape[1]:]
    with Cluster(folder, workers=2, device="cpu", dtype=dtype, quantize=name, quiet=True) as cluster:
        got_logits = cluster.logits(input_ids, mask)
        got = cluster.generate(prompt[0].tolist(), max_new_tokens=32, ignore_eos=True)
        readies = cluster.coordinator.readies
        stats = cluster.coordinator.dispatcher.stats
        layout = cluster.coordinator.layout
        plan = "\n".join(cluster.coordinator.placement.describe() + cluster.coordinator.describe_scheduling())
    real = mask.bool()
    # the same function, to float32 sums and an activation code's halfway point (FLOAT32_TOLERANCE says why), and
    # bfloat16's roundings, which transformers takes in another order. In bfloat16 the coordinator's quantized
    # layers (every attention projection and the head) widen the bound: a last-bit difference of a bfloat16
    # activation (2^-8 of it) moves its int8 code (a step of 1/127 of its block's largest) about half the time, so
    # those rounding-order differences become code differences in each layer; the same modules on one machine agree
    # to bfloat16's last bit (measured 4e-4 of the logits against 7e-2 through the cluster, whose expert sums round
    # in another order). Those differences can turn a near tie of this random model's next tokens, so the greedy
    # tokens are held identical in float32, and in bfloat16 only the first, unless the reference's margin for it
    # is within that bound (with int4 and the float32 attention of short queries it was, on this prompt).
    error, typical = logit_errors(got_logits[real], want_logits[real])
    print(f"logits relative error {error:.2e}, median {typical:.2e}")
    if dtype == "float32":
        check_logits(got_logits[real], want_logits[real])
    else:  # the typical logit still agrees (measured: exactly); a wrong scale or layer would move most of them
        assert error < 1e-1 and typical < 1e-3
    if dtype == "float32":
        assert got.token_ids == want_tokens.tolist()
    elif got.token_ids[0] != want_tokens[0].item():  # only where the reference's first choice is a near tie
        last = want_logits[2, -1].float()
        margin = (last[want_tokens[0]] - last[got.token_ids[0]]).item()
        assert 0 <= margin <= error * want_logits[real].abs().max().item(), "a clear first choice changed"
    assert stats.cold_pairs > 0 and stats.hot_pairs == 0
    assert all(r.quantize_cache in ("written", "hit") for r in readies)
    # the workers hold the experts in the format's bytes, as the plan print says
    assert sum(r.shard_bytes for r in readies) == layout.num_experts * layout.cold_expert_bytes(name)
    weights = layout.expert_bytes // torch_dtype.itemsize  # no biases in these models
    assert layout.cold_expert_bytes(name) * 2 == weights * (17 if name == "int8" else 9) // 8  # 8.5, 4.5 bits each
    assert f"cold on 2 worker(s) in {name}" in plan and "scheduler: off" in plan  # nothing to move to on a CPU
    assert f"attention, shared experts and head in {name} on the CPU" in plan


def cache_entries(cache: Path) -> list[Path]:
    return sorted((cache / "quantized").rglob("*.bin"))


def test_the_next_launch_reads_the_cached_shard_and_a_changed_checkpoint_gets_its_own(tmp_path, monkeypatch):
    """First launch: each worker quantizes its shard and stores it. Second: it reads the stored file (Ready says
    so, and no file is written). The checkpoint written again with other values (same config and tensor names,
    so the same fingerprint): a new entry, and the new weights' results."""
    monkeypatch.setenv("FIDDLER_CACHE", str(tmp_path / "cache"))  # the workers inherit it
    folder = write_checkpoint("tiny", tmp_path / "tiny", dtype=torch.float32, seed=0)
    input_ids, mask = batch(folder)

    def launch() -> tuple[list[str], torch.Tensor]:
        with Cluster(folder, workers=2, device="cpu", quantize="int4", quiet=True) as cluster:
            return [r.quantize_cache for r in cluster.coordinator.readies], cluster.logits(input_ids, mask)

    caches, first = launch()
    assert caches == ["written", "written"]
    entries = cache_entries(tmp_path / "cache")
    assert len(entries) == 2 and all(p.with_suffix(".json").is_file() for p in entries)
    stamps = {p: p.stat().st_mtime_ns for p in entries}
    caches, second = launch()
    assert caches == ["hit", "hit"] and torch.equal(first, second)
    assert {p: p.stat().st_mtime_ns for p in cache_entries(tmp_path / "cache")} == stamps  # nothing rewritten

    other = write_checkpoint("tiny", tmp_path / "other", dtype=torch.float32, seed=1)
    shutil.copyfile(other / "model.safetensors", folder / "model.safetensors")
    caches, third = launch()
    assert caches == ["written", "written"] and len(cache_entries(tmp_path / "cache")) == 4
    with torch.inference_mode():
        want = dequantized_reference(folder, "int4", torch.float32)(input_ids=input_ids, attention_mask=mask).logits
    real = mask.bool()
    check_logits(third[real], want[real])
    assert relative_error(third[real], first[real]) > 0.1


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


# Experts large enough that a shard's bytes stand out of a worker's own memory (~200 MB of Python and torch).
WIDE = Preset("quant-wide", "mixtral", 512, 2048, 2, 8, 2, 4, 2, TINY_VOCAB)


def test_a_worker_holds_its_shard_in_the_quantized_bytes_only(tmp_path, monkeypatch):
    """A worker's resident memory after loading: with --quantize int4 its float shard (96 MiB in bfloat16) is
    not held, neither after quantizing it nor when reading it from the cache; about the int4 bytes (27 MiB) are.
    In no format does the worker keep the checkpoint's file mapped."""
    monkeypatch.setenv("FIDDLER_CACHE", str(tmp_path / "cache"))
    folder = write_checkpoint(WIDE, tmp_path / "wide", dtype=torch.bfloat16)
    resident, shard = {}, {}
    for run in ("none", "written", "hit"):
        with Cluster(folder, workers=1, device="cpu", quantize="none" if run == "none" else "int4",
                     quiet=True) as cluster:
            cluster.generate([1, 40, 41], max_new_tokens=2, ignore_eos=True)
            ready = cluster.coordinator.readies[0]
            assert ready.quantize_cache == ("" if run == "none" else run)
            resident[run], shard[run] = rss_bytes(cluster.worker_pids[0]), ready.shard_bytes
            # nothing of the checkpoint stays mapped: its pages would count in the worker's RSS beside the shard
            maps = Path(f"/proc/{cluster.worker_pids[0]}/maps").read_text()
            assert ".safetensors" not in maps, run
    assert shard["none"] == 96 << 20 and shard["written"] == shard["hit"] == 27 << 20
    saved = shard["none"] - shard["written"]
    for run in ("written", "hit"):  # generous: at least half of what the format saves, and not the float copy
        assert resident[run] < resident["none"] - saved // 2, (run, resident)


def test_the_plan_shows_each_workers_shard_in_the_format_and_refuses_shapes_it_cannot_cut(checkpoints, tmp_path):
    from typer.testing import CliRunner

    from fiddler_moe.cli import launch

    folder = checkpoints["tiny"]
    out = CliRunner().invoke(launch.app, ["--dry-run", "--model", str(folder), "--workers", "2", "--quantize", "int4"])
    assert out.exit_code == 0, out.output
    # 8 experts a worker in each of 4 layers: 16 of 13.5 KiB (24 of 48 KiB in float32 weights, 4.5 bits each)
    assert "cold experts in int4, 13.5 KiB each" in out.stdout
    assert out.stdout.count("16 experts (216.0 KiB in int4)") == 2, out.stdout
    odd = write_checkpoint(Preset("odd", "mixtral", 64, 40, 1, 4, 2, 4, 2, TINY_VOCAB), tmp_path / "odd")
    out = CliRunner().invoke(launch.app, ["--dry-run", "--model", str(odd), "--quantize", "int8"])
    assert out.exit_code == 2 and out.stdout == ""
    assert "--quantize int8 needs expert matrices whose input size is a multiple of 32" in out.stderr
    assert "[64, 40]; run this model with --quantize none" in out.stderr


def test_a_cache_that_cannot_be_written_stops_the_start_with_the_fix(checkpoints, tmp_path, monkeypatch):
    from fiddler_moe.coordinator.dispatch import WorkerFailed

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("FIDDLER_CACHE", str(blocked))
    with pytest.raises(WorkerFailed, match="worker-0 .* refused start-up: cannot write the quantized shard under .*set FIDDLER_CACHE to a writable"):
        with Cluster(checkpoints["tiny"], workers=1, device="cpu", quantize="int8", quiet=True):
            pass


def test_the_plan_warns_when_the_workers_would_not_fit_the_memory(checkpoints):
    """Each worker counts its shard in the format, +10%, and the interpreter's own memory: against each NUMA
    node's memory and against what the machine has available, with the fix named."""
    from fiddler_moe.coordinator.coordinator import prepare
    from fiddler_moe.host import numa
    from fiddler_moe.launch.cluster import WORKER_OWN_BYTES, memory_warnings

    topology = numa.Topology([numa.Node(0, [0, 1], [[0], [1]], memory_bytes=1 << 40)])
    layout = numa.lay_out(topology, 2)
    for name in ("none", "int4"):
        prepared = prepare(checkpoints["tiny"], 2, "cpu", quantize=name)
        placement = prepared.plan([1.0, 1.0])
        shards = prepared.layout.num_experts * prepared.layout.cold_expert_bytes(name)
        need = int(shards * 1.1) + 2 * WORKER_OWN_BYTES
        assert memory_warnings(topology, layout, placement, prepared, name, available=1 << 40) == []
        (short,) = memory_warnings(topology, layout, placement, prepared, name, available=need)  # + coordinator's
        assert "but this machine has" in short and "available" in short
        assert ("--quantize int8 or int4" in short) == (name == "none")
        topology.nodes[0].memory_bytes = need - (1 << 20)
        (node,) = memory_warnings(topology, layout, placement, prepared, name, available=1 << 40)
        assert node.startswith("node 0: its 2 worker(s) need about") and "add workers on other nodes" in node
        topology.nodes[0].memory_bytes = 1 << 40
