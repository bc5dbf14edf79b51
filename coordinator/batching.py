"""The serving engine: every client of a cluster submits requests here, and one loop thread alone runs the model.

`BatchEngine.submit` checks a request at once and queues it; the loop thread takes requests in arrival order and
runs them. Each request's new tokens reach its `RequestHandle` as they are made (all rows' tokens of a step are
chosen first, then handed over together, so that a caller watching many requests through `on_change` wakes once a
step); a handle can be cancelled from any thread. A worker that fails a step ends the requests of that step with
the error, after `on_failure` (the cluster's recovery) has run in the loop thread, so that nothing else touches the
coordinator meanwhile.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from fiddler_moe.coordinator.coordinator import Coordinator, check_sampling
from fiddler_moe.coordinator.dispatch import ClusterDegraded, WorkerFailed

log = logging.getLogger("fiddler.engine")

# An idle engine's first request waits until no other has come for GATHER_S (at most GATHER_LIMIT_S in all), so that
# requests sent together are read in one prefill: a prompt read after the others' first tokens stalls their streams
# for its whole prefill. Clients sending at once reach the queue a few milliseconds apart (each is parsed and
# checked first); a lone request pays GATHER_S, a fraction of a percent of a prefill's time.
GATHER_S = 0.005
GATHER_LIMIT_S = 0.05


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    ignore_eos: bool = False  # never stop at EOS (EOS is masked, as transformers' min_new_tokens does)
    min_tokens: int = 0  # EOS masked until this many new tokens
    stop_token_ids: tuple[int, ...] = ()  # stop at these besides the model's EOS
    num_beams: int = 1  # beam search (greedy beams); >1 returns the best beam

    def check(self, vocab: int) -> None:
        """ValueError naming the field and what it takes."""
        check_sampling(self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.seed, self.num_beams)
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be 0 or more, got {self.min_tokens}")
        bad = next((t for t in self.stop_token_ids if isinstance(t, bool) or not isinstance(t, int)
                    or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"stop token id {bad!r} is not in the vocabulary (0 to {vocab - 1})")


@dataclass
class EngineStats:
    running: int = 0  # requests in the batch now
    waiting: int = 0  # submitted, not yet started
    finished: int = 0  # requests ended (any reason) since the engine started
    prompt_tokens: int = 0  # prompt tokens read (prefilled)
    generated_tokens: int = 0  # new tokens made
    prefill_seconds: float = 0.0  # loop time spent reading prompts
    decode_seconds: float = 0.0  # loop time spent in decoding steps


class RequestHandle:
    """One submitted request, as its caller sees it; the engine's loop thread fills it in."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 on_change: Callable[[RequestHandle], None] | None = None):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        # Called in the engine's thread after each new token and at the end: it must be quick and never block (the
        # HTTP server's, serving/app.py, only notes the handle and wakes its event loop once for all of them).
        self.on_change = on_change
        self.finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
        self.error: BaseException | None = None
        self.submitted_at = time.perf_counter()
        self.started_at: float | None = None  # when its prefill began
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._token_ids: list[int] = []
        self._changed = threading.Condition()
        self._cancel = threading.Event()

    # --- the caller's side ---

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def token_ids(self) -> list[int]:
        """The new tokens so far (a copy; does not wait)."""
        with self._changed:
            return list(self._token_ids)

    def tokens_from(self, start: int) -> tuple[list[int], bool]:
        """The new tokens from index `start` on, and whether the request had finished when they were read (does
        not wait)."""
        with self._changed:
            return self._token_ids[start:], self.done

    def tokens(self, timeout_s: float | None = None) -> Iterator[int]:
        """Each new token id as its step finishes; ends when the request finishes, raises its error if it failed.
        timeout_s bounds each wait for the next token (TimeoutError)."""
        given = 0
        while True:
            with self._changed:
                if not self._changed.wait_for(lambda: len(self._token_ids) > given or self.done, timeout_s):
                    raise TimeoutError(f"request {self.request_id} made no token within {timeout_s}s")
                new = self._token_ids[given:]
                finished = self.done and given + len(new) == len(self._token_ids)
            yield from new
            given += len(new)
            if finished:
                if self.error is not None:
                    raise self.error
                return

    def result(self, timeout_s: float | None = None) -> list[int]:
        """All new token ids once the request has finished; raises its error if it failed."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.done, timeout_s):
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout_s}s")
        if self.error is not None:
            raise self.error
        return list(self._token_ids)

    def seconds(self) -> tuple[float, float]:
        """(prefill, decode) of a finished request: from entering the batch to its first token, then to its end."""
        finished = self.finished_at or time.perf_counter()
        first = self.first_token_at or finished
        return first - (self.started_at or self.submitted_at), finished - first

    def cancel(self) -> None:
        """Leave the batch before the next step (thread-safe; a finished request stays as it is)."""
        self._cancel.set()

    # --- the engine's side ---

    def _emit(self, token: int) -> None:
        with self._changed:
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self._token_ids.append(token)
            self._changed.notify_all()
        if self.on_change is not None:
            self.on_change(self)

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        with self._changed:
            if self.done:
                return
            self.error = error
            self.finished_at = time.perf_counter()
            self.finish_reason = reason
            self._changed.notify_all()
        if self.on_change is not None:
            self.on_change(self)


class _StopWhenCancelled(StoppingCriteria):
    def __init__(self, handle: RequestHandle):
        self.handle = handle

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.handle.cancelled, dtype=torch.bool, device=input_ids.device)


def _warpers(params: SamplingParams) -> LogitsProcessorList:
    """transformers' own sampling steps, in the order its generate applies them."""
    warpers = LogitsProcessorList()
    if params.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        warpers.append(TopKLogitsWarper(top_k=params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=params.top_p))
    return warpers


@dataclass
class _Row:
    """A request in the batch: how it chooses its tokens, and where it is."""

    handle: RequestHandle
    stop_ids: frozenset[int]  # a token among these ends the request
    eos_ids: list[int]  # masked while fewer than min_tokens are made, or always with ignore_eos
    warpers: LogitsProcessorList | None  # None: greedy
    generator: torch.Generator | None  # its own random stream: a seed gives the same tokens beside any others
    length: int  # its real tokens in the cache
    last: int = -1  # the token to read at the next step
    made: int = 0

    @classmethod
    def of(cls, handle: RequestHandle, eos_ids: list[int]) -> _Row:
        params = handle.params
        stop = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(eos_ids))
        sample = params.temperature > 0
        generator = None
        if sample:
            seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()).item())
            generator = torch.Generator().manual_seed(seed)
        masked = sorted(set(eos_ids) | (set(params.stop_token_ids) if not params.ignore_eos else set()))
        return cls(handle, stop, masked, _warpers(params) if sample else None, generator,
                   len(handle.prompt_token_ids))

    @property
    def masks_eos(self) -> bool:
        params = self.handle.params
        return bool(self.eos_ids) and (params.ignore_eos or self.made < params.min_tokens)

    def sample(self, logits: torch.Tensor) -> int:
        """A sampled token from this row's float32 logits (vocabulary,), EOS already masked where it must be."""
        scores = self.warpers(None, logits[None])
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def choose(rows: list[_Row], logits: torch.Tensor) -> list[int]:
    """Each row's next token from float32 logits (rows, vocabulary), as transformers' generate picks it: EOS masked
    where the row asks, then the greedy rows' argmax taken in one call for all of them (the same first maximum
    as row by row) and each sampling row drawn from its own generator."""
    masked = None
    for i, row in enumerate(rows):
        if row.masks_eos:
            if masked is None:
                masked = logits.clone()
            masked[i, row.eos_ids] = -math.inf
    scores = logits if masked is None else masked
    greedy = scores.argmax(dim=-1).tolist() if any(row.warpers is None for row in rows) else []
    return [greedy[i] if row.warpers is None else row.sample(scores[i]) for i, row in enumerate(rows)]


