"""The contestants of `fiddler bench`: a cluster in one configuration, transformers' own `generate`, and (on a GPU
with a device budget) transformers with accelerate's weight offloading at that budget.

Each is started once, warmed up, run --repeats times (possibly interleaved with the others, so a noisy neighbour
hurts all of them alike), and stopped; `summary()` gives its figures. One run is one `generate` of the fixed
prompt with --new-tokens greedy tokens: prefill is the call up to the first new token, decode the rest.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fiddler_moe.host import numa

BREAKDOWN_PARTS = {  # key -> label, in the order of the stacked bars
    "non_expert": "non-expert layers",
    "hot_experts": "hot experts",
    "routing": "routing, gather",
    "worker_compute": "worker compute",
    "transport": "transport",
    "sampling_overhead": "sampling, Python",
}

NOT_BANDWIDTH = {  # what bounds a part's time beyond its bytes at the read bandwidth (bench.bandwidth_bound)
    "non_expert": "linear layers short of the bandwidth; Python and small ops between them, slower after each "
                  "layer call, whose worker turn flushes the caches (benchmarks/coordinator_step.py splits it)",
    "hot_experts": "Python and small ops around the hot experts",
    "routing": "Python, routing bookkeeping",
    "worker_compute": "the workers' kernels short of the bandwidth",
    "transport": "synchronisation: messages and waking the other side",
    "sampling_overhead": "the serving engine's step around the forward: inputs, the logits' copy, sampling",
}


@dataclass
class SweepPoint:
    """One cluster configuration of the sweep, with the launcher's defaults filled in."""

    workers: int
    threads_per_worker: int
    device_memory: str | None
    coordinator_threads: int
    quantize: str = "none"  # the workers' format for cold experts (--quantize)
    decode_threads: int | None = None  # the coordinator's in decoding steps, where not coordinator_threads
    coordinator_threads_flag: int | None = None  # as --coordinator-threads asked (None: the launcher's choice)

    def label(self, coordinator_threads: int) -> str:
        """coordinator threads (prefill/decode where they differ) + workers x threads each, the device memory when
        one was asked for, and the workers' format when quantized."""
        decode = self.decode_threads
        coordinator = f"{coordinator_threads}/{decode}" if decode not in (None, coordinator_threads) else coordinator_threads
        text = f"{coordinator}+{self.workers}x{self.threads_per_worker}"
        if self.device_memory not in (None, ""):
            text += f", mem {self.device_memory}"
        return text if self.quantize == "none" else f"{text}, {self.quantize}"


@dataclass
class Run:
    prefill_seconds: float
    decode_seconds: float
    prompt_tokens: int
    new_tokens: int

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        n = self.new_tokens - 1  # the first new token comes out of prefill
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


def rates(runs: list[Run]) -> dict:
    return {
        "prefill_tokens_per_second": statistics.median(r.prefill_tokens_per_second for r in runs),
        "decode_tokens_per_second": statistics.median(r.decode_tokens_per_second for r in runs),
        "runs": [asdict(r) | {"prefill_tokens_per_second": r.prefill_tokens_per_second,
                              "decode_tokens_per_second": r.decode_tokens_per_second} for r in runs],
    }


# --- timing inside the cluster ---


