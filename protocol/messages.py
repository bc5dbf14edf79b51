"""Every message that crosses a process boundary, as typed dataclasses.

Two conversations use them:
  coordinator <-> expert worker: Hello, LoadShard, Ready, ExpertRequest, ExpertReply, Ping, Shutdown, Error
  client (fiddler CLI) <-> coordinator service: GenerateRequest, TokenChunk, GenerateDone, Error

Only activations travel at inference time: an ExpertRequest carries the routed token rows of one MoE layer
for the experts one worker owns, never weights. Tensors are fields typed `torch.Tensor`; the codec in
`protocol.wire` sends them as raw frames beside a msgpack header.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

# Bump when any message below changes shape; peers with another version are refused with an Error.
PROTOCOL_VERSION = 1


@dataclass
class Message:
    KIND: ClassVar[str] = ""


# --- checkpoint addressing (no tensors: a worker reads the bytes from its own copy of the checkpoint) ---


@dataclass
class TensorRef:
    """One tensor in a safetensors file; `index` selects one expert of a fused [num_experts, ...] tensor."""

    file: str  # relative to the checkpoint folder
    key: str
    index: int | None = None


@dataclass
class ExpertSource:
    """Where one expert's weights live in the checkpoint, in transformers' fused orientation.

    gate_up is the concatenation (dim 0, in order) of the tensors in `gate_up`, e.g. [w1, w3] for Mixtral or
    [gate_proj, up_proj] for Qwen; for a fused checkpoint it is one ref with an index. Experts without a gate
    (has_gate False) have only the up projection in `gate_up`.
    """

    layer: int
    expert: int
    gate_up: list[TensorRef]
    down: list[TensorRef]
    gate_up_bias: list[TensorRef] = field(default_factory=list)
    down_bias: list[TensorRef] = field(default_factory=list)


@dataclass
class KernelSpec:
    """What function an expert computes, taken from the transformers experts module it replaces."""

    activation: str  # a key of transformers.activations.ACT2FN
    has_gate: bool = True
    has_bias: bool = False
    is_transposed: bool = False  # weights stored [in, out] instead of [out, in]
    dtype: str = "float32"  # storage and compute dtype of the expert weights


# --- coordinator <-> worker ---


@dataclass
class Hello(Message):
    KIND: ClassVar[str] = "hello"
    version: int
    token: str = ""


@dataclass
class HelloReply(Message):
    KIND: ClassVar[str] = "hello_reply"
    version: int
    pid: int
    threads: int
    cpus: list[int]
    memory_bytes: int  # memory available to this worker for its shard


@dataclass
class LoadShard(Message):
    KIND: ClassVar[str] = "load_shard"
    model_dir: str  # empty: the worker uses the checkpoint folder it was started with
    fingerprint: str
    kernel: KernelSpec
    experts: list[ExpertSource]


@dataclass
class Ready(Message):
    KIND: ClassVar[str] = "ready"
    num_experts: int
    shard_bytes: int
    load_seconds: float


@dataclass
class ExpertRequest(Message):
    """Rows for several experts of one layer, stacked: rows[offset:offset+row_counts[i]] go to expert_ids[i]."""

    KIND: ClassVar[str] = "expert_request"
    request_id: int
    layer: int
    expert_ids: list[int]
    row_counts: list[int]
    rows: torch.Tensor


@dataclass
class ExpertReply(Message):
    KIND: ClassVar[str] = "expert_reply"
    request_id: int
    layer: int
    outputs: torch.Tensor  # same row order as the request
    compute_seconds: float


@dataclass
class Echo(Message):
    """Rows sent back unchanged as an ExpertReply: measures a transport's round trip (`fiddler bench transport`)."""

    KIND: ClassVar[str] = "echo"
    request_id: int
    rows: torch.Tensor


@dataclass
class AttachShm(Message):
    """Use this shared-memory file (see protocol.shm) for expert requests from now on; answered with Pong."""

    KIND: ClassVar[str] = "attach_shm"
    path: str
    capacity: int


@dataclass
class Ping(Message):
    KIND: ClassVar[str] = "ping"


@dataclass
class Pong(Message):
    KIND: ClassVar[str] = "pong"
    pid: int


@dataclass
class Shutdown(Message):
    KIND: ClassVar[str] = "shutdown"


@dataclass
class Error(Message):
    """Any failure, sent to whoever asked. request_id is -1 when the request could not even be decoded."""

    KIND: ClassVar[str] = "error"
    code: str
    message: str
    request_id: int = -1


# --- client <-> coordinator service ---


@dataclass
class GenerateRequest(Message):
    KIND: ClassVar[str] = "generate"
    prompt: str
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    chat: bool = False


@dataclass
class TokenChunk(Message):
    KIND: ClassVar[str] = "token"
    text: str
    token_ids: list[int]


@dataclass
class GenerateDone(Message):
    KIND: ClassVar[str] = "done"
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    prefill_seconds: float
    decode_seconds: float


ALL_MESSAGES: dict[str, type[Message]] = {
    cls.KIND: cls
    for cls in (
        Hello,
        HelloReply,
        LoadShard,
        Ready,
        ExpertRequest,
        ExpertReply,
        Echo,
        AttachShm,
        Ping,
        Pong,
        Shutdown,
        Error,
        GenerateRequest,
        TokenChunk,
        GenerateDone,
    )
}
