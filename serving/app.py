"""The OpenAI-compatible HTTP API of a cluster: a FastAPI app over its batching engine.

    app = make_app(Served(engine, tokenizer, model_path, health, cluster_stats), api_key="...")

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streamed as server-sent events with
`stream: true`), GET /health and GET /metrics (serving/metrics.py). Every request becomes one engine request per
prompt and choice (`n`); the engine decodes all of them together. The text is decoded here, token by token
(serving/text.py), which is also where stop strings end a request: its handle is cancelled, so it leaves the
batch at the next step. A client that goes away mid-request cancels its handles the same way.

The engine's thread hands new tokens to the event loop itself (`TokenFeed`): each handle notes itself as changed,
and the loop is woken once for all the handles a step changed, so a step of many streams costs one wake-up, not a
thread and a wake-up per stream. Waiting for a token never blocks the loop, and a cancelled stream stops waiting at
once. The tokenizer is this app's own copy, used only on the event loop's thread (a fast tokenizer must not be used
from two threads at once).
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from fiddler_moe.coordinator.batching import BatchEngine, RequestHandle, SamplingParams
from fiddler_moe.coordinator.coordinator import chat_prompt_ids
from fiddler_moe.coordinator.dispatch import ClusterDegraded, WorkerFailed
from fiddler_moe.serving import metrics
from fiddler_moe.serving.schema import ApiError, ChatCompletionRequest, CompletionRequest, validation_error
from fiddler_moe.serving.text import StopText


@dataclass
class Served:
    """What the app serves and how it learns the cluster's state."""

    engine: BatchEngine
    tokenizer: object
    model_path: Path
    health: Callable[[], str | None] = lambda: None  # why the cluster cannot serve (degraded), or None
    coordinator: object | None = None  # for /metrics: hit rate and the workers' busy time
    shutting_down: str | None = None  # set when the server is stopping: new requests get 503
    open_handles: set[RequestHandle] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.model_path.name

    def context_length(self) -> int | None:
        coordinator = self.coordinator
        config = getattr(getattr(coordinator, "layout", None), "config", None)
        return getattr(config, "max_position_embeddings", None)

    def unavailable(self) -> str | None:
        return self.shutting_down or self.health()

    def cancel_all(self) -> None:
        for handle in list(self.open_handles):
            handle.cancel()


# --- the engine's tokens, handed to the event loop ---


class TokenFeed:
    """Wakes the event loop for the requests whose tokens changed: the engine's thread calls `changed` for each
    (RequestHandle.on_change), and one loop callback per batch of changes sets their readers' events."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._changed: dict[TokenReader, None] = {}  # in the order the engine made them
        self._woken = False  # a wake-up is on its way to the loop

    def changed(self, reader: TokenReader) -> None:
        """From the engine's thread: quick, never blocks."""
        with self._lock:
            self._changed[reader] = None
            if self._woken:
                return
            self._woken = True
        try:
            self.loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop is closed: the server stopped
            pass

    def _wake(self) -> None:
        with self._lock:
            changed, self._changed, self._woken = self._changed, {}, False
        for reader in changed:
            reader.ready.set()


class TokenReader:
    """One engine request's tokens, read on the event loop."""

    def __init__(self, feed: TokenFeed):
        self.feed = feed
        self.ready = asyncio.Event()
        self.handle: RequestHandle | None = None  # set once submitted
        self.read = 0  # tokens given out so far

    def on_change(self, handle: RequestHandle) -> None:
        self.feed.changed(self)

    async def next(self) -> list[int] | None:
        """The tokens made since the last call (at least one), or None at the end; raises the request's error."""
        while True:
            tokens, done = self.handle.tokens_from(self.read)
            if tokens:
                self.read += len(tokens)
                return tokens
            if done:
                if self.handle.error is not None:
                    raise self.handle.error
                return None
            self.ready.clear()  # only the loop sets it, so no change can slip in between the look and the wait
            await self.ready.wait()


@dataclass
class Choice:
    """One choice of a response: its engine request, its text and how it ended."""

    index: int
    handle: RequestHandle
    text: StopText
    reader: TokenReader
    generated: int = 0
    finish_reason: str | None = None
    output: str = ""

    async def pieces(self) -> AsyncIterator[str]:
        """The text as it comes, ending at a stop string, the end of sequence or the token limit."""
        while (tokens := await self.reader.next()) is not None:
            for token in tokens:
                self.generated += 1
                piece = self.text.add(token)
                if self.text.stopped:
                    self.handle.cancel()  # leaves the batch before the next step
                    self.finish_reason = "stop"
                if piece:
                    self.output += piece
                    yield piece
                if self.text.stopped:
                    return
        reason = self.handle.finish_reason
        if reason == "cancelled":
            raise ApiError(503, "the request was cancelled: the server is shutting down", None, "shutting_down")
        if reason == "error":
            raise ApiError(500, "the request failed in the engine", None, "engine_error")
        self.finish_reason = "length" if reason == "length" else "stop"
        piece = self.text.finish()
        if piece:
            self.output += piece
            yield piece


