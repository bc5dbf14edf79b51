"""Quantized expert weights: the formats round-trip within their step, the activations are quantized per block the
same way by Python and C, and every product computed with them (the C kernels on each path for any row count, the
fused expert, the Python path without the library, the worker's C loop) is the exact product of the quantized
activations and weights, both dequantized, computed in float64, to within float32 arithmetic and the final
rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fiddler_moe.experts import quant
from fiddler_moe.experts.compute import ExpertKernel
from fiddler_moe.native import kernels, limits
from fiddler_moe.protocol.messages import KernelSpec

FORMATS = list(quant.FORMATS)
needs_library = pytest.mark.skipif(not kernels.available(), reason="the kernel library is not built on this machine")


def paths() -> list[int]:
    """The C paths of quant_gemv.c this CPU has: plain always, AVX2 and AVX-512 where present."""
    best = kernels.library().fiddler_quant_isa() if kernels.available() else 0
    return [isa for isa in (limits.QUANT_ISA_PLAIN, limits.QUANT_ISA_AVX2, limits.QUANT_ISA_AVX512) if isa <= best]


def weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Weights with rows of very different sizes, a block of zeros and a block of tiny values, as real layers
    have."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=generator) * torch.logspace(-3, 0, rows).unsqueeze(1) * 0.1
    w[0, :32] = 0
    w[1, 32:64] *= 1e-4
    return w


def float32_bound(x: torch.Tensor, m: quant.QuantMatrix) -> torch.Tensor:
    """What the kernels' float32 arithmetic may lose, at most: (cols + 3) * 2^-24 * sum |xq| |wq| over the
    quantized activations xq and weights wq. Each block's integer dot product is exact; its product with the two
    scales rounds twice, and float32 sums of at most cols terms in any order round cols times."""
    xq = quant.dequantize_activations(*quant.quantize_activations(x))
    return (m.cols + 3) * 2.0**-24 * (xq.abs() @ quant.dequantize(m, torch.float64).abs().t())


def assert_exact_product(got: torch.Tensor, x: torch.Tensor, m: quant.QuantMatrix) -> None:
    """got is x quantized per block @ dequantize(m).T within float32 arithmetic, rounded once to got's dtype."""
    want = quant.reference_linear(x, m)
    bound = float32_bound(x, m)
    assert got.shape == want.shape
    if got.dtype == torch.float32:
        assert ((got.double() - want).abs() <= bound + 1e-30).all()
    else:  # bfloat16: the float32 result rounded to nearest, so within half a step of it
        step = 2.0 ** (torch.floor(torch.log2(want.abs().clamp(min=1e-30))) - 7)
        assert ((got.double() - want).abs() <= step / 2 + bound).all()


# --- the formats ---


@pytest.mark.parametrize("name", FORMATS)
def test_quantizing_and_dequantizing_stays_within_one_step_of_each_block(name):
    w = weights(64, 256, seed=1)
    m = quant.quantize(w, name)
    m.check()
    fmt = quant.FORMATS[name]
    assert m.q.dtype == fmt.codes_dtype and tuple(m.q.shape) == fmt.codes_shape(64, 256)
    assert m.scale.dtype == torch.float16 and tuple(m.scale.shape) == (64, 256 // 32)
    assert m.nbytes == fmt.nbytes(64, 256) == 64 * 256 * fmt.bits // 8 + 64 * 8 * 2
    back = quant.dequantize(m)
    assert torch.equal(back.double(), quant.dequantize(m, torch.float64))  # exact in float32
    d = m.scale.float().abs().repeat_interleave(32, dim=1)
    error = (back - w).abs()
    codes = quant.codes(m)
    if name == "int8":
        assert codes.abs().max() <= 127
        assert (error <= d / 2 * (1 + 2**-10) + 1e-12).all()
    else:  # Q4_0: codes -8..7; the block's largest magnitude is -8 d, a value of the other sign up to 8 d clamps to 7
        assert codes.min() >= -8 and codes.max() <= 7
        clamped = codes == 7
        assert (error[~clamped] <= d[~clamped] / 2 * (1 + 2**-10) + 1e-12).all()
        assert (error <= d * (1 + 2**-10) + 1e-12).all()
    assert (back[0, :32] == 0).all() and (m.scale[0, 0] == 0)  # a block of zeros stays zeros
    assert (m.scale[1, 1] != 0) and (error[1, 32:64] <= 2.0**-25 * (1 + 2**-10)).all()  # below float16's range


@pytest.mark.parametrize("name, bound", [("int8", 0.006), ("int4", 0.09)])
def test_round_trip_error_on_normal_weights_is_what_the_format_promises(name, bound):
    """Relative RMS error on normally distributed weights: 0.54% for int8, 8.6% for int4 (docs/performance-log.md)."""
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(2)) * 0.02
    error = (quant.dequantize(quant.quantize(w, name)) - w).norm() / w.norm()
    assert error < bound