class ForwardTimer:
    """Seconds inside the model's forward (hooks on the top module); the rest of a decode step is sampling and
    Python in transformers' generate loop."""

    def __init__(self, model: torch.nn.Module):
        self.seconds = 0.0
        self._started = 0.0
        self._handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def _pre(self, *_):
        self._started = time.perf_counter()

    def _post(self, *_):
        self.seconds += time.perf_counter() - self._started

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def breakdown(decode_seconds: float, forward_seconds: float, stats) -> dict[str, float]:
    """Seconds of decode per part; they add up to decode_seconds (each clamped at 0 where clocks disagree).

    Inside an MoE layer call (the dispatcher's stats): the cold requests are sent, the hot experts computed, then
    the replies awaited. Sending plus awaiting is the time spent on the workers; of it, the round trips beyond the
    slowest worker's own compute are transport, the rest worker compute."""
    get = lambda name: float(getattr(stats, name, 0.0) or 0.0)  # noqa: E731
    dispatch, hot = get("dispatch_seconds"), get("hot_seconds")
    waiting = get("send_seconds") + get("wait_seconds")
    transport = min(waiting, get("transport_seconds"))
    return {
        "non_expert": max(0.0, forward_seconds - dispatch),
        "hot_experts": hot,
        "routing": max(0.0, dispatch - hot - waiting),
        "worker_compute": waiting - transport,
        "transport": transport,
        "sampling_overhead": max(0.0, decode_seconds - forward_seconds),
    }


class ClusterRunner:
    def __init__(self, folder: Path, dtype: str, device: str, point: SweepPoint, prompt: list[int],
                 new_tokens: int):
        self.folder, self.dtype, self.device, self.point = folder, dtype, device, point
        self.prompt, self.new_tokens = prompt, new_tokens
        self.threads = point.coordinator_threads  # the coordinator's torch threads
        self.label = f"fiddler {point.label(self.threads)}"
        self.cluster = None
        self.runs: list[Run] = []
        self.decode: list[dict] = []
        self.token_ids: list[int] = []

    @property
    def total_threads(self) -> int:
        return self.threads + self.point.workers * self.point.threads_per_worker

    def start(self) -> None:
        from fiddler_moe.launch.cluster import Cluster
        from fiddler_moe.launch.options import ClusterOptions

        point = self.point
        self.cluster = Cluster(ClusterOptions(model=self.folder, workers=point.workers,
                                              threads_per_worker=point.threads_per_worker, device=self.device,
                                              dtype=self.dtype, device_memory=point.device_memory,
                                              coordinator_threads=point.coordinator_threads_flag,
                                              quantize=point.quantize,
                                              quiet=True))
        self.cluster.start()
        coordinator = self.cluster.coordinator
        self.dispatcher = coordinator.dispatcher
        self.timer = ForwardTimer(coordinator.model)
        self.hot = len(self.dispatcher.hot)
        self.total_experts = coordinator.layout.num_experts
        self.worker_names = [link.name for link in self.dispatcher.workers]
        self.shard_bytes = [ready.shard_bytes for ready in coordinator.readies]

    def warm_up(self) -> None:
        self.cluster.generate(self.prompt, max_new_tokens=min(self.new_tokens, 4), ignore_eos=True)

    def _mark(self) -> dict:
        workers = self.dispatcher.workers
        return {"forward": self.timer.seconds, "busy": [w.busy_seconds for w in workers],
                "requests": [w.requests for w in workers]}

    def run_once(self) -> None:
        from fiddler_moe.coordinator.dispatch import DispatchStats

        marks: dict[str, dict] = {}

        def on_token(_token: int) -> None:
            if "decode" not in marks:  # the first new token: prefill is done, decode starts
                marks["decode"] = self._mark()
                self.dispatcher.stats = DispatchStats()

        out = self.cluster.generate(self.prompt, max_new_tokens=self.new_tokens, ignore_eos=True, on_token=on_token)
        end = self._mark()
        start = marks.get("decode", end)
        stats = self.dispatcher.stats
        self.dispatcher.stats = DispatchStats()
        self.runs.append(Run(out.prefill_seconds, out.decode_seconds, len(self.prompt), len(out.token_ids)))
        self.decode.append({
            "seconds": out.decode_seconds,
            "parts": breakdown(out.decode_seconds, end["forward"] - start["forward"], stats),
            "busy": [b - a for a, b in zip(start["busy"], end["busy"])],
            "requests": [b - a for a, b in zip(start["requests"], end["requests"])],
            "hot_pairs": stats.hot_pairs,
            "cold_pairs": stats.cold_pairs,
        })
        self.token_ids = out.token_ids

    def stop(self) -> None:
        if self.cluster is None:
            return
        if getattr(self, "timer", None):
            self.timer.remove()
        self.cluster.stop()
        self.cluster = None

    def summary(self) -> dict:
        steps = sum(r.new_tokens - 1 for r in self.runs)
        seconds = sum(d["seconds"] for d in self.decode)
        per_token = lambda total: 1e3 * total / steps if steps else 0.0  # noqa: E731
        pairs = sum(d["hot_pairs"] + d["cold_pairs"] for d in self.decode)
        return {
            "config": asdict(self.point) | {"coordinator_threads": self.threads,
                                            "label": self.point.label(self.threads)},
            "total_threads": self.total_threads,
            "hot_experts": self.hot,
            "hot_share": self.hot / self.total_experts if self.total_experts else 0.0,
            **rates(self.runs),
            "decode_ms_per_token": {key: per_token(sum(d["parts"][key] for d in self.decode))
                                    for key in BREAKDOWN_PARTS} | {"total": per_token(seconds)},
            "worker_busy_share": {name: sum(d["busy"][i] for d in self.decode) / seconds if seconds else 0.0
                                  for i, name in enumerate(self.worker_names)},
            "worker_requests_per_token": {name: sum(d["requests"][i] for d in self.decode) / steps if steps else 0.0
                                          for i, name in enumerate(self.worker_names)},
            "hit_rate": sum(d["hot_pairs"] for d in self.decode) / pairs if pairs else 0.0,
            "worker_shard_bytes": dict(zip(self.worker_names, self.shard_bytes)),
            "token_ids": self.token_ids,
        }


