"""`fiddler bench`: prefill and decode speed of the cluster, side by side with transformers' own `generate` and with
the memory-bandwidth ceiling, on the same checkpoint, machine and threads, in one run.

    fiddler bench --preset mini                 # random-weight checkpoint of real shapes, bfloat16, cached
    fiddler bench --preset small --workers 1,2 --threads-per-worker 1,2
    fiddler bench --preset small --quantize none,int8,int4     # the workers' experts in each format
    fiddler bench --model ~/models/Mixtral-8x7B --device cuda --device-memory 20GiB,40GiB

What it measures, per configuration of the grid (workers x threads per worker x device memory x format):
- prefill tok/s: a fixed random prompt of --prompt-len tokens, from the call to the first new token;
- decode tok/s: --new-tokens greedy tokens (EOS ignored), from the first new token to the last;
  each the median of --repeats runs after a warm-up;
- where a decode token's time goes (coordinator forward split into non-expert layers, hot experts, routing
  bookkeeping, waiting on workers as worker compute and transport; sampling and Python outside the forward),
  each worker's busy share, and the hot-expert hit rate.
Then transformers' eager `generate` on the same folder, dtype, device and total threads, and the ceiling: the
machine's measured read bandwidth over the bytes one decode token must read (`decode_bytes`). On a GPU, for each
--device-memory budget, also transformers with accelerate's weight offloading at that budget (device_map="auto",
max_memory: the budget on the GPU, the rest in host memory): what a user whose model does not fit would run.

Results go to the terminal (bench_report.print_tables), to <out>/bench-<name>-<time>.json with the machine's
description, and to a PNG chart beside it when matplotlib is installed (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fiddler_moe.coordinator import loading
from fiddler_moe.benchmarks.runners import NOT_BANDWIDTH, ClusterRunner, SweepPoint, TransformersRunner
from fiddler_moe.coordinator.placement import format_size
from fiddler_moe.host.paths import cache_dir
from fiddler_moe.launch.options import ClusterOptions
from fiddler_moe.launch.synthetic import PRESETS, estimated_bytes, write_checkpoint
from fiddler_moe.native import kernels
from fiddler_moe.experts.compute import chosen_path
from fiddler_moe.host.numa import available_memory_bytes

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BANDWIDTH_METHOD = ("torch.sum over a {size} float32 tensor (read once per sum), best of {repeats} sums at each "
                    "thread count in {threads}; the highest rate")
# Room for the runtime beside the weights: two Python processes with torch, activations, KV cache.
RUNTIME_MARGIN_BYTES = 1 << 30


class BenchError(ValueError):
    """A benchmark that cannot run as asked; the message says what to change."""


@dataclass
class BenchOptions:
    preset: str | None = "mini"
    model: Path | None = None  # a checkpoint folder instead of a preset
    dtype: str = "bfloat16"  # or "auto": the checkpoint's (with --model)
    prompt_len: int = 256
    new_tokens: int = 64
    repeats: int = 3
    warmup: int = 1
    workers: list[int] = field(default_factory=lambda: [1])
    threads_per_worker: list[int | None] = field(default_factory=lambda: [None])  # None: the launcher's default
    device_memory: list[str | None] = field(default_factory=lambda: [None])  # None: the device's default
    quantize: list[str] = field(default_factory=lambda: ["none"])  # the workers' formats to sweep
    device: str = "auto"
    coordinator_threads: list[int | None] = field(default_factory=lambda: [None])  # None: fiddler-launch's
    baseline: bool = True  # transformers' generate
    # On a GPU, per --device-memory budget: transformers with accelerate's weight offloading at that budget
    offload: bool = True
    baseline_threads: list[int] | None = None  # None: each cluster's total threads, up to the cores
    out: Path = Path("bench-results")
    chart: bool = True
    seed: int = 0
    bandwidth_mib: int = 1024
    interleave: bool = True  # run the contestants in turns (all loaded at once) when memory allows


# --- the checkpoint ---


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise BenchError(f"unknown --dtype {name!r}; use {', '.join(DTYPES)} (or auto with --model)")
    return DTYPES[name]


def bench_checkpoint_path(preset: str, dtype: str) -> Path:
    return cache_dir() / "bench" / f"{preset}-{dtype}"


def check_fits(name: str, weight_bytes: int, dtype: str) -> None:
    """Refuse a model whose weights cannot be held: the cluster holds each weight once (non-expert weights in the
    coordinator, experts in the workers) and transformers' baseline loads the whole model after it stops."""
    need = weight_bytes + RUNTIME_MARGIN_BYTES
    available = available_memory_bytes()
    if available is not None and need > available:
        smaller = [p for p, preset in PRESETS.items()
                   if estimated_bytes(preset, torch_dtype(dtype) if dtype in DTYPES else torch.bfloat16)
                   + RUNTIME_MARGIN_BYTES <= available and not p.startswith("tiny-")]
        raise BenchError(
            f"{name} in {dtype} holds {format_size(weight_bytes)} of weights; benchmarking it needs about "
            f"{format_size(need)} of memory but this machine has {format_size(available)} available. "
            f"Use a preset that fits ({', '.join(smaller) or 'none'}) or a machine with more memory."
        )


