"""The expert kernel's CPU fast paths for bfloat16 against PyTorch's plain matmuls: packed for oneDNN (bit-identical),
the decoding kernel's AVX2 and AVX512-BF16 paths for decoding rows and the upcast to float32 in blocks (the same
products, rounded once; sums in another order)."""

from __future__ import annotations

import logging
import platform

import pytest
import torch
import torch.nn as nn

from fiddler_moe.coordinator.cpu_linear import pack_linear_layers
from fiddler_moe.experts import compute
from fiddler_moe.native import kernels
from fiddler_moe.experts.compute import ExpertKernel, ExpertWeights, upcast_linear
from fiddler_moe.protocol.messages import KernelSpec


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


def assert_rounded_product(got: torch.Tensor, x, weight, bias=None, transposed=False) -> None:
    want = exact_bfloat16(x, weight, bias, transposed)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    same_sign = (got.sign() == want.sign()) & (want != 0)
    assert ulps_apart(got[same_sign], want[same_sign]) <= 1


AVX2_LINUX = (platform.system() == "Linux" and platform.machine() == "x86_64"
              and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


@pytest.mark.skipif(not AVX2_LINUX, reason="the decoding kernel is for x86-64 Linux CPUs with AVX2")
def test_gemv_kernel_is_bfloat16_linear():
    """Every row count it takes, a row count that is not a multiple of its 4-row blocks, bias, batch dimensions."""
    assert kernels.available(), "the AVX2 decoding kernel did not build (is a C compiler installed?)"
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(98, 160, generator=generator).bfloat16()  # 24 blocks of 4 rows and 2 rows over
    bias = torch.randn(98, generator=generator).bfloat16()
    for rows in range(1, kernels.MAX_ROWS + 1):
        x = torch.randn(rows, 160, generator=generator).bfloat16()
        assert kernels.applies(x, weight)
        for b in (None, bias):
            got = kernels.linear(x, weight, b)
            assert_rounded_product(got, x, weight, b)
            assert (got == nn.functional.linear(x, weight, b)).float().mean() > 0.95
    x = torch.randn(2, 3, 160, generator=generator).bfloat16()
    assert torch.equal(kernels.linear(x, weight), kernels.linear(x.reshape(6, 160), weight).view(2, 3, 98))
    # what it does not take: too many rows, a transposed view, a width that is not whole 16-element blocks
    assert not kernels.applies(torch.zeros(kernels.MAX_ROWS + 1, 160, dtype=torch.bfloat16), weight)
    assert not kernels.applies(torch.zeros(1, 98, dtype=torch.bfloat16), weight.t())
    assert not kernels.applies(torch.zeros(1, 40, dtype=torch.bfloat16), torch.zeros(8, 40, dtype=torch.bfloat16))


KERNEL_PATHS = [pytest.param(kernels.BF16_ISA_AVX2, id="avx2"),
                pytest.param(kernels.BF16_ISA_AVX512, id="avx512", marks=pytest.mark.skipif(
                    not compute.has_avx512_bfloat16(), reason="this CPU has no AVX512-BF16 instructions")),
                pytest.param(kernels.BF16_ISA_AMX, id="amx", marks=pytest.mark.skipif(
                    not (compute.has_avx512_bfloat16() and compute.has_amx()), reason="this CPU has no AMX tiles"))]


@pytest.mark.skipif(not AVX2_LINUX, reason="the decoding kernel is for x86-64 Linux CPUs with AVX2")
@pytest.mark.parametrize("isa", KERNEL_PATHS)
def test_each_path_of_the_decoding_kernel_is_bfloat16_linear(isa):
    """Each path asked for by name: 1 to MAX_ROWS rows and a few more (in groups), weight rows that are not whole
    4-row (or 64-row) blocks and odd counts, widths of whole 32-column vectors and with 16 columns over, on both
    sides of the AVX2 path's ROW_STREAM_COLS (1024: a row at a time up to it for 1-2 rows, four rows at a time past
    it for 1 row, else tiles of 2 weight rows by up to 4 activation rows), bias,
    activations not 4-byte aligned; within one bfloat16 step of the float64 product and mostly nn.Linear's bits. A
    path that does not exist is refused."""
    generator = torch.Generator().manual_seed(5)
    for out_features, in_features in ((98, 160), (37, 176), (1040, 1024), (45, 1056)):  # 1040: 2 threads' worth
        weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
        bias = torch.randn(out_features, generator=generator).bfloat16()
        for rows in (*range(1, kernels.MAX_ROWS + 1), 11):
            x = torch.randn(rows, in_features, generator=generator).bfloat16()
            for b in (None, bias):
                got = kernels.linear(x, weight, b, isa=isa)
                assert_rounded_product(got, x, weight, b)
                assert (got == nn.functional.linear(x, weight, b)).float().mean() > 0.95
    narrow = torch.randn(98, 160, generator=generator).bfloat16()
    shifted = torch.randn(1 + 3 * 160, generator=generator).bfloat16()[1:].view(3, 160)  # contiguous, 2 bytes off
    assert shifted.data_ptr() % 4 == 2
    assert_rounded_product(kernels.linear(shifted, narrow, isa=isa), shifted, narrow)
    with pytest.raises(ValueError, match="lacks the path"):
        kernels.linear(x, weight, isa=7)


@pytest.mark.skipif(not AVX2_LINUX, reason="the decoding kernel is for x86-64 Linux CPUs with AVX2")
@pytest.mark.parametrize("isa", KERNEL_PATHS)
def test_denormal_activations_move_a_result_by_less_than_their_size(isa):
    """vdpbf16ps (the AVX512-BF16 path) reads denormal inputs as zero and flushes denormal sums: results of ordinary
    size keep within one bfloat16 step, and a product of denormals alone is off by at most cols * 2^-126 * |w|."""
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(40, 160, generator=generator).bfloat16()
    x = torch.randn(3, 160, generator=generator).bfloat16()
    x[:, ::3] = torch.tensor(2.0**-130).bfloat16()  # a bfloat16 denormal
    assert_rounded_product(kernels.linear(x, weight, isa=isa), x, weight)
    tiny = torch.full((2, 160), 2.0**-130).bfloat16()
    got, exact = kernels.linear(tiny, weight, isa=isa).double(), tiny.double() @ weight.double().t()
    assert (got - exact).abs().max() <= 160 * 2.0**-126 * weight.double().abs().max()


@pytest.mark.skipif(not AVX2_LINUX, reason="the decoding kernel is for x86-64 Linux CPUs with AVX2")
def test_a_missing_or_failing_compiler_falls_back(tmp_path, monkeypatch, caplog):
    """(Building once and reusing the build: tests/test_native.py.)"""
    try:
        monkeypatch.setenv("FIDDLER_CACHE", str(tmp_path))
        monkeypatch.setenv("CC", "no-such-compiler")
        kernels.library.cache_clear()
        with caplog.at_level(logging.WARNING, logger="fiddler.kernels"):
            assert not kernels.available()
        assert "no C compiler found (install gcc or set CC)" in caplog.text
        x, weight = torch.ones(1, 16, dtype=torch.bfloat16), torch.ones(4, 16, dtype=torch.bfloat16)
        assert not kernels.applies(x, weight)
        assert compute.fast_linear(x, weight) is None  # callers keep PyTorch's kernel

        monkeypatch.setenv("CC", "false")  # a compiler that fails
        kernels.library.cache_clear()
        with caplog.at_level(logging.WARNING, logger="fiddler.kernels"):
            assert not kernels.available()
        assert f"building {', '.join(source.name for source in kernels.SOURCES)} failed" in caplog.text
        assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").iterdir())
    finally:
        kernels.library.cache_clear()


def test_kernel_and_linear_layers_follow_the_row_count(monkeypatch, avx2_bfloat16_path):
    """Up to kernels.MAX_ROWS rows the expert kernel (in one call for a gated SiLU expert) and the coordinator's
    nn.Linear take the AVX2 decoding kernel (where it builds; else PyTorch's bfloat16 product), from there on the
    float32 path."""
    spec = KernelSpec(activation="silu", dtype="bfloat16")
    generator = torch.Generator().manual_seed(1)
    gate_up = torch.randn(2 * 96, 64, generator=generator).bfloat16()
    down = torch.randn(64, 96, generator=generator).bfloat16()
    kernel = ExpertKernel(spec)
    kernel.pack = False
    calls = []
    monkeypatch.setattr(compute, "upcast_linear", lambda *a, **k: calls.append(a[0].shape[0]) or upcast_linear(*a, **k))
    decoding, linear, experts, silu_expert = [], kernels.linear, [], kernels.silu_expert
    monkeypatch.setattr(kernels, "linear", lambda *a, **k: decoding.append(a[0].shape[0]) or linear(*a, **k))
    monkeypatch.setattr(kernels, "silu_expert", lambda *a, **k: experts.append(a[0].shape[0]) or silu_expert(*a, **k))
    one = torch.randn(1, 64, generator=generator).bfloat16()
    h = nn.functional.linear(one, gate_up)
    want_one = nn.functional.linear(nn.functional.silu(h[:, :96]) * h[:, 96:], down)
    got_one = kernel.forward(ExpertWeights(gate_up, down), one)
    assert calls == [] and decoding == [] and experts == ([1] if kernels.available() else [])
    if kernels.available():  # the same function, rounded once per product
        assert (got_one - want_one).abs().max() <= 0.02 * want_one.abs().max()
    else:
        assert torch.equal(got_one, want_one)
    many = torch.randn(9, 64, generator=generator).bfloat16()
    assert kernel.forward(ExpertWeights(gate_up, down), many).shape == (9, 64) and calls == [9, 9]

    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8, bias=False)).bfloat16()
    want = [model(x) for x in (one, many)]
    assert pack_linear_layers(model) == 2
    decoding.clear()
    bound = kernels.BoundLinear.__call__  # the layers' decoding calls, bound once (`linear` with the checks made)

    def recorded(self, x):
        out = bound(self, x)
        if out is not None:
            decoding.append(x.shape[0])
        return out

    monkeypatch.setattr(kernels.BoundLinear, "__call__", recorded)
    assert (model(one) - want[0]).abs().max() <= 0.02 * want[0].abs().max()
    assert decoding == ([1, 1] if kernels.available() else [])
    assert model(many.view(3, 3, 64)).shape == (3, 3, 8) and len(calls) == 4
    assert (model(many) == want[1]).float().mean() > 0.9


