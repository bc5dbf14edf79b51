"""Scheduling one MoE layer call: group routed tokens by expert, send every cold expert's rows to its worker,
compute the hot experts on the device while the workers run, then gather and combine with the routing weights.

With a scheduler (coordinator/scheduling.py), a long prefill may take some cold experts off their workers for this
call: their weights are copied from the worker's shared shard into a device staging buffer (coordinator/staging.py)
and their rows computed on the device after the hot experts, while the workers compute the rest. A call with
fewer tokens than MIN_ROWS_TO_MOVE (decoding one sequence) never asks: decode stays on the workers.

The combination mirrors transformers' grouped_mm implementation (weighted rows, then a sum over top-k in the
routing weights' precision), so results match transformers' own model.

A decoding step whose layer is all cold on one local worker (CPU-only, every expert cold) takes the same steps in
C instead (`_call_in_c`, native/shm_call.py): right after the worker's turn each Python step here is slow. That is
one sequence's step, or, where no scheduler may move experts, a batch's (the serving engine's steps of up to
native/limits.py's MAX_PAIRS routed pairs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch

from fiddler_moe.native import shm_call
from fiddler_moe.coordinator.placement import Expert
from fiddler_moe.coordinator.scheduling import MIN_ROWS_TO_MOVE
from fiddler_moe.native.shm_call import ShmCall
from fiddler_moe.native import kernels
from fiddler_moe.experts.compute import ExpertKernel, ExpertWeights
from fiddler_moe.protocol import messages as m
from fiddler_moe.protocol.shm import ShmChannel
from fiddler_moe.protocol.transport import Client
from fiddler_moe.protocol.wire import decode, encode_header


class WorkerFailed(RuntimeError):
    """A worker did not answer, answered with an error, or died; the message names it and its shard."""

    def __init__(self, message: str, worker: int | None = None):
        super().__init__(message)
        self.worker = worker


class ClusterDegraded(RuntimeError):
    """A worker is down for good (no restart, or its restarts are used up): requests are refused until the
    cluster is launched again."""


@dataclass
class WorkerLink:
    name: str
    client: Client
    shard: list[Expert]
    alive: Callable[[], bool] = lambda: True  # the launcher's view of the process
    channel: ShmChannel | None = None  # shared-memory slots when the worker is on this host
    busy_seconds: float = 0.0
    requests: int = 0

    @property
    def is_local(self) -> bool:
        return self.client.address.startswith("ipc://")

    def send(self, message: m.Message) -> None:
        """A message over ZeroMQ; rings the shared-memory bell too, since the worker may be asleep on it."""
        self.client.send(message)
        if self.channel is not None:
            self.channel.ring()

    def describe(self) -> str:
        layers = sorted({layer for layer, _ in self.shard})
        span = f"layers {layers[0]}-{layers[-1]}" if layers else "no layers"
        return f"{self.name} ({self.client.address}, {len(self.shard)} experts of {span})"


@dataclass
class DispatchStats:
    """Counters for `fiddler stats` and the benchmarks' time breakdown; reset() starts a new window."""

    hot_pairs: int = 0  # token-expert pairs computed on the device by hot experts
    cold_pairs: int = 0  # ... computed by the workers
    moved_pairs: int = 0  # ... of cold experts moved to the device for one call (the scheduler's choice)
    moved_experts: int = 0  # expert computations moved to the device
    tokens: int = 0  # tokens the model read (counted at its first MoE layer)
    layer_calls: int = 0
    expert_reads: int = 0  # experts routed to, summed over layer calls: each reads its expert's weights once a call
    dispatch_seconds: float = 0.0  # all time inside MoE expert calls
    send_seconds: float = 0.0  # gathering and sending the cold requests (the Python path; the C path's is waiting)
    hot_seconds: float = 0.0  # computing hot experts (overlaps the workers)
    moved_seconds: float = 0.0  # copying moved experts to the device and computing them (overlaps the workers)
    wait_seconds: float = 0.0  # blocked on worker replies after the device's part was done
    round_trip_seconds: float = 0.0  # first request sent -> last reply in, summed over layer calls
    worker_compute_seconds: float = 0.0  # the slowest worker's compute per layer call, summed
    routed: dict[Expert, int] = field(default_factory=dict)
    started: float = field(default_factory=time.time)  # when this window began (wall clock)

    @property
    def hit_rate(self) -> float:
        """Share of token-expert pairs served by hot experts."""
        total = self.hot_pairs + self.moved_pairs + self.cold_pairs
        return self.hot_pairs / total if total else 0.0

    @property
    def transport_seconds(self) -> float:
        """Round trips beyond the workers' own compute: framing, copies, wake-ups."""
        return max(0.0, self.round_trip_seconds - self.worker_compute_seconds)


