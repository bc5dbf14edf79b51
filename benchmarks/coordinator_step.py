"""Where a decode step of the CPU coordinator goes, part by part: a cluster's coordinator against transformers' own
model with its experts answering zeros, both stepped by the serving engine's code, in alternating turns in one
process.

    .venv/bin/python benchmarks/coordinator_step.py --preset mini
    .venv/bin/python benchmarks/coordinator_step.py --preset small --turns 6

The cluster is the default layout's (1 worker, every expert cold, the C layer call); its coordinator runs with
--coordinator-threads (1 by default: then the engine thread's CPU time is the whole coordinator's work, and a busy
machine moves it far less than the wall clock). The zero-experts model (benchmarks/coordinator_layers.py's, with
the coordinator's linear-layer path) is stepped by the engine's `_Batch` and `_Row` in this thread. Forward hooks
read the thread's CPU time around each part: the embedding, the rotary tables, each decoder layer's input norm,
attention (its projections, rotary, cache, SDPA), post-attention norm, router and experts module (for the cluster:
the experts hook, the whole layer call to the worker), the final norm and the head; `rest` is the model's forward
beyond its parts (residual adds, the mask, transformers' Python between modules), `engine` the step beyond the
forward (inputs, sampling). The hooks cost a little time themselves, the same on both sides.

The difference between the two columns is the cluster's own cost: the experts hook, and every part slower right
after the worker's turn (the worker streams a layer's expert weights through the caches both processes share).
"""

from __future__ import annotations

import argparse
import statistics
import time

# Modules by the name transformers gives them in its decoder models, as (part, name suffix).
PARTS = (("embedding", "embed_tokens"), ("rotary", "rotary_emb"), ("input norm", "input_layernorm"),
         ("attention", "self_attn"), ("post-attention norm", "post_attention_layernorm"), ("router", "mlp.gate"),
         ("experts", "mlp.experts"), ("final norm", "model.norm"), ("head", "lm_head"))


class PartClock:
    """CPU time of this thread inside each part of `model`'s forward, through forward hooks."""

    def __init__(self, model, clock=time.thread_time):
        self.clock = clock
        self.seconds = dict.fromkeys([part for part, _ in PARTS] + ["model"], 0.0)
        self._started: dict[str, float] = {}
        for name, module in model.named_modules():
            part = next((part for part, suffix in PARTS if name == suffix or name.endswith("." + suffix)), None)
            if part is not None:
                self._watch(module, part, name)
        self._watch(model, "model", "")

    def _watch(self, module, part: str, key: str) -> None:
        def start(*_):
            self._started[key] = self.clock()

        def stop(*_):
            self.seconds[part] += self.clock() - self._started[key]

        module.register_forward_pre_hook(start)
        module.register_forward_hook(stop)

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    def per_step(self, steps: int, step_seconds: float) -> dict[str, float]:
        """ms a step of each part, `rest` (the forward beyond its parts) and `engine` (the step beyond it)."""
        ms = {part: 1e3 * s / steps for part, s in self.seconds.items()}
        model = ms.pop("model")
        ms["rest"] = model - sum(ms.values())
        ms["engine"] = 1e3 * step_seconds / steps - model
        ms["step"] = 1e3 * step_seconds / steps
        return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--coordinator-threads", type=int, default=1)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16, help="decode steps a turn")
    parser.add_argument("--context", type=int, default=32, help="prompt tokens before a turn's steps")
    args = parser.parse_args()

    from fiddler_moe.host import numa

    numa.use_openmp_settings()  # as the fiddler commands run the coordinator, before torch loads OpenMP
    import torch
    from transformers import DynamicCache

    from fiddler_moe.benchmarks import coordinator_layers
    from fiddler_moe.coordinator.batching import RequestHandle, SamplingParams, _Batch, _Row, choose
    from fiddler_moe.experts import compute
    from fiddler_moe.host.paths import cache_dir
    from fiddler_moe.launch.cluster import Cluster
    from fiddler_moe.launch.synthetic import write_checkpoint

    folder = str(write_checkpoint(args.preset, cache_dir() / "bench" / f"{args.preset}-bfloat16", torch.bfloat16))
    prompt = [10 + i % 1000 for i in range(args.context)]
    cluster = Cluster(folder, workers=1, device="cpu", dtype="bfloat16", coordinator_threads=args.coordinator_threads,
                      quiet=True)
    cluster.start()
    try:
        engine = cluster.coordinator.engine
        cluster_parts = PartClock(cluster.coordinator.model)
        steps = {"seconds": 0.0, "count": 0, "fresh": True}
        engine_step = engine._decode_step

        def timed_step() -> None:  # in the engine's thread
            if steps["fresh"]:  # a turn's first decoding step: its prefill is not counted
                cluster_parts.reset()
                steps.update(seconds=0.0, count=0, fresh=False)
            started = time.thread_time()
            engine_step()
            steps["seconds"] += time.thread_time() - started
            steps["count"] += 1

        engine._decode_step = timed_step
        torch.set_num_threads(args.coordinator_threads)
        way = compute.chosen_path()
        way = "plain" if way == "off" else way
        zero = coordinator_layers.load(folder, way)
        zero_parts = PartClock(zero)

        def cluster_turn() -> dict[str, float]:
            steps["fresh"] = True
            cluster.generate(prompt, max_new_tokens=args.steps + 1, ignore_eos=True)
            deadline = time.monotonic() + 10
            while steps["count"] < args.steps and time.monotonic() < deadline:  # the request ends inside the
                time.sleep(0.001)  # last step, which the engine's thread is still counting
            return cluster_parts.per_step(steps["count"], steps["seconds"])

        def zero_turn() -> dict[str, float]:
            with torch.inference_mode():
                row = _Row.of(RequestHandle("zero", prompt, SamplingParams(ignore_eos=True)), [])
                ids = torch.tensor([prompt])
                mask = torch.ones_like(ids)
                cache = DynamicCache()
                out = zero(input_ids=ids, attention_mask=mask, position_ids=mask.cumsum(1) - 1, cache=cache,
                           use_cache=True, logits_to_keep=1)
                batch = _Batch([row], cache, mask)
                row.last = choose([row], out.logits[:, -1].float())[0]
                zero_parts.reset()
                started = time.thread_time()
                for _ in range(args.steps):
                    row.last = choose([row], batch.step(zero))[0]
                return zero_parts.per_step(args.steps, time.thread_time() - started)

        cluster_turn(), zero_turn()  # warm-up
        turns: dict[str, list[dict[str, float]]] = {"cluster": [], "zero": []}
        for i in range(args.turns):
            for side in ("cluster", "zero") if i % 2 == 0 else ("zero", "cluster"):
                turns[side].append(cluster_turn() if side == "cluster" else zero_turn())
    finally:
        cluster.stop()

    print(f"{args.preset}, coordinator {args.coordinator_threads} thread(s), CPU time of the stepping thread, "
          f"ms a decode step, median of {args.turns} turns of {args.steps} steps:")
    print(f"| part | cluster's coordinator | experts answering zeros | difference |\n| --- | --- | --- | --- |")
    for part in turns["cluster"][0]:
        ours, zeros = (statistics.median(t[part] for t in turns[side]) for side in ("cluster", "zero"))
        print(f"| {part} | {ours:.2f} | {zeros:.2f} | {ours - zeros:+.2f} |")
    ratios = [c["step"] / z["step"] for c, z in zip(turns["cluster"], turns["zero"])]
    print(f"step, cluster over zeros per turn: median {statistics.median(ratios):.3f} "
          f"({min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