def test_the_block_layout_is_llama_cpps():
    """int8: w = d * q; int4: byte j holds weight j (low bits) and weight j + 16 (high bits), w = d * (q - 8), and
    the block's weight of largest magnitude is code -8."""
    w = torch.arange(-16, 16, dtype=torch.float32).unsqueeze(0) / 8  # -2 .. 1.875
    m8 = quant.quantize(w, "int8")
    nearest = torch.tensor(2 / 127).half()
    assert nearest.float() * 127 < 2  # rounded to nearest, -2 would clip: the scale is the next float16 up
    next_up = (nearest.view(torch.int16) + 1).view(torch.float16)  # float16 bits count up with the value
    assert m8.scale.item() == next_up.item() > nearest.item()
    assert m8.q[0, 0] == -127 and m8.q[0, 16] == 0
    m4 = quant.quantize(w, "int4")
    assert m4.scale.item() == torch.tensor(-2 / -8).half().item() == 0.25
    assert (m4.q[0, 0] & 15) == 0 and (m4.q[0, 0] >> 4) == 8  # weights 0 (-2 -> code -8) and 16 (0 -> code 0)
    assert torch.equal(quant.codes(m4)[0], torch.round(w[0] / 0.25).clamp(-8, 7).int())


def test_shapes_the_formats_cannot_cut_are_refused_with_the_fix():
    for name in FORMATS:
        with pytest.raises(ValueError, match="multiple of 32.*--quantize none"):
            quant.quantize(torch.randn(4, 40), name)
    with pytest.raises(ValueError, match="--quantize must be one of none, int8, int4"):
        quant.check_format("q4_k")
    with pytest.raises(ValueError, match="NaN or infinity"):
        quant.quantize(torch.full((2, 32), float("inf")), "int8")


# --- the kernels ---


@needs_library
@pytest.mark.parametrize("name", FORMATS)
def test_the_c_quantizer_gives_the_bits_of_the_reference(name):
    """native/quantize.c against quantize_reference, float32 and bfloat16 weights: rows from 1e-9 to 1e3 (scales
    below float16's normal range), a block of zeros, largest weights of either sign, a tie of magnitudes (the first
    counts), values halfway between codes, and scales moved one float16 step up so as not to clip."""
    generator = torch.Generator().manual_seed(14)
    w = torch.randn(64, 256, generator=generator) * torch.logspace(-9, 3, 64).unsqueeze(1)
    w[0, :32] = 0
    w[1, :32] = torch.arange(-16, 16) / 8
    w[2, :32] = torch.arange(16, -16, -1) / 8
    w[3, 32:64] = 1.0
    w[3, 40] = -1.0
    w[4, :32] = torch.arange(32) * 0.5
    w[5, :32] = 2.0**-20
    for dtype in (torch.float32, torch.bfloat16):
        got, want = quant.quantize(w.to(dtype), name), quant.quantize_reference(w.to(dtype), name)
        assert torch.equal(got.q, want.q) and torch.equal(got.scale.view(torch.int16), want.scale.view(torch.int16))
    assert torch.equal(quant.quantize(w.t().contiguous().t(), name).q, quant.quantize_reference(w, name).q)
    for bad in (float("nan"), float("inf")):
        w[7, 5] = bad
        with pytest.raises(ValueError, match="NaN or infinity"):
            quant.quantize(w, name)


