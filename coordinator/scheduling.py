"""Scheduling one MoE layer call: which cold experts to compute on the device this time instead of on their worker.

Fiddler's rule is to move activations, not weights: for a decoding token an expert's weights cost far more to copy
to the GPU than the CPU takes to compute one row. A long prefill is different: an expert routed 500 rows keeps its
worker busy for a long time while the GPU would copy it and finish in a fraction of that. So per layer call we pick a
set of cold experts to copy into staging buffers on the device and compute there, the rest going to their workers
as usual.

The layer call ends when the last of the device and the workers is done (they run in parallel), so the decision
minimises that makespan, not a sum:

    device  = device_busy_seconds + sum over moved experts of (copy_seconds + device(rows))
    worker w = sum over its experts that stay of worker(rows)            (a worker computes its experts in turn)
    makespan = max(device, worker 0, ..., worker W-1)

`decide` is a pure function of the rows, the owners and a `CostModel`. It is greedy, O(staging_slots * experts):
repeatedly move the expert of the busiest worker whose move leaves that worker and the device finishing earliest,
while that beats the current makespan and staging slots remain, then keep the prefix of moves that gave the best
makespan (so moving everything is never chosen when moving some is better, and nothing moves unless it helps).

The cost model holds three measured quantities for one expert of this model's shape on this machine:
- `worker`: seconds for a worker to compute one expert on `rows` rows (a `Curve`: a line a + b*rows, or a table of
  measured points interpolated linearly);
- `device`: the same on the coordinator's device with the weights already there;
- `copy_seconds`: host -> device copy of one expert's weights.
With --quantize the workers hold int8 or int4 experts: the worker curve is measured with the quantized kernel, a
move copies the format's bytes and dequantizes them on the device (that time is part of `copy_seconds`), the
device curve computes the dequantized expert, and the shape key names the format, so each format has its entry.
`measure_cost_model` measures them (`measure_worker_curve`, `measure_device_curve`, `measure_copy_seconds`), and
`CostModel.save` / `CostModel.load` cache them in one JSON file keyed by machine and model shape
(`machine_key`, `shape_key`); `load_or_measure` does both.

For the dispatcher, `Scheduler` wraps it per layer call:

    scheduler = Scheduler(cost, placement.owner, placement.num_workers, staging_slots=4, device=device)
    schedule = scheduler.schedule(layer, cold_rows={expert: rows, ...}, hot_rows=[rows of each hot expert])
    schedule.moved  # experts of this layer to copy to the device and compute there this call

On a CPU-only coordinator (nothing to copy to: "moving" would only take cores from the workers), without a cost
model or without staging slots it moves nothing and logs why, once.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fiddler_moe.experts import quant
from fiddler_moe.experts.compute import ExpertKernel, ExpertWeights, plain_gate
from fiddler_moe.protocol.messages import KernelSpec

log = logging.getLogger("fiddler.scheduling")

Expert = tuple[int, int]  # (layer, expert), as in coordinator/placement.py
Weights = ExpertWeights | quant.QuantizedExpertWeights  # an expert as a worker holds it
COST_FILE_VERSION = 1
DEFAULT_ROW_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MIN_ROWS_TO_MOVE = 2  # a single row (one decoding token) always stays on its worker: Fiddler's core case


class CostModelError(ValueError):
    """A cost file or curve that cannot be used; the message says how to fix it."""


# --- the cost model ---


@dataclass
class Curve:
    """Seconds to compute one expert as a function of its rows: a line `a + b * rows`, or, when `points` is set, a
    table of (rows, seconds) measured points, interpolated linearly between them, flat below the first and
    extended with the last segment's slope above the last. 0 rows cost 0 (the expert is not called)."""

    a: float = 0.0
    b: float = 0.0
    points: list[tuple[int, float]] | None = None

    def __post_init__(self) -> None:
        if self.points is not None:
            points = sorted((int(r), float(s)) for r, s in self.points)
            if not points or any(r < 1 or not math.isfinite(s) or s < 0 for r, s in points):
                raise CostModelError(f"a cost table needs points (rows >= 1, seconds >= 0), got {self.points}")
            if len({r for r, _ in points}) != len(points):
                raise CostModelError(f"a cost table has repeated row counts: {self.points}")
            self.points = points
        elif not (math.isfinite(self.a) and math.isfinite(self.b)):
            raise CostModelError(f"a cost line needs finite a and b, got a={self.a} b={self.b}")

    def __call__(self, rows: int) -> float:
        if rows <= 0:
            return 0.0
        if self.points is None:
            return max(0.0, self.a + self.b * rows)
        points = self.points
        if rows <= points[0][0]:
            return points[0][1]
        if len(points) == 1:  # one measurement: proportional to rows above it
            return points[0][1] * rows / points[0][0]
        i = bisect.bisect_left(points, rows, key=lambda p: p[0])
        if i == len(points):  # beyond the table: the last segment's slope, never decreasing
            (r0, s0), (r1, s1) = points[-2], points[-1]
            return s1 + max(0.0, (s1 - s0) / (r1 - r0)) * (rows - r1)
        (r0, s0), (r1, s1) = points[i - 1], points[i]
        return s0 + (s1 - s0) * (rows - r0) / (r1 - r0)

    @classmethod
    def line(cls, a: float, b: float) -> Curve:
        return cls(a=a, b=b)

    @classmethod
    def table(cls, points: Iterable[tuple[int, float]]) -> Curve:
        return cls(points=list(points))

    @classmethod
    def fit_line(cls, points: Iterable[tuple[int, float]]) -> Curve:
        """The least-squares line through measured (rows, seconds) points."""
        points = list(points)
        if len(points) < 2:
            raise CostModelError("fitting a line needs at least two measured points")
        n = len(points)
        mean_r = sum(r for r, _ in points) / n
        mean_s = sum(s for _, s in points) / n
        var = sum((r - mean_r) ** 2 for r, _ in points)
        b = sum((r - mean_r) * (s - mean_s) for r, s in points) / var if var else 0.0
        return cls(a=mean_s - b * mean_r, b=b)

    def to_dict(self) -> dict:
        return {"points": [[r, s] for r, s in self.points]} if self.points is not None else {"a": self.a, "b": self.b}

    @classmethod
    def from_dict(cls, data: object) -> Curve:
        if isinstance(data, dict) and "points" in data:
            points = data["points"]
            if not isinstance(points, list) or not all(isinstance(p, list) and len(p) == 2 for p in points):
                raise CostModelError(f"a cost table must be a list of [rows, seconds] pairs, got {points!r}")
            return cls(points=[(p[0], p[1]) for p in points])
        number = (int, float)
        if isinstance(data, dict) and isinstance(data.get("a"), number) and isinstance(data.get("b"), number):
            return cls(a=float(data["a"]), b=float(data["b"]))
        raise CostModelError(
            f'a cost curve is {{"a": ..., "b": ...}} or {{"points": [[rows, seconds], ...]}}, got {data!r}'
        )


