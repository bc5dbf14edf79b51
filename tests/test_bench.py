"""`fiddler bench` end to end on the tiny preset (smoke only: no timing is asserted)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import error_line, runtime_leftovers
from fiddler_moe.cli import fiddler

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_bench_tiny_writes_json_and_png(cli, tmp_path):
    out = tmp_path / "results"
    done = cli(fiddler.app, "bench", "--preset", "tiny", "--prompt-len", "16", "--new-tokens", "2", "--repeats", "1",
               "--workers", "1,2", "--threads-per-worker", "1", "--coordinator-threads", "1", "--device", "cpu",
               "--bandwidth-mib", "64", "--out", out)
    assert done.exit_code == 0, done.stderr
    assert "tokens per second" in done.stdout and "transformers" in done.stdout

    [result_file] = out.glob("bench-tiny-bfloat16-*.json")
    result = json.loads(result_file.read_text())
    assert result["model"]["preset"] == "tiny" and result["model"]["dtype"] == "bfloat16"
    assert [c["config"]["workers"] for c in result["cluster"]] == [1, 2]
    for run in [*result["cluster"], *result["transformers"]]:
        assert run["prefill_tokens_per_second"] > 0 and run["decode_tokens_per_second"] > 0
        assert len(run["token_ids"]) == 2
    breakdown = result["cluster"][0]["decode_ms_per_token"]
    assert set(breakdown) >= {"non_expert", "worker_compute", "transport", "sampling_overhead", "total"}
    assert result["cluster"][0]["hit_rate"] == 0.0  # on the CPU every expert is cold by default
    for c in result["cluster"]:  # each part: its bytes at the bandwidth, and the rest, bound by something else
        bound, ms = c["bound"], c["decode_ms_per_token"]
        assert bound["floor_ms"]["non_expert"] > 0 and bound["floor_ms"]["transport"] == 0
        for key, floor in bound["floor_ms"].items():
            assert bound["beyond_ms"][key] == pytest.approx(max(0.0, ms[key] - floor))
    assert "beyond its bytes at the read bandwidth" in done.stdout and "beyond it" in done.stdout
    assert result["offload"] == []  # accelerate's offloading contestant runs on a GPU only
    assert result["settings"]["interleaved"] and "range over rounds" in done.stdout
    for c in result["cluster"]:  # one round: its ratio is the ratio of the two runs
        versus = c["vs_transformers"]
        for phase in ("prefill", "decode"):
            paired = versus["rounds"][phase]
            assert paired["min"] == paired["median"] == paired["max"] == pytest.approx(versus[phase])
    assert result["bandwidth"]["bytes_per_second"] > 0 and "torch.sum" in result["bandwidth"]["method"]
    assert result["ceiling"]["decode_tokens_per_second"] > 0
    machine = result["machine"]
    assert machine["logical_cpus"] >= 1 and machine["libraries"]["torch"]
    assert {"cpu_model", "numa_nodes", "memory_bytes", "device"} <= set(machine)

    pytest.importorskip("matplotlib")
    [chart] = out.glob("bench-tiny-bfloat16-*.png")
    assert chart.read_bytes()[:8] == PNG_MAGIC
    assert runtime_leftovers() == []


def test_bench_refuses_a_model_that_does_not_fit(cli, tmp_path):
    done = cli(fiddler.app, "bench", "--preset", "mixtral-8x7b", "--out", tmp_path)
    if done.exit_code == 0:
        pytest.skip("this machine has the memory for Mixtral-8x7B")
    assert done.exit_code == 2
    line = error_line(done)
    assert "mixtral-8x7b" in line and "memory" in line
    assert not list(tmp_path.iterdir())


def test_paired_ratios_pair_runs_of_the_same_round():
    from fiddler_moe.benchmarks.bench import paired_ratios

    def run(prefill, decode):
        return {"prefill_tokens_per_second": prefill, "decode_tokens_per_second": decode}

    paired = paired_ratios([run(2, 4), run(3, 3), run(5, 1)], [run(1, 2), run(1, 6), run(1, 0)])
    assert paired["prefill"] == {"median": 3, "min": 2, "max": 5}
    assert paired["decode"] == {"median": 1.25, "min": 0.5, "max": 2}  # a round without a baseline rate is left out


def test_bench_sweeps_the_workers_formats_and_records_each_runs(cli, tmp_path):
    out = tmp_path / "results"
    done = cli(fiddler.app, "bench", "--preset", "tiny", "--prompt-len", "16", "--new-tokens", "2", "--repeats", "1",
               "--quantize", "none,int8,int4", "--no-baseline", "--device", "cpu", "--bandwidth-mib", "64",
               "--no-chart", "--out", out)
    assert done.exit_code == 0, done.stderr
    [result_file] = out.glob("bench-tiny-bfloat16-*.json")
    runs = json.loads(result_file.read_text())["cluster"]
    assert [c["config"]["quantize"] for c in runs] == ["none", "int8", "int4"]
    assert [c["config"]["label"].split(", ")[-1] for c in runs[1:]] == ["int8", "int4"]
    shard = [sum(c["worker_shard_bytes"].values()) for c in runs]
    assert shard[0] > shard[1] > shard[2] and all(c["decode_tokens_per_second"] > 0 for c in runs)
    assert runs[0]["decode_bytes_per_token"] > runs[1]["decode_bytes_per_token"] > runs[2]["decode_bytes_per_token"]
    bad = cli(fiddler.app, "bench", "--preset", "tiny", "--quantize", "int3", "--out", tmp_path / "bad")
    assert bad.exit_code == 2 and "--quantize must be one of none, int8, int4" in error_line(bad)


def test_offload_contestant_splits_the_model_at_the_budget_and_computes_transformers(checkpoints, reference,
                                                                                      tmp_path):
    """The offloading contestant of `fiddler bench --device cuda`: accelerate's device map at the cluster's budget.
    Here the GPU's map is planned on the meta device, and the CPU twin (budget in memory, the rest on disk) runs
    through the same from_pretrained(device_map="auto", max_memory=...) and hooks, and gives transformers' logits."""
    accelerate = pytest.importorskip("accelerate")
    from transformers import AutoConfig, AutoModelForCausalLM

    from fiddler_moe.benchmarks.runners import load_baseline, offload_max_memory

    folder = checkpoints["tiny"]
    weights = sum(p.numel() * 4 for p in reference(folder).parameters())
    budget = weights // 3
    max_memory = offload_max_memory(torch.device("cuda", 0), budget, 1 << 34)
    assert max_memory == {0: budget, "cpu": 1 << 34}
    with accelerate.init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    plan = accelerate.infer_auto_device_map(skeleton, max_memory=max_memory,
                                            no_split_module_classes=skeleton._no_split_modules)
    on_gpu = {name for name, where in plan.items() if where == 0}
    assert on_gpu and "cpu" in plan.values()  # part on the device, the rest offloaded
    gpu_bytes = sum(p.numel() * 4 for name, p in skeleton.named_parameters()
                    if any(name == m or name.startswith(m + ".") for m in on_gpu))
    assert gpu_bytes <= budget

    model = load_baseline(str(folder), torch.float32, torch.device("cpu"), str(budget), str(tmp_path / "spill"))
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, reference(folder)(ids).logits, rtol=1e-5, atol=1e-5)


