"""The serving engine: every client of a cluster submits requests here, and one loop thread alone runs the model.

`BatchEngine.submit` checks a request at once and queues it; the loop thread takes requests in arrival order and
runs them. Each request's new tokens reach its `RequestHandle` as they are made; a handle can be cancelled from any
thread. A worker that fails a step ends the requests of that step with the error, after `on_failure` (the
cluster's recovery) has run in the loop thread, so that nothing else touches the coordinator meanwhile.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from fiddler_moe.coordinator.coordinator import Coordinator, check_sampling
from fiddler_moe.coordinator.dispatch import ClusterDegraded, WorkerFailed

log = logging.getLogger("fiddler.engine")


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


class Cancelled(Exception):
    """Raised inside a generation when its request was cancelled."""


class RequestHandle:
    """One submitted request, as its caller sees it; the engine's loop thread fills it in."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
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

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        with self._changed:
            if self.done:
                return
            self.error = error
            self.finished_at = time.perf_counter()
            self.finish_reason = reason
            self._changed.notify_all()


class _Streamer(BaseStreamer):
    """transformers' streamer protocol -> the handle's tokens."""

    def __init__(self, handle: RequestHandle):
        self.handle = handle
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.handle._emit(token)

    def end(self) -> None:
        pass


class _StopWhenCancelled(StoppingCriteria):
    def __init__(self, handle: RequestHandle):
        self.handle = handle

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.handle.cancelled, dtype=torch.bool, device=input_ids.device)


class BatchEngine:
    def __init__(self, coordinator: Coordinator, max_batch_size: int = 8,
                 on_failure: Callable[[WorkerFailed], None] | None = None):
        """on_failure: called in the loop thread after a step failed on a worker, before its requests end (the
        cluster restarts the worker there)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.coordinator = coordinator
        self.max_batch_size = max_batch_size
        self.on_failure = on_failure
        self._stats = EngineStats()
        self._waiting: deque[RequestHandle] = deque()
        self._running: list[RequestHandle] = []
        self._queue_changed = threading.Condition()
        self._model_lock = threading.RLock()  # held by the loop for each step; exclusive() for anyone else
        self._ids = itertools.count(1)
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="fiddler-engine", daemon=True)
        self._thread.start()

    # --- clients ---

    def submit(self, prompt_ids: list[int], params: SamplingParams = SamplingParams()) -> RequestHandle:
        """Check the request and queue it; never waits for generation. ValueError says what is wrong."""
        coordinator = self.coordinator
        coordinator.check_serving()
        params.check(coordinator.vocab_size)
        prompt_ids = coordinator.check_prompt(prompt_ids, params.max_new_tokens)
        handle = RequestHandle(f"req-{next(self._ids)}", prompt_ids, params)
        with self._queue_changed:
            if self._closing:
                raise ClusterDegraded("the engine is shutting down; the request was not started")
            self._waiting.append(handle)
            self._queue_changed.notify_all()
        return handle

    def stats(self) -> EngineStats:
        with self._queue_changed:
            return EngineStats(**{**self._stats.__dict__, "running": len(self._running),
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
            for handle in [*self._waiting, *self._running]:
                handle.cancel()
            self._queue_changed.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()
        for handle in [*self._waiting, *self._running]:
            handle._finish("cancelled")
        self._waiting.clear()
        self._running.clear()

    # --- the loop thread ---

    def _loop(self) -> None:
        while True:
            with self._queue_changed:
                self._queue_changed.wait_for(lambda: self._waiting or self._closing)
                if self._closing:
                    return
                handle = self._waiting.popleft()
                self._running.append(handle)
            try:
                self._run_alone(handle)
            finally:
                with self._queue_changed:
                    self._running.remove(handle)
                    self._stats.finished += 1

    def _run_alone(self, handle: RequestHandle) -> None:
        """One request through transformers' generate (greedy, sampling, or beam search)."""
        params = handle.params
        if handle.cancelled:
            handle._finish("cancelled")
            return
        handle.started_at = time.perf_counter()
        try:
            with self._model_lock:
                self.coordinator.check_serving()
                output = self._generate(handle)
        except WorkerFailed as e:
            log.error("request %s failed: %s", handle.request_id, e)
            self._recover(e)
            handle._finish("error", e)
            return
        except Exception as e:  # ClusterDegraded, or anything else: the request's caller gets it
            handle._finish("error", e)
            return
        finished = time.perf_counter()
        first = handle.first_token_at or finished
        new = output[0, len(handle.prompt_token_ids):].tolist()
        if params.num_beams > 1:  # beams are known only at the end
            for token in new:
                handle._emit(token)
        with self._queue_changed:
            self._stats.prompt_tokens += len(handle.prompt_token_ids)
            self._stats.generated_tokens += len(new)
            self._stats.prefill_seconds += first - handle.started_at
            self._stats.decode_seconds += finished - first
        if handle.cancelled:
            handle._finish("cancelled")
        elif new and new[-1] in self._stop_ids(params) and not params.ignore_eos:
            handle._finish("stop")
        else:
            handle._finish("length")

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        return set(self.coordinator.eos_token_ids) | set(params.stop_token_ids)

    @torch.inference_mode()
    def _generate(self, handle: RequestHandle) -> torch.Tensor:
        coordinator, params = self.coordinator, handle.params
        sample = params.temperature > 0
        if params.seed is not None:
            torch.manual_seed(params.seed)
        stop = sorted(self._stop_ids(params))
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=sample,
            temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None,
            top_k=(params.top_k or None) if sample else None,
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
            streamer=_Streamer(handle) if params.num_beams == 1 else None,
            stopping_criteria=StoppingCriteriaList([_StopWhenCancelled(handle)]),
        )

    def _recover(self, failure: WorkerFailed) -> None:
        if self.on_failure is None:
            return
        try:
            self.on_failure(failure)
        except Exception:
            log.exception("recovering from a failed worker failed")
