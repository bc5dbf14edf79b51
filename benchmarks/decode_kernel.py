"""One expert's decoding products, side by side: PyTorch's bfloat16 `linear`, the AVX2 decoding kernel
(native/bf16_gemv.c) and the same kernel built without its prefetching.

    .venv/bin/python benchmarks/decode_kernel.py                 # mini's shapes, 1 and 2 threads
    .venv/bin/python benchmarks/decode_kernel.py --hidden 4096 --intermediate 14336 --threads 8

Each figure is the best of --rounds rounds; in every round each contestant computes --calls experts (gate_up,
then down, one row each) cycling through 8 experts' weights so that they come from memory, not the cache.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from fiddler_moe.native import build, kernels


def build_without_prefetch(folder: Path) -> ctypes.CDLL:
    source = kernels.SOURCES[0].read_text().replace("#define PREFETCH_ROWS 12", "#define PREFETCH_ROWS 0")
    source = source.replace("if ((c & 31) == 0) {", "if (PREFETCH_ROWS && (c & 31) == 0) {")
    (folder / "nopf.c").write_text(source)
    runtime = build.openmp_runtime()
    subprocess.run(["cc", *build.compiler_flags(), "-I", str(build.HEADER.parent), "-c", str(folder / "nopf.c"),
                    "-o", str(folder / "nopf.o")], check=True)
    subprocess.run(["cc", "-shared", str(folder / "nopf.o"), *([runtime] if runtime else ["-fopenmp"]), "-o",
                    str(folder / "nopf.so")], check=True)
    lib = ctypes.CDLL(str(folder / "nopf.so"))
    lib.fiddler_bf16_linear.argtypes = kernels.library().fiddler_bf16_linear.argtypes
    return lib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=3584)
    parser.add_argument("--threads", default="1,2", help="thread counts, e.g. 1,2")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--calls", type=int, default=32)
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("the decoding kernel is not available here (see the log above)")
    h, i = args.hidden, args.intermediate
    gate_up = [torch.randn(2 * i, h).bfloat16() for _ in range(8)]
    down = [torch.randn(h, i).bfloat16() for _ in range(8)]
    x, mid = torch.randn(1, h).bfloat16(), torch.randn(1, i).bfloat16()
    out_up, out_down = torch.empty(1, 2 * i, dtype=torch.bfloat16), torch.empty(1, h, dtype=torch.bfloat16)
    linear = torch.nn.functional.linear
    with tempfile.TemporaryDirectory() as tmp:
        plain = build_without_prefetch(Path(tmp)).fiddler_bf16_linear
        contestants = {
            "PyTorch linear": lambda e: (linear(x, gate_up[e]), linear(mid, down[e])),
            "kernel": lambda e: (kernels.linear(x, gate_up[e]), kernels.linear(mid, down[e])),
            "kernel without prefetch": lambda e: (
                plain(gate_up[e].data_ptr(), 2 * i, h, x.data_ptr(), 1, None, out_up.data_ptr()),
                plain(down[e].data_ptr(), h, i, mid.data_ptr(), 1, None, out_down.data_ptr())),
        }
        nbytes = 3 * h * i * 2
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            best = {name: float("inf") for name in contestants}
            for _ in range(args.rounds):
                for name, step in contestants.items():
                    step(0)
                    started = time.perf_counter()
                    for call in range(args.calls):
                        step(call % 8)
                    best[name] = min(best[name], (time.perf_counter() - started) / args.calls)
            print(f"{threads} thread(s), one {h}x{i} expert, 1 row: " + "; ".join(
                f"{name} {s * 1e3:.2f} ms ({nbytes / s / 1e9:.1f} GB/s)" for name, s in best.items()))


if __name__ == "__main__":
    main()
