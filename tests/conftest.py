"""Shared fixtures: real checkpoints written by transformers' save_pretrained, and an isolated runtime folder so
tests can assert that nothing (sockets, run folders) is left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fiddler_moe.launch.synthetic import write_checkpoint

TINY_PRESETS = ["tiny", "tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-gpt-oss"]


@pytest.fixture(scope="session", autouse=True)
def isolated_dirs(tmp_path_factory):
    """Each test session gets its own runtime folder (sockets) and cache (built-in model)."""
    runtime = tmp_path_factory.mktemp("runtime")
    runtime.chmod(0o700)
    os.environ["FIDDLER_RUNTIME_DIR"] = str(runtime)
    os.environ.setdefault("FIDDLER_CACHE", str(tmp_path_factory.mktemp("cache")))
    torch.set_num_threads(1)  # leave the cores to the worker processes
    yield runtime


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: write_checkpoint(name, root / name, dtype=torch.float32, seed=0) for name in TINY_PRESETS}


@pytest.fixture(scope="session")
def sharded_checkpoint(tmp_path_factory) -> Path:
    """A multi-file checkpoint with model.safetensors.index.json, as large real models come."""
    return write_checkpoint("tiny", tmp_path_factory.mktemp("sharded") / "tiny", max_shard_size="300KB")


def runtime_leftovers() -> list[str]:
    """Everything under the runtime folder: cluster folders and sockets that should be gone."""
    root = Path(os.environ["FIDDLER_RUNTIME_DIR"])
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"  # a zombie is dead, merely not reaped by its parent yet
    except FileNotFoundError:
        return True


def children_of(pid: int) -> list[int]:
    """Processes whose parent is pid, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def shm_files() -> set[str]:
    """Shared-memory files of this project in /dev/shm (slots and shards are unlinked once both sides map them)."""
    return {name for name in os.listdir("/dev/shm") if "fiddler" in name}
