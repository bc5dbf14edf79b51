"""The expert function: the same arithmetic transformers' experts modules perform for one expert.

Used by the workers for cold experts and by the coordinator for hot experts, so a token gets the same result
wherever its expert runs. Layout follows transformers' fused experts: gate_up is [2 * intermediate, hidden] with
the gate half first (or [hidden, 2 * intermediate] when transposed), down is [hidden, intermediate].

Speed: decoding reads every routed expert's weights once per token with one row of activations, so the matmuls
are memory-bound matrix-vector products. Three CPU fast paths for bfloat16, chosen by what the CPU has:

- With oneDNN's bfloat16 support (AVX512-BF16 or AMX), PyTorch's plain `linear` falls well short of the memory
  bandwidth; the same oneDNN matmul on weights reordered once into its blocked layout reaches it
  (docs/performance-log.md). So the first forward of an expert on such a CPU re-lays its weights out in place
  (`ExpertWeights.pack`: a private copy replaces the dense tensors, bit-identical results). Weights marked `shared`
  (memory another process maps too) are left alone, since the copy would double them.
- On CPUs with AVX512-BF16 (`avx512`; `amx` with AMX tiles too, the default there: see `bfloat16_path`), the
  weights stay dense and decoding rows (up to `kernels.MAX_ROWS`) go through our own C kernel (vdpbf16ps on the
  bfloat16 pairs as they are, or AMX tile products): a gated SiLU expert in one call, so the worker's C serving loop
  (native/shm_serve.py) answers decoding requests without Python. More rows (prefill) take PyTorch's own `linear`,
  which runs oneDNN on the dense weights: with AMX as fast as on packed ones, without it (Zen 5) a 64-row expert
  1.2x the packed time (against 4x for the float32 upcast); bit for bit transformers' own.
- Without it (AVX2 CPUs: most desktops and laptops, AMD before Zen 4), PyTorch's bfloat16 matmul is a loop of
  matrix-vector products, so a 128-row prefill batch takes 128 times one row. Up to `kernels.MAX_ROWS` rows
  (decoding) a small AVX2 kernel of our own streams the weights once for all rows, faster than PyTorch's for one
  row (native/kernels.py, its AVX2 path); beyond them (from `UPCAST_ROWS` rows on where that kernel cannot be built),
  `upcast_linear` converts the weights to float32 a cache-sized block at a time and multiplies in float32, several
  times faster for a prefill batch. Both round once to bfloat16 as PyTorch's own kernel does. Measurements:
  docs/performance-log.md.

FIDDLER_BF16_PATH chooses one (`bfloat16_path`); FIDDLER_PACK_WEIGHTS=0 turns all of them off. float32 weights
are left as they are (the exactness tests compare them with transformers to 1e-5), and so is anything on a GPU.

Quantized experts (a worker's shard with --quantize int8 or int4: experts/quant.py's QuantizedExpertWeights) take
experts/quant.py's products: the fused C kernel for a gated SiLU expert without biases (any number of rows), else
one product at a time, with the activation between them computed here in the compute dtype as for float weights.
A quantized expert moved to another device is computed there dequantized (quant.DequantizedExpertWeights), its
products quantizing their inputs alike.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fiddler_moe.experts import quant
from fiddler_moe.native import kernels
from fiddler_moe.protocol.messages import KernelSpec
from fiddler_moe.protocol.wire import parse_dtype


def _onednn_bfloat16() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def has_avx512_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 pairs natively (AVX512-BF16: Intel from Cooper Lake, AMD from Zen 4)."""
    try:
        return torch.cpu._is_avx512_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


def has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel from Sapphire Rapids), which oneDNN's bfloat16 products use."""
    try:
        return torch.cpu._is_amx_tile_supported()
    except (AttributeError, RuntimeError):
        return False


BFLOAT16_PATHS = ("auto", "onednn", "amx", "avx512", "avx2", "off")


def _auto_path() -> str:
    return "amx" if has_avx512_bfloat16() and has_amx() else "onednn" if _onednn_bfloat16() else "avx2"


