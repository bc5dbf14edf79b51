"""A decode step of the coordinator's own layers (attention, norms, routers, head; experts answer zeros), several
ways in one process, in alternating turns, against its bytes at the measured read bandwidth.

    .venv/bin/python benchmarks/coordinator_layers.py --preset mini --threads 1
    .venv/bin/python benchmarks/coordinator_layers.py --preset small --threads 2 --ways onednn,avx2

Each way is transformers' own model of the preset with its experts replaced by nothing:
- plain: transformers as it comes (PyTorch's bfloat16 `linear`), DynamicCache;
- onednn / avx512 / avx2: the coordinator's linear layers through coordinator/cpu_linear.py with that bfloat16
  path (FIDDLER_BF16_PATH), and its RMS norms through coordinator/cpu_norm.py, DynamicCache;
- onednn-static: onednn with transformers' StaticCache (no growing the cache by `cat` each step);
- onednn-eager: onednn with transformers' eager attention instead of SDPA (attn_implementation="eager");
- int8 / int4: the linear layers a CPU coordinator quantizes with --quantize (attention, shared experts, head)
  through the quantized kernels (cpu_linear.quantize_linear_layers), the rest onednn, DynamicCache.
A turn times --steps decode steps after a prompt of --context tokens (or, with --prefill, the prompt); each way gets
--turns turns. With one thread the clock is the thread's CPU time, which a busy neighbour on a shared machine moves
far less than the wall clock; with more, the wall clock. Prints each way's median and range, its ratio to the first
way per turn, and the floor: the non-expert bytes of a decode token (benchmarks/bench.py's decode_bytes) over the
read bandwidth at these threads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

WAYS = ("plain", "onednn", "amx", "avx512", "avx2", "onednn-static", "onednn-eager", "int8", "int4")


def load(folder: str, way: str) -> torch.nn.Module:
    import transformers
    from transformers.integrations.moe import ExpertsInterface

    from fiddler_moe.coordinator import cpu_linear, cpu_norm
    from fiddler_moe.experts import compute

    ExpertsInterface.register("nothing", lambda self, hidden, index, weights: torch.zeros_like(hidden))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, experts_implementation="nothing",
        attn_implementation="eager" if way.endswith("-eager") else None).eval()
    empty = torch.nn.Parameter(torch.empty(0, dtype=torch.bfloat16), requires_grad=False)
    for module in model.modules():  # the experts' weights are never read: drop them, as a coordinator holds none
        if type(module).__name__.endswith("Experts"):
            for name, _ in list(module.named_parameters(recurse=False)):
                setattr(module, name, empty)
    if way in ("int8", "int4"):
        cpu_linear.quantize_linear_layers(model, way)
        way = "onednn"
    if way != "plain":
        path = way.split("-")[0]
        if path == "onednn" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            raise SystemExit("onednn: this CPU has no oneDNN bfloat16 support; use --ways plain,avx2")
        # the path's flags, read by cpu_linear's pack_linear_layers and by fast_linear
        for flag, value in compute.flags_of(path).items():
            setattr(compute, flag, value)
        cpu_linear.pack_linear_layers(model)
        cpu_norm.fuse_rms_norms(model)
    return model


def turn(model: torch.nn.Module, static: bool, context: int, steps: int, clock, prefill: bool = False) -> float:
    """Seconds per decode step of one turn: a prompt of `context` tokens, then `steps` greedy steps; or with
    `prefill` the seconds of the prompt's pass alone."""
    from transformers import DynamicCache, StaticCache

    prompt = torch.arange(10, 10 + context).unsqueeze(0)
    with torch.inference_mode():
        cache = (StaticCache(config=model.config, max_cache_len=context + steps + 1) if static
                 else DynamicCache(config=model.config))
        started = clock()
        out = model(prompt, past_key_values=cache, use_cache=True)
        if prefill:
            return clock() - started
        token = out.logits[:, -1:].argmax(-1)
        started = clock()
        for i in range(steps):
            position = torch.tensor([[context + i]])
            out = model(token, past_key_values=cache, use_cache=True, position_ids=position,
                        cache_position=position[0])
            token = out.logits[:, -1:].argmax(-1)
        return (clock() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, of {', '.join(WAYS)}")
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--steps", type=int, default=8, help="decode steps a turn")
    parser.add_argument("--context", type=int, default=32, help="prompt tokens before a turn's steps")
    parser.add_argument("--prefill", action="store_true", help="time the prompt's pass of --context tokens instead "
                        "of the decode steps (ms per prompt; the floor is then a decode step's, for scale)")
    parser.add_argument("--bandwidth-gbs", type=float, help="the read bandwidth for the floor, GB/s (default: "
                        "measured now, which a busy machine lowers)")
    args = parser.parse_args()
    ways = [w.strip() for w in args.ways.split(",")]
    if bad := [w for w in ways if w not in WAYS]:
        raise SystemExit(f"unknown way {bad[0]!r}; use {', '.join(WAYS)}")

    from fiddler_moe.benchmarks.bench import decode_bytes, measure_read_bandwidth
    from fiddler_moe.coordinator import loading
    from fiddler_moe.host.paths import cache_dir
    from fiddler_moe.launch.synthetic import write_checkpoint

    torch.set_num_threads(args.threads)
    folder = str(write_checkpoint(args.preset, cache_dir() / "bench" / f"{args.preset}-bfloat16", torch.bfloat16))
    skeleton, layout = loading.inspect(folder, "bfloat16")
    needed = decode_bytes(skeleton, layout)
    own_bytes = needed.non_expert + needed.embedding_row + needed.head
    del skeleton
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    models = {way: load(folder, way) for way in ways}
    for way in ways:  # warm-up: packed weights touched, kernels built
        turn(models[way], way.endswith("static"), args.context, 2, clock)
    times: dict[str, list[float]] = {way: [] for way in ways}
    for i in range(args.turns):
        for way in ways if i % 2 == 0 else ways[::-1]:
            times[way].append(1e3 * turn(models[way], way.endswith("static"), args.context, args.steps, clock,
                                         args.prefill))
    bandwidth = (args.bandwidth_gbs * 1e9 if args.bandwidth_gbs
                 else measure_read_bandwidth([args.threads], 512)["bytes_per_second"])
    floor = 1e3 * own_bytes / bandwidth
    print(f"{args.preset}, {args.threads} thread(s), {'CPU time' if args.threads == 1 else 'wall clock'}: "
          f"{own_bytes / 1e6:.1f} MB a decode step at {bandwidth / 1e9:.1f} GB/s = {floor:.2f} ms")
    first = ways[0]
    for way, ms in times.items():
        ratios = [a / b for a, b in zip(ms, times[first])]
        print(f"{way}: ms per {'prompt' if args.prefill else 'decode step'} median {statistics.median(ms):.2f} "
              f"(min {min(ms):.2f}, max {max(ms):.2f}); "
              f"{statistics.median(ms) / floor:.2f}x the floor; over {first} per turn median "
              f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
