"""Framing: a message becomes [msgpack header, raw tensor frame, ...] and back, never pickle.

The header is a map {"v": version, "kind": str, "body": {...}, "tensors": [{"field", "dtype", "shape"}]}; each
tensor follows as its own frame holding exactly its bytes, so bfloat16 travels bit-exact and ZeroMQ can send the
tensor's memory without a copy. Decoding trusts nothing: every field is type-checked against the dataclass, every
frame's length against its declared dtype and shape, and sizes are bounded before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
import warnings
from typing import Any, Union

import msgpack
import torch

from protocol.messages import ALL_MESSAGES, PROTOCOL_VERSION, Message

# The receive path wraps read-only ZeroMQ buffers; we never write into them.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

HEADER_KEYS = {"v", "kind", "body", "tensors"}
MAX_HEADER_BYTES = 16 << 20  # a LoadShard for DeepSeek-V3's ~15k experts is a few MB
MAX_TENSOR_BYTES = 4 << 30
MAX_TENSOR_DIMS = 4
MAX_ERROR_CHARS = 400  # an error quoting a hostile value must not be as large as the value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class ProtocolError(Exception):
    """A frame that cannot be decoded; `code` goes into the Error reply."""

    def __init__(self, code: str, message: str):
        if len(message) > MAX_ERROR_CHARS:
            message = message[: MAX_ERROR_CHARS - 3] + "..."
        super().__init__(message)
        self.code = code
        self.message = message


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise ProtocolError("bad_dtype", f"dtype {dtype} cannot travel; use one of {sorted(DTYPES)}")
    return DTYPE_NAMES[dtype]


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ProtocolError("bad_dtype", f"unknown dtype {_short(name)}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


# --- encoding ---


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's own memory as bytes, without a copy when it is already contiguous on the CPU."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def encode(message: Message) -> list[Any]:
    body, tensors, frames = {}, [], []
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if isinstance(value, torch.Tensor):
            tensors.append({"field": f.name, "dtype": dtype_name(value.dtype), "shape": list(value.shape)})
            frames.append(tensor_bytes(value))
        else:
            body[f.name] = _plain(value)
    header = {"v": PROTOCOL_VERSION, "kind": message.KIND, "body": body, "tensors": tensors}
    return [msgpack.packb(header, use_bin_type=True), *frames]


# --- decoding ---


def _frame_buffer(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", frame)  # zmq.Frame when received with copy=False
    return memoryview(buf)


def _check(value: Any, hint: Any, where: str) -> Any:
    """Validate a decoded msgpack value against a type hint; build nested dataclasses."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check(value, option, where)
            except ProtocolError as e:
                errors.append(e.message)
        raise ProtocolError("bad_field", f"{where}: {errors[0] if errors else 'must not be null'}")
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError("bad_field", f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProtocolError("bad_field", f"{where}: expected a number, got {type(value).__name__}")
        return float(value)
    if hint in (int, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ProtocolError("bad_field", f"{where}: expected {hint.__name__}, got {type(value).__name__}")
        return value
    raise ProtocolError("bad_field", f"{where}: unsupported field type {hint}")


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # resolving string annotations is slow; decode is on the hot path


def _build(cls: type, body: Any, where: str, tensors: dict[str, torch.Tensor] | None = None) -> Any:
    if not isinstance(body, dict):
        raise ProtocolError("bad_field", f"{where}: expected a map")
    hints = _type_hints(cls)
    tensors = tensors or {}
    kwargs: dict[str, Any] = {}
    known, tensor_fields = set(), set()
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if hint is torch.Tensor:
            tensor_fields.add(f.name)
            if f.name not in tensors:
                raise ProtocolError("missing_tensor", f"{where}.{f.name}: tensor frame missing")
            kwargs[f.name] = tensors[f.name]
            continue
        known.add(f.name)
        if f.name in body:
            kwargs[f.name] = _check(body[f.name], hint, f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ProtocolError("missing_field", f"{where}: required field {f.name!r} missing")
    unknown = set(body) - known
    if unknown:
        names = sorted(_short(k) for k in unknown)
        raise ProtocolError("bad_field", f"{where}: unknown fields {', '.join(names[:5])}")
    extra = set(tensors) - tensor_fields
    if extra:
        names = sorted(_short(k) for k in extra)
        raise ProtocolError("bad_header", f"{where}: tensor frames for fields that hold no tensor: {', '.join(names)}")
    return cls(**kwargs)


def _tensor(spec: Any, frame: Any, where: str) -> tuple[str, torch.Tensor]:
    if not isinstance(spec, dict) or set(spec) != {"field", "dtype", "shape"}:
        raise ProtocolError("bad_header", f"{where}: tensor spec must be {{field, dtype, shape}}")
    name, shape = spec["field"], spec["shape"]
    if not isinstance(name, str):
        raise ProtocolError("bad_header", f"{where}: tensor field name must be a string")
    dtype = parse_dtype(spec["dtype"]) if isinstance(spec["dtype"], str) else None
    if dtype is None:
        raise ProtocolError("bad_dtype", f"{where}: dtype must be a string")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_TENSOR_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)
    ):
        raise ProtocolError("bad_shape", f"{where}: shape {_short(shape)} is not a list of up to 4 sizes")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if expected > MAX_TENSOR_BYTES:
        raise ProtocolError("too_large", f"{where}: {expected} bytes exceeds the {MAX_TENSOR_BYTES}-byte limit")
    buf = _frame_buffer(frame)
    if buf.nbytes != expected:
        raise ProtocolError(
            "truncated", f"{where}: frame has {buf.nbytes} bytes, header declares {expected} ({spec['dtype']} {shape})"
        )
    if expected == 0:
        return name, torch.empty(shape, dtype=dtype)
    return name, torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape)


def decode(frames: list[Any]) -> Message:
    """Frames in, a validated message out; anything else raises ProtocolError with a code for the reply."""
    if not frames:
        raise ProtocolError("empty", "empty message")
    head = _frame_buffer(frames[0])
    if head.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError("too_large", f"header of {head.nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises many types for garbage
        raise ProtocolError("bad_header", f"header is not valid msgpack: {type(e).__name__}") from None
    if not isinstance(header, dict) or not {"v", "kind", "body"} <= set(header) <= HEADER_KEYS:
        raise ProtocolError("bad_header", "header must be a map with v, kind, body, tensors")
    if header["v"] != PROTOCOL_VERSION:
        raise ProtocolError(
            "version_mismatch",
            f"peer speaks protocol version {_short(header['v'])}, this side speaks {PROTOCOL_VERSION}; "
            "run the same fiddler-moe version on every host",
        )
    kind = header["kind"]
    cls = ALL_MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError("unknown_kind", f"unknown message kind {_short(kind)}")
    specs = header.get("tensors", [])
    if not isinstance(specs, list) or len(specs) != len(frames) - 1:
        raise ProtocolError(
            "truncated", f"{kind}: header declares {len(specs) if isinstance(specs, list) else '?'} tensors, "
            f"got {len(frames) - 1} frames"
        )
    tensors: dict[str, torch.Tensor] = {}
    for spec, frame in zip(specs, frames[1:]):
        name, tensor = _tensor(spec, frame, kind)
        if name in tensors:
            raise ProtocolError("bad_header", f"{kind}: two tensor frames for field {_short(name)}")
        tensors[name] = tensor
    return _build(cls, header["body"], kind, tensors)