# --- transformers' own generate ---


class TransformersRunner:
    """transformers' AutoModelForCausalLM on the same folder, dtype and device, with `threads` torch threads,
    running its own eager `generate` (min_new_tokens = max_new_tokens, greedy).

    It runs in a process of its own, with the environment the user started us with: OpenMP's wait policy is fixed
    per process, and the fiddler commands set OMP_WAIT_POLICY=PASSIVE and a bounded GOMP_SPINCOUNT for the
    coordinator, which would slow transformers down (docs/performance-log.md, item 8). The parent sends one command per
    line, the child answers one JSON line each, so runs still interleave with the cluster's."""

    def __init__(self, folder: Path, dtype: torch.dtype, device: torch.device, threads: int, prompt: list[int],
                 new_tokens: int, offload_budget: str | None = None):
        self.folder, self.dtype, self.device, self.threads = folder, dtype, device, threads
        self.prompt, self.new_tokens = prompt, new_tokens
        self.offload_budget = offload_budget  # accelerate's offloading at this device budget, or None: all on device
        self.label = (f"transformers {threads} threads" if offload_budget is None
                      else f"transformers + accelerate offload, mem {offload_budget}")
        self.process: subprocess.Popen | None = None
        self.runs: list[Run] = []
        self.token_ids: list[int] = []
        self.implementation = "default"

    def start(self) -> None:
        env = dict(os.environ)
        for name, value in numa.user_openmp_settings().items():  # the user's, not the fiddler commands' defaults
            env.pop(name, None)
            if value is not None:
                env[name] = value
        spec = {"folder": str(self.folder), "dtype": str(self.dtype).removeprefix("torch."),
                "device": str(self.device), "threads": self.threads, "prompt": self.prompt,
                "offload_budget": self.offload_budget}
        self.process = subprocess.Popen([sys.executable, "-m", "fiddler_moe.benchmarks.runners", json.dumps(spec)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.implementation = self._ask("ready")["experts_implementation"]

    def _ask(self, command: str) -> dict:
        if command != "ready":
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the transformers baseline process exited (code {self.process.poll()}); see above")
        return json.loads(line)

    def warm_up(self) -> None:
        self._ask(f"run {min(self.new_tokens, 4)}")

    def run_once(self) -> None:
        answer = self._ask(f"run {self.new_tokens}")
        self.runs.append(Run(*answer["run"]))
        self.token_ids = answer["token_ids"]

    def stop(self) -> None:
        if self.process is not None:
            try:
                self.process.stdin.close()
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
            self.process = None

    def summary(self) -> dict:
        return {"threads": self.threads, "experts_implementation": self.implementation, **rates(self.runs),
                "token_ids": self.token_ids} | ({} if self.offload_budget is None
                                                 else {"device_memory": self.offload_budget})


def offload_max_memory(device: torch.device, budget_bytes: int, host_bytes: int) -> dict[int | str, int]:
    """accelerate's `max_memory` for the offloading contestant: the cluster's device budget on the GPU, the rest of
    the weights in host memory (moved to the GPU layer by layer as each forward reaches them, the class of system
    the Fiddler paper measured against). On a CPU the budget is host memory and the rest goes to disk (accelerate's
    disk offload): the same hooks, so the path can be run on a machine without a GPU."""
    if device.type == "cuda":
        return {device.index or 0: budget_bytes, "cpu": host_bytes}
    return {"cpu": budget_bytes}


def load_baseline(folder: str, dtype: torch.dtype, device: torch.device, offload_budget: str | None = None,
                  offload_folder: str | None = None) -> torch.nn.Module:
    """transformers' model for a baseline: all on `device`, or offloaded by accelerate (device_map="auto") with
    `offload_budget` (e.g. "1GiB", as --device-memory) on the device and the rest in host memory (disk on a CPU)."""
    from transformers import AutoModelForCausalLM

    if offload_budget is None:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    from fiddler_moe.coordinator.placement import parse_size

    host = numa.available_memory_bytes() or 1 << 40
    max_memory = offload_max_memory(device, parse_size(offload_budget), host)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="auto", max_memory=max_memory,
                                                 offload_folder=offload_folder)
    return model.eval()


def pad_token_id(model) -> int:
    """The id transformers' generate pads a batch with: the pad token, else the (first) end-of-sequence token."""
    pad = model.generation_config.pad_token_id
    pad = model.generation_config.eos_token_id if pad is None else pad
    return pad[0] if isinstance(pad, list) else pad


def first_token_streamer():
    """A streamer for transformers' generate that records (`first_at`, perf_counter) when the first new token
    comes: generate's first call hands over the prompt, its second the first new token."""
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        calls, first_at = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:
                self.first_at = time.perf_counter()

        def end(self):
            pass

    return FirstToken()


def _baseline_process(spec: dict) -> None:
    """The child side of TransformersRunner: load, say ready, then answer `run N` lines until stdin closes."""
    import tempfile

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    budget = spec.get("offload_budget")
    # accelerate's disk offload, only on a CPU with a budget; removed at exit
    spill = tempfile.TemporaryDirectory(prefix="fiddler-offload-") if budget and device.type == "cpu" else None
    model = load_baseline(spec["folder"], getattr(torch, spec["dtype"]), device, budget, spill and spill.name)
    pad = pad_token_id(model)
    prompt = spec["prompt"]
    implementation = getattr(model.config, "_experts_implementation", None) or "default"
    print(json.dumps({"experts_implementation": implementation}), flush=True)

    for line in sys.stdin:
        n = int(line.split()[1])
        streamer = first_token_streamer()
        input_ids = torch.tensor([prompt], device=device)
        started = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), min_new_tokens=n,
                                    max_new_tokens=n, do_sample=False, pad_token_id=pad, streamer=streamer)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        finished = time.perf_counter()
        first = streamer.first_at or finished
        new = output[0, len(prompt):].tolist()
        print(json.dumps({"run": [first - started, finished - first, len(prompt), len(new)], "token_ids": new}),
              flush=True)


if __name__ == "__main__":
    _baseline_process(json.loads(sys.argv[1]))
