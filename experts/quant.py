"""Quantized expert weights for the CPU workers: the formats, quantizing float weights, the exact reference every
kernel is held to, and the products the worker computes with them.

Both formats cut a weight matrix [out, in] (transformers' orientation; a transposed checkpoint is turned first)
into blocks of QUANT_BLOCK = 32 consecutive weights along the input dimension, each with one float16 scale d, and
keep it as two planes, the codes and the scales:

    int8, llama.cpp's Q8_0 (8.5 bits a weight)
        q      int8 [out, in]                 w = d * q, q in [-127, 127]
        scale  float16 [out, in / 32]         d = amax / 127 rounded to float16 (amax: the block's largest |w|)
        q = round(w / d), halves to even, in float32; a block of zeros has d = 0 and q = 0.
    int4, llama.cpp's Q4_0 (4.5 bits a weight)
        q      uint8 [out, in / 2]            w = d * (q - 8), q in [0, 15]; byte j of a block holds weight j in
                                              its low 4 bits and weight j + 16 in its high 4 bits
        scale  float16 [out, in / 32]         d = m / -8 rounded to float16, m the block's weight of largest
                                              magnitude (the first, on a tie), which becomes q = 0
        q = clamp(round(w / d) + 8, 0, 15), halves to even, in float32.
    Where rounding d to float16 would put the block's largest weight outside the codes, d is the next float16 away
    from zero instead, so that nothing is clipped but what Q4_0 clips by design (a weight of the other sign above
    7.5 d). Every weight is then within half a step d / 2 of its code, Q4_0's clipped ones within d.
Why these (measured, docs/performance-log.md): float16 scales lose nothing against float32 ones (the same error
to four digits on normal and heavy-tailed weights), take half the bytes, and make every dequantized weight exact
in float32 (an 11-bit scale times a code of at most 8 bits), so a kernel that dequantizes into float32 computes
with the very weights of the reference. Below float16's normal range (a block whose largest weight is under
127 * 2^-14 = 0.0078 for int8, 8 * 2^-14 = 0.00049 for int4) a scale has fewer bits: such a block's step is up
to 2^-24 coarser than ideal, which is under 1% for blocks whose largest weight is above 0.001. For int4,
Q4_1 (a minimum per block besides the scale) had 9% less error than Q4_0 but 11% more bytes, which decoding pays
in time one for one, and its d * q + m is not always exact in float32. Planes rather than llama.cpp's interleaved
34- and 18-byte blocks: aligned vector loads in C, and plain tensor views for the Python paths.

Activations: a product quantizes its activation rows too, per block of 32 along the input (`quantize_activations`:
dx = amax / 127 in float32, codes round(x / dx) in [-127, 127], as llama.cpp's Q8_0 with a float32 scale), once per
call, so that the kernels compute each block's dot product in integers (native/quant_gemv.c). The activations' own
error is about that of int8 weights (docs/performance-log.md).

Exactness: the reference of a quantized product is dequantize_activations(quantize_activations(x)) @
dequantize(W).T computed in float64 (`reference_linear`): the same quantized weights and the same quantized
activations, both dequantized. The kernels (native/quant_gemv.c, any number of rows) and the Python path without
the library differ from it only by float32 products of the scales and sums in another order, and the final
rounding to the compute dtype; tests/test_quant.py holds them to that. A model that computes the same function
(tests/test_quant_cluster.py's reference) quantizes each expert product's input with these two functions. What
quantizing costs against the float weights and activations is measured and published
(`benchmarks/quant_accuracy.py`, README), not folded into a bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fiddler_moe.native import kernels
from fiddler_moe.native.limits import QUANT_BLOCK, QUANT_INT4, QUANT_INT8

BLOCK = QUANT_BLOCK


@dataclass(frozen=True)
class QuantFormat:
    name: str  # as --quantize spells it
    code: int  # the C kernels' id (native/limits.py)
    bits: int  # of one code
    codes_dtype: torch.dtype  # of the q plane
    llama_cpp: str  # the llama.cpp type with the same arithmetic

    def codes_shape(self, rows: int, cols: int) -> tuple[int, int]:
        return (rows, cols * self.bits // 8)

    def nbytes(self, rows: int, cols: int) -> int:
        """Bytes of a quantized [rows, cols] matrix: its codes and its float16 scales."""
        return rows * cols * self.bits // 8 + rows * (cols // BLOCK) * 2


FORMATS: dict[str, QuantFormat] = {
    "int8": QuantFormat("int8", QUANT_INT8, 8, torch.int8, "Q8_0"),
    "int4": QuantFormat("int4", QUANT_INT4, 4, torch.uint8, "Q4_0"),
}
CHOICES = ("none", *FORMATS)  # --quantize


def check_format(name: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"--quantize must be one of {', '.join(CHOICES)}, got {name!r}")
    return name


def check_shape(name: str, rows: int, cols: int, what: str = "an expert matrix") -> None:
    """Refuse a matrix whose input dimension is not a whole number of blocks, naming the fix."""
    if cols % BLOCK or rows <= 0:
        raise ValueError(f"--quantize {name} needs expert matrices whose input size is a multiple of {BLOCK}, but "
                         f"{what} is [{rows}, {cols}]; run this model with --quantize none")


@dataclass
class QuantMatrix:
    """A [rows, cols] weight matrix in one of FORMATS: codes and float16 scales (layout above)."""

    format: str
    q: torch.Tensor
    scale: torch.Tensor

    @property
    def rows(self) -> int:
        return self.scale.shape[0]

    @property
    def cols(self) -> int:
        return self.scale.shape[1] * BLOCK

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * 2

    @property
    def code(self) -> int:
        return FORMATS[self.format].code

    def check(self) -> None:
        """That the planes have the dtypes, shapes and contiguity the kernels read."""
        fmt = FORMATS[self.format]
        if (self.q.dtype != fmt.codes_dtype or self.scale.dtype != torch.float16 or self.scale.dim() != 2
                or tuple(self.q.shape) != fmt.codes_shape(self.rows, self.cols) or not self.q.is_contiguous()
                or not self.scale.is_contiguous()):
            raise ValueError(f"a {self.format} matrix needs q {fmt.codes_dtype} {fmt.codes_shape(self.rows, self.cols)}"
                             f" and float16 scales [{self.rows}, {self.cols // BLOCK}], contiguous; got q "
                             f"{self.q.dtype} {list(self.q.shape)} and scales {self.scale.dtype} "
                             f"{list(self.scale.shape)}")


QUANTIZE_ROWS_AT_ONCE = 1 << 22  # weights quantized per step: bounds the float32 temporaries of a large matrix


def _scales(blocks: torch.Tensor, name: str) -> torch.Tensor:
    """Each block's float16 scale: its ideal step rounded to nearest, or one float16 step further from zero where
    that rounding would make the block's largest weight fall outside the codes (and be clipped)."""
    if name == "int8":
        reach, top = blocks.abs().amax(dim=-1), 127
    else:  # the block's weight of largest magnitude, with its sign, maps to q - 8 = -8
        reach = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True)).squeeze(-1).abs()
        top = 8
    d = (reach / top).half()
    short = d.float() * top < reach
    d = torch.where(short, (d.view(torch.int16) + 1).view(torch.float16), d)  # the next float16 up
    if not torch.isfinite(d).all():
        raise ValueError(f"--quantize {name}: the weights hold NaN or infinity, or values too large for float16 "
                         "scales; run with --quantize none")
    if name == "int4":  # negative where the largest weight is positive, so that it is code 0 (q - 8 = -8)
        m = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
        d = torch.where(m > 0, -d, d)
    return d


