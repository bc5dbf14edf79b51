"""A CPU coordinator's RMS norms in one C call (coordinator/cpu_norm.py, native/rms_norm.c): the same function as
transformers' norm modules, taken only for the norms that are Llama's."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm
from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

from fiddler_moe.coordinator import cpu_norm
from fiddler_moe.native import kernels

needs_library = pytest.mark.skipif(not kernels.available(), reason="the kernel library is not built on this machine")


def bfloat16_steps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| in units of one bfloat16 step at want (the spacing of its binade; the smallest normal's below)."""
    want = want.float()
    spacing = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(2.0**-126))) - 7)
    return (got.float() - want).abs() / spacing


@needs_library
@pytest.mark.parametrize("cols", [1024, 128, 100, 7])
def test_the_kernel_is_the_modules_norm_to_within_one_bfloat16_step(cols):
    g = torch.Generator().manual_seed(cols)
    norm = MixtralRMSNorm(cols, eps=1e-5).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(cols, generator=g) * 0.5 + 1)
    differing = total = 0
    for scale in (1e-3, 1.0, 30.0, 1e4):  # the sum of squares from tiny to large
        x = (torch.randn(5, 3, cols, generator=g) * scale).bfloat16()
        want, got = norm(x), kernels.rms_norm(x, norm.weight, norm.variance_epsilon)
        assert got.dtype == torch.bfloat16 and got.shape == x.shape
        steps = bfloat16_steps(got, want)
        assert steps.max() <= 1, (scale, steps.max())
        differing += int((steps > 0).sum())
        total += steps.numel()
    assert differing <= total // 100  # the sums' order moves a few values only
    zeros = torch.zeros(2, cols, dtype=torch.bfloat16)  # eps keeps the scale finite
    assert torch.equal(kernels.rms_norm(zeros, norm.weight, norm.variance_epsilon), norm(zeros))


def test_only_llamas_norm_is_taken():
    assert cpu_norm.is_llama_rms_norm(MixtralRMSNorm(16))
    assert not cpu_norm.is_llama_rms_norm(GptOssRMSNorm(16))  # rounds once, after the weight's product
    assert not cpu_norm.is_llama_rms_norm(torch.nn.LayerNorm(16))


@needs_library
@pytest.mark.parametrize("preset,fused", [("tiny", 4 * 2 + 1), ("tiny-qwen3-moe", 4 * 4 + 1), ("tiny-gpt-oss", 0)])
def test_a_models_norms_take_the_kernel_for_decoding_and_their_own_forward_otherwise(checkpoints, monkeypatch, preset,
                                                                                     fused):
    """Each layer's two norms, Qwen3's query and key norms and the final norm take the kernel in a decoding step;
    gpt-oss keeps its own. More values than FUSED_MAX_ELEMENTS (a prefill) and float32 go through the module's own
    code, unchanged."""
    model = AutoModelForCausalLM.from_pretrained(checkpoints[preset], dtype=torch.bfloat16).eval()
    ids = torch.arange(3, 5).unsqueeze(0)
    with torch.inference_mode():
        want = model(ids).logits
    assert cpu_norm.fuse_rms_norms(model) == fused
    calls, original = [], kernels.rms_norm
    monkeypatch.setattr(kernels, "rms_norm", lambda *a: calls.append(a[0].shape) or original(*a))
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)  # token by token, as decoding runs
        got = [model(ids[:, i:i + 1], cache=cache, use_cache=True) for i in range(2)]
    assert len(calls) == 2 * fused
    assert (got[1].logits - want[:, 1:]).abs().max() <= 0.05 * want.abs().max()
    assert torch.equal(got[1].logits.argmax(-1), want[:, 1:].argmax(-1))

    norms = [m for m in model.modules() if m.forward.__func__ is cpu_norm._fused_forward] if fused else []
    for norm in norms[:1]:
        calls.clear()
        large = torch.randn(cpu_norm.FUSED_MAX_ELEMENTS // norm.weight.shape[0] + 1, norm.weight.shape[0]).bfloat16()
        assert torch.equal(norm(large), type(norm).forward(norm, large)) and calls == []
    float32 = AutoModelForCausalLM.from_pretrained(checkpoints[preset], dtype=torch.float32).eval()
    with torch.inference_mode():
        want32 = float32(ids).logits
        cpu_norm.fuse_rms_norms(float32)
        assert torch.equal(float32(ids).logits, want32) and calls == []  # float32 keeps the module's own code