def test_fused_silu_expert_activates_every_bfloat16_gate_as_pytorch_does(decoding_kernel_path):
    """The fused expert's SiLU (a table of every bfloat16 gate, native/bf16_gemv.c) times its up projection equals
    PyTorch's `silu(gate) * up` for every finite bfloat16 value: identity weights make gate = up = x and out = that
    product. Left out: results below float32's normal range, which the products flush to zero (documented), and past
    bfloat16's, where the identity's zeros times infinity make NaN."""
    width = 64
    gate_up = torch.cat([torch.eye(width), torch.eye(width)]).bfloat16()
    down = torch.eye(width).bfloat16()
    every = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    every = every[torch.isfinite(every.float())]
    compared = 0
    for start in range(0, every.numel(), kernels.MAX_ROWS * width):
        values = every[start:start + kernels.MAX_ROWS * width]
        x = torch.zeros(-(-values.numel() // width) * width, dtype=torch.bfloat16)
        x[: values.numel()] = values
        x = x.view(-1, width)
        got = kernels.silu_expert(x, gate_up, down, isa=compute.decoding_kernel())
        want = nn.functional.silu(x) * x
        size = want.float().abs()
        normal = torch.isfinite(size) & ((size >= torch.finfo(torch.float32).tiny) | (size == 0))
        assert torch.equal(got[normal], want[normal])
        compared += int(normal.sum())
    assert compared > 55000  # of 65280 finite values


@pytest.mark.skipif(not AVX2_LINUX, reason="the decoding kernel is for x86-64 Linux CPUs with AVX2")
@pytest.mark.parametrize("path", ["avx512", "amx"])
def test_avx512_paths_decode_through_the_kernel_and_batch_through_pytorch(monkeypatch, request, path):
    """FIDDLER_BF16_PATH=avx512 or amx: up to MAX_ROWS rows an expert and the coordinator's nn.Linear take that
    kernel on their dense weights (nothing packed beside them); more rows take PyTorch's own linear, bit for bit."""
    from fiddler_moe.coordinator import cpu_linear

    request.getfixturevalue(f"{path}_bfloat16_path")
    isa = kernels.BF16_ISA_AMX if path == "amx" else kernels.BF16_ISA_AVX512
    assert compute.decoding_kernel() == isa
    generator = torch.Generator().manual_seed(7)
    weights = ExpertWeights(torch.randn(2 * 96, 64, generator=generator).bfloat16(),
                            torch.randn(64, 96, generator=generator).bfloat16())
    kernel = ExpertKernel(KernelSpec(activation="silu", dtype="bfloat16"))
    assert kernel.fused_silu and kernel.bf16_isa == isa and not kernel.pack
    paths, silu_expert = [], kernels.silu_expert
    monkeypatch.setattr(kernels, "silu_expert", lambda *a, **k: paths.append(k["isa"]) or silu_expert(*a, **k))
    monkeypatch.setattr(compute, "upcast_linear", None)  # never taken on this path
    one, many = (torch.randn(n, 64, generator=generator).bfloat16() for n in (1, 9))
    kernel.forward(weights, one)
    assert paths == [isa] and not weights.packed
    h = nn.functional.linear(many, weights.gate_up)
    want = nn.functional.linear(nn.functional.silu(h[:, :96]) * h[:, 96:], weights.down)
    assert torch.equal(kernel.forward(weights, many), want) and paths == [isa]

    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8, bias=False)).bfloat16()
    want = [model(x) for x in (one, many)]
    assert cpu_linear.pack_linear_layers(model) == 2
    assert all(m.bf16_isa == isa and m.weight.device.type == "cpu" for m in model)
    decoding, linear = [], kernels.linear
    monkeypatch.setattr(kernels, "linear", lambda *a, **k: decoding.append(k["isa"]) or linear(*a, **k))
    assert_rounded_product(model[0](one), one, model[0].weight, model[0].bias)
    assert (model(one) - want[0]).abs().max() <= 0.02 * want[0].abs().max()
    assert decoding == [isa] * 3
    assert torch.equal(model(many), want[1]) and len(decoding) == 3


