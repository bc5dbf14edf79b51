"""The Python wrappers over the kernel library (built and loaded by native/build.py).

`linear` is nn.Linear for a few rows of bfloat16 activations (bf16_gemv.c), and `silu_expert` a whole gated SiLU
expert (both products and the activation between them) in one call, each on one of three paths (`isa`): AVX2 with
FMA, AVX512-BF16 dot products, or AMX tile products (up to 16 rows at the cost of one) on CPUs that have them
(`bf16_isa()` says which is the best here). Decoding
multiplies a few rows by every weight it passes, so its speed is how fast the weights stream from memory, which
these kernels do faster than PyTorch's bfloat16 matrix-vector product (docs/performance-log.md).
Their results equal nn.Linear's to within one bfloat16 step (the float32 sums are taken in another order).

`quant_linear` and `quant_silu_expert` are the same for quantized weights (quant_gemv.c; the formats are described
in experts/quant.py): any number of rows of bfloat16 or float32 activations, quantized per block of 32 to int8 in
the call, against int8 or int4 codes with float16 scales, by integer dot products; `quant_activations` is that
quantization of the activations alone (tests hold experts/quant.py's to its bits).

`rms_norm` is transformers' RMS norm of a few bfloat16 rows in one call (rms_norm.c). The rest are the small C
pieces of a decoding step's hand-over between processes: `gather_rows` and `combine`
(bit-equal to the dispatcher's tensor ops) and `parked_wait` (parked_wait.c); the worker's serving loop and the
coordinator's layer call have bindings of their own (native/shm_serve.py, native/shm_call.py).

Where the library is not built, `available()` is False and callers keep PyTorch's kernels and the Python paths
(native/build.py says why, once).
"""

from __future__ import annotations

import ctypes

import torch