def bfloat16_path() -> str:
    """The CPU bfloat16 path this process takes: FIDDLER_BF16_PATH (auto, onednn, amx, avx512, avx2 or off), or off
    with FIDDLER_PACK_WEIGHTS=0. `avx2` runs on any AVX2 CPU, also one with oneDNN bfloat16 support, to compare or to
    use the C hand-over paths there; `avx512` on CPUs with AVX512-BF16, `amx` on those with AMX tiles too (the same
    kernel, its products on the tiles: native/bf16_gemv.c). auto picks amx where the CPU has AMX, else oneDNN where
    the CPU has its bfloat16 support, else avx2 (docs/performance-log.md has each measurement):
    - With AMX (a Xeon, 2026-12-02), our kernel decodes faster than oneDNN's packed weights (a mini cluster's decode
      token 0.78x the time in paired turns with avx512; amx the same for one row, and 8 rows at about the cost of
      one) and prefills as fast (a 256-token prompt 234 against 233 ms): oneDNN's AMX products read dense weights as
      fast as packed ones. amx's products are oneDNN's bits there (avx512's are not, nor are packed oneDNN weights
      against transformers' own calls: AMX sums in another order at each batch size).
    - Without AMX (Zen 5, 2026-12-02), avx512 decodes faster too (0.70x the time a token) but prefills slower
      (PyTorch's linear on dense weights: the bench's prefill 0.83-0.94x, one expert at 64 rows 1.2x the time),
      and oneDNN's packed products are transformers' own bits; so auto keeps oneDNN there.
    avx2 is the slower of the two on both sides on such CPUs."""
    chosen = os.environ.get("FIDDLER_BF16_PATH", "auto").strip().lower() or "auto"
    if chosen not in BFLOAT16_PATHS:
        raise ValueError(f"FIDDLER_BF16_PATH={chosen!r}: use one of {', '.join(BFLOAT16_PATHS)}")
    if os.environ.get("FIDDLER_PACK_WEIGHTS", "1") == "0":
        return "off"
    if chosen == "auto":
        return _auto_path()
    if chosen == "onednn" and not _onednn_bfloat16():
        raise ValueError("FIDDLER_BF16_PATH=onednn: this CPU (or this PyTorch build) has no oneDNN bfloat16 "
                         "support; use auto or avx2")
    if chosen in ("avx512", "amx") and not has_avx512_bfloat16():
        raise ValueError(f"FIDDLER_BF16_PATH={chosen}: this CPU has no AVX512-BF16 instructions; use auto or avx2")
    if chosen == "amx" and not has_amx():
        raise ValueError("FIDDLER_BF16_PATH=amx: this CPU has no AMX tiles; use auto or avx512")
    return chosen


try:
    _PATH = bfloat16_path()
    BFLOAT16_PATH_ERROR = ""
except ValueError as e:  # importing must not fail: a cluster's start reports it (check_bfloat16_path)
    _PATH, BFLOAT16_PATH_ERROR = _auto_path(), str(e)


def check_bfloat16_path() -> None:
    """Raise the ValueError of a bad FIDDLER_BF16_PATH, if it is one."""
    if BFLOAT16_PATH_ERROR:
        raise ValueError(BFLOAT16_PATH_ERROR)


PACK_BFLOAT16 = _PATH == "onednn"  # re-lay bfloat16 weights out for oneDNN
UPCAST_BFLOAT16 = _PATH == "avx2"  # the AVX2 decoding kernel, and float32 products from UPCAST_ROWS rows on
AVX512_BFLOAT16 = _PATH in ("avx512", "amx")  # the AVX-512 decoding kernels, PyTorch's linear for more rows
AMX_BFLOAT16 = _PATH == "amx"  # of them the one with AMX tiles
UPCAST_ROWS = 4  # measured on an AVX2 CPU: below it PyTorch's bfloat16 matrix-vector product is faster
UPCAST_BLOCK = 1 << 20  # weights converted at a time (4 MiB of float32): still in cache when multiplied