# Positions a cache layer keeps free after its cached ones: a decoding step writes its keys and values there.
CACHE_ROOM = 256


class _RoomyLayer(DynamicLayer):
    """transformers' DynamicLayer, but a step's new keys and values are written into room kept after the cached
    ones instead of concatenated to them: `cat` copies every layer's whole cache at every step, which grows with the
    context and the model (Mixtral-8x7B at 4096 positions: 512 MiB a step). One layer's keys on mini at 256 / 1024 /
    4096 positions, in cache: 6 / 19 / 61 us by `cat`, 7 us written in place; mini's decoding step was no faster
    at 256 and 1024 positions (docs/performance-log.md, 2026-12-02). `keys` and `values` stay what transformers
    reads, views of the room's first positions; whatever assigns them anew (the engine's join and keep,
    transformers' crop and reordering) gets new room at its next update, and the room is taken again every
    CACHE_ROOM positions, copying the cache once."""

    _key_room: torch.Tensor | None = None
    _value_room: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self._key_room = _append(self.keys, self._key_room, key_states)
        self.values, self._value_room = _append(self.values, self._value_room, value_states)
        return self.keys, self.values

    def reset(self) -> None:
        self._key_room = self._value_room = None
        super().reset()


def _append(cached: torch.Tensor, room: torch.Tensor | None, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cached positions then new ones, the room they lie in): written into `room` where `cached` is its beginning,
    all of its rows and heads, and there is space, else into new room with CACHE_ROOM positions to spare."""
    n = cached.shape[-2] if cached.dim() == 4 else 0
    total = n + new.shape[-2]
    if (room is not None and n and cached.data_ptr() == room.data_ptr() and cached.stride() == room.stride()
            and cached.shape[:2] == room.shape[:2] == new.shape[:2] and total <= room.shape[-2]):
        room[:, :, n:total].copy_(new)
        return room[:, :, :total], room
    room = new.new_empty(*new.shape[:2], total + CACHE_ROOM, new.shape[-1])
    if n:
        room[:, :, :n].copy_(cached)
    room[:, :, n:total].copy_(new)
    return room[:, :, :total], room


def roomy_cache() -> DynamicCache:
    """An empty DynamicCache whose layers keep room for the next positions (`_RoomyLayer`)."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = _RoomyLayer
    return cache