@pytest.mark.skipif(not AVX2_LINUX, reason="the decoding kernel is for x86-64 Linux CPUs with AVX2")
def test_fused_silu_expert_is_the_two_products(decoding_kernel_path):
    """One call per gated SiLU expert gives the bits of the two products with PyTorch's activation and product
    between them, for every row count it takes, into a given output too, on each path; experts it does not take
    (biases, another activation) keep the two products."""
    generator = torch.Generator().manual_seed(3)
    weights = ExpertWeights((torch.randn(2 * 96, 64, generator=generator) * 0.2).bfloat16(),
                            (torch.randn(64, 96, generator=generator) * 0.2).bfloat16())
    fused = ExpertKernel(KernelSpec(activation="silu", dtype="bfloat16"))
    assert fused.fused_silu and kernels.available()
    two_products = ExpertKernel(KernelSpec(activation="silu", dtype="bfloat16"))
    two_products.fused_silu = False
    for rows in range(1, kernels.MAX_ROWS + 1):
        x = (torch.randn(rows, 64, generator=generator) * 3).bfloat16()
        want = two_products.forward(weights, x)
        assert torch.equal(fused.forward(weights, x), want)
        out = torch.full((rows + 2, 64), 7.0, dtype=torch.bfloat16)
        fused.forward(weights, x, out[1 : rows + 1])
        assert torch.equal(out[1 : rows + 1], want) and (out[0] == 7).all() and (out[-1] == 7).all()
    assert not ExpertKernel(KernelSpec(activation="gelu", dtype="bfloat16")).fused_silu
    assert not ExpertKernel(KernelSpec(activation="silu", dtype="bfloat16", has_bias=True)).fused_silu
    assert not ExpertKernel(KernelSpec(activation="silu", dtype="float32")).fused_silu


