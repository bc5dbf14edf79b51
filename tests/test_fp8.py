"""Checkpoints that arrive in FP8 with block scales (DeepSeek-V3/R1, Qwen3 FP8): the workers dequantize their experts
one at a time as they load them, the coordinator its FP8 attention weights, and the cluster computes what
transformers' own dequantized model computes; with --quantize, the dequantized experts are quantized again."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

from fiddler_moe.benchmarks.quant_accuracy import check_logits, quantized_reference
from fiddler_moe.coordinator import loading
from fiddler_moe.experts import fp8
from fiddler_moe.launch.cluster import Cluster
from fiddler_moe.launch.synthetic import write_checkpoint

pytest.importorskip("accelerate", reason="transformers reads FP8 checkpoints only with accelerate installed")

PROMPT = [1, *range(40, 60)]
BLOCK = (32, 32)  # the tiny presets' sizes are multiples of 32, not of the releases' 128


def test_fp8_blocks_quantize_and_dequantize_as_transformers_does():
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(3))
    weight[:32, :32] = 0  # a block of zeros keeps scale 1
    quantizer = SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=BLOCK, scale_fmt="float"))
    want = Fp8Quantize(quantizer)._quantize_one("x.weight", weight)
    q, scale_inv = fp8.quantize(weight, BLOCK)
    assert torch.equal(q.view(torch.uint8), want["x.weight"].view(torch.uint8))
    assert torch.equal(scale_inv, want["x.weight_scale_inv"]) and scale_inv.shape == (3, 2)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(fp8.dequantize(q, scale_inv, dtype),
                           Fp8Dequantize(quantizer)._dequantize_one(q, scale_inv, output_dtype=dtype))
    assert (fp8.dequantize(q, scale_inv, torch.float32) - weight).abs().max() < weight.abs().max() / 16
    with pytest.raises(ValueError, match="does not match its block scales"):
        fp8.dequantize(q, scale_inv.repeat(40, 1), torch.float32)  # more block rows than weight rows


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3-moe"])
def test_an_fp8_checkpoint_runs_as_transformers_dequantized_model(tmp_path, preset):
    """Attention weights and experts in FP8 (the layout DeepSeek-V3 ships): hot experts on the coordinator, cold
    ones on two workers, each dequantized as transformers dequantizes it on a CPU."""
    folder = write_checkpoint(preset, tmp_path / preset, fp8_block=BLOCK)
    _, layout = loading.inspect(folder, "float32")
    assert layout.quantization == "fp8" and layout.non_expert_scales  # the attention projections
    assert all(s.gate_up_scales and s.down_scales for s in layout.experts.values())
    assert layout.checkpoint_expert_bytes < layout.expert_bytes * layout.num_experts / 3
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.tensor([PROMPT])
    with torch.inference_mode():
        want = ref(input_ids=prompt).logits
        want_tokens = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                   min_new_tokens=8, do_sample=False)[0, prompt.shape[1]:].tolist()
    with Cluster(folder, device="cpu", quiet=True, workers=2, hot_experts=5) as c:
        got = c.logits(prompt, torch.ones_like(prompt))
        got_tokens = c.generate(PROMPT, max_new_tokens=8, ignore_eos=True).token_ids
        stats = c.coordinator.dispatcher.stats
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    assert got_tokens == want_tokens
    assert stats.hot_pairs > 0 and stats.cold_pairs > 0


def test_fp8_experts_quantized_again_are_transformers_with_those_experts(tmp_path):
    """--quantize on an FP8 checkpoint: each expert dequantized (in the compute dtype) and quantized to int4 (int8
    takes the same path); the cluster is transformers' dequantized model with every expert's weights so quantized."""
    name = "int4"
    folder = write_checkpoint("tiny", tmp_path / "tiny", fp8_block=BLOCK)
    ref = quantized_reference(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), name)
    prompt = torch.tensor([PROMPT])
    with torch.inference_mode():
        want = ref(input_ids=prompt).logits
    with Cluster(folder, device="cpu", quiet=True, workers=1, quantize=name) as c:
        got = c.logits(prompt, torch.ones_like(prompt))
    check_logits(got, want)