@needs_library
def test_the_activations_are_quantized_alike_in_python_and_c():
    """Bit for bit on every path: bfloat16 and float32 rows, a block of zeros, a block whose values fall halfway
    between codes (halves to even), tiny and large values."""
    generator = torch.Generator().manual_seed(13)
    x = torch.randn(5, 32 * 9, generator=generator) * torch.logspace(-6, 3, 5).unsqueeze(1)
    x[0, :32] = 0
    x[1, 32:64] = torch.arange(-15.5, 16.5)  # amax 15.5 ... scaled to codes: some land on .5 steps
    x[2, 64:96] = torch.linspace(-127, 127, 32).round() / 2  # dx = 0.5: every odd code is a half
    q, d = quant.quantize_activations(x)
    assert q.dtype == torch.int8 and d.dtype == torch.float32 and q.abs().max() == 127
    assert (q[0, :32] == 0).all() and d[0, 0] == 0
    assert (quant.dequantize_activations(q, d) - x.double()).abs().max(dim=1).values.le(d.double().amax(1) / 2).all()
    for dtype in (torch.float32, torch.bfloat16):
        want = quant.quantize_activations(x.to(dtype))
        for isa in paths():
            got = kernels.quant_activations(x.to(dtype), isa=isa)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_library
@pytest.mark.parametrize("name", FORMATS)
def test_every_kernel_path_is_the_exact_product_for_any_row_count(name):
    """Decoding (1 to MAX_ROWS rows) and prefill row counts (whole and partial tiles of 6 rows), bfloat16 and
    float32 activations, each C path this CPU has, weight row counts that are not a whole number of the threads'
    pieces of 32 rows (a last piece of one partial panel of 16 rows, or a whole and a partial one), and rows of 5,
    18, 23 and 37 blocks: the AVX-512 decoding path takes a row's scales 16 blocks at a time and its codes 2 (int8)
    or 4 (int4) blocks at a time, so these end in a part of 16 and in 1, 2 and 3 blocks of a step."""
    generator = torch.Generator().manual_seed(4)
    for out_rows, cols in ((98, 160), (116, 32 * 37), (24, 32 * 18), (24, 32 * 23)):
        m = quant.quantize(weights(out_rows, cols, seed=3), name)
        for isa in paths():
            for dtype in (torch.float32, torch.bfloat16):
                for rows in [*range(1, limits.MAX_ROWS + 1), 9, 16, 33, 70]:
                    x = torch.randn(rows, cols, generator=generator).to(dtype)
                    got = kernels.quant_linear(m.code, m.q, m.scale, x, isa=isa)
                    assert got.dtype == dtype
                    assert_exact_product(got, x, m)


@needs_library
def test_the_kernels_refuse_what_they_do_not_take():
    m = quant.quantize(weights(8, 64, seed=5), "int8")
    lib = kernels.library()
    x = torch.randn(1, 64)
    out = torch.empty(1, 8)
    for fmt, cols, n, isa in [(7, 64, 1, 0), (limits.QUANT_INT8, 40, 1, 0), (limits.QUANT_INT8, 64, -1, 0),
                              (limits.QUANT_INT8, 64, 1, 99)]:
        assert lib.fiddler_quant_linear(fmt, m.q.data_ptr(), m.scale.data_ptr(), 8, cols, x.data_ptr(), 0, n,
                                        out.data_ptr(), isa) == -2
    with pytest.raises(ValueError, match="does not take"):
        kernels.quant_linear(7, m.q, m.scale, x)
    assert kernels.quant_applies(torch.randn(limits.MAX_ROWS + 1, 64), 64)
    assert not kernels.quant_applies(torch.randn(0, 64), 64)
    assert not kernels.quant_applies(torch.randn(1, 64).half(), 64)
    assert not kernels.quant_applies(torch.randn(1, 32), 64)


@pytest.mark.parametrize("name", FORMATS)
def test_the_python_path_is_the_exact_product(name, monkeypatch):
    """Without the kernel library: float32 tiles of dequantized weights (several, the last partial) times the
    quantized activations with torch.mm, for decoding and prefill row counts."""
    monkeypatch.setattr(quant, "TILE", 1000)
    monkeypatch.setattr(kernels, "available", lambda: False)
    m = quant.quantize(weights(98, 160, seed=6), name)
    generator = torch.Generator().manual_seed(7)
    for rows in (1, limits.MAX_ROWS + 1, 70):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, 160, generator=generator).to(dtype)
            got = quant.linear(x, m)
            assert got.dtype == dtype and got.is_contiguous()
            assert_exact_product(got, x, m)


