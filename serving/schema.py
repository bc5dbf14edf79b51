"""The requests of OpenAI's API that the server takes, as pydantic models, and its error shape.

Field names, defaults and ranges are OpenAI's (temperature 1 unless told, `max_tokens` 16 for completions), plus
vLLM's extension fields that benchmarks send (`ignore_eos`, `min_tokens`, `top_k`) and `num_beams`. Fields the
engine cannot honour (log probabilities, penalties, tools) are refused with a 400 that names them rather than
silently ignored; unknown fields are ignored, as other OpenAI-compatible servers do, so that newer clients work.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationFields(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM: -1 (or 0) is off
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM extension: generate max_tokens whatever the model says
    min_tokens: int = Field(0, ge=0)  # vLLM extension: no end of sequence before this many tokens
    num_beams: int = Field(1, ge=1, le=64)  # extension: beam search, the best beam answers
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if isinstance(value, list) and any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def refuse_unsupported(self) -> None:
        """A 400 naming the first field whose feature the engine does not have."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported by this server; leave it 0", name, "unsupported")
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported by this server; leave it out", "logit_bias",
                           "unsupported")
        if self.num_beams > 1 and self.stream:
            raise ApiError(400, "num_beams > 1 cannot stream (the best beam is known only at the end); "
                           "set stream to false", "num_beams", "unsupported")
        if self.num_beams > 1 and (self.temperature or 0) > 0:
            raise ApiError(400, "num_beams > 1 is greedy beam search; set temperature to 0", "num_beams",
                           "unsupported")


class CompletionRequest(GenerationFields):
    # A prompt is text or token ids; a list of them is a batch (one choice set per prompt, as OpenAI's API does).
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise ApiError(400, "echo is not supported by this server; leave it false", "echo", "unsupported")
        if self.suffix:
            raise ApiError(400, "suffix (insertion) is not supported by this server; leave it out", "suffix",
                           "unsupported")
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, "best_of is not supported by this server; leave it out (num_beams does beam search)",
                           "best_of", "unsupported")
        if self.logprobs is not None:
            raise ApiError(400, "logprobs are not supported by this server; leave them out", "logprobs",
                           "unsupported")

    def prompts(self) -> list[str | list[int]]:
        """The batch: one prompt per entry."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        if not self.prompt:
            raise ApiError(400, "prompt is empty; give some text", "prompt", "empty_prompt")
        return list(self.prompt)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # none: the rest of the context
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs or self.top_logprobs:
            raise ApiError(400, "logprobs are not supported by this server; leave them out", "logprobs",
                           "unsupported")
        if self.tools:
            raise ApiError(400, "tools (function calling) are not supported by this server; leave them out",
                           "tools", "unsupported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ApiError(400, "response_format other than text is not supported by this server",
                           "response_format", "unsupported")

    def new_token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict]:
        """The messages as the tokenizer's chat template takes them."""
        turns = []
        for message in self.messages:
            turn = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
            if message.name:
                turn["name"] = message.name
            turns.append(turn)
        return turns


def validation_error(errors: list[dict]) -> ApiError:
    """pydantic's first complaint as one line naming the field, e.g. "temperature: Input should be less than or
    equal to 2"."""
    first = errors[0] if errors else {"loc": (), "msg": "the request could not be read"}
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(where) or None
    message = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return ApiError(400, "the request body is not valid JSON", None, "invalid_json")
    if first.get("type") == "missing":
        message = "is required"
    return ApiError(400, f"{param}: {message}" if param else message, param, "invalid_value")
