"""One expert computed from bfloat16, int8 and int4 weights, side by side: time per expert and the rate at which
each reads its weights, against the machine's measured read bandwidth.

    .venv/bin/python benchmarks/quant_kernel.py                       # mini's shapes, 1 and 2 threads, 1 row
    .venv/bin/python benchmarks/quant_kernel.py --hidden 2048 --intermediate 5632 --rows 1,8,128

Contestants, for each row count: the bfloat16 expert as a worker computes it (experts/compute.py's ExpertKernel:
oneDNN, the AVX512-BF16 or the AVX2 kernel, as FIDDLER_BF16_PATH picks), and the quantized ones (experts/compute.py with
QuantizedExpertWeights: the fused C kernel, integer dot products, for any number of rows), plus each C path of
the fused quantized kernel asked for by name (the plain one up to MAX_ROWS rows). Each figure is the best of
--rounds rounds; a round computes --calls experts cycling through enough experts' weights that they come from
memory, not the caches. GB/s is the weight bytes of one expert over its time.
"""

from __future__ import annotations

import argparse
import time

import torch

from fiddler_moe.benchmarks.bench import measure_read_bandwidth
from fiddler_moe.experts import quant
from fiddler_moe.experts.compute import ExpertKernel, ExpertWeights, bfloat16_path
from fiddler_moe.native import kernels, limits
from fiddler_moe.protocol.messages import KernelSpec

PATHS = {limits.QUANT_ISA_PLAIN: "plain", limits.QUANT_ISA_AVX2: "avx2", limits.QUANT_ISA_AVX512: "avx512"}
CACHE_BYTES = 256 << 20  # weights cycled through per contestant: well beyond the last-level caches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=3584)
    parser.add_argument("--threads", default="1,2", help="thread counts, e.g. 1,2")
    parser.add_argument("--rows", default="1", help="activation rows per expert, e.g. 1,8,128")
    parser.add_argument("--paths", default="plain,avx2,avx512", help="C paths of the fused quantized kernel to time "
                        "by name besides the worker's own choice, e.g. avx2; none for none")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=32)
    parser.add_argument("--cpu-time", action="store_true", help="time with this thread's CPU time instead of the "
                        "wall clock (one thread only): on a machine shared with other work, time spent descheduled "
                        "does not count")
    args = parser.parse_args()
    if args.cpu_time and args.threads != "1":
        parser.error("--cpu-time measures one thread: use it with --threads 1")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    h, i = args.hidden, args.intermediate
    generator = torch.Generator().manual_seed(0)
    copies = max(2, CACHE_BYTES // (3 * h * i * 2))
    floats = [ExpertWeights((torch.randn(2 * i, h, generator=generator) * 0.02).bfloat16(),
                            (torch.randn(h, i, generator=generator) * 0.02).bfloat16()) for _ in range(copies)]
    kernel = ExpertKernel(KernelSpec(activation="silu", dtype="bfloat16"))
    contestants = {f"bfloat16 ({bfloat16_path()})": (kernel, floats, floats[0].nbytes)}
    for name in quant.FORMATS:
        weights = [quant.QuantizedExpertWeights(quant.quantize(w.gate_up, name), quant.quantize(w.down, name))
                   for w in floats]
        contestants[name] = (kernel, weights, weights[0].nbytes)
    best_path = PATHS[kernels.library().fiddler_quant_isa()] if kernels.available() else "none (no library)"
    print(f"one {h}x{i} gated SiLU expert; {copies} copies cycled; the best C path here: {best_path}")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        bandwidth = measure_read_bandwidth([threads], 512)["bytes_per_second"]
        print(f"{threads} thread(s): read bandwidth {bandwidth / 1e9:.1f} GB/s (torch.sum over 512 MiB, wall clock); "
              f"kernels timed by {'CPU time' if args.cpu_time else 'wall clock'}")
        for rows in [int(r) for r in args.rows.split(",")]:
            x = (torch.randn(rows, h, generator=generator)).bfloat16()
            steps = {name: (lambda e, k=k, ws=ws: k.forward(ws[e % len(ws)], x))
                     for name, (k, ws, _) in contestants.items()}
            nbytes = {name: n for name, (_, _, n) in contestants.items()}
            if kernels.available():
                for name in quant.FORMATS:
                    ws = contestants[name][1]
                    for isa, label in PATHS.items():
                        if label not in args.paths.split(","):
                            continue
                        if isa > kernels.library().fiddler_quant_isa() or (isa == limits.QUANT_ISA_PLAIN
                                                                            and rows > limits.MAX_ROWS):
                            continue  # the plain path only where it takes seconds, not minutes
                        steps[f"{name} C {label}"] = (lambda e, ws=ws, isa=isa: kernels.quant_silu_expert(
                            ws[e % len(ws)].gate_up.code, (ws[e % len(ws)].gate_up.q, ws[e % len(ws)].gate_up.scale),
                            (ws[e % len(ws)].down.q, ws[e % len(ws)].down.scale), x, isa=isa))
                        nbytes[f"{name} C {label}"] = nbytes[name]
            best = {name: float("inf") for name in steps}
            for _ in range(args.rounds):
                for name, step in steps.items():
                    step(0)
                    started = clock()
                    for call in range(args.calls):
                        step(call)
                    best[name] = min(best[name], (clock() - started) / args.calls)
            base = best[next(iter(contestants))]
            for name, seconds in best.items():
                print(f"  {rows:4d} row(s) {name:22s} {seconds * 1e3:8.3f} ms  {nbytes[name] / seconds / 1e9:6.1f} GB/s"
                      f"  {base / seconds:5.2f}x bfloat16")


if __name__ == "__main__":
    main()
