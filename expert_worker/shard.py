"""A worker's shard: the (layer, expert) pairs it owns, read from the checkpoint and nothing more."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from expert_worker.checkpoint import TensorReader
from expert_worker.compute import ExpertWeights
from protocol.messages import ExpertSource, TensorRef
from protocol.wire import parse_dtype


def _gather(reader: TensorReader, refs: list[TensorRef], dtype: torch.dtype) -> torch.Tensor | None:
    if not refs:
        return None
    parts = [reader.read(r.file, r.key, r.index) for r in refs]
    # Per-expert layouts (Mixtral's w1/w3, Qwen's gate_proj/up_proj) concatenate along the output dim, as
    # transformers' own conversion does when it fuses them into gate_up_proj.
    tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return tensor.to(dtype).contiguous()


def load_expert(reader: TensorReader, source: ExpertSource, dtype: torch.dtype) -> ExpertWeights:
    return ExpertWeights(
        gate_up=_gather(reader, source.gate_up, dtype),
        down=_gather(reader, source.down, dtype),
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
