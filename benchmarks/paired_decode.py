"""Decode time per token of two contestants loaded side by side and run in short alternating turns.

On a machine whose speed drifts (a shared VM), a `fiddler bench` round of 64 tokens is long against the swings;
turns of a dozen tokens, paired, show differences of a few percent that rounds hide. Each contestant runs in its own
process (OpenMP reads its settings once per process) and answers one turn per line:

    .venv/bin/python benchmarks/paired_decode.py --preset mini "GOMP_SPINCOUNT=3000" "GOMP_SPINCOUNT=30000"
    .venv/bin/python benchmarks/paired_decode.py --preset small "" transformers
    .venv/bin/python benchmarks/paired_decode.py --preset mini "tree=../old-checkout" ""
    .venv/bin/python benchmarks/paired_decode.py --preset mini "coordinator_threads=1" ""
    .venv/bin/python benchmarks/paired_decode.py --preset mini "quantize=int4,coordinator_threads=1" "quantize=int4"

A contestant is `transformers` (its own generate, 2 threads, the environment this script was started with), or a
cluster of this checkout (or of `tree=PATH`, run by that checkout's own .venv) with `fiddler-launch`'s default
layout and the environment settings given as NAME=VALUE, comma-separated (`coordinator_threads=N` sets the
coordinator's torch threads instead, --coordinator-threads; `quantize=FORMAT` the experts' format, --quantize). Prints each side's ms per decode token
and the median of the per-turn ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def serve_turns(folder: str, tokens: int, prompt_len: int, contestant: str, coordinator_threads: int | None,
                quantize: str) -> None:
    """The child: load the contestant, then time one greedy run of `tokens` new tokens per line on stdin."""
    if contestant == "cluster":  # OpenMP's waiting as the fiddler commands set it, before torch loads OpenMP
        from fiddler_moe.host import numa

        numa.use_openmp_settings()
    import torch

    prompt = [10 + i % 1000 for i in range(prompt_len)]
    if contestant == "transformers":
        import transformers
        from transformers.generation.streamers import BaseStreamer

        torch.set_num_threads(2)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
        ids = torch.tensor([prompt])

        class FirstToken(BaseStreamer):
            def __init__(self):
                self.puts, self.at = 0, 0.0

            def put(self, value):
                self.puts += 1
                if self.puts == 2:  # the prompt, then the first new token: decoding starts here
                    self.at = time.perf_counter()

            def end(self):
                pass

        def turn(n: int) -> float:
            streamer = FirstToken()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), min_new_tokens=n, max_new_tokens=n,
                           do_sample=False, streamer=streamer, pad_token_id=0)
            return (time.perf_counter() - streamer.at) / (n - 1)

        run = turn
    else:
        from fiddler_moe.launch.cluster import Cluster
        from fiddler_moe.launch.options import ClusterOptions

        cluster = Cluster(ClusterOptions(model=folder, workers=1, device="cpu", dtype="bfloat16",
                                         coordinator_threads=coordinator_threads, quantize=quantize, quiet=True))
        cluster.start()

        def run(n: int) -> float:
            out = cluster.generate(prompt, max_new_tokens=n, ignore_eos=True)
            return out.decode_seconds / (n - 1)

    try:
        run(4)
        print("ready", flush=True)
        for _ in sys.stdin:
            print(json.dumps(run(tokens + 1)), flush=True)
    finally:
        if contestant == "cluster":
            cluster.stop()


def start(spec: str, folder: str, tokens: int, prompt_len: int) -> subprocess.Popen:
    env, tree, flags = dict(os.environ), ROOT, []
    if spec != "transformers":
        for item in filter(None, spec.split(",")):
            name, _, value = item.partition("=")
            if name == "tree":
                tree = Path(value).resolve()
            elif name == "coordinator_threads":
                flags += ["--coordinator-threads", value]
            elif name == "quantize":
                flags += ["--quantize", value]
            else:
                env[name] = value
    # Another checkout runs in its own environment (`make setup` there), whose editable install imports its code.
    python = Path(sys.executable) if tree == ROOT else tree / ".venv" / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"tree={tree}: no {python}; run `make setup` in that checkout first")
    command = [str(python), str(Path(__file__).resolve()), "-", "-", "--model", folder, "--tokens", str(tokens),
               "--prompt-len", str(prompt_len), "--serve", "transformers" if spec == "transformers" else "cluster",
               *flags]
    return subprocess.Popen(command, cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--model", help="a checkpoint folder instead of a preset")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per turn")
    parser.add_argument("--turns", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens before each turn's decoding")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # in the child processes: transformers or cluster
    parser.add_argument("--coordinator-threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--quantize", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_turns(args.model, args.tokens, args.prompt_len, args.serve, args.coordinator_threads, args.quantize)
        return
    if args.model:
        folder = args.model
    else:
        import torch

        from fiddler_moe.launch.synthetic import write_checkpoint
        from fiddler_moe.host.paths import cache_dir

        folder = str(write_checkpoint(args.preset, cache_dir() / "bench" / f"{args.preset}-bfloat16", torch.bfloat16))
    sides = {spec: start(spec, folder, args.tokens, args.prompt_len) for spec in (args.a, args.b)}
    times: dict[str, list[float]] = {spec: [] for spec in sides}
    try:
        for side in sides.values():
            if side.stdout.readline().strip() != "ready":
                raise SystemExit("a contestant failed to start (see its messages above)")
        for turn in range(args.turns):
            for spec in (args.a, args.b) if turn % 2 == 0 else (args.b, args.a):
                sides[spec].stdin.write("go\n")
                sides[spec].stdin.flush()
                times[spec].append(json.loads(sides[spec].stdout.readline()))
    finally:
        for side in sides.values():
            side.stdin.close()
            side.wait(timeout=60)
    for spec, values in times.items():
        ms = [v * 1e3 for v in values]
        print(f"{spec or '(defaults)'}: ms per decode token min {min(ms):.2f} median {statistics.median(ms):.2f} "
              f"max {max(ms):.2f}")
    ratios = [a / b for a, b in zip(times[args.a], times[args.b])]
    print(f"time of the first over the second, per turn: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {len(ratios)} turns)")


if __name__ == "__main__":
    main()