def prepare_checkpoint(options: BenchOptions, log: Callable[[str], None]) -> tuple[Path, str]:
    """The folder to benchmark and the dtype to run it in; a preset is written once into the cache."""
    if options.model is not None:
        folder = Path(options.model).expanduser()
        if not (folder / "config.json").is_file():
            raise BenchError(f"{folder} has no config.json; point --model at a Hugging Face checkpoint folder")
        dtype = options.dtype
        if dtype == "auto":
            dtype = str(loading.resolve_dtype(loading.read_config(folder), None)).removeprefix("torch.")
        torch_dtype(dtype)
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        if dtype in DTYPES:  # a checkpoint stored in another width grows or shrinks when loaded
            stored = loading.resolve_dtype(loading.read_config(folder), None)
            size = size * DTYPES[dtype].itemsize // max(1, stored.itemsize)
        check_fits(str(folder), size, dtype)
        return folder, dtype
    if options.preset not in PRESETS:
        raise BenchError(f"unknown preset {options.preset!r}; choose one of: {', '.join(PRESETS)}")
    dtype = "bfloat16" if options.dtype == "auto" else options.dtype
    preset = PRESETS[options.preset]
    check_fits(f"preset {preset.name!r}", estimated_bytes(preset, torch_dtype(dtype)), dtype)
    folder = bench_checkpoint_path(preset.name, dtype)
    if not (folder / "config.json").exists():
        log(f"writing the {preset.name} checkpoint ({format_size(estimated_bytes(preset, torch_dtype(dtype)))}, "
            f"random weights) into {folder}; later runs reuse it")
    try:
        return write_checkpoint(preset, folder, dtype=torch_dtype(dtype)), dtype
    except MemoryError as e:
        raise BenchError(str(e)) from None


@dataclass
class DecodeBytes:
    """Bytes one decode token must read: every non-expert weight but the embedding table, one embedding row,
    the head, and top_k experts in every MoE layer. The KV cache (a few MB at these lengths) is left out."""

    non_expert: int  # attention, norms, routers, shared experts (without embedding table and head)
    experts: int
    embedding_row: int
    head: int

    @property
    def total(self) -> int:
        return self.non_expert + self.experts + self.embedding_row + self.head


def decode_bytes(model: torch.nn.Module, layout: loading.ModelLayout, quantize: str = "none") -> DecodeBytes:
    """What one decode token reads, every routed expert counted in the workers' format."""
    itemsize = torch.empty((), dtype=layout.dtype).element_size()
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    table, head_bytes = embedding.numel() * itemsize, head.numel() * itemsize
    tied = head is embedding  # then the checkpoint holds the table once, and the head reads all of it
    top_k = getattr(layout.config, "num_experts_per_tok", None) or getattr(layout.config, "top_k", 1)
    return DecodeBytes(
        non_expert=max(0, layout.non_expert_bytes - table - (0 if tied else head_bytes)),
        experts=top_k * layout.cold_expert_bytes(quantize) * len(layout.moe_layers),
        embedding_row=embedding.shape[1] * itemsize,
        head=head_bytes,
    )


def random_prompt(vocab_size: int, length: int, seed: int, avoid: set[int]) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (length,), generator=generator).tolist()
    usable = [i for i in range(min(vocab_size, 1024)) if i not in avoid]
    return [usable[i % len(usable)] if i in avoid else i for i in ids]


