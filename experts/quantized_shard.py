"""A worker's shard in a quantized format (--quantize int8 or int4), quantized once and kept in the cache.

The first launch quantizes the shard straight from the checkpoint's safetensors, one expert at a time (the float
weights of one expert are all that is ever held), appending each expert's planes to a file under

    cache_dir()/quantized/<checkpoint fingerprint>/<format>/<shard hash>.bin   (+ .json: where each tensor sits)

and every later launch with the same checkpoint, shard and format reads that file instead: nothing is read from
the checkpoint or computed, only bytes copied. The shard is read into the worker's own memory rather than mapped
from the page cache: memory the worker allocates sits on its NUMA node (it is bound there), and under memory
pressure the kernel would drop clean file pages of a mapping first and read them back from disk in the middle of
a decoding step, where a private copy stays put like the float shard does. When something may move to a GPU
(LoadShard.shared), the same bytes are read into one /dev/shm file instead, which the coordinator maps to copy
experts from in their format (coordinator/staging.py), as a float shard is shared. The shard hash covers the
experts and where their tensors live, the compute dtype (of the biases), the layout version and each safetensors
file's size and modification time: the fingerprint alone names a config and a tensor table, so a checkpoint
written again with other values would otherwise find the old entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from fiddler_moe.experts import quant
from fiddler_moe.experts.checkpoint import CheckpointError, TensorReader
from fiddler_moe.experts.shard import SHARED_ALIGN, SharedShard, _gather, create_shared_file
from fiddler_moe.host.paths import cache_dir
from fiddler_moe.protocol.messages import ExpertSource, SharedTensor
from fiddler_moe.protocol.wire import parse_dtype

log = logging.getLogger("fiddler.worker")

LAYOUT_VERSION = 1  # bump when the bytes written for a shard change, so that old entries are not read
ALIGN = 64  # each tensor starts on a cache line
DTYPES = {"int8": torch.int8, "uint8": torch.uint8, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float32": torch.float32}
Expert = tuple[int, int]  # (layer, expert)
PROGRESS_SECONDS = 5.0  # a log line at most this often while quantizing


def _file_stamps(folder: Path, sources: list[ExpertSource]) -> dict[str, list[int]]:
    names = sorted({ref.file for s in sources for refs in (s.gate_up, s.down, s.gate_up_bias, s.down_bias)
                    for ref in refs})
    stamps = {}
    for name in names:
        try:
            st = (folder / name).stat()
        except OSError as e:
            raise CheckpointError(f"cannot read {folder / name}: {e.strerror}; copy the checkpoint again") from None
        stamps[name] = [st.st_size, st.st_mtime_ns]
    return stamps


def shard_key(folder: Path, sources: list[ExpertSource], name: str, dtype_name: str, transposed: bool) -> str:
    """The shard hash: what the quantized bytes depend on (see the module's docstring)."""
    material = {"layout": LAYOUT_VERSION, "format": name, "dtype": dtype_name, "transposed": transposed,
                "experts": [asdict(s) for s in sources], "files": _file_stamps(folder, sources)}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]


def cache_path(fingerprint: str, name: str, key: str) -> Path:
    return cache_dir() / "quantized" / fingerprint / name / key


def quantize_expert(reader: TensorReader, source: ExpertSource, name: str, dtype: torch.dtype,
                    transposed: bool) -> quant.QuantizedExpertWeights:
    """One expert read from the checkpoint and quantized from its stored values (as float32); biases in `dtype`.
    Weights stored quantized (MXFP4, FP8) are quantized from their dequantization in `dtype`, the weights
    transformers' model of the checkpoint holds. Checkpoints stored [in, out] (transposed) are turned to [out, in]
    first."""

    def matrix(refs, scales) -> quant.QuantMatrix:
        weight = _gather(reader, refs, dtype if scales else torch.float32, scales)
        return quant.quantize(weight.t() if transposed else weight, name)

    return quant.QuantizedExpertWeights(matrix(source.gate_up, source.gate_up_scales),
                                        matrix(source.down, source.down_scales),
                                        _gather(reader, source.gate_up_bias, dtype),
                                        _gather(reader, source.down_bias, dtype))


