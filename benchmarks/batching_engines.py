"""Concurrent streams decoded together on one cluster: our engine (coordinator/batching.py) against transformers'
continuous-batching manager (`generate_batch`, paged attention, every request's tokens packed into one forward
pass), both driving the same hooked model, so every cold expert is read by the workers in both.

    .venv/bin/python benchmarks/batching_engines.py --preset mini --streams 1,2,4,8 --new-tokens 32

For each number of streams, that many distinct prompts start at once and each makes --new-tokens tokens (greedy,
never stopping early). Printed per contestant: aggregate tok/s from the first submission to the last token (prefill
included), and for our engine also its decoding steps alone (tokens made in steps / seconds in steps); `exact`
says whether each stream's tokens equal its solo run. Turns alternate between the contestants.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fiddler_moe.benchmarks.bench import bench_checkpoint_path
from fiddler_moe.coordinator.batching import SamplingParams
from fiddler_moe.launch.cluster import Cluster
from fiddler_moe.launch.synthetic import write_checkpoint


def prompts(count: int, length: int) -> list[list[int]]:
    """Distinct prompts of slightly different lengths."""
    return [[1] + [(100 + 37 * i + 11 * j) % 500 for j in range(length - 1 - i % 3)] for i in range(count)]


def ours(cluster: Cluster, batch: list[list[int]], new_tokens: int) -> tuple[float, float, list[list[int]]]:
    engine = cluster.engine
    before = engine.stats()
    started = time.perf_counter()
    handles = [engine.submit(p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)) for p in batch]
    out = [h.result() for h in handles]
    wall = time.perf_counter() - started
    after = engine.stats()
    stepped = (after.generated_tokens - before.generated_tokens) - len(batch)  # less each prefill's token
    steps_s = after.decode_seconds - before.decode_seconds
    return sum(map(len, out)) / wall, stepped / steps_s if steps_s else 0.0, out


def theirs(cluster: Cluster, batch: list[list[int]], new_tokens: int, config) -> tuple[float, list[list[int]]]:
    from transformers import GenerationConfig

    generation = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=-1, pad_token_id=0)
    model = cluster.coordinator.model
    with cluster.engine.exclusive(), torch.inference_mode():
        started = time.perf_counter()
        results = model.generate_batch(batch, generation_config=generation, continuous_batching_config=config,
                                       persistent_manager=True, warmup=False)
        wall = time.perf_counter() - started
    ordered = sorted(results.values(), key=lambda r: int(r.request_id.rsplit("_", 1)[-1]))
    out = [list(r.generated_tokens) for r in ordered]
    return sum(map(len, out)) / wall, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--streams", default="1,2,4,8")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    from transformers import ContinuousBatchingConfig

    dtype = getattr(torch, args.dtype)
    folder = write_checkpoint(args.preset, bench_checkpoint_path(args.preset, args.dtype), dtype=dtype)
    streams = [int(n) for n in args.streams.split(",")]
    batch = prompts(max(streams), args.prompt_len)
    config = ContinuousBatchingConfig(num_blocks=4 * max(streams), max_batch_tokens=max(streams) * args.prompt_len,
                                      max_requests_per_batch=max(streams), allow_block_sharing=False, page_size=64)
    rows = []
    with Cluster(folder, workers=1, device="cpu", dtype=args.dtype, quiet=True, max_batch_size=max(streams)) as c:
        solo = [ours(c, [p], args.new_tokens)[2][0] for p in batch]
        if not args.skip_transformers:
            theirs(c, batch[:1], 4, config)  # the manager's set-up, once
        for n in streams:
            mine, steps, theirs_rates, exact_mine, exact_theirs = [], [], [], True, True
            for _ in range(args.repeats):
                rate, step_rate, out = ours(c, batch[:n], args.new_tokens)
                mine.append(rate)
                steps.append(step_rate)
                exact_mine &= out == solo[:n]
                if not args.skip_transformers:
                    rate, out = theirs(c, batch[:n], args.new_tokens, config)
                    theirs_rates.append(rate)
                    exact_theirs &= out == solo[:n]
            row = {"streams": n, "engine_tok_s": statistics.median(mine),
                   "engine_steps_tok_s": statistics.median(steps), "engine_exact": exact_mine}
            if theirs_rates:
                row |= {"generate_batch_tok_s": statistics.median(theirs_rates), "generate_batch_exact": exact_theirs}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{args.preset} {args.dtype}, {args.prompt_len}-token prompts, {args.new_tokens} new tokens, "
          f"median of {args.repeats}")
    print("| streams | engine tok/s (end to end) | engine tok/s (decode steps) | generate_batch tok/s | exact |")
    print("|---|---|---|---|---|")
    for r in rows:
        exact = f"{'yes' if r['engine_exact'] else 'no'} / {'yes' if r.get('generate_batch_exact') else 'no'}"
        print(f"| {r['streams']} | {r['engine_tok_s']:.1f} | {r['engine_steps_tok_s']:.1f} | "
              f"{r.get('generate_batch_tok_s', float('nan')):.1f} | {exact} |")


if __name__ == "__main__":
    main()