def quantized_expert(name: str, hidden: int, inter: int, seed: int) -> quant.QuantizedExpertWeights:
    return quant.QuantizedExpertWeights(quant.quantize(weights(2 * inter, hidden, seed) * 4, name),
                                        quant.quantize(weights(hidden, inter, seed + 1) * 4, name))


def reference_expert(x: torch.Tensor, w: quant.QuantizedExpertWeights) -> torch.Tensor:
    """The gated SiLU expert with the dequantized weights, each product exact in float64 (`reference_linear`), the
    activation between them computed in x's dtype as the kernels compute it, since the down product quantizes it."""
    h = quant.reference_linear(x, w.gate_up).to(x.dtype)
    gate, up = h.chunk(2, dim=-1)
    return quant.reference_linear(nn.functional.silu(gate) * up, w.down)


@needs_library
def test_the_fused_experts_activation_has_pytorchs_bits():
    """silu(gate) * up between the fused expert's products equals PyTorch's on each path: for every bfloat16 gate
    (up = 1, so the product is the activation itself) and for random float32 rows."""
    lib = kernels.library()
    gate = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    gate = gate[~gate.isnan()][:(1 << 16) - 512]  # a whole number of 32-column blocks
    h = torch.cat([gate.float(), torch.ones(gate.numel())]).view(1, -1)
    x = torch.randn(3, 2 * 256, generator=torch.Generator().manual_seed(14)) * 4
    for isa in paths():
        got = torch.empty(1, gate.numel())
        assert lib.fiddler_silu_product(h.data_ptr(), 1, gate.numel(), 1, got.data_ptr(), isa) == 0
        assert torch.equal(got[0], nn.functional.silu(gate).float())
        got = torch.empty(3, 256)
        assert lib.fiddler_silu_product(x.data_ptr(), 3, 256, 0, got.data_ptr(), isa) == 0
        assert torch.allclose(got, nn.functional.silu(x[:, :256]) * x[:, 256:], rtol=1e-6, atol=0)


@needs_library
@pytest.mark.parametrize("name", FORMATS)
def test_fused_expert_is_the_two_products(name):
    """One call per expert (what the worker's C loop calls) gives the two products with PyTorch's activation and
    product between them: the bits in bfloat16, within a float32 step in float32; and both are the float64
    expert to within their rounding."""
    w = quantized_expert(name, 64, 96, seed=8)
    kernel = ExpertKernel(KernelSpec(activation="silu", dtype="bfloat16"))
    assert kernel.fused_silu_quantized
    generator = torch.Generator().manual_seed(9)
    for dtype, tolerance in ((torch.bfloat16, 0.02), (torch.float32, 1e-5)):
        for isa in paths():
            for rows in [*range(1, limits.MAX_ROWS + 1), 20]:
                x = (torch.randn(rows, 64, generator=generator) * 3).to(dtype)
                fused = kernels.quant_silu_expert(w.gate_up.code, (w.gate_up.q, w.gate_up.scale),
                                                  (w.down.q, w.down.scale), x, isa=isa)
                h = kernels.quant_linear(w.gate_up.code, w.gate_up.q, w.gate_up.scale, x, isa=isa)
                two = kernels.quant_linear(w.down.code, w.down.q, w.down.scale,
                                           nn.functional.silu(h[:, :96]) * h[:, 96:], isa=isa)
                if dtype == torch.bfloat16:
                    assert torch.equal(fused, two)
                else:
                    assert ((fused - two).abs() <= 1e-6 * two.abs().max()).all()
                want = reference_expert(x, w)
                assert (fused.double() - want).abs().max() <= tolerance * want.abs().max()
        out = torch.full((4, 64), 7.0, dtype=dtype)
        x = torch.randn(2, 64, generator=generator).to(dtype)
        kernel.forward(w, x, out[1:3])  # into a slice of a reply, as the worker's Python path writes
        assert torch.equal(out[1:3], kernel.forward(w, x)) and (out[0] == 7).all() and (out[3] == 7).all()