# Routed pairs up to which grouping is done on Python lists (decoding): fewer tensor ops. A speed threshold, not a
# capacity: native/limits.py's MAX_PAIRS (the most pairs a call through shm_call.c takes) is set apart from it, and
# a call on either side of either gives the same bits.
SMALL_CALL_PAIRS = 64


Index = torch.Tensor | list[int]  # positions or tokens: a list for a small call, a tensor on the device otherwise


def _group_by_expert(top_k_index: torch.Tensor) -> tuple[Index, Index, list[tuple[int, int]]]:
    """The (token, k) pairs sorted by expert, stably: their positions among the flattened pairs, their tokens, and
    (expert, row count) for each expert that has rows, in expert order."""
    top_k = top_k_index.shape[1]
    if top_k_index.numel() <= SMALL_CALL_PAIRS:  # a decode step: a dozen tensor ops cost more than the lists
        ids = top_k_index.reshape(-1).tolist()
        order = sorted(range(len(ids)), key=ids.__getitem__)
        groups: dict[int, int] = {}
        for i in order:
            groups[ids[i]] = groups.get(ids[i], 0) + 1
        return order, [i // top_k for i in order], list(groups.items())
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    return order, order // top_k, list(zip(experts.tolist(), counts.tolist()))


def _on(device: torch.device, index: Index) -> torch.Tensor:
    return torch.tensor(index, device=device) if isinstance(index, list) else index


def _combine(outputs: torch.Tensor, order: Index, top_k_weights: torch.Tensor) -> torch.Tensor:
    """The call's result from the grouped outputs: back to (token, k) order, weighted, summed over k, as
    transformers' grouped_mm does it. A decoding step's few rows take one call of the bfloat16 kernel library
    instead of five tensor ops (each slow right after a worker's turn has flushed the caches)."""
    num_tokens, top_k = top_k_weights.shape
    if isinstance(order, list) and kernels.combines(outputs, top_k_weights):
        row_of = [0] * len(order)
        for row, pair in enumerate(order):
            row_of[pair] = row
        return kernels.combine(outputs, row_of, top_k_weights)
    unsorted = torch.empty_like(outputs)
    unsorted[_on(outputs.device, order)] = outputs
    return (unsorted * top_k_weights.reshape(-1, 1)).view(num_tokens, top_k, -1).sum(dim=1)


class Dispatcher:
    def __init__(
        self,
        kernel: ExpertKernel,
        hot: dict[Expert, ExpertWeights],
        owner: dict[Expert, int],
        workers: list[WorkerLink],
        reply_timeout_s: float = 300.0,
        scheduler=None,
        reachable: dict[Expert, ExpertWeights] | None = None,
        staging=None,
    ):
        """scheduler: a coordinator.scheduling.Scheduler (or MoveEveryExpert) deciding per call which cold experts
        to move; reachable: cold experts whose weights this process can copy (views of mapped shared shards);
        staging: the coordinator.staging.Staging buffers moved experts are copied into."""
        self.kernel = kernel
        self.hot = hot
        self.owner = owner
        self.workers = workers
        self.reply_timeout_s = reply_timeout_s
        self.scheduler = scheduler
        self.reachable = reachable if reachable is not None else {}
        self.staging = staging
        self.first_layer = min((layer for layer, _ in [*hot, *owner]), default=None)
        self.stats = DispatchStats()
        self._next_id = 0
        # Layers whose experts are all cold on one worker: a decoding step's call to it may go through shm_call.c.
        owners: dict[int, set[int]] = {}
        for (layer, _), w in owner.items():
            owners.setdefault(layer, set()).add(w)
        hot_layers = {layer for layer, _ in hot}
        self.sole_worker = {layer: ws.pop() for layer, ws in owners.items() if len(ws) == 1 and layer not in hot_layers}
        self._shm_calls: dict[int, ShmCall] = {}  # per worker, for its current channel

    def forward(
        self, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        entered = time.perf_counter()
        num_tokens, top_k = top_k_index.shape
        may_move = num_tokens >= MIN_ROWS_TO_MOVE and self.scheduler is not None and self.scheduler.enabled
        if not may_move and layer in self.sole_worker and shm_call.takes(hidden, top_k_index, top_k_weights):
            result = self._call_in_c(self.sole_worker[layer], layer, hidden, top_k_index, top_k_weights, entered)
            if result is not None:
                return result
        order, tokens, groups = _group_by_expert(top_k_index)

        # Where each expert's rows sit in `rows`, and who computes them.
        hot_spans: list[tuple[ExpertWeights, int, int]] = []
        by_worker: dict[int, list[tuple[int, int, int]]] = {}
        start = 0
        for expert, count in groups:
            key = (layer, expert)
            if key in self.hot:
                hot_spans.append((self.hot[key], start, start + count))
                self.stats.hot_pairs += count
            else:
                by_worker.setdefault(self.owner[key], []).append((expert, start, start + count))
            start += count
        moved = self._take_moved(layer, by_worker, hot_spans) if num_tokens >= MIN_ROWS_TO_MOVE else []

        # Every cold request goes out before anything waits. When one worker computes every pair (all experts
        # cold on one worker: decoding on a CPU), its request is gathered straight from `hidden` and its reply is
        # the grouped output, with no copies in between.
        sent = time.perf_counter()
        whole = len(by_worker) == 1 and not hot_spans and not moved
        rows = None if whole else hidden[_on(hidden.device, tokens)]  # (tokens * top_k, hidden), grouped by expert
        pending = {w: self._send(w, layer, hidden, tokens, rows, spans) for w, spans in by_worker.items()}
        hot_started = time.perf_counter()
        outputs = None if whole else torch.empty_like(rows)
        for weights, lo, hi in hot_spans:
            self.kernel.forward(weights, rows[lo:hi], outputs[lo:hi])
        hot_done = time.perf_counter()
        self.stats.send_seconds += hot_started - sent
        self.stats.hot_seconds += hot_done - hot_started
        for expert, lo, hi in moved:  # copied into a staging buffer, computed here, while the workers run
            slot, weights = self.staging.load(self.reachable[(layer, expert)])
            outputs[lo:hi] = self.kernel.forward(weights, rows[lo:hi])
            self.staging.release(slot)
        waited = time.perf_counter()
        self.stats.moved_seconds += waited - hot_done
        computed: dict[int, float] = {}
        for w, (request_id, seq, spans) in pending.items():
            reply = self._receive(w, request_id, seq, layer)
            computed[w] = reply.compute_seconds
            out = reply.outputs
            if out.dtype != hidden.dtype or out.device != hidden.device:  # even a no-op .to() costs time here
                out = out.to(device=hidden.device, dtype=hidden.dtype)
            if whole:
                outputs = out
                continue
            offset = 0
            for _, lo, hi in spans:
                outputs[lo:hi] = out[offset : offset + hi - lo]
                offset += hi - lo
        done = time.perf_counter()

        result = _combine(outputs, order, top_k_weights)
        if result.dtype != hidden.dtype:
            result = result.to(hidden.dtype)
        cold_pairs = sum(hi - lo for spans in by_worker.values() for _, lo, hi in spans)
        self._record(layer, num_tokens, groups, cold_pairs, computed, entered, sent, waited, done)
        return result

    def _call_in_c(self, w: int, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor, entered: float) -> torch.Tensor | None:
        """The whole call through shm_call.c (see native/shm_call.py), or None when it does not take it. What the
        reply's arrival needs is made before the post; after it only the C call's return and the statistics run,
        each line of Python slow from the caches the worker's turn has flushed."""
        link = self.workers[w]
        if link.channel is None:
            return None
        lane = self._shm_calls.get(w)
        if lane is None or lane.channel is not link.channel:  # a restarted worker has a new channel
            lane = self._shm_calls[w] = ShmCall(link.channel)
        num_tokens = top_k_index.shape[0]
        result = torch.empty(num_tokens, hidden.shape[1], dtype=hidden.dtype)
        # Nothing between posting and waiting: the worker's threads take every core as soon as they wake.
        self._next_id += 1
        sent = time.perf_counter()
        if not lane.post(hidden, top_k_index, top_k_weights, self._next_id, layer, result):
            return None
        if self._wait(w, layer, lane.finish) == 1:
            seconds = lane.call.compute_seconds
        else:  # not a plain reply to this call (an error, say): the Python path reads it
            reply = self._receive(w, self._next_id, lane.call.seq, layer)
            result = _combine(reply.outputs, lane.order(), top_k_weights).to(hidden.dtype)
            seconds = reply.compute_seconds
        done = time.perf_counter()
        # No device work to overlap here: the wait runs from the post.
        self._record(layer, num_tokens, lane.routed(), top_k_index.numel(), {w: seconds}, entered, sent, sent, done)
        return result

    def _record(self, layer: int, num_tokens: int, routed: list[tuple[int, int]], cold_pairs: int,
                computed: dict[int, float], entered: float, sent: float, waited: float, done: float) -> None:
        """The statistics of a finished layer call, either path's: the pairs `routed` to each expert (expert,
        pairs) and those the workers computed, the call and its tokens (counted at the first layer), the wait for
        the workers from `waited` to `done` and their round trip from `sent`, the slowest one's compute, and each
        worker's request and busy seconds (`computed`: its reply's compute seconds, per worker asked)."""
        stats = self.stats
        for expert, count in routed:
            key = (layer, expert)
            stats.routed[key] = stats.routed.get(key, 0) + count
        stats.cold_pairs += cold_pairs
        stats.layer_calls += 1
        stats.expert_reads += len(routed)
        if layer == self.first_layer:
            stats.tokens += num_tokens
        stats.wait_seconds += done - waited
        if computed:
            stats.round_trip_seconds += done - sent
            stats.worker_compute_seconds += max(computed.values())
        for w, seconds in computed.items():
            link = self.workers[w]
            link.requests += 1
            link.busy_seconds += seconds
        stats.dispatch_seconds += time.perf_counter() - entered

    def _take_moved(self, layer: int, by_worker: dict[int, list[tuple[int, int, int]]],
                    hot_spans: list[tuple[ExpertWeights, int, int]]) -> list[tuple[int, int, int]]:
        """Ask the scheduler which cold experts of this call to compute here; take their spans out of by_worker."""
        if self.scheduler is None or not self.scheduler.enabled or not by_worker:
            return []
        cold_rows = {e: hi - lo for spans in by_worker.values() for e, lo, hi in spans}
        fixed: Collection[int] = {e for e in cold_rows if (layer, e) not in self.reachable}
        schedule = self.scheduler.schedule(layer, cold_rows, [hi - lo for _, lo, hi in hot_spans], fixed=fixed)
        if not schedule.moved:
            return []
        moved = []
        for w in list(by_worker):
            stay = [span for span in by_worker[w] if span[0] not in schedule.moved]
            moved += [span for span in by_worker[w] if span[0] in schedule.moved]
            if stay:
                by_worker[w] = stay
            else:
                del by_worker[w]
        self.stats.moved_experts += len(moved)
        self.stats.moved_pairs += sum(hi - lo for _, lo, hi in moved)
        return moved

    def _send(self, w: int, layer: int, hidden: torch.Tensor, tokens: Index, rows: torch.Tensor | None,
              spans: list[tuple[int, int, int]]):
        """Send one worker its rows for this layer: straight into its shared-memory slot when they fit, else as
        ZeroMQ frames. `rows` are the call's grouped rows, or None when this worker takes every pair: then they are
        gathered from `hidden` by `tokens` into the outgoing buffer. Returns what _receive needs to match the
        reply."""
        self._next_id += 1
        link = self.workers[w]
        count = sum(hi - lo for _, lo, hi in spans)
        shape = (count, hidden.shape[1])
        use_shm = link.channel is not None and link.channel.fits(count * hidden.shape[1] * hidden.element_size())
        batch = link.channel.request_view(hidden.dtype, shape) if use_shm else torch.empty(shape, dtype=hidden.dtype)
        if rows is None:  # one copy: the gather itself, from any device
            if (isinstance(tokens, list) and hidden.device == batch.device and hidden.is_contiguous()
                    and hidden.dtype == batch.dtype and kernels.available()):
                kernels.gather_rows(hidden, tokens, batch)  # a decoding step: no tensor ops
            elif hidden.device == batch.device:
                torch.index_select(hidden, 0, _on(hidden.device, tokens), out=batch)
            else:
                batch.copy_(hidden.index_select(0, _on(hidden.device, tokens)))
        else:  # one copy: from the grouped rows (on any device) into the outgoing buffer
            pieces = [rows[lo:hi] for _, lo, hi in spans]
            if rows.device != batch.device and len(pieces) > 1:
                pieces = [torch.cat(pieces)]  # joined on the device: one device-to-host copy, one wait, not one each
            offset = 0
            for piece in pieces:
                batch[offset : offset + len(piece)].copy_(piece)
                offset += len(piece)
        request = m.ExpertRequest(
            request_id=self._next_id,
            layer=layer,
            expert_ids=[e for e, _, _ in spans],
            row_counts=[hi - lo for _, lo, hi in spans],
            rows=batch,
        )
        if use_shm:
            seq = link.channel.post_request(encode_header(request), batch.numel() * batch.element_size())
        else:
            seq = None
            link.send(request)
        return self._next_id, seq, spans

    def _receive(self, w: int, request_id: int, seq: int | None, layer: int) -> m.ExpertReply:
        """The worker's ExpertReply to request_id: from its shared-memory slot (`seq`, the request's sequence
        number there) or over ZeroMQ (seq None). An Error from the worker raises WorkerFailed."""
        link = self.workers[w]

        def poll(timeout_s: float) -> m.ExpertReply | None:
            if seq is not None:
                frames = link.channel.wait_reply(seq, timeout_s=timeout_s)
                reply = None if frames is None else decode(frames, link.channel.reply_view)
            else:
                reply = link.client.receive(timeout_s=timeout_s)
            if isinstance(reply, m.Error):
                raise WorkerFailed(f"{link.describe()} failed layer {layer}: {reply.message}", w)
            if isinstance(reply, m.ExpertReply) and reply.request_id == request_id:
                return reply
            return None  # nothing yet, or a late reply to an abandoned request: dropped, ours is still to come

        return self._wait(w, layer, poll)

    def _wait(self, w: int, layer: int, poll: Callable[[float], object]):
        """poll(timeout_s) until it gives something true (a reply; shm_call's status 1 or -1), within
        reply_timeout_s; WorkerFailed, naming the worker, when the time is up or the worker has died."""
        link = self.workers[w]
        deadline = time.monotonic() + self.reply_timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerFailed(f"{link.describe()} did not reply within {self.reply_timeout_s:.0f}s", w)
            got = poll(min(left, 1.0))
            if got:
                return got
            if not link.alive():
                raise WorkerFailed(f"{link.describe()} died while computing layer {layer}", w)