def flags_of(path: str) -> dict[str, bool]:
    """The flags above for a path name: tests and benchmarks switch paths within one process through them."""
    return {"PACK_BFLOAT16": path == "onednn", "UPCAST_BFLOAT16": path == "avx2",
            "AVX512_BFLOAT16": path in ("avx512", "amx"), "AMX_BFLOAT16": path == "amx"}


def chosen_path() -> str:
    """The path the flags above say now: onednn, amx, avx512, avx2 or off."""
    return ("onednn" if PACK_BFLOAT16 else "amx" if AMX_BFLOAT16 else "avx512" if AVX512_BFLOAT16
            else "avx2" if UPCAST_BFLOAT16 else "off")


def _float32_blocks(weight: torch.Tensor):
    """(first row, those rows of `weight` in float32) for consecutive blocks of UPCAST_BLOCK elements, converted
    into one reused scratch buffer."""
    rows, cols = weight.shape
    block = max(1, UPCAST_BLOCK // cols)
    scratch = torch.empty(min(block, rows), cols)
    for start in range(0, rows, block):
        w = scratch[: min(block, rows - start)]
        w.copy_(weight[start : start + len(w)])
        yield start, w


@torch.no_grad()
def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  transposed: bool = False) -> torch.Tensor:
    """x @ weight.T + bias ([out, in] weight; x @ weight + bias when `transposed`) for bfloat16 on the CPU,
    computed in float32 over blocks of the weight converted on the fly and rounded once to bfloat16, as
    `nn.Linear` does. The products are PyTorch's bfloat16 kernel's, which accumulates in float32 too; only the
    order of the sums may differ."""
    xf = x.float()
    if transposed:  # [in, out]: blocks of input features, accumulated
        out = torch.zeros(x.shape[0], weight.shape[1])
        for start, w in _float32_blocks(weight):
            out.addmm_(xf[:, start : start + len(w)], w)
    else:  # [out, in]: blocks of output features, computed as out.T
        out_t = torch.empty(weight.shape[0], x.shape[0])
        for start, w in _float32_blocks(weight):
            torch.mm(w, xf.t(), out=out_t[start : start + len(w)])
        out = out_t.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype, memory_format=torch.contiguous_format)


def decoding_kernel() -> int:
    """The path (native/limits.py's BF16_ISA_*) of the C decoding kernel this process's bfloat16 path takes on dense
    weights, or 0 for none (oneDNN's packed weights, or off)."""
    if AVX512_BFLOAT16:
        return kernels.BF16_ISA_AMX if AMX_BFLOAT16 else kernels.BF16_ISA_AVX512
    return kernels.BF16_ISA_AVX2 if UPCAST_BFLOAT16 else 0


def use_upcast(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and not weight.is_mkldnn and x.numel() >= UPCAST_ROWS * x.shape[-1])


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                transposed: bool = False, isa: int | None = None) -> torch.Tensor | None:
    """x @ weight.T + bias (x @ weight + bias when `transposed`) by the fast paths for bfloat16 on dense weights
    above (the decoding kernel, float32 products for batches on the AVX2 path), or None where PyTorch's own kernel
    is the one to use. `isa`: the decoding kernel's path (BF16_ISA_*), else this process's (`decoding_kernel`)."""
    isa = decoding_kernel() if isa is None else isa
    if not isa:
        return None
    if not transposed and kernels.applies(x, weight):
        return kernels.linear(x, weight, bias, isa=isa)
    if isa == kernels.BF16_ISA_AVX2 and use_upcast(x, weight):
        return upcast_linear(x, weight, bias, transposed=transposed)
    return None


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.to_dense() if t is not None and t.is_mkldnn else t