@dataclass
class CostModel:
    """Measured costs of one expert of one model shape on one machine (see the module docstring)."""

    worker: Curve  # a worker computing one expert on `rows` rows
    device: Curve  # the coordinator's device computing one expert whose weights are there
    copy_seconds: float  # host -> device copy of one expert's weights
    can_move: bool = True  # False when the coordinator's device is the CPU: moving gains nothing
    machine: str = ""  # machine_key(...)
    shape: str = ""  # shape_key(...)

    def worker_seconds(self, rows: int) -> float:
        return self.worker(rows)

    def device_seconds(self, rows: int) -> float:
        return self.device(rows)

    def move_seconds(self, rows: int) -> float:
        """Device time to take one expert over: copy its weights, then compute its rows."""
        return self.copy_seconds + self.device(rows)

    @property
    def key(self) -> str:
        return f"{self.machine} | {self.shape}"

    def to_dict(self) -> dict:
        return {"machine": self.machine, "shape": self.shape, "can_move": self.can_move,
                "copy_seconds": self.copy_seconds, "worker": self.worker.to_dict(), "device": self.device.to_dict()}

    @classmethod
    def from_dict(cls, data: object) -> CostModel:
        if not isinstance(data, dict):
            raise CostModelError(f"a cost model entry must be an object, got {type(data).__name__}")
        copy = data.get("copy_seconds")
        if not isinstance(copy, (int, float)) or isinstance(copy, bool) or not copy >= 0:
            raise CostModelError(f'"copy_seconds" must be a number >= 0, got {copy!r}')
        return cls(worker=Curve.from_dict(data.get("worker")), device=Curve.from_dict(data.get("device")),
                   copy_seconds=float(copy), can_move=bool(data.get("can_move", True)),
                   machine=str(data.get("machine", "")), shape=str(data.get("shape", "")))

    def save(self, path: str | os.PathLike) -> Path:
        """Add (or replace) this machine + shape's entry in the cost file at `path`; other entries are kept."""
        path = Path(path).expanduser()
        entries = _read_cost_file(path) if path.exists() else {}
        entries[self.key] = self.to_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": COST_FILE_VERSION, "entries": dict(sorted(entries.items()))}, indent=2)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text + "\n")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, machine: str, shape: str) -> CostModel | None:
        """This machine + shape's entry of the cost file, or None when the file or the entry does not exist yet."""
        path = Path(path).expanduser()
        if not path.exists():
            return None
        entry = _read_cost_file(path).get(f"{machine} | {shape}")
        if entry is None:
            return None
        try:
            return cls.from_dict(entry)
        except CostModelError as e:
            raise CostModelError(f"{path}: {e}; delete the file to measure again") from None


