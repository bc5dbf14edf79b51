"""Every message that crosses a process boundary, as typed dataclasses.

Two conversations use them:
  coordinator <-> expert worker: Hello, LoadShard, Ready, ExpertRequest, ExpertReply, Ping, Shutdown, Error
  client (fiddler CLI) <-> coordinator service: GenerateRequest, TokenChunk, GenerateDone, StatsRequest,
  StatsReply, Error

Only activations travel at inference time: an ExpertRequest carries the routed token rows of one MoE layer
for the experts one worker owns, never weights. Tensors are fields typed `torch.Tensor`; the codec in
`protocol.wire` sends them as raw frames beside a msgpack header.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

# Bump when any message below changes shape; peers with another version are refused with an Error.
PROTOCOL_VERSION = 6


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
    # MXFP4 checkpoints (config quantization_config quant_method "mxfp4", as gpt-oss ships): `gate_up` and `down`
    # name the `*_blocks` tensors (uint8, two 4-bit values a byte) and these the `*_scales` (one uint8 power of two
    # per 32 values); the loader dequantizes them into the model's orientation and dtype (experts.mxfp4). Empty for
    # weights stored as plain floats.
    gate_up_scales: list[TensorRef] = field(default_factory=list)
    down_scales: list[TensorRef] = field(default_factory=list)


@dataclass
class KernelSpec:
    """What function an expert computes, taken from the transformers experts module it replaces:

        h = x @ gate_up (+ gate_up_bias)                      # [rows, 2 * intermediate], or [rows, intermediate]
        gate, up = halves of h (`interleaved`: even and odd columns)
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)         # when `limit` is set
        glu = activation(gate), or gate * sigmoid(alpha * gate)           # when `alpha` is set
        out = (glu * (up + up_offset)) @ down (+ down_bias)   # without a gate: activation(h) @ down

    The defaults are the plain gated expert of Mixtral, Qwen-MoE and DeepSeek; GPT-OSS sets interleaved, limit,
    alpha and up_offset=1."""

    activation: str  # a key of transformers.activations.ACT2FN
    has_gate: bool = True
    has_bias: bool = False
    is_transposed: bool = False  # weights stored [in, out] instead of [out, in]
    dtype: str = "float32"  # storage and compute dtype of the expert weights
    interleaved: bool = False  # gate and up alternate along the output (gate0, up0, gate1, ...), not halves
    limit: float | None = None
    alpha: float | None = None
    up_offset: float = 0.0


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
    # Keep the shard in one shared-memory file that the coordinator maps read-only (same host only), so that it
    # can copy a cold expert's weights to its device without a second copy in memory. See Ready.shared_path.
    shared: bool = False
    # Keep the shard in this format instead of the kernel's dtype: "none", "int8" or "int4" (experts/quant.py),
    # quantized from the checkpoint once and cached. A quantized shard is never shared.
    quantize: str = "none"


@dataclass
class SharedTensor:
    """One tensor of a shared shard: `shape` elements of the shard's dtype at byte `offset` of the file."""

    layer: int
    expert: int
    name: str  # gate_up, down, gate_up_bias or down_bias (expert_worker.compute.ExpertWeights' fields)
    offset: int
    shape: list[int]
    dtype: str = ""  # a quantized shard's plane (gate_up.q, gate_up.scale, ...): its own dtype; "": the shard's


@dataclass
class Ready(Message):
    KIND: ClassVar[str] = "ready"
    num_experts: int
    shard_bytes: int
    load_seconds: float
    # When LoadShard.shared: the /dev/shm file holding the shard (the coordinator maps it, then unlinks the name)
    # and where each tensor sits in it; empty when the worker could not share it (shared_note says why).
    shared_path: str = ""
    shared_bytes: int = 0
    shared_tensors: list[SharedTensor] = field(default_factory=list)
    shared_note: str = ""
    # With LoadShard.quantize: "hit" (read from the cache, nothing quantized) or "written" (quantized now, stored).
    quantize_cache: str = ""  # a quantized shard: "written" (quantized now), "hit" (from the cache), "kept"


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
    spin: bool = True  # spin briefly before sleeping on the bell; False where the coordinator computes on its cores
    # Taking turns: after a decoding step's request, watch the bell this long (helper threads parked) before
    # sleeping, where a core is free for it (launch/cluster.py's worker_turn_spin_s); 0: sleep at once.
    turn_spin_s: float = 0.0


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
    num_beams: int = 1  # beam search when above 1 (greedy beams; the best one is returned)


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


@dataclass
class StatsRequest(Message):
    """Ask the coordinator for its live statistics (`fiddler stats`); answered with StatsReply."""

    KIND: ClassVar[str] = "stats"
    reset: bool = False  # start a new counting window after answering


@dataclass
class WorkerStats:
    name: str
    address: str
    experts: int  # experts in its shard
    requests: int  # expert requests it answered
    busy_seconds: float  # its own compute time for them


@dataclass
class LayerCounts:
    """Token-expert routings of one MoE layer, one count per expert in expert order."""

    layer: int
    counts: list[int]


@dataclass
class StatsReply(Message):
    """Counts since launch (or the last reset). Token-expert pairs are served hot (an expert on the device),
    moved (a cold expert whose weights were copied to the device for one layer call) or cold (on its worker)."""

    KIND: ClassVar[str] = "stats_reply"
    model: str
    fingerprint: str
    window_seconds: float  # since the counting window started
    tokens: int  # tokens the model read (prompt and generated)
    layer_calls: int
    hot_pairs: int
    moved_pairs: int
    cold_pairs: int
    moved_experts: int  # expert computations moved to the device
    dispatch_seconds: float  # inside MoE expert calls
    hot_seconds: float  # computing hot experts on the device
    moved_seconds: float  # copying moved experts to the device and computing them there
    wait_seconds: float  # waiting for workers after the device's part was done
    workers: list[WorkerStats]
    routed: list[LayerCounts]
    expected_hit_rate: float | None = None  # the placement's, from its profile
    scheduler: str = ""  # what the scheduler does, in words


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
        StatsRequest,
        StatsReply,
    )
}
