"""GPT-OSS: biased experts with an interleaved, clamped gate, in bfloat16 and from MXFP4 checkpoints, computed by
the workers as transformers computes them. The float32 placements are in test_exactness.py."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Mxfp4Config
from transformers.integrations.mxfp4 import convert_moe_packed_tensors
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from fiddler_moe.benchmarks.quant_accuracy import check_logits, quantized_reference
from fiddler_moe.coordinator import loading
from fiddler_moe.experts import mxfp4
from fiddler_moe.experts.compute import ExpertKernel
from fiddler_moe.launch.cluster import Cluster
from fiddler_moe.launch.synthetic import build_config, write_checkpoint
from fiddler_moe.protocol.messages import KernelSpec

PROMPT = [1, *range(40, 60)]  # longer than the tiny preset's sliding window of 8


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def run_both(folder, dtype: torch.dtype, reference_kwargs=None, **cluster):
    """(cluster logits, transformers' logits, cluster tokens, transformers' tokens, dispatcher stats) on PROMPT."""
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **(reference_kwargs or {})).eval()
    prompt = torch.tensor([PROMPT])
    with torch.inference_mode():
        want_logits = ref(input_ids=prompt).logits
        want_tokens = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                   min_new_tokens=16, do_sample=False)[0, prompt.shape[1]:].tolist()
    with Cluster(folder, device="cpu", quiet=True, dtype=str(dtype).removeprefix("torch."), **cluster) as c:
        got_logits = c.logits(prompt, torch.ones_like(prompt))
        got_tokens = c.generate(PROMPT, max_new_tokens=16, ignore_eos=True).token_ids
        stats = c.coordinator.dispatcher.stats
    return got_logits, want_logits, got_tokens, want_tokens, stats


def test_the_kernel_computes_gpt_oss_gate_past_its_clamp():
    """ExpertKernel's gate for GPT-OSS's KernelSpec is GptOssExperts._apply_gate bit for bit, on values inside and
    beyond the clamp, in float32 and bfloat16; the published clamp (7.0) and alpha are read from the module."""
    config = build_config("tiny-gpt-oss", torch.float32)
    config.swiglu_limit = 7.0
    module = GptOssExperts(config)
    for dtype in (torch.float32, torch.bfloat16):
        layer = loading.MoELayer("model.layers.0.mlp.experts", 0, module.num_experts, module)
        spec = loading.kernel_spec(config, layer, dtype)
        assert (spec.interleaved, spec.limit, spec.alpha, spec.up_offset) == (True, 7.0, 1.702, 1.0)
        h = (torch.randn(5, 2 * config.intermediate_size, generator=torch.Generator().manual_seed(1)) * 10).to(dtype)
        assert (h.abs() > 7).any()
        assert torch.equal(ExpertKernel(spec).gate(h), module._apply_gate(h))


def test_the_c_kernels_refuse_every_gate_but_the_plain_one():
    """The fused C expert (and the worker's C serve loop, which reads the same flag) takes plain gated SiLU only."""
    plain = KernelSpec(activation="silu", dtype="bfloat16")
    assert ExpertKernel(plain).fused_silu in (True, False)  # True where the kernel library is built
    for change in ({"interleaved": True}, {"limit": 7.0}, {"alpha": 1.702}, {"up_offset": 1.0}, {"has_bias": True},
                   {"is_transposed": True}):
        assert not ExpertKernel(KernelSpec(activation="silu", dtype="bfloat16", **change)).fused_silu, change


def test_mxfp4_dequantizes_as_transformers_does():
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(3, 64, 48, generator=generator)
    blocks, scales = mxfp4.quantize(weight)
    assert blocks.dtype == scales.dtype == torch.uint8 and blocks.shape == (3, 48, 2, 16)
    for dtype in (torch.float32, torch.bfloat16):
        want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        assert torch.equal(mxfp4.dequantize(blocks, scales, dtype), want)
        assert torch.equal(mxfp4.dequantize(blocks[1], scales[1], dtype), want[1])  # one expert at a time
        assert mxfp4.dequantized_shape(tuple(blocks.shape)) == tuple(want.shape)


def test_bfloat16_gpt_oss_matches_transformers(tmp_path):
    folder = write_checkpoint("tiny-gpt-oss", tmp_path / "gpt-oss-bf16", dtype=torch.bfloat16)
    got, want, got_tokens, want_tokens, stats = run_both(folder, torch.bfloat16, workers=3, hot_experts=5)
    assert relative_error(got, want) < 1e-2
    assert got_tokens == want_tokens
    assert stats.hot_pairs > 0 and stats.cold_pairs > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_gpt_oss_matches_transformers_dequantized_model(tmp_path, dtype):
    """A checkpoint with MXFP4 experts, as gpt-oss ships: the workers (and the hot experts) dequantize it once as
    they load, and the cluster computes what transformers' dequantized model computes."""
    folder = write_checkpoint("tiny-gpt-oss", tmp_path / "gpt-oss-mxfp4", mxfp4=True)
    _, layout = loading.inspect(folder, str(dtype).removeprefix("torch."))
    assert layout.quantization == "mxfp4"
    assert layout.checkpoint_expert_bytes < layout.expert_bytes * layout.num_experts
    assert "MXFP4 in the checkpoint" in Cluster.dequantization_note(layout)
    got, want, got_tokens, want_tokens, stats = run_both(
        folder, dtype, {"quantization_config": Mxfp4Config(dequantize=True)}, workers=2, hot_experts=5)
    assert relative_error(got, want) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert got_tokens == want_tokens
    assert stats.hot_pairs > 0 and stats.cold_pairs > 0


def test_mxfp4_experts_quantized_again_are_transformers_with_those_experts(tmp_path):
    """--quantize int8 on an MXFP4 checkpoint: each worker dequantizes an expert and quantizes it to int8 (double
    quantization); the cluster is transformers' dequantized model with every expert's weights so quantized."""
    folder = write_checkpoint("tiny-gpt-oss", tmp_path / "gpt-oss-mxfp4", mxfp4=True)
    _, layout = loading.inspect(folder, "float32")
    assert "quantizes them to int8" in Cluster.dequantization_note(layout, "int8")
    ref = quantized_reference(AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=Mxfp4Config(dequantize=True)).eval(), "int8")
    prompt = torch.tensor([PROMPT])
    with torch.inference_mode():
        want = ref(input_ids=prompt).logits
    with Cluster(folder, device="cpu", quiet=True, dtype="float32", workers=1, quantize="int8") as c:
        got = c.logits(prompt, torch.ones_like(prompt))
    check_logits(got, want)


@pytest.mark.parametrize("quantization, named", [
    ({"quant_method": "gptq", "bits": 4}, "quantized (gptq)"),
    ({"quant_method": "fp8", "weight_block_size": None}, "no weight_block_size"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "expert_dtype": "fp4"}, "experts are fp4"),
])
def test_other_quantized_checkpoints_are_refused_in_one_line(tmp_path, quantization, named):
    import json

    folder = write_checkpoint("tiny-gpt-oss", tmp_path / "quantized")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantization
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(loading.CheckpointError) as refused:
        loading.inspect(folder)
    assert named in str(refused.value) and "\n" not in str(refused.value)