def _read_cost_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CostModelError(f"cost file {path} cannot be read ({e}); delete it to measure again") from None
    if (not isinstance(data, dict) or data.get("version") != COST_FILE_VERSION
            or not isinstance(data.get("entries"), dict)):
        raise CostModelError(f"cost file {path} is not a version-{COST_FILE_VERSION} fiddler-moe cost file; delete it "
                             "to measure again")
    return data["entries"]


def default_cost_path() -> Path:
    """$FIDDLER_CACHE/costs.json, else $XDG_CACHE_HOME/fiddler-moe/costs.json, else ~/.cache/fiddler-moe/costs.json."""
    if os.environ.get("FIDDLER_CACHE"):
        return Path(os.environ["FIDDLER_CACHE"]).expanduser() / "costs.json"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "fiddler-moe" / "costs.json"


def machine_key(device: torch.device | str, worker_threads: int | None = None) -> str:
    """Which machine the costs were measured on: host, CPU model, cores, worker threads, coordinator device."""
    device = torch.device(device)
    parts = [platform.node() or "host", _cpu_model(), f"{os.cpu_count()} cpus"]
    if worker_threads:
        parts.append(f"{worker_threads} worker threads")
    parts.append(torch.cuda.get_device_name(device) if device.type == "cuda" else device.type)
    return " / ".join(parts)


