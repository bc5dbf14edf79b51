"""Placement: which experts are hot (on the coordinator's device) and which worker owns each cold one.

    plan(experts_per_layer, expert_bytes, non_expert_bytes, device_memory, num_workers, hot_experts=None,
         *, profile=None, worker_weights=None) -> Placement

The budget. `device_memory` less the non-expert weights buys `(device_memory - non_expert_bytes) // expert_bytes`
hot experts, never more (`hot_experts` overrides the count; `device_memory=None` makes every expert hot).

Without a profile (the first version's rule): hot experts are spread evenly over the layers (expert 0 of every layer,
then expert 1, ...); cold experts are dealt to workers in turn, layer after layer, so that the experts of one layer
land on different workers (they are then computed in parallel). With worker_weights the dealing is weighted (smooth
weighted round-robin), so each worker's shard is proportional to its weight; with equal weights it is plain
round-robin and every worker gets the same number.

With a profile (coordinator/profile.py: how often each expert was routed on calibration prompts):
- hot: the most routed experts that fit the budget; ties go to the no-profile order (lower expert index, then lower
  layer), so equal counts still spread over the layers and the result never depends on dict order.
- cold: layer by layer, the layer's experts in decreasing popularity go each to the worker whose expected load in
  this layer (routings / weight) ends lowest - a greedy LPT (longest processing time first) - with two rules on
  top: while some worker holds none of this layer's experts, only such workers are candidates (so a layer's W most
  popular experts sit on W different workers and run in parallel), and a worker holds at most
  ceil(cold experts of the layer * weight / total weight) of the layer (so shards stay proportional to weights
  even where the profile saw no traffic). Ties go to the worker with the least expected load over all layers so far,
  then the lowest index, which rotates each layer's busiest slot around the workers and balances the totals.
  Balancing per layer is what matters at run time: layers run one after another, and one layer call takes as long
  as its slowest worker.

worker_weights are relative compute capacities (e.g. threads or cores per worker; a remote 32-core host next to
local 8-thread workers gets 32 against 8). Expected load is routings / weight, i.e. proportional to expected time.

Placement.expected_hit_rate is the share of the profile's token-expert routings that hot experts serve (None without
a profile); Placement.expected_load[w] is the share of cold routings worker w serves. Both are shown by describe().
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fiddler_moe.coordinator.profile import ExpertProfile

Expert = tuple[int, int]  # (layer, expert)

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(text: str) -> int:
    """'20GiB', '512MB', '1.5G', '0' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"cannot read size {text!r}; write it like 20GiB, 512MB or 0")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@dataclass
class Placement:
    hot: list[Expert]
    owner: dict[Expert, int]  # cold expert -> worker index
    num_workers: int
    expert_bytes: int
    notes: list[str] = field(default_factory=list)
    expected_hit_rate: float | None = None  # share of the profile's routings served hot; None without a profile
    expected_load: list[float] | None = None  # per worker: share of the profile's cold routings it serves
    worker_weights: list[float] | None = None  # relative compute capacity per worker, as given to plan()
    cold_expert_bytes: int | None = None  # one expert on a worker, where it differs from expert_bytes (--quantize)
    cold_format: str = ""  # the workers' format then, e.g. "int4"
    coordinator_format: str = ""  # the format of a CPU coordinator's own linear layers, routers aside, if quantized

    def shard(self, worker: int) -> list[Expert]:
        return sorted(e for e, w in self.owner.items() if w == worker)

    def describe(self) -> list[str]:
        total = len(self.hot) + len(self.owner)
        cold_bytes = self.cold_expert_bytes or self.expert_bytes
        in_format = f" in {self.cold_format}" if self.cold_format else ""
        lines = [
            f"experts: {total} routed, {len(self.hot)} hot on the device "
            f"({format_size(len(self.hot) * self.expert_bytes)}), {len(self.owner)} cold on {self.num_workers} "
            f"worker(s)" + (f"{in_format} ({format_size(cold_bytes)} each)" if in_format else "")
        ]
        if self.expected_hit_rate is not None:
            lines.append(f"  expected hit rate (profile): {self.expected_hit_rate:.1%} of token-expert routings hot")
        for w in range(self.num_workers):
            shard = self.shard(w)
            layers = sorted({layer for layer, _ in shard})
            line = (f"  worker {w}: {len(shard)} experts ({format_size(len(shard) * cold_bytes)}{in_format}) "
                    f"over {len(layers)} layer(s)")
            if self.worker_weights is not None:
                line += f", weight {self.worker_weights[w]:g}"
            if self.expected_load is not None:
                line += f", {self.expected_load[w]:.1%} of cold routings"
            lines.append(line)
        if self.coordinator_format:
            lines.append(f"  {self.coordinator_line()}")
        return lines + [f"  note: {n}" for n in self.notes]

    def coordinator_line(self) -> str:
        """What a CPU coordinator's own linear layers are held in, when --quantize reaches them."""
        return (f"coordinator: attention, shared experts and head in {self.coordinator_format} on the CPU "
                "(routers and hot experts in the compute dtype)")


