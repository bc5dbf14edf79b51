"""The coordinator's prompt endpoint: clients send GenerateRequest, receive TokenChunk messages as tokens are
produced, then GenerateDone; a StatsRequest is answered with the live statistics (coordinator/stats.py). Requests
are served one at a time in arrival order; a bad request gets an Error and the service goes on serving the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fiddler_moe.coordinator import stats
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


class PromptService:
    def __init__(
        self,
        coordinator: Coordinator,
        address: str,
        on_failure: Callable[[WorkerFailed], None] = lambda failure: None,
        on_idle: Callable[[], None] = lambda: None,
    ):
        """on_failure: called after a request failed on a worker (the launcher restarts it);
        on_idle: called when no request came for a while (the launcher checks its workers)."""
        self.coordinator = coordinator
        self.on_failure = on_failure
        self.on_idle = on_idle
        self.server = Server(address, max_message_bytes=PROMPT_MESSAGE_BYTES)
        self.address = self.server.address
        self.requests_served = 0

    def handle(self, identity: bytes, frames: list) -> None:
        reply = lambda msg: self.server.reply(identity, msg)  # noqa: E731
        # Validate everything before generating: a bad request gets an Error (to its client only) and the loop
        # goes on serving the others.
        try:
            msg = decode(frames)
            if isinstance(msg, m.Ping):
                reply(m.Pong(0))
                return
            if isinstance(msg, m.StatsRequest):
                reply(stats.snapshot(self.coordinator))
                if msg.reset:
                    stats.reset(self.coordinator)
                return
            if not isinstance(msg, m.GenerateRequest):
                raise ProtocolError("unexpected", f"the coordinator does not accept {msg.KIND!r} messages")
            if not msg.prompt.strip():
                raise ProtocolError("bad_request", "the prompt is empty; give some text")
            check_sampling(msg.max_new_tokens, msg.temperature, msg.top_p, msg.top_k, msg.seed)
        except ValueError as e:
            log.warning("refused a request: %s", e)
            reply(m.Error("bad_request", str(e)))
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
        try:
            result = self.coordinator.generate(
                msg.prompt,
                max_new_tokens=msg.max_new_tokens,
                temperature=msg.temperature,
                top_p=msg.top_p,
                top_k=msg.top_k,
                seed=msg.seed,
                chat=msg.chat,
                on_token=stream,
            )
        except ValueError as e:
            reply(m.Error("bad_request", str(e)))
            return
        except WorkerFailed as e:
            log.error("request failed: %s", e)
            reply(m.Error("worker_failed", f"{e}; the cluster is restoring the worker, try again"))
            self.on_failure(e)
            return
        except ClusterDegraded as e:
            reply(m.Error("degraded", str(e)))
            return
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM in the middle of a request: tell its client, then stop
            reply(m.Error("shutdown", "the cluster is shutting down (Ctrl-C or SIGTERM); the request was not finished"))
            raise
        except Exception as e:  # report, keep serving
            log.exception("request failed")
            reply(m.Error("internal", f"{type(e).__name__}: {e}"))
            return
        self.requests_served += 1
        reply(
            m.GenerateDone(
                prompt_token_ids=result.prompt_token_ids,
                token_ids=result.token_ids,
                text=result.text,
                prefill_seconds=result.prefill_seconds,
                decode_seconds=result.decode_seconds,
            )
        )

    def _handle_safely(self, identity: bytes, frames: list) -> None:
        """One request; nothing one client sends can end the loop (Ctrl-C and SIGTERM still do)."""
        try:
            self.handle(identity, frames)
        except Exception:
            log.exception("a request failed outside its own error handling; serving on")

    def serve(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        try:
            while not should_stop():
                envelope = self.server.receive(timeout_s=0.5)
                if envelope is not None:
                    self._handle_safely(envelope.identity, envelope.frames)
                else:
                    self.on_idle()
        finally:
            self.server.close()