def _codes(blocks: torch.Tensor, d: torch.Tensor, name: str) -> torch.Tensor:
    df = d.float().unsqueeze(-1)
    safe = torch.where(df == 0, torch.ones_like(df), df)
    q = torch.where(df == 0, torch.zeros_like(blocks), torch.round(blocks / safe))
    if name == "int8":
        return q.clamp_(-127, 127).to(torch.int8).flatten(1)
    q = (q + 8).clamp_(0, 15).to(torch.uint8)
    return (q[..., :16] | (q[..., 16:] << 4)).flatten(1)


@torch.no_grad()
def quantize(weight: torch.Tensor, name: str) -> QuantMatrix:
    """`weight` [out, in] (any float dtype, on the CPU) in format `name`, rounded to nearest as described above:
    by the C quantizer (native/quantize.c, at memory speed) for float32 and bfloat16 weights where the kernel
    library is built, else by `quantize_reference`; the two give the same bits."""
    fmt = FORMATS[name]
    rows, cols = weight.shape
    check_shape(name, rows, cols)
    if weight.dtype not in (torch.float32, torch.bfloat16) or weight.device.type != "cpu" or not kernels.available():
        return quantize_reference(weight, name)
    weight = weight.contiguous()
    q = torch.empty(fmt.codes_shape(rows, cols), dtype=fmt.codes_dtype)
    scale = torch.empty(rows, cols // BLOCK, dtype=torch.float16)
    status = kernels.library().fiddler_quantize(fmt.code, weight.data_ptr(), int(weight.dtype == torch.bfloat16),
                                                rows, cols, q.data_ptr(), scale.data_ptr())
    if status == -3:
        raise ValueError(f"--quantize {name}: the weights hold NaN or infinity, or values too large for float16 "
                         "scales; run with --quantize none")
    if status != 0:
        raise ValueError(f"fiddler_quantize: the kernel does not take format {name} for a [{rows}, {cols}] matrix")
    return QuantMatrix(name, q, scale)


@torch.no_grad()
def quantize_reference(weight: torch.Tensor, name: str) -> QuantMatrix:
    """`quantize` in PyTorch operations: the reference the C quantizer is held to, and the path without it."""
    fmt = FORMATS[name]
    rows, cols = weight.shape
    check_shape(name, rows, cols)
    q = torch.empty(fmt.codes_shape(rows, cols), dtype=fmt.codes_dtype)
    scale = torch.empty(rows, cols // BLOCK, dtype=torch.float16)
    step = max(1, QUANTIZE_ROWS_AT_ONCE // cols)
    for start in range(0, rows, step):
        part = weight[start : start + step].float().reshape(-1, cols // BLOCK, BLOCK)
        d = _scales(part, name)
        scale[start : start + step] = d
        q[start : start + step] = _codes(part, d, name)
    return QuantMatrix(name, q, scale)


def codes(m: QuantMatrix) -> torch.Tensor:
    """The signed integer of each weight, [rows, cols] int32: q for int8, q - 8 for int4."""
    if m.format == "int8":
        return m.q.int()
    blocks = m.q.view(m.rows, -1, BLOCK // 2).int()
    return (torch.cat([blocks & 15, blocks >> 4], dim=-1) - 8).reshape(m.rows, m.cols)


@torch.no_grad()
def dequantize(m: QuantMatrix, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weights d * code as [rows, cols] `dtype` (into `out` when given), on m's device; exact in float32 and
    float64 (see above)."""
    d = m.scale.to(dtype).repeat_interleave(BLOCK, dim=1)
    return torch.mul(codes(m).to(dtype), d, out=out)


@torch.no_grad()
def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, cols] quantized per block of 32 as every product quantizes its activations, bit for bit with the C
    kernels' (native/quant_gemv.c): (codes int8 [n, cols], scales float32 [n, cols / 32]). dx = amax / 127 and
    codes round(x * (1 / dx)), halves to even, all in float32; a block of zeros has dx = 0 and codes 0."""
    n, cols = x.shape
    blocks = x.float().reshape(n, cols // BLOCK, BLOCK)
    d = blocks.abs().amax(dim=-1) / 127
    inverse = torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / d)
    q = torch.round(blocks * inverse.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q.reshape(n, cols), d


def dequantize_activations(q: torch.Tensor, d: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The activations dx * code as [n, cols] `dtype` (exact in float64)."""
    return q.to(dtype) * d.to(dtype).repeat_interleave(BLOCK, dim=1)


def quantized_input(x: torch.Tensor) -> torch.Tensor:
    """x as the products see it: quantized per block and dequantized, in float32 (rounded to it: dx * code has up
    to 31 bits), x's shape. What a reference model feeds each quantized expert product instead of x."""
    flat = x.reshape(-1, x.shape[-1])
    return dequantize_activations(*quantize_activations(flat), torch.float32).reshape(x.shape)


def reference_linear(x: torch.Tensor, m: QuantMatrix) -> torch.Tensor:
    """The exact product of x quantized per block with m, in float64: both dequantized."""
    return dequantize_activations(*quantize_activations(x)) @ dequantize(m, torch.float64).t()


# --- the products a worker computes ---


@dataclass
class QuantizedExpertWeights:
    """One expert with quantized matrices (gate_up [2 * inter or inter, hidden], down [hidden, inter], always in
    [out, in] orientation) and biases in the compute dtype."""

    gate_up: QuantMatrix
    down: QuantMatrix
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        biases = [t for t in (self.gate_up_bias, self.down_bias) if t is not None]
        return self.gate_up.nbytes + self.down.nbytes + sum(t.numel() * t.element_size() for t in biases)

    @property
    def hidden(self) -> int:
        return self.down.rows

    def planes(self) -> dict[str, torch.Tensor]:
        """Every tensor of the expert by name (gate_up.q, gate_up.scale, down.q, down.scale, and the biases it has):
        what the quantized cache stores and a move copies."""
        found = {"gate_up.q": self.gate_up.q, "gate_up.scale": self.gate_up.scale, "down.q": self.down.q,
                 "down.scale": self.down.scale}
        if self.gate_up_bias is not None:
            found["gate_up_bias"] = self.gate_up_bias
        if self.down_bias is not None:
            found["down_bias"] = self.down_bias
        return found

    @classmethod
    def from_planes(cls, name: str, planes: dict[str, torch.Tensor]) -> QuantizedExpertWeights:
        return cls(QuantMatrix(name, planes["gate_up.q"], planes["gate_up.scale"]),
                   QuantMatrix(name, planes["down.q"], planes["down.scale"]),
                   planes.get("gate_up_bias"), planes.get("down_bias"))

    def to(self, device: torch.device | str) -> QuantizedExpertWeights:
        return QuantizedExpertWeights.from_planes(self.gate_up.format,
                                                  {k: t.to(device) for k, t in self.planes().items()})


@dataclass
class DequantizedExpertWeights:
    """A quantized expert's matrices dequantized to float32 (exact: every d * code is a float32), on any device,
    with its biases in the compute dtype: how a device other than a worker's CPU computes a quantized expert (a
    moved one, coordinator/staging.py). Its products quantize their inputs per block as the kernels do
    (`dequantized_linear`), so that it computes the quantized format's function, the same as its worker."""

    gate_up: torch.Tensor  # float32 [out, in]
    down: torch.Tensor
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @classmethod
    def empty_like(cls, w: QuantizedExpertWeights, device: torch.device | str) -> DequantizedExpertWeights:
        """Room for `w` dequantized on `device` (fill it with `dequantize_expert`)."""
        return cls(torch.empty(w.gate_up.shape, device=device), torch.empty(w.down.shape, device=device))

    @property
    def hidden(self) -> int:
        return self.down.shape[0]


@torch.no_grad()
def dequantize_expert(w: QuantizedExpertWeights, into: DequantizedExpertWeights | None = None
                      ) -> DequantizedExpertWeights:
    """`w` dequantized on its own device (into `into`'s matrices when given): codes and float16 scales to float32,
    the very weights of the reference."""
    gate_up = dequantize(w.gate_up, torch.float32, None if into is None else into.gate_up)
    down = dequantize(w.down, torch.float32, None if into is None else into.down)
    return DequantizedExpertWeights(gate_up, down, w.gate_up_bias, w.down_bias)


def dequantized_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [n, cols] quantized per block (as the kernels quantize it) @ weight.T, for a dequantized float32 weight
    on x's device, in float32 and rounded once to x's dtype: the reference's product, on any device."""
    return (quantized_input(x) @ weight.t()).to(x.dtype)


def expert_nbytes(name: str, gate_up: tuple[int, int], down: tuple[int, int], bias_bytes: int = 0) -> int:
    """Bytes of one expert in format `name`, from its matrices' [out, in] shapes (the plan print)."""
    fmt = FORMATS[name]
    return fmt.nbytes(*gate_up) + fmt.nbytes(*down) + bias_bytes


TILE = 1 << 20  # weights dequantized at a time without the kernel library (4 MiB of float32)


def _float32_tiles(m: QuantMatrix):
    """(first row, those rows dequantized to float32) for consecutive tiles of about TILE weights."""
    rows, cols = m.shape
    step = max(1, TILE // cols)
    for start in range(0, rows, step):
        yield start, dequantize(QuantMatrix(m.format, m.q[start : start + step], m.scale[start : start + step]))


@torch.no_grad()
def linear(x: torch.Tensor, m: QuantMatrix) -> torch.Tensor:
    """x quantized per block @ dequantize(m).T for x [n, cols], accumulated in float32 and rounded once to x's
    dtype: the C kernel's integer dot products for any number of rows; without the kernel library, float32 tiles
    of dequantized weights times the dequantized activations with torch.mm."""
    n = x.shape[0]
    if kernels.quant_applies(x, m.cols):
        return kernels.quant_linear(m.code, m.q, m.scale, x)
    xf = quantized_input(x) if n else x.float()
    out_t = torch.empty(m.rows, n)
    for start, tile in _float32_tiles(m):
        torch.mm(tile, xf.t(), out=out_t[start : start + len(tile)])
    return out_t.t().to(x.dtype).contiguous()
