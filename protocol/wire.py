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
import reprlib
import types
import typing
import warnings
from collections.abc import Callable
from typing import Any, Union

import msgpack
import torch

from fiddler_moe.protocol.messages import ALL_MESSAGES, PROTOCOL_VERSION, ExpertReply, ExpertRequest, Message

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
# Nesting of maps and lists in a header. Our deepest message (LoadShard: header, body, experts, an ExpertSource, its
# tensor list, a TensorRef) nests 6 deep; a hostile header nested thousands deep would otherwise reach recursion
# limits in whatever walks it.
MAX_HEADER_DEPTH = 16

# Quoting an untrusted value in an error: bounded in depth, items and length, never recursing without a bound.
_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxlist, _QUOTE.maxdict, _QUOTE.maxtuple = 2, 4, 4, 4
_QUOTE.maxstring = _QUOTE.maxother = _QUOTE.maxlong = 40


def _short(value: Any) -> str:
    text = _QUOTE.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _nesting_within(value: Any, limit: int) -> bool:
    """Whether maps and lists in `value` nest at most `limit` deep; walked without recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = [*item.keys(), *item.values()]
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return False
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list | tuple))
    return True


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


_SCALARS = (int, float, str, bool, bytes, type(None))


def _plain(value: Any) -> Any:
    if type(value) in _SCALARS:
        return value
    if isinstance(value, list | tuple):
        # lists of numbers (expert ids, row counts, token ids) are the common case on the hot path: no call per item
        if all(type(v) in _SCALARS for v in value):
            return list(value)
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
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


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _layer_call_header(message: ExpertRequest | ExpertReply) -> bytes:
    """The header `_header` writes for the messages of every layer call, without walking the dataclass fields (it
    costs half as much right after a worker's turn has flushed the caches)."""
    if type(message) is ExpertRequest:
        body = {"request_id": message.request_id, "layer": message.layer, "expert_ids": list(message.expert_ids),
                "row_counts": list(message.row_counts)}
        field, tensor = "rows", message.rows
    else:
        body = {"request_id": message.request_id, "layer": message.layer,
                "compute_seconds": float(message.compute_seconds)}
        field, tensor = "outputs", message.outputs
    spec = {"field": field, "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape)}
    return msgpack.packb({"v": PROTOCOL_VERSION, "kind": message.KIND, "body": body, "tensors": [spec]})


def _header(message: Message) -> tuple[bytes, list[torch.Tensor]]:
    body, specs, tensors = {}, [], []
    for name in _field_names(type(message)):
        value = getattr(message, name)
        if isinstance(value, torch.Tensor):
            specs.append({"field": name, "dtype": dtype_name(value.dtype), "shape": list(value.shape)})
            tensors.append(value)
        else:
            body[name] = _plain(value)
    header = {"v": PROTOCOL_VERSION, "kind": message.KIND, "body": body, "tensors": specs}
    return msgpack.packb(header, use_bin_type=True), tensors


def encode(message: Message) -> list[Any]:
    header, tensors = _header(message)
    return [header, *(tensor_bytes(t) for t in tensors)]


def encode_header(message: Message) -> bytes:
    """Only the header frame: for the shared-memory transport, whose tensors are already in the slot."""
    if type(message) in (ExpertRequest, ExpertReply):
        return _layer_call_header(message)
    return _header(message)[0]


# --- decoding ---


def _frame_buffer(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", frame)  # zmq.Frame when received with copy=False
    return memoryview(buf)


Validator = Callable[[Any, str], Any]


def _check(value: Any, hint: Any, where: str) -> Any:
    """Validate a decoded msgpack value against a type hint; build nested dataclasses."""
    return _validator(hint)(value, where)


def _bad(where: str, expected: str, value: Any) -> ProtocolError:
    return ProtocolError("bad_field", f"{where}: expected {expected}, got {type(value).__name__}")


@functools.cache
def _validator(hint: Any) -> Validator:
    """A checker for one type hint, built once: decode runs per expert request, so no typing introspection there."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [option for option in typing.get_args(hint) if option is not type(None)]
        nullable = len(options) < len(typing.get_args(hint))
        checks = [_validator(option) for option in options]

        def check_union(value, where):
            if value is None:
                if nullable:
                    return None
                raise ProtocolError("bad_field", f"{where}: must not be null")
            errors = []
            for check in checks:
                try:
                    return check(value, where)
                except ProtocolError as e:
                    errors.append(e.message)
            raise ProtocolError("bad_field", f"{where}: {errors[0] if errors else 'must not be null'}")

        return check_union
    if origin is list:
        (item,) = typing.get_args(hint)
        if item is int:  # the common case (expert ids, row counts, token ids): one pass, no per-item calls

            def check_int_list(value, where):
                if not isinstance(value, list):
                    raise _bad(where, "a list", value)
                for i, v in enumerate(value):
                    if type(v) is not int:
                        raise _bad(f"{where}[{i}]", "int", v)
                return value

            return check_int_list
        check_item = _validator(item)

        def check_list(value, where):
            if not isinstance(value, list):
                raise _bad(where, "a list", value)
            return [check_item(v, f"{where}[{i}]") for i, v in enumerate(value)]

        return check_list
    if dataclasses.is_dataclass(hint):
        return lambda value, where: _build(hint, value, where)
    if hint is float:

        def check_float(value, where):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _bad(where, "a number", value)
            return float(value)

        return check_float
    if hint in (int, str, bool):

        def check_plain(value, where):
            if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
                raise _bad(where, hint.__name__, value)
            return value

        return check_plain

    def unsupported(value, where):
        raise ProtocolError("bad_field", f"{where}: unsupported field type {hint}")

    return unsupported


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # resolving string annotations is slow; decode is on the hot path


@functools.cache
def _fields(cls: type) -> tuple[list[tuple[str, Validator | None, bool]], frozenset, frozenset]:
    """Per message class: (name, validator or None for a tensor, required) for each field, and the sets of
    plain and tensor field names."""
    hints = _type_hints(cls)
    specs, plain, tensor = [], set(), set()
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if hints[f.name] is torch.Tensor:
            specs.append((f.name, None, True))
            tensor.add(f.name)
        else:
            specs.append((f.name, _validator(hints[f.name]), required))
            plain.add(f.name)
    return specs, frozenset(plain), frozenset(tensor)


def _build(cls: type, body: Any, where: str, tensors: dict[str, torch.Tensor] | None = None) -> Any:
    if not isinstance(body, dict):
        raise ProtocolError("bad_field", f"{where}: expected a map")
    specs, known, tensor_fields = _fields(cls)
    tensors = tensors or {}
    kwargs: dict[str, Any] = {}
    for name, check, required in specs:
        if check is None:
            if name not in tensors:
                raise ProtocolError("missing_tensor", f"{where}.{name}: tensor frame missing")
            kwargs[name] = tensors[name]
        elif name in body:
            kwargs[name] = check(body[name], f"{where}.{name}")
        elif required:
            raise ProtocolError("missing_field", f"{where}: required field {name!r} missing")
    unknown = set(body) - known
    if unknown:
        names = sorted(_short(k) for k in unknown)
        raise ProtocolError("bad_field", f"{where}: unknown fields {', '.join(names[:5])}")
    extra = set(tensors) - tensor_fields
    if extra:
        names = sorted(_short(k) for k in extra)
        raise ProtocolError("bad_header", f"{where}: tensor frames for fields that hold no tensor: {', '.join(names)}")
    return cls(**kwargs)


_SPEC_KEYS = frozenset({"field", "dtype", "shape"})


View = Callable[[torch.dtype, tuple[int, ...]], torch.Tensor]  # a tensor over a frame's bytes, made by the caller


def _tensor(spec: Any, frame: Any, where: str, view: View | None = None) -> tuple[str, torch.Tensor]:
    if not isinstance(spec, dict) or spec.keys() != _SPEC_KEYS:
        raise ProtocolError("bad_header", f"{where}: tensor spec must be {{field, dtype, shape}}")
    name, shape = spec["field"], spec["shape"]
    if not isinstance(name, str):
        raise ProtocolError("bad_header", f"{where}: tensor field name must be a string")
    dtype = parse_dtype(spec["dtype"]) if isinstance(spec["dtype"], str) else None
    if dtype is None:
        raise ProtocolError("bad_dtype", f"{where}: dtype must be a string")
    if not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS or not _sizes(shape):
        raise ProtocolError("bad_shape", f"{where}: shape {_short(shape)} is not a list of up to 4 sizes")
    expected = math.prod(shape) * dtype.itemsize
    if expected > MAX_TENSOR_BYTES:
        raise ProtocolError("too_large", f"{where}: {expected} bytes exceeds the {MAX_TENSOR_BYTES}-byte limit")
    buf = _frame_buffer(frame)
    if buf.nbytes != expected:
        raise ProtocolError(
            "truncated", f"{where}: frame has {buf.nbytes} bytes, header declares {expected} ({spec['dtype']} {shape})"
        )
    if expected == 0:
        return name, torch.empty(shape, dtype=dtype)
    if view is not None:
        return name, view(dtype, tuple(shape))
    return name, torch.frombuffer(buf, dtype=dtype).view(shape)


def _sizes(shape: list) -> bool:
    for d in shape:
        if type(d) is not int or not 0 <= d < 2**40:  # type(), not isinstance: True is not a size
            return False
    return True


# The two messages of every layer call, decoded field by field with the same checks as `_build` makes, in a fraction
# of the generic path's time right after a worker's turn has flushed the caches (docs/performance-log.md).
_LAYER_CALL_KINDS = {  # kind: (class, its body's keys, its tensor's field)
    ExpertRequest.KIND: (ExpertRequest, frozenset({"request_id", "layer", "expert_ids", "row_counts"}), "rows"),
    ExpertReply.KIND: (ExpertReply, frozenset({"request_id", "layer", "compute_seconds"}), "outputs"),
}


def _int_list(value: Any) -> bool:
    if type(value) is not list:
        return False
    for v in value:
        if type(v) is not int:
            return False
    return True


def _decode_layer_call(header: dict, frames: list[Any], view: View | None) -> Message | None:
    """An ExpertRequest or ExpertReply in exactly the form `encode` writes, else None (the generic path then
    decodes the message or says what is wrong with it)."""
    entry = _LAYER_CALL_KINDS[header["kind"]]
    body, specs = header.get("body"), header.get("tensors")
    if (header.get("v") != PROTOCOL_VERSION or len(header) != 4 or type(body) is not dict
            or body.keys() != entry[1] or type(specs) is not list or len(specs) != 1 or len(frames) != 2):
        return None
    cls, _, field = entry
    request_id, layer = body["request_id"], body["layer"]
    if type(request_id) is not int or type(layer) is not int or not isinstance(specs[0], dict):
        return None
    if specs[0].get("field") != field:
        return None
    if cls is ExpertRequest:
        expert_ids, row_counts = body["expert_ids"], body["row_counts"]
        if not (_int_list(expert_ids) and _int_list(row_counts)):
            return None
        return ExpertRequest(request_id, layer, expert_ids, row_counts, _tensor(specs[0], frames[1], cls.KIND, view)[1])
    seconds = body["compute_seconds"]
    if type(seconds) is not float:
        return None
    return ExpertReply(request_id, layer, _tensor(specs[0], frames[1], cls.KIND, view)[1], seconds)


def decode(frames: list[Any], view: View | None = None) -> Message:
    """Frames in, a validated message out; anything else raises ProtocolError with a code for the reply. `view`,
    where given, makes the tensor of a one-tensor message over the last frame (the shared-memory transport keeps
    one per shape: making a tensor costs more than the rest of decoding right after a worker's turn)."""
    if not frames:
        raise ProtocolError("empty", "empty message")
    head = _frame_buffer(frames[0])
    if head.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError("too_large", f"header of {head.nbytes} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises many types for garbage
        raise ProtocolError("bad_header", f"header is not valid msgpack: {type(e).__name__}") from None
    if isinstance(header, dict) and type(header.get("kind")) is str and header["kind"] in _LAYER_CALL_KINDS:
        message = _decode_layer_call(header, frames, view)  # checks the type of every value before using it
        if message is not None:
            return message
    if not _nesting_within(header, MAX_HEADER_DEPTH):
        raise ProtocolError("bad_header", f"header nests maps and lists more than {MAX_HEADER_DEPTH} deep")
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
        name, tensor = _tensor(spec, frame, kind, view if len(specs) == 1 else None)
        if name in tensors:
            raise ProtocolError("bad_header", f"{kind}: two tensor frames for field {_short(name)}")
        tensors[name] = tensor
    return _build(cls, header["body"], kind, tensors)
