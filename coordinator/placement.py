"""Placement: which experts are hot (on the coordinator's device) and which worker owns each cold one.

First version: the device-memory budget, after the non-expert weights, buys hot experts spread evenly over the
layers; cold experts are dealt to workers round-robin, layer after layer, so that the experts of one layer land on
different workers (they are then computed in parallel) and every worker gets the same number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

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

    def shard(self, worker: int) -> list[Expert]:
        return sorted(e for e, w in self.owner.items() if w == worker)

    def describe(self) -> list[str]:
        total = len(self.hot) + len(self.owner)
        lines = [
            f"experts: {total} routed, {len(self.hot)} hot on the device "
            f"({format_size(len(self.hot) * self.expert_bytes)}), {len(self.owner)} cold on {self.num_workers} "
            f"worker(s)"
        ]
        for w in range(self.num_workers):
            shard = self.shard(w)
            layers = sorted({layer for layer, _ in shard})
            lines.append(
                f"  worker {w}: {len(shard)} experts ({format_size(len(shard) * self.expert_bytes)}) "
                f"over {len(layers)} layer(s)"
            )
        return lines + [f"  note: {n}" for n in self.notes]


def plan(
    experts_per_layer: dict[int, int],
    expert_bytes: int,
    non_expert_bytes: int,
    device_memory: int | None,
    num_workers: int,
    hot_experts: int | None = None,
) -> Placement:
    """device_memory: bytes the coordinator's device may hold for weights (None: every expert hot).
    hot_experts: an explicit count that overrides the budget (tests, benchmarks)."""
    layers = sorted(experts_per_layer)
    total = sum(experts_per_layer.values())
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
    hot: list[Expert] = []
    rank = 0
    while len(hot) < count:  # expert 0 of every layer, then expert 1 of every layer, ...
        for layer in layers:
            if rank < experts_per_layer[layer] and len(hot) < count:
                hot.append((layer, rank))
        rank += 1
    hot_set = set(hot)
    cold = [(layer, e) for layer in layers for e in range(experts_per_layer[layer]) if (layer, e) not in hot_set]
    if cold and num_workers < 1:
        raise ValueError(f"{len(cold)} experts are cold but there are no workers; use --workers 1 or more")
    owner = {expert: i % num_workers for i, expert in enumerate(cold)}
    return Placement(hot=hot, owner=owner, num_workers=num_workers, expert_bytes=expert_bytes, notes=notes)