def _write(path: Path, folder: Path, sources: list[ExpertSource], name: str, dtype: torch.dtype, transposed: bool,
           worker: str) -> None:
    """Quantize the shard into path.bin and describe it in path.json (written last: its presence means whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    reader = TensorReader(folder)
    table, offset = [], 0
    started = last = time.monotonic()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".quantizing-")
    try:
        with os.fdopen(fd, "wb") as out:
            for done, source in enumerate(sources, 1):
                weights = quantize_expert(reader, source, name, dtype, transposed)
                for tensor_name, tensor in weights.planes().items():
                    data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
                    out.write(data + b"\0" * (-len(data) % ALIGN))
                    table.append({"layer": source.layer, "expert": source.expert, "name": tensor_name,
                                  "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape),
                                  "offset": offset})
                    offset += len(data) + (-len(data) % ALIGN)
                if time.monotonic() - last >= PROGRESS_SECONDS and done < len(sources):
                    last = time.monotonic()
                    log.info("%s: quantizing to %s: %d of %d experts (%.0fs)", worker, name, done, len(sources),
                             last - started)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path.with_suffix(".bin"))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        reader.close()
    meta = {"layout": LAYOUT_VERSION, "format": name, "size": offset, "tensors": table}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".quantizing-", suffix=".json")
    with os.fdopen(fd, "w") as out:
        json.dump(meta, out)
    os.replace(tmp, path.with_suffix(".json"))


def _private(size: int) -> torch.Tensor:
    return torch.empty(size, dtype=torch.uint8)


def _read(path: Path, name: str, allocate: Callable[[int], torch.Tensor] = _private
          ) -> tuple[dict[tuple[int, int], quant.QuantizedExpertWeights], list[SharedTensor]] | None:
    """The cached shard at `path`, read into a buffer `allocate(size)` gives (this process's memory, or a shared
    file), and where each tensor sits in it; None when there is none (or it is incomplete)."""
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
        size = meta["size"]
        if meta["layout"] != LAYOUT_VERSION or meta["format"] != name:
            return None
        with open(path.with_suffix(".bin"), "rb", buffering=0) as f:
            if os.fstat(f.fileno()).st_size != size:
                return None
            buffer = allocate(size)
            view, done = memoryview(buffer.numpy()), 0
            while done < size:
                got = f.readinto(view[done:])
                if not got:
                    return None
                done += got
    except (OSError, ValueError, KeyError, TypeError):
        return None
    where = []
    try:
        for t in meta["tensors"]:
            count = math.prod(t["shape"])
            if t["offset"] % ALIGN or t["offset"] + count * DTYPES[t["dtype"]].itemsize > size:
                return None
            where.append(SharedTensor(t["layer"], t["expert"], t["name"], t["offset"], list(t["shape"]), t["dtype"]))
        shard = _views(buffer, where, name)
        for w in shard.values():
            w.gate_up.check()
            w.down.check()
    except (KeyError, TypeError, ValueError, RuntimeError):
        return None
    return shard, where


def _views(buffer: torch.Tensor, tensors: list[SharedTensor], name: str) -> dict[Expert, quant.QuantizedExpertWeights]:
    """QuantizedExpertWeights viewing the uint8 `buffer` where `tensors` say each plane sits."""
    parts: dict[Expert, dict[str, torch.Tensor]] = {}
    for t in tensors:
        dtype = DTYPES[t.dtype]
        part = buffer[t.offset : t.offset + math.prod(t.shape) * dtype.itemsize]
        parts.setdefault((t.layer, t.expert), {})[t.name] = part.view(dtype).view(t.shape)
    return {key: quant.QuantizedExpertWeights.from_planes(name, p) for key, p in parts.items()}


def shared_quantized_views(buffer, tensors: list[SharedTensor], name: str
                           ) -> dict[Expert, quant.QuantizedExpertWeights]:
    """QuantizedExpertWeights viewing a shared quantized shard's buffer (the coordinator's read-only mapping of
    the worker's file), as `_read` laid it out."""
    return _views(torch.frombuffer(buffer, dtype=torch.uint8), tensors, name)


def load_quantized_shard(folder: Path, fingerprint: str, sources: list[ExpertSource], name: str, dtype_name: str,
                         transposed: bool = False, worker: str = "worker", shared: bool = False
                         ) -> tuple[dict[Expert, quant.QuantizedExpertWeights], bool, Path, SharedShard | None]:
    """The shard in format `name`: (weights by (layer, expert), whether it came from the cache, the cache entry's
    path without suffix, and with `shared` the /dev/shm file holding it, as experts/shard.py's load_shard_shared
    keeps a float shard, for the coordinator to map and move experts from; SharedMemoryUnavailable when there is
    no room). Quantizes and stores it first when the cache has no entry for it."""
    dtype = parse_dtype(dtype_name)
    key = shard_key(folder, sources, name, dtype_name, transposed)
    path = cache_path(fingerprint, name, key)
    wanted = {(s.layer, s.expert) for s in sources}
    held: list[SharedShard] = []

    def allocate(size: int) -> torch.Tensor:
        if not shared:
            return _private(size)
        file, mm = create_shared_file(-(-size // SHARED_ALIGN) * SHARED_ALIGN, "fiddler-shard")
        held.append(SharedShard(file, len(mm), mm, []))
        return torch.frombuffer(mm, dtype=torch.uint8, count=size)

    def read() -> tuple[dict[tuple[int, int], quant.QuantizedExpertWeights], list[SharedTensor]] | None:
        found = _read(path, name, allocate)
        if found is None or set(found[0]) != wanted:
            found = None
            while held:
                held.pop().close()
        return found

    found = read()
    from_cache = found is not None
    if found is None:
        log.info("%s: quantizing %d experts to %s (once; kept in %s)", worker, len(sources), name, path.parent)
        started = time.monotonic()
        try:
            _write(path, folder, sources, name, dtype, transposed, worker)
        except OSError as e:
            raise CheckpointError(f"cannot write the quantized shard under {path.parent}: {e.strerror or e}; free "
                                  "disk space there or set FIDDLER_CACHE to a writable folder with room") from None
        found = read()
        if found is None:
            raise CheckpointError(f"the quantized shard just written to {path}.bin cannot be read back; check the "
                                  f"disk under {cache_dir()} or set FIDDLER_CACHE to another folder")
        log.info("%s: quantized %d experts to %s in %.1fs", worker, len(sources), name, time.monotonic() - started)
    shard, where = found
    if held:
        held[0].tensors = where
    return shard, from_cache, path, held[0] if held else None