class _Batch:
    """Rows' KV cache: one DynamicCache whose rows are left-padded to one length, and the attention mask that hides
    the padding. The running batch takes in each group of new rows after their prefill; rows leave between steps."""

    def __init__(self, rows: list[_Row] | None = None, cache: DynamicCache | None = None,
                 mask: torch.Tensor | None = None):
        self.rows: list[_Row] = rows or []
        self.cache = cache
        self.mask = mask  # (rows, cached length): 1 for a real token

    def join(self, other: _Batch) -> None:
        """Take in another batch's rows and cache, after these rows."""
        if not other.rows:
            return
        if not self.rows:
            self.rows, self.cache, self.mask = other.rows, other.cache, other.mask
            return
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(other.mask, width)])
        self.rows = self.rows + other.rows

    def keep(self, kept: list[int]) -> None:
        """Only these rows stay (their order kept); padding no row needs any more is cut off."""
        if len(kept) == len(self.rows):
            return
        if not kept:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(kept, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(dim=0).long().argmax())  # the first column some row still reads
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.rows = [self.rows[i] for i in kept]

    def step(self, model: torch.nn.Module) -> torch.Tensor:
        """One decoding step of every row: each reads its last token; float32 logits (rows, vocabulary)."""
        device = self.mask.device
        input_ids = torch.tensor([[row.last] for row in self.rows], device=device)
        positions = torch.tensor([[row.length] for row in self.rows], device=device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        out = model(input_ids=input_ids, attention_mask=self.mask, position_ids=positions,
                    cache=self.cache, use_cache=True)
        for row in self.rows:
            row.length += 1
        return out.logits[:, -1, :].float().cpu()  # chosen on the CPU: each request's generator lives there


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros before the sequence dimension's entries (dim 2 of a cache tensor, dim 1 of a mask) up to `width`."""
    dim = 2 if t.dim() == 4 else 1
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class BatchEngine:
    def __init__(self, coordinator: Coordinator, max_batch_size: int = 8,
                 on_failure: Callable[[WorkerFailed], None] | None = None, decode_threads: int | None = None):
        """on_failure: called in the loop thread after a step failed on a worker, before its requests end (the
        cluster restarts the worker there). decode_threads: torch threads of the decoding steps (None: the same as
        prefill, the creator's count; see launch/cluster.py's coordinator_decode_threads)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if getattr(coordinator, "_engine", None) is not None:  # two loops would run one model from two threads
            raise RuntimeError("this coordinator has its engine already: use coordinator.engine (cluster.engine)")
        coordinator._engine = self  # every client of the coordinator goes through this one
        self.coordinator = coordinator
        self.max_batch_size = max_batch_size
        self.on_failure = on_failure
        self._stats = EngineStats()
        self._waiting: deque[RequestHandle] = deque()
        self._batch = _Batch()
        self._starting = 0  # requests taken from the queue, not yet in the batch (prefilling, or a beam search)
        self._queue_changed = threading.Condition(threading.RLock())
        self._model_lock = threading.RLock()  # held by the loop for each step; exclusive() for anyone else
        self._ids = itertools.count(1)
        self._closing = False
        self._torch_threads = torch.get_num_threads()  # OpenMP's count is per thread: the loop takes its creator's
        if decode_threads is not None and decode_threads < 1:
            raise ValueError(f"decode_threads must be at least 1, got {decode_threads}")
        self._decode_threads = decode_threads or self._torch_threads
        self._head_hooks = self._head_on_prefill_threads(coordinator.model)
        self._thread = threading.Thread(target=self._loop, name="fiddler-engine", daemon=True)
        self._thread.start()

    # --- clients ---

    def submit(self, prompt_ids: list[int], params: SamplingParams = SamplingParams(),
               on_change: Callable[[RequestHandle], None] | None = None) -> RequestHandle:
        """Check the request and queue it; never waits for generation. ValueError says what is wrong. on_change:
        see RequestHandle."""
        coordinator = self.coordinator
        coordinator.check_serving()
        params.check(coordinator.vocab_size)
        prompt_ids = coordinator.check_prompt(prompt_ids, params.max_new_tokens)
        handle = RequestHandle(f"req-{next(self._ids)}", prompt_ids, params, on_change)
        with self._queue_changed:
            if self._closing:
                raise ClusterDegraded("the engine is shutting down; the request was not started")
            self._waiting.append(handle)
            self._queue_changed.notify_all()
        return handle

    def stats(self) -> EngineStats:
        with self._queue_changed:
            return EngineStats(**{**self._stats.__dict__, "running": len(self._batch.rows) + self._starting,
                                  "waiting": len(self._waiting)})

    @contextlib.contextmanager
    def exclusive(self):
        """Use the coordinator outside the loop (logits, restarting a worker): waits for the current step."""
        with self._model_lock:
            yield

    def close(self) -> None:
        """Stop the loop; unfinished requests end as cancelled."""
        with self._queue_changed:
            self._closing = True
            for handle in [*self._waiting, *(row.handle for row in self._batch.rows)]:
                handle.cancel()
            self._queue_changed.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()
        for handle in [*self._waiting, *(row.handle for row in self._batch.rows)]:
            self._end(handle, "cancelled")
        self._waiting.clear()
        self._batch.keep([])
        for hook in self._head_hooks:
            hook.remove()
        if getattr(self.coordinator, "_engine", None) is self:
            self.coordinator._engine = None

    # --- the loop thread ---

    def _loop(self) -> None:
        torch.set_num_threads(self._torch_threads)
        with torch.inference_mode():
            while True:
                with self._queue_changed:
                    self._queue_changed.wait_for(lambda: self._waiting or self._batch.rows or self._closing)
                    if not self._batch.rows:
                        self._gather()
                    if self._closing:
                        return
                    starting = self._admit()
                    self._starting = len(starting)
                try:
                    if starting:
                        self._use_threads(self._torch_threads)
                    if starting and starting[0].params.num_beams > 1:
                        self._run_alone(starting[0])
                    elif starting:
                        self._prefill(starting)
                    with self._queue_changed:
                        self._starting = 0
                    if self._batch.rows:
                        self._use_threads(self._decode_threads)
                        self._decode_step()
                except Exception as e:  # a fault of the engine itself: its requests end with it, the loop goes on
                    log.exception("the engine's step failed")
                    handles = [*starting, *(row.handle for row in self._batch.rows)]
                    self._batch.keep([])
                    with self._queue_changed:
                        self._starting = 0
                    self._fail(handles, e)

    def _head_on_prefill_threads(self, model: torch.nn.Module) -> list:
        """Where decoding steps run on fewer threads than prefill, the head (the output embeddings) on prefill's
        threads in them too: it is the largest weight of a step, read once after the last layer's experts, when the
        workers rest, and one thread reads it at one core's share of the bandwidth. Paired on mini, bfloat16, a Xeon
        with AMX (docs/performance-log.md, 2026-12-02): 0.925x the time a token; the attention projections likewise
        (2 MB each, read while a worker still watches for the next layer) made it 1.43x. Returns the hooks."""
        head = model.get_output_embeddings() if self._decode_threads < self._torch_threads else None
        if head is None:
            return []
        before: list[int] = []

        def widen(module, args) -> None:
            before.append(torch.get_num_threads())
            self._use_threads(self._torch_threads)

        def restore(module, args, output) -> None:
            self._use_threads(before.pop())

        return [head.register_forward_pre_hook(widen), head.register_forward_hook(restore)]

    def _use_threads(self, count: int) -> None:
        """This thread's torch (and so OpenMP) threads from now on; set only on a change."""
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)

    def _gather(self) -> None:
        """Idle, with a request waiting: wait for those sent with it (see GATHER_S). Called holding the queue's lock."""
        deadline = time.perf_counter() + GATHER_LIMIT_S
        seen = len(self._waiting)
        while not self._closing and 0 < seen < self.max_batch_size:
            left = min(GATHER_S, deadline - time.perf_counter())
            if left <= 0 or not self._queue_changed.wait(left) or len(self._waiting) == seen:
                return
            seen = len(self._waiting)

    def _admit(self) -> list[RequestHandle]:
        """The waiting requests that join now, in arrival order, while the batch has room. A beam search runs on
        its own: it starts once the batch is empty, and nothing joins while it waits or runs."""
        starting: list[RequestHandle] = []
        while self._waiting and len(self._batch.rows) + len(starting) < self.max_batch_size:
            handle = self._waiting[0]
            if handle.cancelled:
                self._waiting.popleft()
                self._end(handle, "cancelled")
                continue
            if handle.params.num_beams > 1:
                if not self._batch.rows and not starting:
                    starting.append(self._waiting.popleft())
                break
            starting.append(self._waiting.popleft())
        return starting

    def _end(self, handle: RequestHandle, reason: str, error: BaseException | None = None) -> None:
        if handle.done:
            return
        handle._finish(reason, error)
        with self._queue_changed:
            self._stats.finished += 1

    def _fail(self, handles: list[RequestHandle], error: BaseException) -> None:
        """A step failed: a worker's failure is recovered first (in this thread), then its requests end."""
        if isinstance(error, WorkerFailed):
            log.error("%d request(s) failed: %s", len(handles), error)
            self._recover(error)
        elif not isinstance(error, ClusterDegraded | ValueError):
            log.error("%d request(s) failed: %s: %s", len(handles), type(error).__name__, error)
        for handle in handles:
            self._end(handle, "error", error)

    def _advance(self, row: _Row, token: int) -> bool:
        """Hand the row's new token to its caller; False when that ended the request."""
        row.made += 1
        row.last = token
        row.handle._emit(token)
        with self._queue_changed:
            self._stats.generated_tokens += 1
        if token in row.stop_ids:
            self._end(row.handle, "stop")
            return False
        if row.made >= row.handle.params.max_new_tokens:
            self._end(row.handle, "length")
            return False
        return True

    def _prefill(self, handles: list[RequestHandle]) -> None:
        """Read the new requests' prompts in one forward pass (left-padded to the longest), choose each one's first
        token, and let those not finished by it join the batch."""
        coordinator = self.coordinator
        started = time.perf_counter()
        rows = []
        for handle in handles:
            handle.started_at = started
            rows.append(_Row.of(handle, coordinator.eos_token_ids))
        width = max(row.length for row in rows)
        input_ids = torch.full((len(rows), width), coordinator.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, handle in enumerate(handles):
            input_ids[i, width - len(handle.prompt_token_ids):] = torch.tensor(handle.prompt_token_ids)
            mask[i, width - len(handle.prompt_token_ids):] = 1
        input_ids, mask = input_ids.to(coordinator.device), mask.to(coordinator.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = roomy_cache()
        try:
            with self._model_lock:
                coordinator.check_serving()
                out = coordinator.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                        cache=cache, use_cache=True, logits_to_keep=1)
        except Exception as e:  # their callers get it
            self._fail(handles, e)
            return
        with self._queue_changed:
            self._stats.prompt_tokens += sum(row.length for row in rows)
            self._stats.prefill_seconds += time.perf_counter() - started
        logits = out.logits[:, -1, :].float().cpu()  # chosen on the CPU: each request's generator lives there
        group = _Batch(rows, cache, mask)
        group.keep([i for i, (row, token) in enumerate(zip(rows, choose(rows, logits))) if self._advance(row, token)])
        self._batch.join(group)

    def _decode_step(self) -> None:
        """Every row advances by one token in one forward pass; finished and cancelled rows leave."""
        batch = self._batch
        for row in batch.rows:
            if row.handle.cancelled:
                self._end(row.handle, "cancelled")
        batch.keep([i for i, row in enumerate(batch.rows) if not row.handle.done])
        if not batch.rows:
            return
        started = time.perf_counter()
        try:
            with self._model_lock:
                self.coordinator.check_serving()
                logits = batch.step(self.coordinator.model)
        except Exception as e:
            handles = [row.handle for row in batch.rows]
            batch.keep([])
            self._fail(handles, e)
            return
        tokens = choose(batch.rows, logits)
        batch.keep([i for i, (row, token) in enumerate(zip(batch.rows, tokens)) if self._advance(row, token)])
        with self._queue_changed:
            self._stats.decode_seconds += time.perf_counter() - started

    def _run_alone(self, handle: RequestHandle) -> None:
        """A beam search, through transformers' generate: its beams are the rows of each layer call."""
        params = handle.params
        handle.started_at = time.perf_counter()
        try:
            with self._model_lock:
                self.coordinator.check_serving()
                output = self._generate(handle)
        except Exception as e:
            self._fail([handle], e)
            return
        finished = time.perf_counter()
        new = output[0, len(handle.prompt_token_ids):].tolist()
        for token in new:
            handle._emit(token)
        with self._queue_changed:
            self._stats.prompt_tokens += len(handle.prompt_token_ids)
            self._stats.generated_tokens += len(new)
            self._stats.prefill_seconds += finished - handle.started_at
        if handle.cancelled:
            self._end(handle, "cancelled")
        elif new and new[-1] in self._stop_ids(params) and not params.ignore_eos:
            self._end(handle, "stop")
        else:
            self._end(handle, "length")

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        return set(self.coordinator.eos_token_ids) | set(params.stop_token_ids)

    def _generate(self, handle: RequestHandle) -> torch.Tensor:
        coordinator, params = self.coordinator, handle.params
        stop = sorted(self._stop_ids(params))
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=False,
            num_beams=params.num_beams,
            pad_token_id=coordinator.pad_token_id,
            eos_token_id=stop or None,
            min_new_tokens=params.max_new_tokens if params.ignore_eos else (params.min_tokens or None),
        )
        input_ids = torch.tensor([handle.prompt_token_ids], device=coordinator.device)
        return coordinator.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=config,
            stopping_criteria=StoppingCriteriaList([_StopWhenCancelled(handle)]),
        )

    def _recover(self, failure: WorkerFailed) -> None:
        if self.on_failure is None:
            return
        try:
            self.on_failure(failure)
        except Exception:
            log.exception("recovering from a failed worker failed")
