"""The coordinator's prompt endpoint: clients send GenerateRequest, receive TokenChunk messages as tokens are
produced, then GenerateDone; a StatsRequest is answered with the live statistics (coordinator/stats.py). Requests
go to the serving engine (coordinator/batching.py) as they arrive, so concurrent clients decode together; a bad
request gets an Error and the service goes on serving the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from fiddler_moe.coordinator import stats
from fiddler_moe.coordinator.batching import RequestHandle, SamplingParams
from fiddler_moe.coordinator.coordinator import Coordinator, check_sampling
from fiddler_moe.coordinator.dispatch import ClusterDegraded, WorkerFailed
from fiddler_moe.protocol import messages as m
from fiddler_moe.protocol.transport import Server
from fiddler_moe.protocol.wire import ProtocolError, decode

log = logging.getLogger("fiddler.service")

# A prompt request is text: 64 MiB holds any context length with room to spare; larger messages are dropped unread.
PROMPT_MESSAGE_BYTES = 64 << 20


class TextStream:
    """Turns token ids into text pieces, holding back an incomplete UTF-8 character until it is whole."""

    def __init__(self, tokenizer, emit: Callable[[str, list[int]], None]):
        self.tokenizer = tokenizer
        self.emit = emit
        self.ids: list[int] = []
        self.pending: list[int] = []
        self.sent = 0

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        self.pending.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.emit(text[self.sent :], self.pending)
        self.sent, self.pending = len(text), []


# While requests run, the socket is polled this often for new ones between sending their tokens.
POLL_WHILE_SERVING_S = 0.002
IDLE_TICK_S = 0.5


@dataclass
class _Serving:
    """A request in the engine and what its client has been sent."""

    identity: bytes
    handle: RequestHandle
    stream: TextStream
    given: int = 0  # tokens passed to the stream


class PromptService:
    def __init__(
        self,
        coordinator: Coordinator,
        address: str,
        on_idle: Callable[[], None] = lambda: None,
    ):
        """on_idle: called when no request came for a while and none is running (the launcher checks its
        workers). A request failed on a worker is recovered by the engine (its on_failure) before the error."""
        self.coordinator = coordinator
        self.on_idle = on_idle
        self.server = Server(address, max_message_bytes=PROMPT_MESSAGE_BYTES)
        self.address = self.server.address
        self.requests_served = 0
        self.serving: list[_Serving] = []

    def handle(self, identity: bytes, frames: list) -> None:
        """One message: answered at once, or a request handed to the engine (its tokens follow from pump)."""
        reply = lambda msg: self.server.reply(identity, msg)  # noqa: E731
        # Validate everything before generating: a bad request gets an Error (to its client only) and the loop
        # goes on serving the others.
        try:
            msg = decode(frames)
            if isinstance(msg, m.Ping):
                reply(m.Pong(0))
                return
            if isinstance(msg, m.StatsRequest):
                with self.coordinator.engine.exclusive():  # between steps: counts of whole steps
                    reply(stats.snapshot(self.coordinator))
                    if msg.reset:
                        stats.reset(self.coordinator)
                return
            if not isinstance(msg, m.GenerateRequest):
                raise ProtocolError("unexpected", f"the coordinator does not accept {msg.KIND!r} messages")
            if not msg.prompt.strip():
                raise ProtocolError("bad_request", "the prompt is empty; give some text")
            check_sampling(msg.max_new_tokens, msg.temperature, msg.top_p, msg.top_k, msg.seed, msg.num_beams)
            params = SamplingParams(max_new_tokens=msg.max_new_tokens, temperature=msg.temperature, top_p=msg.top_p,
                                    top_k=msg.top_k, seed=msg.seed, num_beams=msg.num_beams)
            handle = self.coordinator.engine.submit(self.coordinator.encode_prompt(msg.prompt, msg.chat), params)
        except ValueError as e:
            log.warning("refused a request: %s", e)
            reply(m.Error("bad_request", str(e)))
            return
        except ClusterDegraded as e:
            reply(m.Error("degraded", str(e)))
            return
        except ProtocolError as e:
            log.warning("refused a request: %s", e.message)
            reply(m.Error(e.code, e.message))
            return
        except Exception as e:  # whatever a client sends, it gets an error and the service goes on
            log.exception("refused a request that could not be read")
            reply(m.Error("bad_request", f"the request could not be read: {type(e).__name__}"))
            return
        stream = TextStream(self.coordinator.tokenizer, lambda text, ids: reply(m.TokenChunk(text, list(ids))))
        self.serving.append(_Serving(identity, handle, stream))

    def pump(self) -> None:
        """Send each running request's new tokens; answer those that finished."""
        for serving in list(self.serving):
            handle = serving.handle
            done = handle.done  # read first: its tokens are complete once it is set
            for token in handle.token_ids()[serving.given:]:
                serving.stream(token)
                serving.given += 1
            if done:
                self.serving.remove(serving)
                self._answer(serving)

    def _answer(self, serving: _Serving) -> None:
        reply = lambda msg: self.server.reply(serving.identity, msg)  # noqa: E731
        handle, e = serving.handle, serving.handle.error
        if e is None and handle.finish_reason == "cancelled":
            reply(m.Error("shutdown", "the cluster is shutting down; the request was not finished"))
        elif isinstance(e, WorkerFailed):
            log.error("request failed: %s", e)
            reply(m.Error("worker_failed", f"{e}; the cluster restarts the worker, try again"))
        elif isinstance(e, ClusterDegraded):
            reply(m.Error("degraded", str(e)))
        elif isinstance(e, ValueError):
            reply(m.Error("bad_request", str(e)))
        elif e is not None:  # report, keep serving
            log.error("request failed: %s: %s", type(e).__name__, e)
            reply(m.Error("internal", f"{type(e).__name__}: {e}"))
        else:
            self.requests_served += 1
            ids = handle.token_ids()
            prefill_seconds, decode_seconds = handle.seconds()
            reply(m.GenerateDone(prompt_token_ids=handle.prompt_token_ids, token_ids=ids,
                                 text=self.coordinator.tokenizer.decode(ids, skip_special_tokens=True),
                                 prefill_seconds=prefill_seconds, decode_seconds=decode_seconds))

    def _handle_safely(self, identity: bytes, frames: list) -> None:
        """One request; nothing one client sends can end the loop (Ctrl-C and SIGTERM still do)."""
        try:
            self.handle(identity, frames)
        except Exception:
            log.exception("a request failed outside its own error handling; serving on")

    def serve(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        idle_since = time.monotonic()
        try:
            while not should_stop():
                envelope = self.server.receive(timeout_s=POLL_WHILE_SERVING_S if self.serving else IDLE_TICK_S)
                if envelope is not None:
                    self._handle_safely(envelope.identity, envelope.frames)
                self.pump()
                if envelope is not None or self.serving:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since >= IDLE_TICK_S:
                    self.on_idle()
                    idle_since = time.monotonic()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM in the middle of requests: tell their clients, then stop
            for serving in self.serving:
                serving.handle.cancel()
                self.server.reply(serving.identity, m.Error(
                    "shutdown", "the cluster is shutting down (Ctrl-C or SIGTERM); the request was not finished"))
            self.serving = []
            raise
        finally:
            self.server.close()