@dataclass
class ExpertWeights:
    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    shared: bool = False  # the tensors are views of memory shared with another process: never re-laid out

    @property
    def nbytes(self) -> int:
        tensors = [self.gate_up, self.down, self.gate_up_bias, self.down_bias]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def packed(self) -> bool:
        """Whether the matrices are in oneDNN's blocked layout (see `pack`)."""
        return self.gate_up.is_mkldnn

    def pack(self) -> None:
        """Re-lay gate_up and down out in place into oneDNN's blocked layout for matrix-vector products. They keep
        shape and dtype; `to()` gives ordinary dense tensors back. Only for [out, in] bfloat16 matrices on the CPU."""
        if not self.packed:
            self.gate_up = torch.ops.mkldnn._reorder_linear_weight(self.gate_up, 1)
            self.down = torch.ops.mkldnn._reorder_linear_weight(self.down, 1)

    def to(self, device: torch.device | str) -> ExpertWeights:
        move = lambda t: None if t is None else _dense(t).to(device)  # noqa: E731
        return ExpertWeights(move(self.gate_up), move(self.down), move(self.gate_up_bias), move(self.down_bias),
                             shared=self.shared and torch.device(device).type == "cpu")


# The activations of the common MoE families, as transformers' ACT2FN computes them (nn.functional.silu for both
# names, nn.ReLU), without importing transformers: a worker starts in half the time without it.
_PLAIN_ACTIVATIONS = {"silu": torch.nn.functional.silu, "swish": torch.nn.functional.silu,
                      "relu": torch.nn.functional.relu}


def activation(name: str):
    """The activation function transformers' ACT2FN gives for `name`."""
    if name in _PLAIN_ACTIVATIONS:
        return _PLAIN_ACTIVATIONS[name]
    from transformers.activations import ACT2FN  # the rest (GELU variants, ...), from the model definition itself

    if name not in ACT2FN:
        raise ValueError(f"unknown activation {name!r} in the model config")
    return ACT2FN[name]


def plain_gate(spec: KernelSpec) -> bool:
    """Whether the gate is `activation(gate) * up` on the two halves of gate_up (no interleaving, clamp, alpha or
    offset): the one the C kernels compute."""
    return not spec.interleaved and spec.limit is None and spec.alpha is None and not spec.up_offset