def test_bench_serve_measures_concurrent_http_clients_beside_transformers(cli, tmp_path):
    out = tmp_path / "serve"
    done = cli(fiddler.app, "bench", "serve", "--preset", "tiny", "--clients", "1,2", "--prompt-len", "8",
               "--new-tokens", "4", "--repeats", "1", "--out", out)
    assert done.exit_code == 0, done.stderr
    assert "| 2 | fiddler |" in done.stdout and "transformers, batch of 2" in done.stdout
    [result_file] = out.glob("serve-tiny-bfloat16-*.json")
    result = json.loads(result_file.read_text())
    assert [r["clients"] for r in result["fiddler"]] == [r["clients"] for r in result["transformers"]] == [1, 2]
    for row in [*result["fiddler"], *result["transformers"]]:
        assert row["aggregate_decode_tokens_per_second"] > 0 and row["ttft_seconds"] > 0
        assert row["rounds"][0]["tokens"] == [4] * row["clients"]  # every stream got all its tokens
    assert result["fiddler"][0]["versus_one_client"] == 1.0
    for row in result["fiddler"]:  # top-2 of 8: a decoding step's call reads 2 experts or more, a prefill's up to 8
        assert 2 <= row["experts_per_layer_call"] <= 8
    assert result["cluster_layout"]["transformers_threads"] >= 1
    assert result["cluster_layout"]["cold_format"] == "bfloat16"
    pytest.importorskip("matplotlib")
    [chart] = out.glob("serve-tiny-bfloat16-*.png")
    assert chart.read_bytes()[:8] == PNG_MAGIC
    assert runtime_leftovers() == []
    assert "1,0" in error_line(cli(fiddler.app, "bench", "serve", "--clients", "1,0", "--out", tmp_path / "bad"))


