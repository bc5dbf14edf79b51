"""Live statistics: what `fiddler stats` and `fiddler generate --stats` show, and profiles saved from them.

The coordinator counts while it serves: per (layer, expert) the token routings, which token-expert pairs were
served hot (an expert resident on the device), moved (a cold expert copied to the device for one layer call) or
cold (computed by its worker), and per worker its requests and busy time (coordinator/dispatch.py). `snapshot`
packs these into a StatsReply for the prompt endpoint (coordinator/service.py); `describe` and `as_dict` show
one; `difference` is what happened between two snapshots (one request's share); `to_profile` turns the routing
counts into an ExpertProfile that the next launch can place by (`fiddler-launch --profile`).
"""

from __future__ import annotations

import dataclasses
import time

from fiddler_moe.coordinator.dispatch import DispatchStats
from fiddler_moe.coordinator.profile import ExpertProfile
from fiddler_moe.protocol import messages as m


def snapshot(coordinator) -> m.StatsReply:
    """The coordinator's counts since launch or the last reset."""
    stats = coordinator.dispatcher.stats
    layout = coordinator.layout
    routed = [
        m.LayerCounts(layer.layer, [stats.routed.get((layer.layer, e), 0) for e in range(layer.num_experts)])
        for layer in layout.moe_layers
    ]
    workers = [
        m.WorkerStats(link.name, link.client.address, len(link.shard), link.requests, link.busy_seconds)
        for link in coordinator.links
    ]
    return m.StatsReply(
        model=str(layout.folder),
        fingerprint=layout.fingerprint,
        window_seconds=max(0.0, time.time() - stats.started),
        tokens=stats.tokens,
        layer_calls=stats.layer_calls,
        hot_pairs=stats.hot_pairs,
        moved_pairs=stats.moved_pairs,
        cold_pairs=stats.cold_pairs,
        moved_experts=stats.moved_experts,
        dispatch_seconds=stats.dispatch_seconds,
        hot_seconds=stats.hot_seconds,
        moved_seconds=stats.moved_seconds,
        wait_seconds=stats.wait_seconds,
        workers=workers,
        routed=routed,
        expected_hit_rate=coordinator.placement.expected_hit_rate,
        scheduler=getattr(coordinator, "scheduling_line", ""),
    )


def reset(coordinator) -> None:
    """Start a new counting window."""
    coordinator.dispatcher.stats = DispatchStats()
    for link in coordinator.links:
        link.requests, link.busy_seconds = 0, 0.0


def pairs(reply: m.StatsReply) -> int:
    return reply.hot_pairs + reply.moved_pairs + reply.cold_pairs


def hit_rate(reply: m.StatsReply) -> float:
    """Share of token-expert pairs served by hot experts."""
    total = pairs(reply)
    return reply.hot_pairs / total if total else 0.0


def difference(before: m.StatsReply, after: m.StatsReply) -> m.StatsReply:
    """The counts between two snapshots of the same coordinator (e.g. around one request)."""
    numbers = {}
    for f in dataclasses.fields(m.StatsReply):
        a, b = getattr(before, f.name), getattr(after, f.name)
        if isinstance(b, bool) or not isinstance(b, int | float) or f.name == "expected_hit_rate":
            continue
        numbers[f.name] = b - a if isinstance(a, int | float) else b
    earlier = {w.name: w for w in before.workers}
    workers = []
    for w in after.workers:
        e = earlier.get(w.name)
        workers.append(w if e is None else
                       m.WorkerStats(w.name, w.address, w.experts, w.requests - e.requests,
                                     w.busy_seconds - e.busy_seconds))
    counted = {c.layer: c.counts for c in before.routed}
    routed = []
    for c in after.routed:
        old = counted.get(c.layer, [])
        routed.append(m.LayerCounts(c.layer, [n - (old[i] if i < len(old) else 0) for i, n in enumerate(c.counts)]))
    return dataclasses.replace(after, **numbers, workers=workers, routed=routed)


def to_profile(reply: m.StatsReply) -> ExpertProfile:
    """The routing counts as a profile for the next launch (`--profile`)."""
    counts = {(c.layer, e): n for c in reply.routed for e, n in enumerate(c.counts)}
    return ExpertProfile.from_counts(counts, fingerprint=reply.fingerprint, model=reply.model, tokens=reply.tokens,
                                     experts_per_layer={c.layer: len(c.counts) for c in reply.routed})


def as_dict(reply: m.StatsReply) -> dict:
    """For --json: every field (routed as {layer: [counts]}) plus the hit rate."""
    data = dataclasses.asdict(reply)
    data["routed"] = {str(c.layer): c.counts for c in reply.routed}
    data["hit_rate"] = hit_rate(reply)
    return data


def _share(n: int, total: int) -> str:
    return f"{n / total:.1%}" if total else "-"


def describe(reply: m.StatsReply) -> list[str]:
    """The statistics for people, one fact per line."""
    total = pairs(reply)
    expected = (f" (the profile expected {reply.expected_hit_rate:.1%})"
                if reply.expected_hit_rate is not None else "")
    lines = [
        f"model: {reply.model} (fingerprint {reply.fingerprint}); counting for {reply.window_seconds:.1f}s",
        f"tokens: {reply.tokens} read in {reply.layer_calls} MoE layer calls",
        f"hit rate: {hit_rate(reply):.1%} of {total} token-expert pairs served hot{expected}",
        (f"  hot {reply.hot_pairs} ({_share(reply.hot_pairs, total)}), moved to the device {reply.moved_pairs} "
         f"({_share(reply.moved_pairs, total)}, {reply.moved_experts} expert copies), on workers {reply.cold_pairs} "
         f"({_share(reply.cold_pairs, total)})"),
        (f"time in MoE layers: {reply.dispatch_seconds:.3f}s; device: hot experts {reply.hot_seconds:.3f}s, moved "
         f"experts {reply.moved_seconds:.3f}s; waiting for workers {reply.wait_seconds:.3f}s"),
    ]
    for w in reply.workers:
        busy = f" ({w.busy_seconds / reply.window_seconds:.1%} of the time)" if reply.window_seconds > 0 else ""
        lines.append(f"  {w.name}: {w.experts} experts, {w.requests} requests, busy {w.busy_seconds:.3f}s{busy}")
    if reply.scheduler:
        lines.append(reply.scheduler)
    return lines