def _error_of(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ClusterDegraded):
        return ApiError(503, str(e), None, "degraded")
    if isinstance(e, WorkerFailed):
        return ApiError(503, f"{e}; the cluster is restoring the worker, try again", None, "worker_failed")
    if isinstance(e, ValueError):
        return ApiError(400, str(e), None, "invalid_value")
    return ApiError(500, f"{type(e).__name__}: {e}", None, "internal")


# --- the app ---


def make_app(served: Served, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="fiddler-moe", docs_url=None, redoc_url=None, openapi_url=None)
    tokenizer = copy.deepcopy(served.tokenizer)
    counters = metrics.Counters()
    feeds: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TokenFeed] = weakref.WeakKeyDictionary()
    app.state.served, app.state.metrics = served, counters

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        counters.request(request.url.path, e.status)
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError):
        return await api_error(request, validation_error(e.errors()))

    @app.exception_handler(404)
    async def not_found(request: Request, e):
        return await api_error(request, ApiError(404, f"no route {request.method} {request.url.path}; this server "
                                                 "has /v1/models, /v1/completions, /v1/chat/completions, /health, "
                                                 "/metrics", None, "not_found"))

    def check_key(request: Request) -> None:
        if not api_key:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            what = "no API key was given" if not given else "the API key is wrong"
            raise ApiError(401, f"{what}; send `Authorization: Bearer <key>` with the server's --api-key",
                           None, "invalid_api_key")

    def check_model(name: str) -> None:
        if name not in (served.name, str(served.model_path)):
            raise ApiError(404, f"the model {name!r} does not exist here; this server serves {served.name!r}",
                           "model", "model_not_found")

    def check_available() -> None:
        reason = served.unavailable()
        if reason:
            raise ApiError(503, reason, None, "unavailable")

    @app.get("/health")
    async def health():
        reason = served.unavailable()
        if reason:
            status = "shutting_down" if served.shutting_down else "degraded"
            return JSONResponse({"status": status, "reason": reason}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.exposition(counters, served)
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        counters.request("/v1/models", 200)
        created = int(served.model_path.stat().st_mtime) if served.model_path.exists() else 0
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": created,
                                            "owned_by": "fiddler-moe", "root": str(served.model_path)}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_key(request)
        check_model(body.model)
        body.refuse_unsupported()
        check_available()
        prompts = []
        for prompt in body.prompts():
            if isinstance(prompt, str):
                if not prompt.strip():
                    raise ApiError(400, "prompt is empty; give some text", "prompt", "empty_prompt")
                prompts.append(tokenizer(prompt)["input_ids"])
            else:
                prompts.append(list(prompt))
        return await respond(request, body, prompts, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_key(request)
        check_model(body.model)
        body.refuse_unsupported()
        check_available()
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages",
                           "no_chat_template")
        try:
            ids = chat_prompt_ids(tokenizer, body.conversation())
        except Exception as e:  # the template's own complaint (e.g. roles out of order) is the client's to fix
            raise ApiError(400, f"the chat template refused the messages: {e}", "messages", "invalid_messages")
        return await respond(request, body, [ids], body.new_token_limit(), chat=True)

    async def respond(request: Request, body, prompts: list[list[int]], max_tokens: int | None, chat: bool):
        choices = submit(body, prompts, max_tokens)
        route = "/v1/chat/completions" if chat else "/v1/completions"
        reply = Reply(served.name, chat, sum(len(p) for p in prompts))
        if body.stream:
            counters.request(route, 200)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(reply, choices, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            await asyncio.gather(*(drain(choice, request) for choice in choices))
        except BaseException as e:
            release(choices)
            raise _error_of(e) from None
        release(choices)
        counters.request(route, 200)
        return reply.whole(choices)

    def submit(body, prompts: list[list[int]], max_tokens: int | None) -> list[Choice]:
        context = served.context_length()
        loop = asyncio.get_running_loop()
        feed = feeds.get(loop) or feeds.setdefault(loop, TokenFeed(loop))
        choices: list[Choice] = []
        try:
            for prompt in prompts:
                limit = max_tokens if max_tokens is not None else (context - len(prompt) if context else 256)
                for j in range(body.n):
                    seed = None if body.seed is None else body.seed + j  # n choices differ when sampling
                    params = SamplingParams(
                        max_new_tokens=limit,
                        temperature=1.0 if body.temperature is None else body.temperature,
                        top_p=1.0 if body.top_p is None else body.top_p,
                        top_k=max(0, body.top_k or 0),
                        seed=seed,
                        ignore_eos=body.ignore_eos,
                        min_tokens=body.min_tokens,
                        num_beams=body.num_beams,
                    )
                    reader = TokenReader(feed)
                    reader.handle = handle = served.engine.submit(prompt, params, reader.on_change)
                    served.open_handles.add(handle)
                    choices.append(Choice(len(choices), handle, StopText(tokenizer, body.stop_strings()), reader))
        except BaseException as e:
            release(choices)
            raise _error_of(e) from None
        return choices

    async def drain(choice: Choice, request: Request) -> None:
        watch = asyncio.ensure_future(_disconnected(request))
        try:
            reading = asyncio.ensure_future(_consume(choice))
            done, _ = await asyncio.wait({reading, watch}, return_when=asyncio.FIRST_COMPLETED)
            if reading not in done:  # the client went away: nobody will read the answer
                reading.cancel()
                raise ApiError(499, "the client closed the connection", None, "client_closed")
            reading.result()
        finally:
            watch.cancel()

    def release(choices: list[Choice]) -> None:
        """The request is over for the client: any handle still running is cancelled and forgotten."""
        for choice in choices:
            if not choice.handle.done:
                choice.handle.cancel()
            counters.finished(choice.finish_reason or "cancelled")
            served.open_handles.discard(choice.handle)

    async def stream(reply: Reply, choices: list[Choice], include_usage: bool) -> AsyncIterator[str]:
        # One queue for every choice's pieces, so that choices stream side by side as they come.
        events: asyncio.Queue = asyncio.Queue()

        async def read(choice: Choice) -> None:
            try:
                async for piece in choice.pieces():
                    events.put_nowait((choice, piece))
                events.put_nowait((choice, None))
            except BaseException as e:
                events.put_nowait((choice, e))

        readers = [asyncio.ensure_future(read(choice)) for choice in choices]
        try:
            if reply.chat:
                for choice in choices:
                    yield reply.event(choice.index, {"role": "assistant", "content": ""}, None, include_usage)
            open_choices = len(choices)
            while open_choices:
                choice, item = await events.get()
                if isinstance(item, BaseException):
                    error = _error_of(item)
                    yield f"data: {json.dumps(error.body())}\n\n"
                    return
                if item is None:
                    open_choices -= 1
                    yield reply.event(choice.index, {} if reply.chat else "", choice.finish_reason, include_usage)
                else:
                    yield reply.event(choice.index, {"content": item} if reply.chat else item, None, include_usage)
            if include_usage:
                yield reply.usage_event(choices)
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away (the stream is cancelled): no handle stays in the batch
            for reader in readers:
                reader.cancel()
            release(choices)

    return app


async def _consume(choice: Choice) -> None:
    async for _ in choice.pieces():
        pass


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)


