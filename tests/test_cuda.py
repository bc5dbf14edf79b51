"""The CUDA coordinator: the same function as transformers' model on the same GPU, in every placement, and with cold
experts moved to the device (forced, and as the measured cost model decides). Skipped where torch sees no GPU; CI
has none, so these run on a machine with one (`python -m pytest tests/test_cuda.py`)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from fiddler_moe.launch.cluster import Cluster

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPT = [1, 5, 9, 30, 44, 12, 7, 7, 8, 100, 3, 17, 64, 2, 90, 33]
LONG_PROMPT = list(range(1, 200))


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 on the GPU without TF32, so that both sides compute at full precision."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float().cpu(), want.float().cpu()
    return ((got - want).abs().max() / want.abs().max()).item()


def reference(folder, prompt: list[int], new_tokens: int) -> tuple[torch.Tensor, list[int]]:
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to("cuda").eval()
    ids = torch.tensor([prompt], device="cuda")
    with torch.inference_mode():
        logits = ref(input_ids=ids).logits
        tokens = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False)
    return logits.cpu(), tokens[0, len(prompt):].tolist()


@pytest.mark.parametrize("hot_experts", [0, 5, 10_000])
@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2-moe"])
def test_cuda_coordinator_matches_transformers(checkpoints, preset, hot_experts):
    folder = checkpoints[preset]
    want_logits, want_tokens = reference(folder, PROMPT, 24)
    with Cluster(folder, workers=2, hot_experts=hot_experts, device="cuda", scheduling="never", quiet=True) as cluster:
        coordinator = cluster.coordinator
        assert coordinator.device.type == "cuda"
        assert all(t.device.type == "cuda" for w in coordinator.dispatcher.hot.values() for t in (w.gate_up, w.down))
        got_logits = cluster.logits(torch.tensor([PROMPT]))
        got = cluster.generate(PROMPT, max_new_tokens=24, ignore_eos=True)
        assert coordinator.cold_expert_tensors_held() == 0
    assert got_logits.device.type == "cuda"
    assert relative_error(got_logits, want_logits) < 3e-4  # see tests/test_quant_cluster.py: an activation code
    assert got.token_ids == want_tokens


def test_cuda_moving_every_cold_expert_gives_transformers_logits(checkpoints):
    """The move path on a GPU: shared shards mapped and page-locked, experts copied into device staging buffers."""
    folder = checkpoints["tiny"]
    want_logits, want_tokens = reference(folder, LONG_PROMPT, 12)
    with Cluster(folder, workers=2, hot_experts=3, device="cuda", scheduling="always", quiet=True) as cluster:
        coordinator = cluster.coordinator
        assert sorted(coordinator.mapped) == [0, 1]
        assert coordinator.notes == []  # every shard mapped and page-locked
        assert all(t.device.type == "cuda" for t in coordinator.dispatcher.staging.buffers[0].values())
        got_logits = cluster.logits(torch.tensor([LONG_PROMPT]))
        stats = coordinator.dispatcher.stats
        assert stats.moved_pairs > 0
        got = cluster.generate(LONG_PROMPT, max_new_tokens=12, ignore_eos=True)
    assert relative_error(got_logits, want_logits) < 3e-4  # see tests/test_quant_cluster.py: an activation code
    assert got.token_ids == want_tokens


def test_cuda_cost_model_scheduler_moves_long_prefill_and_keeps_decode_on_workers(checkpoints, tmp_path, monkeypatch):
    """The default scheduler measures its cost model on this GPU at start-up (cached per machine) and decides per
    layer call: a decoding token never moves; whatever it moves, the logits stay transformers'."""
    monkeypatch.setenv("FIDDLER_CACHE", str(tmp_path))
    folder = checkpoints["tiny"]
    want_logits, want_tokens = reference(folder, LONG_PROMPT, 8)
    with Cluster(folder, workers=2, hot_experts=0, device="cuda", quiet=True) as cluster:
        coordinator = cluster.coordinator
        assert coordinator.scheduling_line.startswith("scheduler: moves"), coordinator.scheduling_line
        assert (tmp_path / "costs.json").exists()
        got_logits = cluster.logits(torch.tensor([LONG_PROMPT]))
        stats = coordinator.dispatcher.stats
        moved_in_prefill = stats.moved_pairs
        cluster.logits(torch.tensor([[LONG_PROMPT[0]]]))
        assert stats.moved_pairs == moved_in_prefill  # one row: always the worker
        got = cluster.generate(LONG_PROMPT, max_new_tokens=8, ignore_eos=True)
    print(f"\n{coordinator.scheduling_line}\nprefill of {len(LONG_PROMPT)} tokens moved {moved_in_prefill} "
          "token-expert pairs")
    assert relative_error(got_logits, want_logits) < 3e-4  # see tests/test_quant_cluster.py: an activation code
    assert got.token_ids == want_tokens