def plan(
    experts_per_layer: dict[int, int],
    expert_bytes: int,
    non_expert_bytes: int,
    device_memory: int | None,
    num_workers: int,
    hot_experts: int | None = None,
    *,
    profile: ExpertProfile | None = None,
    worker_weights: list[float] | None = None,
) -> Placement:
    """device_memory: bytes the coordinator's device may hold for weights (None: every expert hot).
    hot_experts: an explicit count that overrides the budget (tests, benchmarks).
    profile: expert popularity (coordinator/profile.py); picks the hot set and balances the workers' expected load.
    worker_weights: relative compute capacity of each worker (default: all equal)."""
    layers = sorted(experts_per_layer)
    total = sum(experts_per_layer.values())
    weights = _check_weights(worker_weights, num_workers)
    notes = []
    if hot_experts is not None:
        count = max(0, min(hot_experts, total))
    elif device_memory is None:
        count = total
    else:
        spare = device_memory - non_expert_bytes
        count = max(0, min(total, spare // expert_bytes)) if expert_bytes else total
        if spare < 0 and device_memory > 0:
            notes.append(
                f"the device budget ({format_size(device_memory)}) does not cover the non-expert weights "
                f"({format_size(non_expert_bytes)}); every expert is cold"
            )
    counts = _profile_counts(profile, experts_per_layer) if profile is not None else None
    if counts is not None and not any(counts.values()):
        notes.append("the profile counted no routings; placed as without a profile")
        counts = None

    # Default order: expert 0 of every layer, then expert 1 of every layer, ...
    default_order = sorted(
        ((layer, e) for layer in layers for e in range(experts_per_layer[layer])), key=lambda k: (k[1], k[0])
    )
    if counts is None:
        hot = default_order[:count]
    else:  # most routed first; sorted() is stable, so ties keep the default order
        hot = sorted(default_order, key=lambda k: -counts[k])[:count]
    hot_set = set(hot)
    cold = [(layer, e) for layer in layers for e in range(experts_per_layer[layer]) if (layer, e) not in hot_set]
    if cold and num_workers < 1:
        raise ValueError(f"{len(cold)} experts are cold but there are no workers; use --workers 1 or more")

    if counts is None:
        owner = _deal_weighted_round_robin(cold, weights)
    else:
        owner = _balance_by_popularity(cold, counts, weights)

    expected_hit_rate = expected_load = None
    if counts is not None:
        routed = sum(counts.values())
        expected_hit_rate = sum(counts[k] for k in hot) / routed
        cold_routed = sum(counts[k] for k in cold)
        per_worker = [0] * num_workers
        for key, w in owner.items():
            per_worker[w] += counts[key]
        expected_load = [n / cold_routed if cold_routed else 0.0 for n in per_worker]
    return Placement(
        hot=hot,
        owner=owner,
        num_workers=num_workers,
        expert_bytes=expert_bytes,
        notes=notes,
        expected_hit_rate=expected_hit_rate,
        expected_load=expected_load,
        worker_weights=list(weights) if worker_weights is not None else None,
    )


def _check_weights(worker_weights: list[float] | None, num_workers: int) -> list[float]:
    if worker_weights is None:
        return [1.0] * num_workers
    weights = [float(w) for w in worker_weights]
    if len(weights) != num_workers:
        raise ValueError(f"{len(weights)} worker weights for {num_workers} workers; give one weight per worker")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ValueError(f"worker weights must be positive numbers (e.g. each worker's threads), got {worker_weights}")
    return weights


def _profile_counts(profile: ExpertProfile, experts_per_layer: dict[int, int]) -> dict[Expert, int]:
    """Every expert of the model -> its count in the profile (0 when absent); refuses experts the model lacks."""
    counts = {(layer, e): 0 for layer, n in experts_per_layer.items() for e in range(n)}
    for key, n in profile.counts.items():
        if key not in counts:
            raise ValueError(
                f"the profile ({profile.model}) counts layer {key[0]} expert {key[1]}, which this model does not "
                "have: it was recorded on another model/checkpoint; re-run `fiddler profile --model ...`"
            )
        counts[key] = n
    return counts


def _deal_weighted_round_robin(cold: list[Expert], weights: list[float]) -> dict[Expert, int]:
    """Smooth weighted round-robin (as nginx balances upstreams): each turn every worker gains its weight, the one
    with the most credit takes the expert and pays the total. Equal weights give 0, 1, ..., W-1, 0, 1, ..."""
    total = sum(weights)
    credit = [0.0] * len(weights)
    owner = {}
    for expert in cold:
        for w, weight in enumerate(weights):
            credit[w] += weight
        chosen = max(range(len(weights)), key=lambda w: (credit[w], -w))
        credit[chosen] -= total
        owner[expert] = chosen
    return owner


def _balance_by_popularity(
    cold: list[Expert], counts: dict[Expert, int], weights: list[float]
) -> dict[Expert, int]:
    """Per layer, LPT over the workers with a spread rule and a per-layer cap (see the module docstring)."""
    num_workers = len(weights)
    total_weight = sum(weights)
    overall = [0.0] * num_workers  # routings assigned so far, all layers
    owner: dict[Expert, int] = {}
    by_layer: dict[int, list[Expert]] = {}
    for key in cold:
        by_layer.setdefault(key[0], []).append(key)
    for layer in sorted(by_layer):
        experts = sorted(by_layer[layer], key=lambda k: (-counts[k], k[1]))
        cap = [math.ceil(len(experts) * weight / total_weight - 1e-9) for weight in weights]
        while sum(cap) < len(experts):  # rounding guard; ceil makes the caps cover the layer
            cap[max(range(num_workers), key=lambda w: (weights[w], -w))] += 1
        load = [0.0] * num_workers  # this layer's routings per worker
        held = [0] * num_workers
        for key in experts:
            c = counts[key]
            open_workers = [w for w in range(num_workers) if held[w] < cap[w]]
            empty = [w for w in open_workers if held[w] == 0]
            candidates = empty or open_workers
            chosen = min(
                candidates,
                key=lambda w: ((load[w] + c) / weights[w], (overall[w] + c) / weights[w], w),
            )
            owner[key] = chosen
            load[chosen] += c
            held[chosen] += 1
            overall[chosen] += c
    return dict(sorted(owner.items()))