# --- the machine ---


def _cpuinfo() -> dict[str, str]:
    found = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            found.setdefault(key.strip(), value.strip())
    return found


def _physical_cores() -> int | None:
    cores = set()
    with contextlib.suppress(OSError):
        block = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            if not line.strip():
                if "core id" in block:
                    cores.add((block.get("physical id"), block["core id"]))
                block = {}
                continue
            key, _, value = line.partition(":")
            block[key.strip()] = value.strip()
    return len(cores) or None


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def describe_machine(device: torch.device) -> dict:
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    nodes = sorted(Path("/sys/devices/system/node").glob("node[0-9]*"))
    meminfo = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            meminfo[key] = int(value.split()[0]) * 1024
    described = {
        "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "physical_cores": _physical_cores(),
        "numa_nodes": len(nodes) or 1,
        "memory_bytes": meminfo.get("MemTotal"),
        "memory_available_bytes": available_memory_bytes(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_features": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"}),
        "onednn_bfloat16": bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "os": platform.platform(),
        "python": platform.python_version(),
        "libraries": {name: _version(name) for name in ("torch", "transformers", "pyzmq", "numpy", "safetensors")},
    }
    return described


def measure_read_bandwidth(threads: list[int], size_mib: int = 1024, repeats: int = 5) -> dict:
    """Read bandwidth from a float32 reduction that streams the array once. Several thread counts because one
    core may or may not saturate memory; the best is the ceiling's numerator."""
    previous = torch.get_num_threads()
    x = torch.ones(size_mib * (1 << 20) // 4)
    by_threads = {}
    try:
        for t in sorted(set(threads)):
            torch.set_num_threads(t)
            x.sum()  # warm-up: pages touched, threads started
            best = 0.0
            for _ in range(repeats):
                started = time.perf_counter()
                x.sum()
                best = max(best, x.numel() * 4 / (time.perf_counter() - started))
            by_threads[t] = best
    finally:
        torch.set_num_threads(previous)
        del x
    return {
        "bytes_per_second": max(by_threads.values()),
        "by_threads": {str(t): v for t, v in by_threads.items()},
        "method": BANDWIDTH_METHOD.format(size=format_size(size_mib << 20), repeats=repeats,
                                          threads=sorted(by_threads)),
    }


def best_bandwidth(first: dict, second: dict) -> dict:
    by_threads = {t: max(first["by_threads"][t], second["by_threads"][t]) for t in first["by_threads"]}
    method = first["method"] + "; measured before and after the runs, the better of the two"
    return {"bytes_per_second": max(by_threads.values()), "by_threads": by_threads, "method": method}


# --- the whole benchmark ---


def launcher_threads(cluster: ClusterOptions, model: loading.ModelLayout) -> tuple[int, int, int]:
    """What `fiddler-launch` would give a cluster of these options on this model: (threads per worker, coordinator
    threads, the coordinator's threads in decoding steps)."""
    from fiddler_moe.launch.cluster import (Cluster, converts_bfloat16_layers, coordinator_decode_threads,
                                            held_layer_bytes)

    layout = Cluster(cluster).plan_workers()
    coordinator = cluster.coordinator_threads or len(layout.coordinator_cpus)
    decode = coordinator_decode_threads(cluster, layout, held_layer_bytes(model, cluster.quantize),
                                        converts_bfloat16_layers(model, cluster.quantize))
    return layout.workers[0].threads, coordinator, decode or coordinator


def grid(options: BenchOptions, model: loading.ModelLayout) -> list[SweepPoint]:
    points = []
    for workers, threads, coordinator, memory, quantize in itertools.product(
        options.workers, options.threads_per_worker, options.coordinator_threads, options.device_memory,
        options.quantize
    ):
        cluster = ClusterOptions(workers=workers, threads_per_worker=threads, device=options.device,
                                 device_memory=memory, coordinator_threads=coordinator, quantize=quantize)
        threads_each, coordinator_threads, decode_threads = launcher_threads(cluster, model)
        points.append(SweepPoint(workers, threads_each, memory, coordinator_threads, quantize, decode_threads,
                                 coordinator))
    return points


def check_options(options: BenchOptions) -> None:
    for workers in options.workers:
        if workers < 1:
            raise BenchError(f"--workers {workers}: the benchmark needs at least one worker")
    if options.prompt_len < 1:
        raise BenchError(f"--prompt-len must be 1 or more, got {options.prompt_len}")
    if options.new_tokens < 2:
        raise BenchError(f"--new-tokens must be 2 or more (decode needs a second token), got {options.new_tokens}")
    if options.repeats < 1 or options.warmup < 0:
        raise BenchError("--repeats must be 1 or more and --warmup 0 or more")
    if options.bandwidth_mib < 16:
        raise BenchError("--bandwidth-mib must be at least 16 (larger than the CPU caches, for a memory figure)")


def run_bench(options: BenchOptions, log: Callable[[str], None] = lambda text: print(text, file=sys.stderr)) -> dict:
    """Run every configuration and the baseline; return the result (what the JSON file holds)."""
    from fiddler_moe.coordinator.coordinator import resolve_device

    check_options(options)
    folder, dtype = prepare_checkpoint(options, log)
    device = resolve_device(options.device)
    skeleton, layout = loading.inspect(folder, dtype)
    points = grid(options, layout)
    context = getattr(layout.config, "max_position_embeddings", None)
    if context and options.prompt_len + options.new_tokens > context:
        raise BenchError(f"--prompt-len {options.prompt_len} plus --new-tokens {options.new_tokens} exceeds the "
                         f"model's context of {context} tokens")
    from fiddler_moe.coordinator.coordinator import load_tokenizer

    tokenizer = load_tokenizer(layout.folder)
    prompt = random_prompt(layout.config.vocab_size, options.prompt_len, options.seed,
                           set(tokenizer.all_special_ids))
    needed = decode_bytes(skeleton, layout)
    needed_in = {q: decode_bytes(skeleton, layout, q).total for q in options.quantize}
    del skeleton
    threads_seen = sorted({1, os.cpu_count() or 1})
    log(f"measuring read bandwidth ({options.bandwidth_mib} MiB, {threads_seen} threads)")
    bandwidth = measure_read_bandwidth(threads_seen, options.bandwidth_mib)
    initial_threads = torch.get_num_threads()

    clusters = [ClusterRunner(folder, dtype, options.device, point, prompt, options.new_tokens) for point in points]
    cores = os.cpu_count() or 1
    baselines = []
    if options.baseline:  # the same total threads as each cluster, up to the cores there are
        for threads in options.baseline_threads or sorted({min(cores, c.total_threads) for c in clusters}):
            baselines.append(TransformersRunner(folder, torch_dtype(dtype), device, threads, prompt,
                                                options.new_tokens))
    offloaders = []
    if options.offload and device.type == "cuda":  # the offloading class of system, at each budget a cluster gets
        if _version("accelerate") is None:
            raise BenchError("the offloading contestant needs accelerate: pip install -e '.[bench]' (or --no-offload)")
        for budget in dict.fromkeys(p.device_memory for p in points if p.device_memory not in (None, "", "all")):
            threads = min(cores, clusters[0].total_threads)
            offloaders.append(TransformersRunner(folder, torch_dtype(dtype), device, threads, prompt,
                                                 options.new_tokens, offload_budget=budget))
    runners = [*clusters, *baselines, *offloaders]
    weight_bytes = layout.non_expert_bytes + layout.expert_bytes * layout.num_experts
    interleave = options.interleave and len(runners) > 1
    available = available_memory_bytes()
    if interleave and available is not None and weight_bytes * len(runners) + RUNTIME_MARGIN_BYTES > available:
        log(f"not interleaving: {len(runners)} copies of the weights ({format_size(weight_bytes * len(runners))}) "
            f"would not fit in memory; running one after another")
        interleave = False
    play(runners, options, interleave, initial_threads, log)
    # Once more at the end: on a shared machine a busy moment at the start would lower the ceiling.
    bandwidth = best_bandwidth(bandwidth, measure_read_bandwidth(threads_seen, options.bandwidth_mib))
    ceiling = bandwidth["bytes_per_second"] / needed.total

    cluster_results = []
    for runner in clusters:
        result = runner.summary()
        result["share_of_ceiling"] = result["decode_tokens_per_second"] / ceiling
        # a quantized run reads fewer bytes a token: its own ceiling too
        result["decode_bytes_per_token"] = needed_in[runner.point.quantize]
        result["share_of_own_ceiling"] = (result["decode_tokens_per_second"]
                                          / (bandwidth["bytes_per_second"] / needed_in[runner.point.quantize]))
        cluster_results.append(result)
    baseline_results = []
    for runner in baselines:
        result = runner.summary()
        result["share_of_ceiling"] = result["decode_tokens_per_second"] / ceiling
        baseline_results.append(result)
    offload_results = []
    for runner in offloaders:
        result = runner.summary()
        result["share_of_ceiling"] = result["decode_tokens_per_second"] / ceiling
        offload_results.append(result)
    for result in cluster_results:
        result["bound"] = bandwidth_bound(result, needed, needed_in[result["config"]["quantize"]],
                                          bandwidth["bytes_per_second"], bandwidth["by_threads"].get("1"))
    for result in cluster_results:
        offloaded = [o for o in offload_results if o["device_memory"] == result["config"]["device_memory"]]
        if offloaded:  # the same device budget, weights moved by accelerate instead of activations to workers
            match = offloaded[0]
            result["vs_offload"] = {
                "prefill": result["prefill_tokens_per_second"] / match["prefill_tokens_per_second"],
                "decode": result["decode_tokens_per_second"] / match["decode_tokens_per_second"],
            }
            if interleave:
                result["vs_offload"]["rounds"] = paired_ratios(result["runs"], match["runs"])
    for result in cluster_results:
        same = [b for b in baseline_results if b["threads"] == min(cores, result["total_threads"])]
        match = (same or baseline_results or [None])[0]
        if match:
            result["vs_transformers"] = {
                "threads": match["threads"],
                "prefill": result["prefill_tokens_per_second"] / match["prefill_tokens_per_second"],
                "decode": result["decode_tokens_per_second"] / match["decode_tokens_per_second"],
                "same_greedy_tokens": _same_prefix(result["token_ids"], match["token_ids"]),
            }
            if interleave:  # run i of each contestant came in the same round, moments apart
                result["vs_transformers"]["rounds"] = paired_ratios(result["runs"], match["runs"])

    config = layout.config
    bfloat16_path = chosen_path()  # which CPU bfloat16 fast path the expert kernel and a CPU coordinator take
    return {
        "schema": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["fiddler", *sys.argv[1:]]) if sys.argv and "fiddler" in sys.argv[0] else None,
        "machine": describe_machine(device),
        "model": {
            "name": options.preset if options.model is None else str(options.model),
            "preset": options.preset if options.model is None else None,
            "folder": str(folder),
            "architecture": config.model_type,
            "dtype": dtype,
            "hidden_size": config.hidden_size,
            "layers": config.num_hidden_layers,
            "experts": layout.num_experts,
            "moe_layers": len(layout.moe_layers),
            "top_k": getattr(config, "num_experts_per_tok", None),
            "expert_bytes": layout.expert_bytes,
            "weight_bytes": layout.non_expert_bytes + layout.expert_bytes * layout.num_experts,
            "decode_bytes_per_token": asdict(needed) | {"total": needed.total},
        },
        "settings": {
            "prompt_len": options.prompt_len,
            "new_tokens": options.new_tokens,
            "repeats": options.repeats,
            "warmup": options.warmup,
            "seed": options.seed,
            "device": str(device),
            "interleaved": interleave,
            "pack_weights": os.environ.get("FIDDLER_PACK_WEIGHTS", "1") != "0",
            # experts/compute.py's path, under the older names for three of them (onednn, avx2, off)
            "cpu_bfloat16_path": {"onednn": "packed", "avx2": "upcast", "off": "plain"}.get(bfloat16_path,
                                                                                            bfloat16_path),
            # the decoding kernel (native/kernels.py) serves rows up to kernels.MAX_ROWS on the upcast, avx512 and
            # amx paths
            "cpu_bfloat16_decode_kernel": bfloat16_path in ("avx2", "avx512", "amx") and kernels.available(),
        },
        "bandwidth": bandwidth,
        "ceiling": {
            "decode_tokens_per_second": ceiling,
            "how": "read bandwidth / decode_bytes_per_token.total",
        },
        "cluster": cluster_results,
        "transformers": baseline_results,
        "offload": offload_results,  # transformers + accelerate's offloading, per device budget (GPU only)
    }