def test_bench_serve_runs_the_workers_in_the_format_asked(cli, tmp_path):
    out = tmp_path / "serve"
    done = cli(fiddler.app, "bench", "serve", "--preset", "tiny", "--quantize", "int8", "--clients", "1",
               "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1", "--no-baseline", "--no-chart", "--out", out)
    assert done.exit_code == 0, done.stderr
    assert "| 1 | fiddler, int8 |" in done.stdout
    [result_file] = out.glob("serve-tiny-bfloat16-int8-*.json")
    result = json.loads(result_file.read_text())
    assert result["settings"]["quantize"] == "int8" and result["cluster_layout"]["cold_format"] == "int8"
    assert result["fiddler"][0]["rounds"][0]["tokens"] == [4]
    assert runtime_leftovers() == []
    sweep = error_line(cli(fiddler.app, "bench", "serve", "--quantize", "none,int4", "--out", tmp_path / "bad"))
    assert "one format at a time" in sweep and "--quantize int4" in sweep


def test_a_coordinator_decoding_on_one_thread_gets_its_floor_at_one_threads_bandwidth():
    """Where the coordinator decodes on one thread and prefills on more, the breakdown gives its bytes' time at one
    thread's read bandwidth (the head at every core's); elsewhere it gives none."""
    from fiddler_moe.benchmarks.bench import DecodeBytes, bandwidth_bound
    from fiddler_moe.benchmarks.runners import NOT_BANDWIDTH

    needed = DecodeBytes(non_expert=4_000_000, experts=10_000_000, embedding_row=0, head=2_000_000)
    result = {"decode_ms_per_token": dict.fromkeys(NOT_BANDWIDTH, 9.0), "hit_rate": 0.0,
              "config": {"decode_threads": 1, "coordinator_threads": 2}}
    bound = bandwidth_bound(result, needed, needed.total, 2e9, 1e9)
    assert bound["floor_ms"]["non_expert"] == pytest.approx(3.0)  # 6 MB at 2 GB/s
    assert bound["non_expert_one_thread_ms"] == pytest.approx(4.0 + 1.0)  # 4 MB at 1 GB/s, the head at 2 GB/s
    for config in ({"decode_threads": 2, "coordinator_threads": 2}, {"decode_threads": 1, "coordinator_threads": 1},
                   {"decode_threads": None, "coordinator_threads": 2}):
        assert "non_expert_one_thread_ms" not in bandwidth_bound({**result, "config": config}, needed, needed.total,
                                                                 2e9, 1e9)
    assert "non_expert_one_thread_ms" not in bandwidth_bound(result, needed, needed.total, 2e9)
