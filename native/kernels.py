"""nn.Linear for a few rows of bfloat16 activations on AVX2 CPUs, through bf16_gemv.c (built on first use).

`silu_expert` computes a whole gated SiLU expert (both products and the activation between them) in one call.
The same library holds the small C pieces of a decoding step's hand-over between processes: `gather_rows` and
`combine` (bit-equal to the dispatcher's tensor ops), `parked_wait` (parked_wait.c), the worker's serving loop
(shm_serve.c, native/shm_serve.py) and the coordinator's layer call (shm_call.c, native/shm_call.py).

Decoding multiplies one row by every weight it passes, so its speed is how fast the weights stream from memory.
On CPUs without oneDNN's bfloat16 support PyTorch's bfloat16 matrix-vector product reaches 11-13 GB/s on two Zen 3
cores where a float32 sum reads 19; the kernel in bf16_gemv.c reaches 16-18 (README, "Performance"). Its results
equal nn.Linear's to within one bfloat16 step (the float32 sums are taken in another order).

The kernel is compiled once per machine with the system C compiler ($CC, else cc) into the cache folder
(launch/rundir.py), against the OpenMP runtime PyTorch has loaded, so it shares PyTorch's threads. Without a
compiler, on other CPUs, or with FIDDLER_PACK_WEIGHTS=0, `available()` is False and callers keep PyTorch's
kernel and the Python paths: slower decoding, same results. Import torch before this module builds or loads it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from fiddler_moe.host.paths import cache_dir

log = logging.getLogger("fiddler.kernels")

SOURCES = [Path(__file__).with_name(name) for name in ("bf16_gemv.c", "parked_wait.c", "shm_serve.c", "shm_call.c")]
HEADERS = [Path(__file__).with_name("shm_lane.h")]
MAX_ROWS = 8  # activation rows per call; more take the float32 path (experts/compute.py)
# No contraction of a*b+c into one rounding: the combine must round each product as PyTorch does.
_FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-fPIC"]


def _openmp_runtime() -> str | None:
    """The OpenMP library this process has loaded (PyTorch's), so the kernel joins its thread team."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address, perms, offset, device, inode, path (when mapped from a file)
        name = os.path.basename(fields[5]) if len(fields) == 6 else ""
        if name.startswith(("libgomp", "libiomp5", "libomp")) and ".so" in name:
            return fields[5]
    return None


def _why_unavailable() -> str | None:
    if os.environ.get("FIDDLER_PACK_WEIGHTS", "1") == "0":
        return "FIDDLER_PACK_WEIGHTS=0"
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"it is built for x86-64 Linux, not {platform.system()} {platform.machine()}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "this CPU has no AVX2 and FMA"
    return None


def _build(target: Path, compiler: str, runtime: str | None) -> None:
    """Compile SOURCES into `target`; several processes may race, the last rename wins with equal bytes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        objects = [str(Path(tmp) / source.with_suffix(".o").name) for source in SOURCES]
        lib = Path(tmp) / target.name
        # Link the objects against PyTorch's OpenMP library itself (not -fopenmp's default libgomp), which may be
        # a renamed copy inside the torch package.
        link = [runtime, f"-Wl,-rpath,{os.path.dirname(runtime)}"] if runtime else ["-fopenmp"]
        compile_each = [[compiler, *_FLAGS, "-c", str(source), "-o", obj] for source, obj in zip(SOURCES, objects)]
        for command in [*compile_each, [compiler, "-shared", *objects, *link, "-o", str(lib)]]:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"`{' '.join(command)}` failed: {done.stderr.strip()[-500:]}")
        os.replace(lib, target)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernel, or None (logged once, with what to do about it)."""
    why = _why_unavailable()
    if why:
        log.info("PyTorch's bfloat16 kernel serves decoding: %s", why)
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("decoding in bfloat16 uses PyTorch's slower kernel: no C compiler found (install gcc or set CC)")
        return None
    runtime = _openmp_runtime()
    sources = b"".join(source.read_bytes() for source in [*SOURCES, *HEADERS])
    key = hashlib.sha256(sources + repr((_FLAGS, compiler, runtime)).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"bf16_gemv-{key}.so"
    try:
        if not target.exists():
            _build(target, compiler, runtime)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("decoding in bfloat16 uses PyTorch's slower kernel: building %s failed: %s",
                    ", ".join(source.name for source in SOURCES), e)
        return None
    fn = lib.fiddler_bf16_linear
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    fn = lib.fiddler_bf16_silu_expert
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_void_p]
    fn.restype = ctypes.c_int
    lib.fiddler_gather_rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_void_p]
    lib.fiddler_gather_rows.restype = None
    lib.fiddler_combine.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.fiddler_combine.restype = None
    lib.fiddler_parked_wait.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int64]
    lib.fiddler_parked_wait.restype = ctypes.c_int
    lib.fiddler_serve_requests.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int64] * 7,
                                           ctypes.c_int]
    lib.fiddler_serve_requests.restype = ctypes.c_int64
    lib.fiddler_post_layer_call.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 6 + [ctypes.c_void_p]
    lib.fiddler_post_layer_call.restype = ctypes.c_int
    lib.fiddler_finish_layer_call.argtypes = [ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int64] * 5,
                                              ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                              ctypes.c_int, ctypes.c_void_p]
    lib.fiddler_finish_layer_call.restype = ctypes.c_int
    return lib


def available() -> bool:
    return library() is not None


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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """nn.functional.linear(x, weight, bias) for bfloat16 on the CPU, where `applies` says so."""
    rows, cols = weight.shape
    flat = x.reshape(-1, cols).contiguous()
    if bias is not None:
        bias = bias.to(torch.bfloat16).contiguous()
    out = torch.empty(flat.shape[0], rows, dtype=torch.bfloat16)
    status = library().fiddler_bf16_linear(weight.data_ptr(), rows, cols, flat.data_ptr(), flat.shape[0],
                                           None if bias is None else bias.data_ptr(), out.data_ptr())
    if status != 0:
        raise MemoryError("no memory for the activations' float32 copy")
    return out.view(*x.shape[:-1], rows)


def silu_expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, out: torch.Tensor | None = None
                ) -> torch.Tensor:
    """A gated SiLU expert without biases, `(silu(gate) * up) @ down.T` with `gate, up = (x @ gate_up.T).chunk(2)`,
    for x [n, hidden] where `applies_to_expert` says so; rounded to bfloat16 where PyTorch's operations round. One
    call (and one wake-up of the thread team) per expert. Writes into `out` when given (a contiguous [n, hidden]
    bfloat16 tensor, e.g. a reply slot)."""
    inter, hidden = down.shape[1], down.shape[0]
    x = x.contiguous()
    if out is None:
        out = torch.empty(x.shape[0], hidden, dtype=torch.bfloat16)
    status = library().fiddler_bf16_silu_expert(gate_up.data_ptr(), down.data_ptr(), hidden, inter, x.data_ptr(),
                                                x.shape[0], out.data_ptr())
    if status != 0:
        raise MemoryError("no memory for the expert's scratch rows")
    return out


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


def parked_wait(address: int, value: int, timeout_s: float) -> None:
    """Sleep until the 32-bit word at `address` (in memory shared with another process) is no longer `value`,
    for at most timeout_s or until a signal, with this process's OpenMP threads asleep too (parked_wait.c). The
    caller rechecks the word. Only where `available()`."""
    library().fiddler_parked_wait(address, value, int(timeout_s * 1e9))