class ExpertKernel:
    """Computes experts for rows of activations according to a KernelSpec."""

    def __init__(self, spec: KernelSpec):
        self.act = activation(spec.activation)
        self.spec = spec
        self.dtype = parse_dtype(spec.dtype)
        self.pack = PACK_BFLOAT16 and spec.dtype == "bfloat16" and not spec.is_transposed
        self.bf16_isa = decoding_kernel() if spec.dtype == "bfloat16" else 0  # the C kernel's path, 0 for none
        if self.bf16_isa:
            kernels.available()  # build the decoding kernel now (once per machine), not during the first token
        # A gated SiLU expert without biases (Mixtral, Qwen-MoE, DeepSeek) decodes in one call of the kernel; it
        # computes the plain gate only (no interleaving, clamp, alpha or offset).
        self.fused_silu = (bool(self.bf16_isa) and spec.has_gate and not spec.has_bias
                           and not spec.is_transposed and spec.activation in ("silu", "swish")
                           and plain_gate(spec))
        # Quantized matrices are always [out, in]: any plain gated SiLU expert without biases fuses, in either dtype.
        self.fused_silu_quantized = (spec.has_gate and not spec.has_bias and spec.activation in ("silu", "swish")
                                     and plain_gate(spec))

    def gate(self, h: torch.Tensor) -> torch.Tensor:
        """[rows, 2 * intermediate] -> [rows, intermediate]: the gated activation KernelSpec describes, in the
        order of operations of transformers' `_apply_gate` implementations, so the bits match."""
        spec = self.spec
        gate, up = (h[..., ::2], h[..., 1::2]) if spec.interleaved else h.chunk(2, dim=-1)
        if spec.limit is not None:
            gate = gate.clamp(min=None, max=spec.limit)
            up = up.clamp(min=-spec.limit, max=spec.limit)
        glu = self.act(gate) if spec.alpha is None else gate * torch.sigmoid(gate * spec.alpha)
        return glu * up if not spec.up_offset else (up + spec.up_offset) * glu

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if weight.is_mkldnn:
            out = torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, None, "none", [None], "")
        elif (fast := fast_linear(x, weight, transposed=self.spec.is_transposed)) is not None:
            out = fast
        elif self.spec.is_transposed:
            out = x @ weight
        else:
            out = torch.nn.functional.linear(x, weight)
        return out if bias is None else out + bias

    def _packable(self, weights: ExpertWeights) -> bool:
        return (self.pack and not weights.packed and not weights.shared and weights.gate_up.device.type == "cpu"
                and weights.gate_up.dtype == torch.bfloat16 and weights.down.dtype == torch.bfloat16)

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        return self.gate(h) if self.spec.has_gate else self.act(h)

    def _forward_quantized(self, weights: quant.QuantizedExpertWeights, x: torch.Tensor,
                           out: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_empty((0, weights.hidden)) if out is None else out
        if (self.fused_silu_quantized and weights.gate_up_bias is None and weights.down_bias is None
                and (out is None or (out.dtype == x.dtype and out.is_contiguous()))
                and kernels.quant_applies(x, weights.gate_up.cols)):
            return kernels.quant_silu_expert(weights.gate_up.code, (weights.gate_up.q, weights.gate_up.scale),
                                             (weights.down.q, weights.down.scale), x, out)
        return self._two_products(quant.linear, weights, x, out)

    def _two_products(self, linear: Callable, weights: quant.QuantizedExpertWeights | quant.DequantizedExpertWeights,
                      x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """gate_up, the activation, down, each product by `linear` (the format's), with the biases."""
        h = linear(x, weights.gate_up)
        if weights.gate_up_bias is not None:
            h = h + weights.gate_up_bias
        h = linear(self._activate(h), weights.down)
        if weights.down_bias is not None:
            h = h + weights.down_bias
        return h if out is None else out.copy_(h)

    def _forward_dequantized(self, weights: quant.DequantizedExpertWeights, x: torch.Tensor,
                             out: torch.Tensor | None) -> torch.Tensor:
        """A quantized expert dequantized on a device (a moved one): the products of the reference, each rounded to
        the compute dtype, with the activation between them in the compute dtype, as the workers compute it."""
        if x.shape[0] == 0:
            return x.new_empty((0, weights.hidden)) if out is None else out
        return self._two_products(quant.dequantized_linear, weights, x, out)

    @torch.inference_mode()
    def forward(self, weights: ExpertWeights | quant.QuantizedExpertWeights | quant.DequantizedExpertWeights,
                x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The expert's output rows for x [rows, hidden], written into `out` when given (same shape and dtype)."""
        if isinstance(weights, (quant.QuantizedExpertWeights, quant.DequantizedExpertWeights)):
            if x.dtype != self.dtype:
                x = x.to(self.dtype)
            if isinstance(weights, quant.DequantizedExpertWeights):
                return self._forward_dequantized(weights, x, out)
            return self._forward_quantized(weights, x, out)
        if self._packable(weights):
            weights.pack()
        if x.dtype != weights.gate_up.dtype:  # a no-op .to() is not free on a decoding step's layer call
            x = x.to(weights.gate_up.dtype)
        if x.shape[0] == 0:  # oneDNN refuses empty matmuls; the answer is known
            hidden = weights.down.shape[1] if self.spec.is_transposed else weights.down.shape[0]
            return x.new_empty((0, hidden)) if out is None else out
        if (self.fused_silu and weights.gate_up_bias is None and weights.down_bias is None
                and (out is None or (out.dtype == torch.bfloat16 and out.is_contiguous()))
                and kernels.applies_to_expert(x, weights.gate_up, weights.down)):
            return kernels.silu_expert(x, weights.gate_up, weights.down, out, isa=self.bf16_isa)
        h = self._linear(x, weights.gate_up, weights.gate_up_bias)
        h = self._linear(self._activate(h), weights.down, weights.down_bias)
        return h if out is None else out.copy_(h)