class Reply:
    """The JSON of completions and chat completions, whole or as server-sent events."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int):
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.object = "chat.completion" if chat else "text_completion"

    def usage(self, choices: list[Choice]) -> dict:
        generated = sum(c.generated for c in choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": generated,
                "total_tokens": self.prompt_tokens + generated}

    def whole(self, choices: list[Choice]) -> dict:
        if self.chat:
            shaped = [{"index": c.index, "message": {"role": "assistant", "content": c.output},
                       "logprobs": None, "finish_reason": c.finish_reason} for c in choices]
        else:
            shaped = [{"index": c.index, "text": c.output, "logprobs": None, "finish_reason": c.finish_reason}
                      for c in choices]
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": shaped, "usage": self.usage(choices)}

    def event(self, index: int, content, finish_reason: str | None, include_usage: bool) -> str:
        if self.chat:
            choice = {"index": index, "delta": content, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": content, "logprobs": None, "finish_reason": finish_reason}
        return self._chunk([choice], **({"usage": None} if include_usage else {}))

    def usage_event(self, choices: list[Choice]) -> str:
        return self._chunk([], usage=self.usage(choices))

    def _chunk(self, choices: list[dict], **extra) -> str:
        """One server-sent event of the stream."""
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.model, "choices": choices, **extra}
        return f"data: {json.dumps(chunk)}\n\n"
