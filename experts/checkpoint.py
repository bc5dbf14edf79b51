"""A Hugging Face checkpoint folder on disk: which tensors are in which safetensors file, and reading them.

Both the coordinator (non-expert and hot-expert weights) and the workers (their shard) read through here, one
tensor at a time, so no process ever maps more than it computes with. The fingerprint identifies a checkpoint by
its config and tensor table (names, dtypes, shapes, offsets) without hashing gigabytes of weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointError(Exception):
    """A checkpoint folder that cannot be used; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class TensorInfo:
    file: str  # relative to the checkpoint folder
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                           "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


def _safe_name(folder: Path, name: str) -> Path:
    """A file named by an index or a LoadShard, kept inside the checkpoint folder (symlinks inside it, as in the
    Hugging Face cache, are fine; absolute paths and '..' are not)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts or "\0" in name:
        raise CheckpointError(f"{name!r} is not a file name inside {folder}; the index or request is corrupt")
    return folder / name


def _corrupt(path: Path) -> CheckpointError:
    return CheckpointError(f"{path} has a corrupt header; download or copy it again")


def read_header(path: Path) -> dict:
    """The JSON header of one safetensors file, checked against the file's real size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path} is truncated ({size} bytes); download or copy it again")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise CheckpointError(
                    f"{path} is truncated or corrupt: its header claims {n} bytes of a {size}-byte file; "
                    "download or copy it again"
                )
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; download the full checkpoint again") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _corrupt(path) from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}; check that it is a readable file") from None
    if not isinstance(header, dict):
        raise _corrupt(path)
    end = 0
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, stop = meta["data_offsets"]
            count = math.prod(meta["shape"])
            itemsize = SAFETENSORS_DTYPE_BYTES.get(meta["dtype"])  # sub-byte and rare dtypes: not checked
            ok = (isinstance(meta["dtype"], str) and all(isinstance(d, int) and d >= 0 for d in meta["shape"])
                  and isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop
                  and (itemsize is None or stop - begin == count * itemsize))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: the entry for tensor {key} is corrupt; download or copy it again")
        end = max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path} is truncated: its header describes {8 + n + end} bytes but the file has {size}; "
            "download or copy it again"
        )
    return header


def _weight_files(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index} is not a valid safetensors index; download it again") from None
        missing = [f for f in files if not _safe_name(folder, f).exists()]
        if missing:
            raise CheckpointError(
                f"{index} names {len(missing)} missing file(s), e.g. {missing[0]}; download the full checkpoint"
            )
        return files
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"no *.safetensors files in {folder}; fiddler-moe reads safetensors checkpoints "
            "(convert .bin weights with transformers' save_pretrained(safe_serialization=True))"
        )
    return files


def tensor_table(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor name in the checkpoint with its file, dtype and shape, from the headers alone."""
    table: dict[str, TensorInfo] = {}
    for name in _weight_files(folder):
        for key, meta in read_header(folder / name).items():
            if key == "__metadata__":
                continue
            shape = tuple(meta["shape"])
            nbytes = SAFETENSORS_DTYPE_BYTES.get(meta["dtype"], 4)
            for d in shape:
                nbytes *= d
            table[key] = TensorInfo(file=name, dtype=meta["dtype"], shape=shape, nbytes=nbytes)
    return table


def fingerprint(folder: Path) -> str:
    """Same config and same tensor table => same fingerprint, on any host holding a copy of the checkpoint."""
    h = hashlib.sha256()
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {folder / 'config.json'} ({e}); copy the checkpoint again") from None
    h.update(json.dumps(config, sort_keys=True).encode())
    for key, info in sorted(tensor_table(folder).items()):
        h.update(f"{key}:{info.dtype}:{info.shape}\n".encode())
    return h.hexdigest()[:16]


class TensorReader:
    """Reads single tensors (or one expert of a fused tensor) from a folder's safetensors files."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._open: dict[str, object] = {}

    def _file(self, name: str):
        if name not in self._open:
            path = _safe_name(self.folder, name)
            try:
                self._open[name] = safe_open(os.fspath(path), framework="pt", device="cpu")
            except FileNotFoundError:
                raise CheckpointError(f"{path} is missing; this host's checkpoint copy is incomplete") from None
            except Exception as e:  # OSError, safetensors' own error for a damaged file
                raise CheckpointError(f"cannot open {path}: {e}; download or copy it again") from None
        return self._open[name]

    def read(self, file: str, key: str, index: int | None = None) -> torch.Tensor:
        f = self._file(file)
        try:
            if index is None:
                return f.get_tensor(key)
            # get_slice reads only this expert's bytes of a fused [num_experts, ...] tensor
            return f.get_slice(key)[index]
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {key} from {self.folder / file}: {e}") from None

    def close(self) -> None:
        self._open.clear()