def play(runners: list, options: BenchOptions, interleave: bool, threads: int, log: Callable[[str], None]) -> None:
    """Start, warm up, run and stop every contestant. Interleaved: all are loaded, then each round runs each of
    them once (in a rotating order), so a burst of load from elsewhere on the machine hurts all of them alike."""

    def turn(runner, action: str) -> None:
        torch.set_num_threads(runner.threads)  # the coordinator's threads, or transformers'
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        try:
            getattr(runner, action)()
        finally:
            torch.set_num_threads(threads)
            if affinity is not None:
                os.sched_setaffinity(0, affinity)

    try:
        if interleave:
            for runner in runners:
                log(f"starting {runner.label}")
                turn(runner, "start")
            for _ in range(options.warmup):
                for runner in runners:
                    turn(runner, "warm_up")
            for round_ in range(options.repeats):
                log(f"round {round_ + 1} of {options.repeats}: {len(runners)} contestants, "
                    f"{options.prompt_len} + {options.new_tokens} tokens each")
                for i in range(len(runners)):
                    turn(runners[(i + round_) % len(runners)], "run_once")
        else:
            for runner in runners:
                log(f"{runner.label}: {options.repeats} run(s) of {options.prompt_len} + {options.new_tokens} tokens")
                turn(runner, "start")
                try:
                    for _ in range(options.warmup):
                        turn(runner, "warm_up")
                    for _ in range(options.repeats):
                        turn(runner, "run_once")
                finally:
                    runner.stop()
    finally:
        for runner in runners:
            runner.stop()