def shape_key(spec: KernelSpec, weights: Weights) -> str:
    """Which expert shape the costs are for: the kernel and the weight shapes and dtype, or the quantized format
    (in the compute dtype)."""
    gate = "" if plain_gate(spec) else (f" interleaved={spec.interleaved} limit={spec.limit} alpha={spec.alpha} "
                                        f"up_offset={spec.up_offset}")
    if isinstance(weights, quant.QuantizedExpertWeights):
        held = f"{weights.gate_up.format} in {spec.dtype}"
    else:
        held = str(weights.gate_up.dtype).removeprefix("torch.")
    return (f"{spec.activation} gate={spec.has_gate} bias={spec.has_bias} transposed={spec.is_transposed}{gate} "
            f"{held} gate_up={list(weights.gate_up.shape)} down={list(weights.down.shape)}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


# --- measuring ---


def _hidden_size(kernel: ExpertKernel, weights: Weights | quant.DequantizedExpertWeights) -> int:
    if not isinstance(weights, ExpertWeights):  # [out, in] whatever the checkpoint's layout
        return weights.hidden
    return weights.down.shape[1] if kernel.spec.is_transposed else weights.down.shape[0]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The fastest of `repeats` timed runs after one warm-up run (the least disturbed by other work)."""
    fn()
    _synchronize(device)
    best = math.inf
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        fn()
        _synchronize(device)
        best = min(best, time.perf_counter() - started)
    return best


def _measure_curve(kernel: ExpertKernel, weights: Weights | quant.DequantizedExpertWeights, device: torch.device,
                   row_counts: Sequence[int], repeats: int) -> Curve:
    hidden = _hidden_size(kernel, weights)
    points = []
    for rows in sorted(set(row_counts)):
        x = torch.randn(rows, hidden, dtype=kernel.dtype, device=device)
        points.append((rows, _best_seconds(lambda: kernel.forward(weights, x), device, repeats)))
    return Curve.table(points)


def measure_worker_curve(kernel: ExpertKernel, weights: Weights, row_counts: Sequence[int] = DEFAULT_ROW_COUNTS,
                         repeats: int = 3, threads: int | None = None) -> Curve:
    """Time ExpertKernel.forward on the CPU for each row count, with `threads` torch threads (a worker's setting;
    None: the current one): quantized weights with the quantized kernel. Measures compute only, not the round trip
    to a worker process."""
    weights = weights.to("cpu")
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _measure_curve(kernel, weights, torch.device("cpu"), row_counts, repeats)
    finally:
        torch.set_num_threads(previous)


def measure_device_curve(kernel: ExpertKernel, weights: Weights, device: torch.device | str,
                         row_counts: Sequence[int] = DEFAULT_ROW_COUNTS, repeats: int = 3) -> Curve:
    """Time ExpertKernel.forward on the coordinator's device, weights already there (a quantized expert
    dequantized there, as a move computes it)."""
    device = torch.device(device)
    on_device = weights.to(device)
    if isinstance(on_device, quant.QuantizedExpertWeights):
        on_device = quant.dequantize_expert(on_device)
    return _measure_curve(kernel, on_device, device, row_counts, repeats)


def copied_tensors(weights: Weights) -> list[torch.Tensor]:
    """What a move copies of an expert: its weights as the worker holds them (a quantized expert's codes, scales
    and biases: the format's bytes)."""
    if isinstance(weights, quant.QuantizedExpertWeights):
        return list(weights.planes().values())
    return [t for t in (weights.gate_up, weights.down, weights.gate_up_bias, weights.down_bias) if t is not None]


def measure_copy_seconds(weights: Weights, device: torch.device | str, repeats: int = 3) -> float:
    """Seconds to copy one expert's weights from (pinned) host memory to the device, and for a quantized expert
    to dequantize them there. 0 on a CPU device: there is nothing to copy, and moving an expert there gains
    nothing (CostModel.can_move is False)."""
    device = torch.device(device)
    if device.type == "cpu":
        return 0.0
    tensors = [t.to("cpu") for t in copied_tensors(weights)]
    try:
        tensors = [t.pin_memory() for t in tensors]
    except RuntimeError:  # pinning unavailable: time the pageable copy, which is what we would get
        pass
    if not isinstance(weights, quant.QuantizedExpertWeights):
        return _best_seconds(lambda: [t.to(device, non_blocking=True) for t in tensors], device, repeats)
    names, into = list(weights.planes()), quant.DequantizedExpertWeights.empty_like(weights, device)

    def move() -> None:
        planes = {name: t.to(device, non_blocking=True) for name, t in zip(names, tensors)}
        quant.dequantize_expert(quant.QuantizedExpertWeights.from_planes(weights.gate_up.format, planes), into)

    return _best_seconds(move, device, repeats)


def measure_cost_model(kernel: ExpertKernel, weights: Weights, device: torch.device | str,
                       row_counts: Sequence[int] = DEFAULT_ROW_COUNTS, worker_threads: int | None = None,
                       repeats: int = 3) -> CostModel:
    """Measure all three costs with one expert's weights (random weights of the right shape do as well)."""
    device = torch.device(device)
    worker = measure_worker_curve(kernel, weights, row_counts, repeats, worker_threads)
    can_move = device.type != "cpu"
    on_device = measure_device_curve(kernel, weights, device, row_counts, repeats) if can_move else worker
    return CostModel(worker=worker, device=on_device, copy_seconds=measure_copy_seconds(weights, device, repeats),
                     can_move=can_move, machine=machine_key(device, worker_threads),
                     shape=shape_key(kernel.spec, weights))


def load_or_measure(kernel: ExpertKernel, weights: Weights, device: torch.device | str,
                    worker_threads: int | None = None, path: str | os.PathLike | None = None,
                    row_counts: Sequence[int] = DEFAULT_ROW_COUNTS) -> CostModel:
    """The cached cost model for this machine and shape, measured and saved on first use."""
    path = Path(path) if path is not None else default_cost_path()
    machine, shape = machine_key(device, worker_threads), shape_key(kernel.spec, weights)
    cost = CostModel.load(path, machine, shape)
    if cost is None:
        log.info("measuring expert costs on this machine (once; cached in %s)", path)
        cost = measure_cost_model(kernel, weights, device, row_counts, worker_threads)
        cost.save(path)
    return cost


# --- the decision ---


def finish_times(
    cold_rows: Mapping[int, int],
    owner: Mapping[int, int],
    num_workers: int,
    cost: CostModel,
    device_busy_seconds: float,
    moved: Iterable[int] = (),
    worker_scale: Sequence[float] | None = None,
) -> tuple[float, list[float]]:
    """(device seconds, [seconds per worker]) for a layer call where the experts in `moved` run on the device."""
    moved = set(moved)
    scale = worker_scale or [1.0] * num_workers
    device = device_busy_seconds
    workers = [0.0] * num_workers
    for expert, rows in cold_rows.items():
        if rows <= 0:
            continue
        if expert in moved:
            device += cost.move_seconds(rows)
        else:
            workers[owner[expert]] += scale[owner[expert]] * cost.worker_seconds(rows)
    return device, workers


def makespan(
    cold_rows: Mapping[int, int],
    owner: Mapping[int, int],
    num_workers: int,
    cost: CostModel,
    device_busy_seconds: float,
    moved: Iterable[int] = (),
    worker_scale: Sequence[float] | None = None,
) -> float:
    """When the layer call ends: the last of the device and the workers to finish."""
    device, workers = finish_times(cold_rows, owner, num_workers, cost, device_busy_seconds, moved, worker_scale)
    return max([device, *workers])


def decide(
    cold_rows: dict[int, int],
    owner: dict[int, int],
    num_workers: int,
    cost: CostModel,
    device_busy_seconds: float,
    staging_slots: int,
    *,
    worker_scale: Sequence[float] | None = None,
    min_rows: int = MIN_ROWS_TO_MOVE,
    min_gain_seconds: float = 0.0,
    fixed: Collection[int] = (),
) -> set[int]:
    """The cold experts of one layer call to copy to the device and compute there (see the module docstring).

    cold_rows: expert -> rows routed to it this call; owner: expert -> its worker; device_busy_seconds: what the
    device does anyway meanwhile (the hot experts); staging_slots: how many experts the device can take at most.
    worker_scale: per-worker multiplier on the worker curve (2.0 for a worker half as fast; default all 1).
    Experts with fewer than min_rows rows never move, nor do those in `fixed` (e.g. on a remote worker, whose
    weights the coordinator cannot reach); a set is returned only if it beats not moving by more than
    min_gain_seconds. Deterministic: ties go to the lower expert index."""
    if not cost.can_move or staging_slots <= 0 or not cold_rows:
        return set()
    if worker_scale is not None and len(worker_scale) != num_workers:
        raise ValueError(f"{len(worker_scale)} worker scales for {num_workers} workers")
    scale = list(worker_scale) if worker_scale is not None else [1.0] * num_workers
    worker_time = [0.0] * num_workers
    movable: list[dict[int, tuple[float, float]]] = [{} for _ in range(num_workers)]  # expert -> (worker s, move s)
    for expert, rows in sorted(cold_rows.items()):
        if rows <= 0:
            continue
        w = owner.get(expert)
        if w is None or not 0 <= w < num_workers:
            raise ValueError(f"expert {expert} has rows but no worker among {num_workers} owns it")
        seconds = scale[w] * cost.worker_seconds(rows)
        worker_time[w] += seconds
        if rows >= min_rows and expert not in fixed:
            movable[w][expert] = (seconds, cost.move_seconds(rows))
    device = device_busy_seconds
    no_move = max([device, *worker_time])
    sequence: list[int] = []
    best_span, best_length = no_move, 0
    while len(sequence) < staging_slots:
        top = max(worker_time)
        if device >= top:
            break  # the device is (among) the last to finish: moving more only makes it later
        best = None  # (this worker's and the device's finish after the move, device's finish, expert, worker)
        for w in range(num_workers):
            if worker_time[w] != top:
                continue
            for expert, (stay, move) in movable[w].items():
                candidate = (max(device + move, worker_time[w] - stay), device + move, expert, w)
                if best is None or candidate < best:
                    best = candidate
        if best is None or best[0] >= top:
            break  # no move gets the busiest worker done sooner without the device finishing as late
        _, device, expert, w = best
        worker_time[w] -= movable[w].pop(expert)[0]
        sequence.append(expert)
        span = max([device, *worker_time])
        if span < best_span:
            best_span, best_length = span, len(sequence)
    if no_move - best_span <= min_gain_seconds:
        return set()
    return set(sequence[:best_length])


@dataclass
class Schedule:
    """One layer call's decision: the experts to move, and the makespans predicted with and without moving."""

    moved: frozenset[int] = frozenset()
    predicted_seconds: float | None = None
    no_move_seconds: float | None = None
    reason: str = ""  # why nothing can move, when so


@dataclass
class Scheduler:
    """Per-call decisions for the dispatcher: placement's owners, the cost model and the staging slots, fixed for a
    run. Moves nothing, and says why once in the log, where moving is impossible or pointless."""

    cost: CostModel | None
    owner: Mapping[Expert, int]  # Placement.owner: cold (layer, expert) -> worker
    num_workers: int
    staging_slots: int
    device: torch.device | str | None = None  # the coordinator's device; "cpu" turns moving off
    worker_scale: Sequence[float] | None = None
    disabled_reason: str = field(init=False, default="")
    calls: int = field(init=False, default=0)
    moved_experts: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        by_layer: dict[int, dict[int, int]] = {}
        for (layer, expert), w in self.owner.items():
            by_layer.setdefault(layer, {})[expert] = w
        self._owner_by_layer = by_layer
        self._said = False
        device = torch.device(self.device) if self.device is not None else None
        if device is not None and device.type == "cpu":
            self.disabled_reason = ("the coordinator runs on the CPU, so there is no device to move experts to; "
                                    "every cold expert is computed by its worker")
        elif self.cost is not None and not self.cost.can_move:
            self.disabled_reason = ("the cost model was measured with a CPU coordinator (can_move is false); "
                                    "every cold expert is computed by its worker")
        elif self.cost is None:
            self.disabled_reason = "no cost model; every cold expert is computed by its worker"
        elif self.staging_slots <= 0:
            self.disabled_reason = ("no device memory is set aside for staging cold experts; every cold expert is "
                                    "computed by its worker")

    @property
    def enabled(self) -> bool:
        return not self.disabled_reason

    def schedule(self, layer: int, cold_rows: Mapping[int, int], hot_rows: Iterable[int] = (),
                 device_busy_seconds: float = 0.0, fixed: Collection[int] = ()) -> Schedule:
        """cold_rows: expert -> rows for this layer's cold experts; hot_rows: rows of each hot expert of the call
        (their device time is predicted with the cost model), plus device_busy_seconds of other device work;
        fixed: experts of this layer that cannot move."""
        self.calls += 1
        if not self.enabled:
            if not self._said:
                log.info(self.disabled_reason)
                self._said = True
            return Schedule(reason=self.disabled_reason)
        cost = self.cost
        busy = device_busy_seconds + sum(cost.device_seconds(r) for r in hot_rows)
        owner = self._owner_by_layer.get(layer, {})
        rows = dict(cold_rows)
        moved = decide(rows, owner, self.num_workers, cost, busy, self.staging_slots, worker_scale=self.worker_scale,
                       fixed=fixed)
        self.moved_experts += len(moved)
        return Schedule(
            moved=frozenset(moved),
            predicted_seconds=makespan(rows, owner, self.num_workers, cost, busy, moved, self.worker_scale),
            no_move_seconds=makespan(rows, owner, self.num_workers, cost, busy, (), self.worker_scale),
        )


@dataclass
class MoveEveryExpert:
    """A forced decision, for tests and experiments: every cold expert with at least MIN_ROWS_TO_MOVE rows moves
    (single decoding rows still stay on their workers). Same interface as Scheduler."""

    disabled_reason: str = field(init=False, default="")
    calls: int = field(init=False, default=0)
    moved_experts: int = field(init=False, default=0)

    @property
    def enabled(self) -> bool:
        return True

    def schedule(self, layer: int, cold_rows: Mapping[int, int], hot_rows: Iterable[int] = (),
                 device_busy_seconds: float = 0.0, fixed: Collection[int] = ()) -> Schedule:
        self.calls += 1
        moved = frozenset(e for e, rows in cold_rows.items() if rows >= MIN_ROWS_TO_MOVE and e not in fixed)
        self.moved_experts += len(moved)
        return Schedule(moved=moved)
