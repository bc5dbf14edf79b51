"""A worker's shard: the (layer, expert) pairs it owns, read from the checkpoint and nothing more.

`load_shard` reads it into the worker's private memory. `load_shard_shared` (asked for with LoadShard.shared, when
the coordinator has a GPU to copy cold experts to) puts it in one /dev/shm file instead, every tensor at a known
offset, so the coordinator can map the very same pages read-only: the weights exist once in memory.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fiddler_moe.experts import fp8, mxfp4
from fiddler_moe.experts.checkpoint import CheckpointError, TensorInfo, TensorReader, tensor_table
from fiddler_moe.experts.compute import ExpertWeights
from fiddler_moe.protocol.messages import ExpertSource, SharedTensor, TensorRef
from fiddler_moe.protocol.wire import parse_dtype


def _gather(reader: TensorReader, refs: list[TensorRef], dtype: torch.dtype,
            scales: list[TensorRef] | None = None) -> torch.Tensor | None:
    if not refs:
        return None
    if scales:
        if len(scales) != len(refs):
            raise CheckpointError(f"weight {refs[0].key} comes in {len(refs)} parts but {len(scales)} scale tensors; "
                                  "the checkpoint is incomplete")
        first = reader.read(refs[0].file, refs[0].key, refs[0].index)
        if first.dtype == torch.uint8:  # MXFP4 blocks and scales, dequantized as transformers does (experts.mxfp4)
            if len(refs) != 1:
                raise CheckpointError(f"MXFP4 weight {refs[0].key} comes in {len(refs)} parts; fiddler-moe reads it "
                                      "as one blocks and one scales tensor, as gpt-oss ships it")
            scale = reader.read(scales[0].file, scales[0].key, scales[0].index)
            try:
                return mxfp4.dequantize(first, scale, dtype)
            except ValueError as e:
                raise CheckpointError(f"{refs[0].key}: {e}") from None
        # FP8 with block scales (experts.fp8): each part dequantized to `dtype` as transformers does, then joined
        parts = []
        for i, (ref, scale_ref) in enumerate(zip(refs, scales)):
            weight = first if i == 0 else reader.read(ref.file, ref.key, ref.index)
            try:
                parts.append(fp8.dequantize(weight, reader.read(scale_ref.file, scale_ref.key, scale_ref.index),
                                            dtype))
            except ValueError as e:
                raise CheckpointError(f"{ref.key}: {e}; the checkpoint is damaged") from None
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)).contiguous()
    parts = [reader.read(r.file, r.key, r.index) for r in refs]
    # Per-expert layouts (Mixtral's w1/w3, Qwen's gate_proj/up_proj) concatenate along the output dim, as
    # transformers' own conversion does when it fuses them into gate_up_proj.
    tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    tensor = tensor.to(dtype).contiguous()
    # safetensors' tensors view its private mapping of the whole file: a shard that kept one would keep that
    # mapping, and every page of it ever read, resident beside the shard (the float shard's RSS was twice its size).
    if any(tensor.untyped_storage().data_ptr() == part.untyped_storage().data_ptr() for part in parts):
        tensor = tensor.clone()
    return tensor


def load_expert(reader: TensorReader, source: ExpertSource, dtype: torch.dtype) -> ExpertWeights:
    return ExpertWeights(
        gate_up=_gather(reader, source.gate_up, dtype, source.gate_up_scales),
        down=_gather(reader, source.down, dtype, source.down_scales),
        gate_up_bias=_gather(reader, source.gate_up_bias, dtype),
        down_bias=_gather(reader, source.down_bias, dtype),
    )


def load_shard(
    folder: Path,
    sources: list[ExpertSource],
    dtype_name: str,
    progress: Callable[[int], None] | None = None,
) -> dict[tuple[int, int], ExpertWeights]:
    dtype = parse_dtype(dtype_name)
    reader = TensorReader(folder)
    shard = {}
    try:
        for source in sources:
            shard[(source.layer, source.expert)] = load_expert(reader, source, dtype)
            if progress:
                progress(1)
    finally:
        reader.close()
    return shard


# --- a shard in shared memory (LoadShard.shared) ---

SHARED_DIR = "/dev/shm"
SHARED_ALIGN = 4096  # each tensor starts on a page: DMA-friendly, and no two tensors share a cache line
WEIGHT_NAMES = ("gate_up", "down", "gate_up_bias", "down_bias")  # ExpertWeights' fields, in order


class SharedMemoryUnavailable(Exception):
    """The shard cannot be placed in shared memory (no /dev/shm, or not enough room); the message says which."""


@dataclass
class SharedShard:
    """A worker's shard laid out in one file under /dev/shm, mapped read-write by the worker. The coordinator
    maps the same file read-only (coordinator/staging.py) and unlinks its name: the memory exists once, and
    nothing is left in /dev/shm when the processes end."""

    path: str
    size: int
    mm: mmap.mmap
    tensors: list[SharedTensor]

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close(self) -> None:
        self.unlink()
        with contextlib.suppress(BufferError):  # tensors still view it: released with them or the process
            self.mm.close()


def _shape(table: dict[str, TensorInfo], refs: list[TensorRef], scales: list[TensorRef] | None = None
           ) -> tuple[int, ...] | None:
    """The shape `_gather` produces for these refs, from the checkpoint's headers alone."""
    if not refs:
        return None
    if scales and table[refs[0].key].dtype == "U8":  # MXFP4; FP8 weights have their own shape
        blocks = _shape(table, refs)
        if blocks is None or len(blocks) != 3:
            raise CheckpointError(f"MXFP4 blocks {refs[0].key} have shape {blocks}; the checkpoint is damaged")
        return mxfp4.dequantized_shape(blocks)
    shapes = []
    for ref in refs:
        info = table.get(ref.key)
        if info is None:
            raise CheckpointError(f"tensor {ref.key} is not in the checkpoint; the coordinator and this worker see "
                                  "different checkpoints")
        shapes.append(info.shape[1:] if ref.index is not None else info.shape)
    if len(shapes) == 1:
        return tuple(shapes[0])
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def shared_layout(folder: Path, sources: list[ExpertSource], dtype: torch.dtype) -> tuple[list[SharedTensor], int]:
    """Where every tensor of the shard goes in the shared file, and the file's size."""
    table = tensor_table(folder)
    itemsize = torch.empty((), dtype=dtype).element_size()
    tensors, offset = [], 0
    for source in sources:
        for name in WEIGHT_NAMES:
            shape = _shape(table, getattr(source, name), getattr(source, f"{name}_scales", None))
            if shape is None:
                continue
            tensors.append(SharedTensor(source.layer, source.expert, name, offset, list(shape)))
            offset += -(-math.prod(shape) * itemsize // SHARED_ALIGN) * SHARED_ALIGN
    return tensors, max(offset, SHARED_ALIGN)


def create_shared_file(size: int, prefix: str) -> tuple[str, mmap.mmap]:
    if not os.path.isdir(SHARED_DIR):
        raise SharedMemoryUnavailable(f"{SHARED_DIR} does not exist on this machine")
    try:
        stat = os.statvfs(SHARED_DIR)
    except OSError as e:
        raise SharedMemoryUnavailable(f"cannot inspect {SHARED_DIR}: {e.strerror}") from None
    free = stat.f_bavail * stat.f_frsize
    if free < size:
        raise SharedMemoryUnavailable(
            f"the shard needs {size / 2**20:.1f} MiB of shared memory but {SHARED_DIR} has {free / 2**20:.1f} MiB "
            "free (in a container, raise --shm-size)"
        )
    path = os.path.join(SHARED_DIR, f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise SharedMemoryUnavailable(f"cannot create {path}: {e.strerror}") from None
    try:
        os.ftruncate(fd, size)
        # Take the pages now: a /dev/shm that fills up meanwhile fails here with ENOSPC instead of a SIGBUS later.
        os.posix_fallocate(fd, 0, size)
        return path, mmap.mmap(fd, size)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise SharedMemoryUnavailable(f"cannot reserve {size / 2**20:.1f} MiB in {SHARED_DIR}: {e.strerror}") from None
    finally:
        os.close(fd)


def load_shard_shared(
    folder: Path,
    sources: list[ExpertSource],
    dtype_name: str,
    prefix: str = "fiddler-shard",
) -> tuple[dict[tuple[int, int], ExpertWeights], SharedShard]:
    """load_shard, but every tensor lives in one shared-memory file (the returned weights are views of it)."""
    dtype = parse_dtype(dtype_name)
    tensors, size = shared_layout(folder, sources, dtype)
    path, mm = create_shared_file(size, prefix)
    shared = SharedShard(path, size, mm, tensors)
    views = shared_views(mm, tensors, dtype)
    reader = TensorReader(folder)
    try:
        for source in sources:
            key = (source.layer, source.expert)
            loaded = load_expert(reader, source, dtype)  # one expert at a time in private memory, then copied over
            for name in WEIGHT_NAMES:
                got, into = getattr(loaded, name), getattr(views[key], name)
                if got is None:
                    continue
                if into is None or tuple(got.shape) != tuple(into.shape):
                    raise CheckpointError(f"layer {source.layer} expert {source.expert} {name} has shape "
                                          f"{list(got.shape)}, its checkpoint header says otherwise")
                into.copy_(got)
    except BaseException:
        views.clear()
        shared.close()
        raise
    finally:
        reader.close()
    return views, shared


def shared_views(buffer, tensors: list[SharedTensor], dtype: torch.dtype) -> dict[tuple[int, int], ExpertWeights]:
    """ExpertWeights viewing a shared shard's buffer (the worker's read-write mapping or the coordinator's
    read-only one), as laid out by shared_layout; marked shared, so the kernel never re-lays them out into a copy."""
    parts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for t in tensors:
        count = math.prod(t.shape)
        view = torch.frombuffer(buffer, dtype=dtype, count=count, offset=t.offset).view(t.shape)
        parts.setdefault((t.layer, t.expert), {})[t.name] = view
    return {key: ExpertWeights(p["gate_up"], p["down"], p.get("gate_up_bias"), p.get("down_bias"), shared=True)
            for key, p in parts.items()}
