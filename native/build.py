"""Building and loading the kernel library: this folder's C sources, compiled on first use, with each exported
function's ctypes signature read from the one header that declares them all (fiddler_native.h).

The library is compiled once per machine with the system C compiler ($CC, else cc) into the cache folder
(host/paths.py), against the OpenMP runtime PyTorch has loaded, so that it shares PyTorch's threads. The limits
of native/limits.py reach the compiler as -D flags; they, the sources, the flags, the compiler and the runtime
make the cache key. Without a compiler, on other CPUs, or with FIDDLER_PACK_WEIGHTS=0, `library()` is None
(logged once, with the reason and what to do) and callers keep PyTorch's kernels and the Python paths: slower
decoding, same results. Import torch before this module builds or loads the library.

The Python wrappers over the library are in native/kernels.py, native/shm_serve.py and native/shm_call.py.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from fiddler_moe.host.paths import cache_dir
from fiddler_moe.native import limits

log = logging.getLogger("fiddler.kernels")

_HERE = Path(__file__).parent
SOURCES = [_HERE / name for name in ("bf16_gemv.c", "quant_gemv.c", "quantize.c", "rms_norm.c", "parked_wait.c",
                                     "shm_serve.c", "shm_call.c", "limits.c")]
HEADER = _HERE / "fiddler_native.h"  # every exported function and the structs Python mirrors
HEADERS = [HEADER, _HERE / "shm_lane.h", _HERE / "convert.h"]
# No contraction of a*b+c into one rounding: the combine must round each product as PyTorch does. A function
# exported without a prototype in HEADER would have no ctypes signature: missing-prototypes makes that an error.
_FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-fPIC", "-Werror=missing-prototypes"]


def compiler_flags() -> list[str]:
    """The flags each source is compiled with, the shared limits among them."""
    return [*_FLAGS, *(f"-D{name}={value}" for name, value in limits.values().items())]


def openmp_runtime() -> str | None:
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


def why_unavailable() -> str | None:
    """Why this machine or setting gets no library, or None."""
    if os.environ.get("FIDDLER_PACK_WEIGHTS", "1") == "0":
        return "FIDDLER_PACK_WEIGHTS=0"
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return f"it is built for x86-64 Linux, not {platform.system()} {platform.machine()}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "this CPU has no AVX2 and FMA"
    return None


def _build(target: Path, compiler: str, flags: list[str], runtime: str | None) -> None:
    """Compile SOURCES into `target`; several processes may race, the last rename wins with equal bytes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        objects = [str(Path(tmp) / source.with_suffix(".o").name) for source in SOURCES]
        lib = Path(tmp) / target.name
        # Link the objects against PyTorch's OpenMP library itself (not -fopenmp's default libgomp), which may be
        # a renamed copy inside the torch package.
        link = [runtime, f"-Wl,-rpath,{os.path.dirname(runtime)}"] if runtime else ["-fopenmp"]
        compile_each = [[compiler, *flags, "-c", str(source), "-o", obj] for source, obj in zip(SOURCES, objects)]
        _run_all(compile_each)  # at once: the first build is part of a first launch
        _run_all([[compiler, "-shared", *objects, *link, "-o", str(lib)]])
        os.replace(lib, target)


def _run_all(commands: list[list[str]], timeout_s: float = 120) -> None:
    """Run the commands side by side; RuntimeError with the first failure's command and error output."""
    running = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for command in commands]
    try:
        for command, process in zip(commands, running):
            _, err = process.communicate(timeout=timeout_s)
            if process.returncode != 0:
                raise RuntimeError(f"`{' '.join(command)}` failed: {err.strip()[-500:]}")
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()
                process.wait()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built library with every function's signature set, or None (logged once, with what to do about it)."""
    why = why_unavailable()
    if why:
        log.info("PyTorch's bfloat16 kernel serves decoding: %s", why)
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("decoding in bfloat16 uses PyTorch's slower kernel: no C compiler found (install gcc or set CC)")
        return None
    runtime = openmp_runtime()
    flags = compiler_flags()
    sources = b"".join(source.read_bytes() for source in [*SOURCES, *HEADERS])
    key = hashlib.sha256(sources + repr((flags, compiler, runtime)).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"bf16_gemv-{key}.so"
    try:
        if not target.exists():
            _build(target, compiler, flags, runtime)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("decoding in bfloat16 uses PyTorch's slower kernel: building %s failed: %s",
                    ", ".join(source.name for source in SOURCES), e)
        return None
    for name, (argtypes, restype) in signatures().items():  # a header Python cannot read stops here, loudly
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    return lib


def available() -> bool:
    return library() is not None


# --- the signatures, from the header ---

_C_TYPES = {"int64_t": ctypes.c_int64, "int": ctypes.c_int, "uint32_t": ctypes.c_uint32, "double": ctypes.c_double}
_PROTOTYPE = re.compile(r"(?P<result>[\w\s*]+?)\s*\b(?P<name>fiddler_\w+)\s*\((?P<params>[^()]*)\)")


def _ctype(declaration: str, named: bool, where: str) -> type | None:
    """The ctypes type of a return type (`named` False: "int64_t", "void") or of a parameter with its name
    ("const uint16_t *x"): any pointer is a c_void_p."""
    if "*" in declaration:
        return ctypes.c_void_p
    words = [word for word in declaration.split() if word != "const"]
    if named and len(words) == 2 and words[0] in _C_TYPES:
        return _C_TYPES[words[0]]
    if not named and words == ["void"]:
        return None
    if not named and len(words) == 1 and words[0] in _C_TYPES:
        return _C_TYPES[words[0]]
    raise ValueError(f"{HEADER.name}: {where}: no ctypes type for `{declaration.strip()}`; use int64_t, int, "
                     f"uint32_t, double or a pointer (or add the type to _C_TYPES in native/build.py)")


def signatures(header: Path = HEADER) -> dict[str, tuple[list[type], type | None]]:
    """(argtypes, restype) of every function `header` declares, by name. Besides prototypes of fiddler_*
    functions the header may hold only structs and preprocessor lines; anything else raises ValueError."""
    text = re.sub(r"/\*.*?\*/|//[^\n]*", " ", header.read_text(), flags=re.DOTALL)
    text = re.sub(r"^\s*#[^\n]*", "", text, flags=re.MULTILINE)
    statements, depth, start = [], 0, 0
    for i, char in enumerate(text):  # top-level statements: split at each `;` outside braces
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == ";" and depth == 0:
            statements.append(" ".join(text[start:i].split()))
            start = i + 1
    if text[start:].strip() or depth != 0:
        raise ValueError(f"{header.name}: unbalanced braces or text after the last `;`")
    found: dict[str, tuple[list[type], type | None]] = {}
    for statement in statements:
        if statement.startswith(("typedef struct ", "struct ")):
            continue
        match = _PROTOTYPE.fullmatch(statement)
        if match is None:
            raise ValueError(f"{header.name}: cannot read `{statement}`: only prototypes of fiddler_* functions and "
                             f"structs belong there")
        name, params = match["name"], match["params"].strip()
        if name in found:
            raise ValueError(f"{header.name}: {name} is declared twice")
        if not params:
            raise ValueError(f"{header.name}: {name}() declares no parameters: write {name}(void)")
        argtypes = [] if params == "void" else [_ctype(p, True, f"{name}'s `{p.strip()}`") for p in params.split(",")]
        found[name] = (argtypes, _ctype(match["result"], False, f"{name}'s return type"))
    if not found:
        raise ValueError(f"{header.name}: no fiddler_* prototypes found")
    return found