def test_cuda_bfloat16_greedy_tokens(tmp_path):
    """bfloat16 on the GPU, every expert cold on CPU workers: the greedy tokens stay those of transformers' model
    on the same GPU."""
    from fiddler_moe.launch.synthetic import write_checkpoint

    folder = write_checkpoint("tiny", tmp_path / "tiny-bf16", dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to("cuda").eval()
    prompt = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48]], device="cuda")
    with torch.inference_mode():
        want = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, min_new_tokens=16,
                            do_sample=False)[0, prompt.shape[1]:]
    with Cluster(folder, workers=1, hot_experts=4, device="cuda", quiet=True) as cluster:
        got = cluster.generate(prompt[0].tolist(), max_new_tokens=16, ignore_eos=True)
    assert got.token_ids == want.tolist()


def test_cuda_coordinator_with_quantized_cold_experts(checkpoints):
    """--quantize int8 with a GPU: hot experts stay float32 on the device, cold ones are int8 on the workers and move
    to the GPU as int8 (dequantized there); the function is transformers' (eager experts) with the cold experts'
    weights dequantized and their products' inputs quantized per block as the workers quantize them
    (experts/quant.py), wherever a cold expert is computed."""
    import functools
    import re

    from fiddler_moe.experts import quant

    folder = checkpoints["tiny"]
    with Cluster(folder, workers=2, hot_experts=5, device="cuda", quantize="int8", quiet=True) as cluster:
        coordinator = cluster.coordinator
        cold = set(coordinator.placement.owner)
        assert len(coordinator.dispatcher.hot) == 5 and cold
        assert all(w.gate_up.dtype == torch.float32 and w.gate_up.device.type == "cuda"
                   for w in coordinator.dispatcher.hot.values())
        assert "of int8, dequantized on the device" in coordinator.describe_scheduling()[0]
        got_logits = cluster.logits(torch.tensor([PROMPT]))
        got = cluster.generate(PROMPT, max_new_tokens=24, ignore_eos=True)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, experts_implementation="eager").eval()
    ref = ref.to("cuda")
    cold_weights = set()  # data pointers of the cold experts' matrices, whose products quantize their inputs
    linear = torch.nn.functional.linear

    def expert_linear(x, weight, bias=None):
        return linear(quant.quantized_input(x) if weight.data_ptr() in cold_weights else x, weight, bias)

    def with_quantized_inputs(forward):
        @functools.wraps(forward)
        def wrapped(*args, **kwargs):
            torch.nn.functional.linear = expert_linear
            try:
                return forward(*args, **kwargs)
            finally:
                torch.nn.functional.linear = linear
        return wrapped

    with torch.no_grad():
        for name, module in ref.named_modules():
            if not (hasattr(module, "down_proj") and hasattr(module, "_is_expert_parallel")):
                continue
            layer = int(re.findall(r"\.(\d+)\.", f".{name}.")[0])
            for param in (module.gate_up_proj, module.down_proj):
                for e in range(param.shape[0]):
                    if (layer, e) in cold:
                        param[e] = quant.dequantize(quant.quantize(param[e].cpu(), "int8")).cuda()
                        cold_weights.add(param[e].data_ptr())
            module.forward = with_quantized_inputs(module.forward)
    ids = torch.tensor([PROMPT], device="cuda")
    with torch.inference_mode():
        want_logits = ref(input_ids=ids).logits
        want_tokens = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                                   do_sample=False)[0, len(PROMPT):].tolist()
    assert relative_error(got_logits, want_logits) < 3e-4  # see tests/test_quant_cluster.py: an activation code
    assert got.token_ids == want_tokens


def test_cuda_bench_runs_accelerates_offloading_at_the_clusters_budget(cli, tmp_path):
    """`fiddler bench --device cuda --device-memory M`: beside the cluster, transformers with accelerate's weight
    offloading at M (part of the model on the GPU, the rest in host memory), and the cluster's ratio against it."""
    import json

    from fiddler_moe.cli import fiddler

    pytest.importorskip("accelerate")
    out = tmp_path / "results"
    done = cli(fiddler.app, "bench", "--preset", "tiny", "--prompt-len", "16", "--new-tokens", "4", "--repeats", "1",
               "--device", "cuda", "--device-memory", "300KB", "--bandwidth-mib", "64", "--no-chart", "--out", out)
    assert done.exit_code == 0, done.stderr
    [result_file] = out.glob("bench-tiny-*.json")
    result = json.loads(result_file.read_text())
    [offload] = result["offload"]
    assert offload["device_memory"] == "300KB" and offload["decode_tokens_per_second"] > 0
    [cluster] = result["cluster"]
    assert cluster["vs_offload"]["decode"] > 0 and "offload 300KB" in done.stdout