@pytest.mark.skipif(not kernels.available(), reason="the bfloat16 kernel library is not built on this machine")
def test_combine_and_gather_are_the_tensor_ops():
    """A decoding step's gather into the request slot and its weighted sum over top-k, without tensor ops: the
    bits of the ops the dispatcher uses for larger calls (transformers' grouped_mm combine), for float32 weights
    (Mixtral's router) and bfloat16 ones, top-k 1 to 8."""
    from fiddler_moe.coordinator.dispatch import _combine

    generator = torch.Generator().manual_seed(5)
    for top_k in (1, 2, 4, 8):
        for weight_dtype in (torch.float32, torch.bfloat16):
            for tokens in (1, 3):
                pairs = tokens * top_k
                outputs = (torch.randn(pairs, 48, generator=generator) * 4).bfloat16()
                order = torch.randperm(pairs, generator=generator)
                weights = torch.rand(tokens, top_k, generator=generator).to(weight_dtype)
                tensor_ops = _combine(outputs, order, weights).to(torch.bfloat16)  # a tensor order: the ops
                assert torch.equal(_combine(outputs, order.tolist(), weights), tensor_ops)
    hidden = torch.randn(5, 32, generator=generator).bfloat16()
    out = torch.empty(4, 32, dtype=torch.bfloat16)
    kernels.gather_rows(hidden, [3, 0, 3, 4], out)
    assert torch.equal(out, hidden[[3, 0, 3, 4]])