def bandwidth_bound(result: dict, needed: DecodeBytes, needed_total: int, bytes_per_second: float,
                    one_thread_bytes_per_second: float | None = None) -> dict:
    """Per part of a decode token: the ms its bytes take at the measured read bandwidth (the floor), and the ms
    beyond them, which are bound by something else (NOT_BANDWIDTH says what). The non-expert layers read their
    weights, an embedding row and the head; the experts their top-k share, split by the hit rate between hot
    (the coordinator) and cold (the workers, in their format); routing, transport and sampling read nothing.
    Where the coordinator decodes on one thread but prefills on more, `non_expert_one_thread_ms` is what its
    bytes take at one thread's read bandwidth (the head at every core's: coordinator/batching.py reads it so): on a
    CPU where one core cannot read what all do, that is part of the time beyond the floor."""
    ms = result["decode_ms_per_token"]
    expert_bytes = needed_total - needed.non_expert - needed.embedding_row - needed.head  # in the workers' format
    hot = result["hit_rate"]
    floor_bytes = {
        "non_expert": needed.non_expert + needed.embedding_row + needed.head,
        "hot_experts": hot * needed.experts,
        "worker_compute": (1 - hot) * expert_bytes,
    }
    floor = {key: 1e3 * floor_bytes.get(key, 0) / bytes_per_second for key in NOT_BANDWIDTH}
    beyond = {key: max(0.0, ms[key] - floor[key]) for key in NOT_BANDWIDTH}
    bound = {"floor_ms": floor, "beyond_ms": beyond, "floor_total_ms": sum(floor.values()),
             "beyond_total_ms": sum(beyond.values())}
    config = result["config"]
    if one_thread_bytes_per_second and config.get("decode_threads") == 1 and config["coordinator_threads"] > 1:
        bound["non_expert_one_thread_ms"] = 1e3 * ((needed.non_expert + needed.embedding_row)
                                                   / one_thread_bytes_per_second + needed.head / bytes_per_second)
    return bound


def paired_ratios(runs: list[dict], baseline_runs: list[dict]) -> dict:
    """Per round, this contestant's rate over the baseline's: on a machine whose speed drifts with other load, the
    median of these moves less than the ratio of the two medians. Median, min and max, prefill and decode."""
    paired = {}
    for phase in ("prefill", "decode"):
        key = f"{phase}_tokens_per_second"
        ratios = [a[key] / b[key] for a, b in zip(runs, baseline_runs) if b[key] > 0]
        if ratios:
            paired[phase] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return paired


def _same_prefix(a: list[int], b: list[int]) -> int:
    """How many leading greedy tokens two runs share (bfloat16 ties may split them late)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
