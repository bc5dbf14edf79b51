"""The expert kernel's CPU fast paths for bfloat16 against PyTorch's plain matmuls: packed for oneDNN (bit-identical)
and upcast to float32 in blocks (the same products, rounded once; sums in another order)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from coordinator.cpu_linear import pack_linear_layers
from expert_worker import compute
from expert_worker.compute import PACK_BFLOAT16, ExpertKernel, ExpertWeights, upcast_linear
from protocol.messages import KernelSpec


def exact_bfloat16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """The product in float64, rounded once to bfloat16: what any float32-accumulating kernel approximates."""
    w = weight.double() if transposed else weight.double().t()
    out = x.double() @ w
    return (out if bias is None else out + bias.double()).to(torch.bfloat16)


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bfloat16 steps (same-sign values; the int16 patterns are ordered like the values)."""
    return int((a.view(torch.int16).int() - b.view(torch.int16).int()).abs().max())


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_upcast_linear_is_bfloat16_linear(monkeypatch, transposed, bias):
    monkeypatch.setattr(compute, "UPCAST_BLOCK", 1000)  # several blocks, the last one partial
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 80, generator=generator).bfloat16()  # [out, in], or [in, out] when transposed
    b = torch.randn(80 if transposed else 96, generator=generator).bfloat16() if bias else None
    for rows in (4, 70):
        x = torch.randn(rows, 96 if transposed else 80, generator=generator).bfloat16()
        got = upcast_linear(x, weight, b, transposed=transposed)
        if transposed:  # PyTorch's own bfloat16 kernels, which also round once
            plain = x @ weight if b is None else torch.addmm(b, x, weight)
        else:
            plain = nn.functional.linear(x, weight, b)
        want = exact_bfloat16(x, weight, b, transposed)
        assert got.dtype == torch.bfloat16 and got.shape == want.shape and got.is_contiguous()
        same_sign = (got.sign() == want.sign()) & (want != 0)
        assert ulps_apart(got[same_sign], want[same_sign]) <= 1
        assert (got == plain).float().mean() > 0.95


def test_upcast_kernel_and_linear_layers_follow_the_row_count(monkeypatch):
    """From UPCAST_ROWS rows on, the expert kernel and the coordinator's nn.Linear take the float32 path; a
    decoding row keeps PyTorch's bfloat16 matrix-vector product (bit-identical to transformers' own)."""
    monkeypatch.setattr(compute, "UPCAST_BFLOAT16", True)
    monkeypatch.setattr(compute, "PACK_BFLOAT16", False)
    spec = KernelSpec(activation="silu", dtype="bfloat16")
    generator = torch.Generator().manual_seed(1)
    gate_up = torch.randn(2 * 96, 64, generator=generator).bfloat16()
    down = torch.randn(64, 96, generator=generator).bfloat16()
    kernel = ExpertKernel(spec)
    kernel.pack = False
    calls = []
    monkeypatch.setattr(compute, "upcast_linear", lambda *a, **k: calls.append(a[0].shape[0]) or upcast_linear(*a, **k))
    one = torch.randn(1, 64, generator=generator).bfloat16()
    want_one = nn.functional.linear(nn.functional.silu(nn.functional.linear(one, gate_up)[:, :96])
                                    * nn.functional.linear(one, gate_up)[:, 96:], down)
    assert torch.equal(kernel.forward(ExpertWeights(gate_up, down), one), want_one) and calls == []
    many = torch.randn(9, 64, generator=generator).bfloat16()
    assert kernel.forward(ExpertWeights(gate_up, down), many).shape == (9, 64) and calls == [9, 9]

    import coordinator.cpu_linear as cpu_linear

    monkeypatch.setattr(cpu_linear, "UPCAST_BFLOAT16", True)
    monkeypatch.setattr(cpu_linear, "PACK_BFLOAT16", False)
    monkeypatch.setattr(cpu_linear, "upcast_linear", compute.upcast_linear)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8, bias=False)).bfloat16()
    want = [model(x) for x in (one, many)]
    assert pack_linear_layers(model) == 2
    assert torch.equal(model(one), want[0])
    assert model(many.view(3, 3, 64)).shape == (3, 3, 8) and len(calls) == 4
    assert (model(many) == want[1]).float().mean() > 0.9


@pytest.mark.skipif(not PACK_BFLOAT16, reason="no oneDNN bfloat16 support on this CPU")
def test_packed_bfloat16_kernel_matches_plain():
    spec = KernelSpec(activation="silu", dtype="bfloat16")
    generator = torch.Generator().manual_seed(0)
    gate_up = torch.randn(2 * 96, 64, generator=generator).bfloat16()
    down = torch.randn(64, 96, generator=generator).bfloat16()
    packed = ExpertWeights(gate_up.clone(), down.clone())
    plain_kernel = ExpertKernel(spec)
    plain_kernel.pack = False
    for rows in (1, 3, 70):
        x = torch.randn(rows, 64, generator=generator).bfloat16()
        want = plain_kernel.forward(ExpertWeights(gate_up, down), x)
        assert torch.equal(ExpertKernel(spec).forward(packed, x), want)
    assert packed.packed and packed.nbytes == gate_up.nbytes + down.nbytes
    dense = packed.to("cpu")  # ordinary tensors back, for whoever copies weights elsewhere
    assert not dense.packed and torch.equal(dense.gate_up, gate_up)
    shared = ExpertWeights(gate_up.clone(), down.clone(), shared=True)
    ExpertKernel(spec).forward(shared, x)
    assert not shared.packed
    assert ExpertKernel(spec).forward(packed, x[:0]).shape == (0, 64)