@pytest.mark.parametrize("name", FORMATS)
def test_expert_kernel_computes_quantized_experts_for_any_row_count(name):
    """ExpertKernel.forward with quantized weights: decoding rows (the fused kernel), prefill rows (tiles), no
    rows, and experts the fused kernel does not take (biases, another activation) through the two products."""
    w = quantized_expert(name, 64, 96, seed=10)
    generator = torch.Generator().manual_seed(11)
    for dtype in ("float32", "bfloat16"):
        kernel = ExpertKernel(KernelSpec(activation="silu", dtype=dtype))
        for rows in (1, 5, limits.MAX_ROWS + 1, 40):
            x = torch.randn(rows, 64, generator=generator)
            got = kernel.forward(w, x)
            assert got.dtype == getattr(torch, dtype) and got.shape == (rows, 64)
            want = reference_expert(x.to(got.dtype), w)
            assert (got.double() - want).abs().max() <= (0.02 if dtype == "bfloat16" else 1e-5) * want.abs().max()
        assert kernel.forward(w, x[:0]).shape == (0, 64)
    biased = quant.QuantizedExpertWeights(w.gate_up, w.down, torch.randn(192, generator=generator),
                                          torch.randn(64, generator=generator))
    gelu = ExpertKernel(KernelSpec(activation="gelu", has_bias=True, dtype="float32"))
    x = torch.randn(3, 64, generator=generator)
    h = (quant.reference_linear(x, w.gate_up) + biased.gate_up_bias.double()).float()
    gate, up = h.chunk(2, dim=-1)
    want = quant.reference_linear(nn.functional.gelu(gate) * up, w.down) + biased.down_bias.double()
    got = gelu.forward(biased, x)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


@needs_library
@pytest.mark.parametrize("name", FORMATS)
def test_the_workers_c_loop_serves_quantized_experts_as_python_does(name):
    """A quantized shard in the worker's C loop over the slot (shm_serve.c): bfloat16 decoding requests get the
    bits of the Python path; float32 rows and other shards' experts are left in the slot for Python."""
    from fiddler_moe.native.shm_serve import ShmServeLoop
    from fiddler_moe.protocol import messages as m
    from fiddler_moe.protocol.shm import ShmChannel
    from fiddler_moe.protocol.wire import decode, encode_header

    shard = {(layer, expert): quantized_expert(name, 64, 96, seed=20 + 2 * expert + layer)
             for layer in (0, 1) for expert in (0, 2, 3)}
    kernel = ExpertKernel(KernelSpec(activation="silu", dtype="bfloat16"))
    coordinator = ShmChannel.create(capacity=1 << 16)
    worker = ShmChannel.attach(coordinator.path, 1 << 16)
    coordinator.unlink()
    worker.spin = False
    try:
        loop = ShmServeLoop.build(worker, shard, kernel)
        assert loop is not None and loop.format == quant.FORMATS[name].code
        assert ShmServeLoop.build(worker, shard, ExpertKernel(KernelSpec(activation="silu", dtype="float32"))) is None

        def post(request):
            coordinator.request_view(request.rows.dtype, tuple(request.rows.shape)).copy_(request.rows)
            return coordinator.post_request(encode_header(request), request.rows.numel() * request.rows.element_size())

        generator = torch.Generator().manual_seed(12)
        rows = (torch.randn(4, 64, generator=generator) * 2).bfloat16()
        seq = post(m.ExpertRequest(request_id=7, layer=1, expert_ids=[3, 0, 2], row_counts=[1, 0, 3], rows=rows))
        assert loop.serve(timeout_s=0.01) == 1 and worker.last_request_seq == seq
        reply = decode(coordinator.wait_reply(seq, timeout_s=1))
        want = torch.cat([kernel.forward(shard[(1, 3)], rows[:1]), kernel.forward(shard[(1, 2)], rows[1:])])
        assert torch.equal(reply.outputs, want)
        for request in (m.ExpertRequest(1, 0, [1], [1], rows[:1]), m.ExpertRequest(1, 0, [0], [1], rows[:1].float())):
            seq = post(request)
            assert loop.serve(timeout_s=0.01) == 0
            assert worker.wait_request(timeout_s=0)[0] == seq  # still there for Python
    finally:
        worker.close()
        coordinator.close()