@pytest.mark.skipif(not kernels.available(), reason="the bfloat16 kernel library is not built on this machine")
def test_parked_wait_returns_when_the_word_changes_or_the_time_is_up():
    """The wait that sends this process's OpenMP threads to sleep: it returns when another thread (another
    process, in the cluster) changes the word, and at its timeout when nobody does; PyTorch's thread team works
    as before afterwards."""
    import ctypes
    import threading
    import time

    x, weight = torch.randn(3, 64).bfloat16(), torch.randn(128, 64).bfloat16()
    before = kernels.linear(x, weight)
    word = ctypes.c_uint32(7)
    changer = threading.Timer(0.05, lambda: setattr(word, "value", 8))
    changer.start()
    deadline = time.monotonic() + 10
    while word.value == 7 and time.monotonic() < deadline:  # the caller's loop, as ShmChannel._wait has it
        kernels.parked_wait(ctypes.addressof(word), 7, 1.0)
    changer.join()
    assert word.value == 8
    started = time.monotonic()
    kernels.parked_wait(ctypes.addressof(word), 8, 0.02)  # nobody changes it: back after the timeout
    assert word.value == 8 and time.monotonic() - started >= 0.015
    assert torch.equal(kernels.linear(x, weight), before)  # the thread team answers as before


@pytest.mark.skipif(not kernels.available(), reason="the bfloat16 kernel library is not built on this machine")
def test_parked_watch_sees_a_change_while_watching_and_sleeps_after():
    """A worker's wait between two layers of a decoding step: a change during the watch is seen without
    sleeping (the changer, a plain store with no futex wake, could not wake a sleeper: only the watch sees it);
    with nothing changing it watches, then sleeps until the timeout."""
    import ctypes
    import threading
    import time

    word = ctypes.c_uint32(3)
    changer = threading.Timer(0.02, lambda: setattr(word, "value", 4))
    changer.start()
    started = time.monotonic()
    kernels.parked_wait(ctypes.addressof(word), 3, 5.0, watch_s=2.0)
    changer.join()
    assert word.value == 4 and time.monotonic() - started < 1.0, "seen while watching, not after the timeout"
    started = time.monotonic()
    kernels.parked_wait(ctypes.addressof(word), 4, 0.02, watch_s=0.01)  # nobody changes it: watch, then sleep
    assert time.monotonic() - started >= 0.025


def test_packed_bfloat16_kernel_matches_plain(onednn_bfloat16_path):
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


@pytest.mark.parametrize("avx512, amx, onednn, chosen", [(True, True, True, "amx"), (True, False, True, "onednn"),
                                                         (False, False, True, "onednn"), (False, False, False, "avx2")])
def test_auto_takes_the_amx_kernel_where_the_cpu_has_amx(monkeypatch, avx512, amx, onednn, chosen):
    """auto: the AMX kernel where oneDNN's AMX products prefill from dense weights as fast as from packed ones;
    oneDNN's packed weights on other CPUs with its bfloat16 support; else AVX2."""
    monkeypatch.delenv("FIDDLER_BF16_PATH", raising=False)
    monkeypatch.delenv("FIDDLER_PACK_WEIGHTS", raising=False)
    monkeypatch.setattr(compute, "has_avx512_bfloat16", lambda: avx512)
    monkeypatch.setattr(compute, "has_amx", lambda: amx)
    monkeypatch.setattr(compute, "_onednn_bfloat16", lambda: onednn)
    assert compute.bfloat16_path() == chosen


def test_a_bfloat16_path_this_cpu_lacks_is_refused_with_what_to_use(monkeypatch):
    monkeypatch.setattr(compute, "has_avx512_bfloat16", lambda: False)
    monkeypatch.setenv("FIDDLER_BF16_PATH", "avx512")
    with pytest.raises(ValueError, match="no AVX512-BF16 instructions; use auto or avx2"):
        compute.bfloat16_path()
    monkeypatch.setattr(compute, "has_avx512_bfloat16", lambda: True)
    monkeypatch.setattr(compute, "has_amx", lambda: False)
    monkeypatch.setenv("FIDDLER_BF16_PATH", "amx")
    with pytest.raises(ValueError, match="no AMX tiles; use auto or avx512"):
        compute.bfloat16_path()
    monkeypatch.setenv("FIDDLER_BF16_PATH", "avx1024")
    with pytest.raises(ValueError, match="use one of auto, onednn, amx, avx512, avx2, off"):
        compute.bfloat16_path()