# SOURCES and library are read through this module too (benchmarks/decode_kernel.py, tests).
from fiddler_moe.native.build import SOURCES, available, library  # noqa: F401
from fiddler_moe.native.limits import BF16_ISA_AMX, BF16_ISA_AVX2, BF16_ISA_AVX512, MAX_ROWS  # noqa: F401
# MAX_ROWS: activation rows per decoding call; more take a batch path (experts/compute.py)


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` takes this product: a few rows, a dense row-major bfloat16 weight on the CPU whose rows
    are a whole number of 16-element blocks."""
    return (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and x.device.type == "cpu" and not weight.is_mkldnn and weight.dim() == 2 and weight.is_contiguous()
            and weight.shape[1] % 16 == 0 and x.shape[-1] == weight.shape[1]
            and 0 < x.numel() <= MAX_ROWS * weight.shape[1] and available())


def applies_to_expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether `silu_expert` takes this expert: `applies` to both of its products."""
    return (applies(x, gate_up) and down.dtype == torch.bfloat16 and down.device.type == "cpu" and not down.is_mkldnn
            and down.dim() == 2 and down.is_contiguous() and down.shape[1] % 16 == 0
            and gate_up.shape[0] == 2 * down.shape[1] and x.shape[-1] == down.shape[0])


def bf16_isa() -> int:
    """The best path of the bfloat16 kernels on this CPU: BF16_ISA_AMX, BF16_ISA_AVX512 or BF16_ISA_AVX2. Only where
    `available()`."""
    return library().fiddler_bf16_isa()


def _bf16_status(status: int, what: str) -> None:
    if status == -1:
        raise MemoryError(f"no memory for the scratch rows of {what}")
    if status == -2:
        raise ValueError(f"{what}: this CPU lacks the path (isa) asked for; pass 0 for the best it has")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, isa: int = 0) -> torch.Tensor:
    """nn.functional.linear(x, weight, bias) for bfloat16 on the CPU, where `applies` says so. `isa`: 0 for the best
    path of this CPU, or BF16_ISA_AVX2 / _AVX512 / _AMX."""
    rows, cols = weight.shape
    flat = x.reshape(-1, cols).contiguous()
    if bias is not None:
        bias = bias.to(torch.bfloat16).contiguous()
    out = torch.empty(flat.shape[0], rows, dtype=torch.bfloat16)
    _bf16_status(library().fiddler_bf16_linear(weight.data_ptr(), rows, cols, flat.data_ptr(), flat.shape[0],
                                               None if bias is None else bias.data_ptr(), out.data_ptr(), isa),
                 "fiddler_bf16_linear")
    return out.view(*x.shape[:-1], rows)


class BoundLinear:
    """`linear` of one weight, with what stays the same from call to call (the weight's address and shape, the
    bias, the path) bound once: a coordinator's decoding step makes some 30 of these calls on small weights, where
    `applies` and `linear`'s checks cost a fifth of the call. Holds the weight and bias, so their memory lives as
    long as it does; `matches` says whether it still computes with a module's current tensors."""

    __slots__ = ("weight", "bias", "isa", "_call", "_weight_ptr", "_bias_ptr", "_bias_source_ptr", "_rows", "_cols")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, isa: int = 0):
        self.weight, self.isa = weight, isa
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16).contiguous()
        self._rows, self._cols = weight.shape
        self._weight_ptr = weight.data_ptr()
        self._bias_ptr = None if self.bias is None else self.bias.data_ptr()
        self._bias_source_ptr = None if bias is None else bias.data_ptr()
        self._call = library().fiddler_bf16_linear

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, isa: int = 0) -> BoundLinear | None:
        """A BoundLinear where `applies` takes this weight (for one row of its width), else None."""
        if not applies(torch.empty(1, weight.shape[-1], dtype=torch.bfloat16), weight):
            return None
        return cls(weight, bias, isa)

    def matches(self, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """Whether `weight` and `bias` are the tensors bound, in the same memory (`Module.to` may give a parameter
        new memory and keep the object)."""
        return (weight.data_ptr() == self._weight_ptr and weight.shape == self.weight.shape
                and (None if bias is None else bias.data_ptr()) == self._bias_source_ptr)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [..., cols] @ weight.T + bias, or None where the kernel does not take x (dtype, device, row count)."""
        if x.dtype is not torch.bfloat16 or not x.is_cpu or x.shape[-1] != self._cols:
            return None
        rows = x.numel() // self._cols
        if not 0 < rows <= MAX_ROWS:
            return None
        x = x.contiguous()
        out = torch.empty((*x.shape[:-1], self._rows), dtype=torch.bfloat16)
        status = self._call(self._weight_ptr, self._rows, self._cols, x.data_ptr(), rows, self._bias_ptr,
                            out.data_ptr(), self.isa)
        if status:
            _bf16_status(status, "fiddler_bf16_linear")
        return out


def silu_expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, out: torch.Tensor | None = None,
                isa: int = 0) -> torch.Tensor:
    """A gated SiLU expert without biases, `(silu(gate) * up) @ down.T` with `gate, up = (x @ gate_up.T).chunk(2)`,
    for x [n, hidden] where `applies_to_expert` says so; rounded to bfloat16 where PyTorch's operations round. One
    call (and one wake-up of the thread team) per expert. Writes into `out` when given (a contiguous [n, hidden]
    bfloat16 tensor, e.g. a reply slot). `isa` as for `linear`."""
    inter, hidden = down.shape[1], down.shape[0]
    x = x.contiguous()
    if out is None:
        out = torch.empty(x.shape[0], hidden, dtype=torch.bfloat16)
    _bf16_status(library().fiddler_bf16_silu_expert(gate_up.data_ptr(), down.data_ptr(), hidden, inter,
                                                    x.data_ptr(), x.shape[0], out.data_ptr(), isa),
                 "fiddler_bf16_silu_expert")
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' (Llama's) RMS norm of bfloat16 rows x [..., cols] with a bfloat16 weight [cols], in one call
    (rms_norm.c); equal to the PyTorch code's result to within one bfloat16 step (its sum of squares is taken in
    another order)."""
    cols = weight.shape[0]
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    library().fiddler_rms_norm(x.data_ptr(), weight.data_ptr(), x.numel() // cols, cols, eps, out.data_ptr())
    return out


def quant_applies(x: torch.Tensor, cols: int) -> bool:
    """Whether the quantized kernels take activations x [n, cols]: bfloat16 or float32 on the CPU, at least one
    row, and the library built."""
    return (x.dtype in (torch.bfloat16, torch.float32) and x.device.type == "cpu" and x.dim() == 2
            and x.shape[1] == cols and x.shape[0] > 0 and available())


def _quant_status(status: int, what: str) -> None:
    if status == -1:
        raise MemoryError(f"no memory for the scratch rows of {what}")
    if status == -2:
        raise ValueError(f"{what}: the kernel does not take this format, shape or path (isa) on this CPU")


def quant_linear(code: int, q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, isa: int = 0) -> torch.Tensor:
    """x [n, cols] @ w.T for a quantized w (codes q, float16 scales [rows, cols / 32], format `code` of
    native/limits.py) and x quantized per block, rounded once to x's dtype, where `quant_applies` says so. `isa`: 0
    for the best path of this CPU, or QUANT_ISA_PLAIN / _AVX2 / _AVX512."""
    rows, cols = scale.shape[0], scale.shape[1] * 32
    x = x.contiguous()
    out = torch.empty(x.shape[0], rows, dtype=x.dtype)
    _quant_status(library().fiddler_quant_linear(code, q.data_ptr(), scale.data_ptr(), rows, cols, x.data_ptr(),
                                                 int(x.dtype == torch.bfloat16), x.shape[0], out.data_ptr(), isa),
                  "fiddler_quant_linear")
    return out


def quant_silu_expert(code: int, gate_up: tuple[torch.Tensor, torch.Tensor], down: tuple[torch.Tensor, torch.Tensor],
                      x: torch.Tensor, out: torch.Tensor | None = None, isa: int = 0) -> torch.Tensor:
    """A gated SiLU expert without biases with quantized matrices, each given as (codes, scales), for x [n, hidden]
    where `quant_applies` says so; rounded to x's dtype where PyTorch's operations round. Writes into `out` when
    given (contiguous, x's shape and dtype)."""
    hidden, inter = down[1].shape[0], down[1].shape[1] * 32
    x = x.contiguous()
    if out is None:
        out = torch.empty_like(x)
    _quant_status(library().fiddler_quant_silu_expert(
        code, gate_up[0].data_ptr(), gate_up[1].data_ptr(), down[0].data_ptr(), down[1].data_ptr(), hidden, inter,
        x.data_ptr(), int(x.dtype == torch.bfloat16), x.shape[0], out.data_ptr(), isa), "fiddler_quant_silu_expert")
    return out


def quant_activations(x: torch.Tensor, isa: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, cols] (bfloat16 or float32) quantized per block of 32 as the products quantize it: (codes int8 [n,
    cols], scales float32 [n, cols / 32])."""
    x = x.contiguous()
    n, cols = x.shape
    q = torch.empty(n, cols, dtype=torch.int8)
    d = torch.empty(n, cols // 32)
    _quant_status(library().fiddler_quant_activations(x.data_ptr(), int(x.dtype == torch.bfloat16), n, cols,
                                                      q.data_ptr(), d.data_ptr(), isa), "fiddler_quant_activations")
    return q, d


def _int64_array(values: list[int]) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


def gather_rows(source: torch.Tensor, index: list[int], out: torch.Tensor) -> None:
    """out[i] = source[index[i]] for a contiguous 2-D CPU `source` and `out` of one dtype and width (a few rows,
    no tensor ops: a decoding step's gather into a worker's request slot). The caller checks the index."""
    library().fiddler_gather_rows(source.data_ptr(), source.shape[1] * source.element_size(), _int64_array(index),
                                  len(index), out.data_ptr())


def combines(outputs: torch.Tensor, weights: torch.Tensor) -> bool:
    """Whether `combine` takes these: bfloat16 outputs, float32 or bfloat16 weights, contiguous, on the CPU."""
    return (outputs.dtype == torch.bfloat16 and weights.dtype in (torch.float32, torch.bfloat16)
            and outputs.device.type == "cpu" and weights.device.type == "cpu" and outputs.is_contiguous()
            and weights.is_contiguous() and available())


def combine(outputs: torch.Tensor, row_of: list[int], weights: torch.Tensor) -> torch.Tensor:
    """The expert outputs weighted and summed over top-k, as transformers' grouped_mm combines them (bit-equal):
    `(outputs[row_of] * weights.reshape(-1, 1)).view(tokens, top_k, -1).sum(dim=1)` in bfloat16, where
    outputs [pairs, hidden], weights [tokens, top_k], and row_of[p] is the row of outputs holding pair p."""
    tokens, top_k = weights.shape
    result = torch.empty(tokens, outputs.shape[1], dtype=torch.bfloat16)
    library().fiddler_combine(outputs.data_ptr(), _int64_array(row_of), weights.data_ptr(),
                              int(weights.dtype == torch.bfloat16), tokens, top_k, outputs.shape[1],
                              result.data_ptr())
    return result


def set_waiting(channel, spin: bool) -> None:
    """How a shared-memory channel (protocol.shm.ShmChannel) waits: spinning briefly first where this side has a
    core to itself (`spin`), else sleeping at once, with this process's OpenMP threads parked where the library is
    built (the coordinator and the workers take turns on the same cores)."""
    channel.spin = spin
    if not spin and available():
        channel.sleep = parked_wait


def parked_wait(address: int, value: int, timeout_s: float, watch_s: float = 0.0) -> None:
    """Sleep until the 32-bit word at `address` (in memory shared with another process) is no longer `value`,
    for at most timeout_s or until a signal, with this process's OpenMP threads asleep too (parked_wait.c), this
    thread watching the word for watch_s first (a worker between two layers of a decoding step). The caller
    rechecks the word. Only where `available()`."""
    library().fiddler_parked_watch(address, value, int(watch_s * 1e9), int(timeout_s * 1e9))
