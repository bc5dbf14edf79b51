"""nn.Linear for a few rows of bfloat16 activations on AVX2 CPUs, through bf16_gemv.c (built on first use).

`silu_expert` computes a whole gated SiLU expert (both products and the activation between them) in one call.

Decoding multiplies one row by every weight it passes, so its speed is how fast the weights stream from memory.
On CPUs without oneDNN's bfloat16 support PyTorch's bfloat16 matrix-vector product reaches 11-13 GB/s on two Zen 3
cores where a float32 sum reads 19; the kernel in bf16_gemv.c reaches 16-18 (README, "Performance"). Its results
equal nn.Linear's to within one bfloat16 step (the float32 sums are taken in another order).

The kernel is compiled once per machine with the system C compiler ($CC, else cc) into the cache folder
(launch/rundir.py), against the OpenMP runtime PyTorch has loaded, so it shares PyTorch's threads. Without a
compiler, on other CPUs, or with FIDDLER_PACK_WEIGHTS=0, `available()` is False and callers keep PyTorch's
kernel: slower decoding, same results. Import torch before this module builds or loads the kernel.
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

from launch.rundir import cache_dir

log = logging.getLogger("fiddler.gemv")

SOURCE = Path(__file__).with_name("bf16_gemv.c")
MAX_ROWS = 8  # activation rows per call; more take the float32 path (expert_worker/compute.py)
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC"]


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
    """Compile bf16_gemv.c into `target`; several processes may race, the last rename wins with equal bytes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        obj, lib = Path(tmp) / "gemv.o", Path(tmp) / target.name
        # Link the object against PyTorch's OpenMP library itself (not -fopenmp's default libgomp), which may be
        # a renamed copy inside the torch package.
        link = [runtime, f"-Wl,-rpath,{os.path.dirname(runtime)}"] if runtime else ["-fopenmp"]
        for command in ([compiler, *_FLAGS, "-c", str(SOURCE), "-o", str(obj)],
                        [compiler, "-shared", str(obj), *link, "-o", str(lib)]):
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
    key = hashlib.sha256(SOURCE.read_bytes() + repr((_FLAGS, compiler, runtime)).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"bf16_gemv-{key}.so"
    try:
        if not target.exists():
            _build(target, compiler, runtime)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("decoding in bfloat16 uses PyTorch's slower kernel: building %s failed: %s", SOURCE.name, e)
        return None
    fn = lib.fiddler_bf16_linear
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    fn = lib.fiddler_bf16_silu_expert
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_void_p]
    fn.restype = ctypes.c_int
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
