"""Every knob of a cluster, with its default, its command-line flag and its help: declared once, checked once.

    options = ClusterOptions(model="path/to/mixtral", workers=4, device_memory="20GiB")
    with Cluster(options) as cluster: ...

`fiddler-launch`, `fiddler run` and `fiddler profile` build their cluster flags from the `Flag` in each field's
metadata (cli/options.py); a field without one (shm_rows, scheduling, token, quiet) is for Python callers only.
A bad value raises ValueError when the options are made, with one line naming the flag and the fix, so nothing
later checks them again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fiddler_moe.coordinator.placement import parse_size
from fiddler_moe.coordinator.profile import ExpertProfile
from fiddler_moe.experts.quant import check_format


@dataclass(frozen=True)
class Flag:
    names: tuple[str, ...]  # "--workers", "-w"; a bool flag as "--on/--off"
    help: str
    type: object = None  # what the command line reads, where it differs from the field's type


def flag(*names: str, help: str, type: object = None) -> dict:
    """The metadata of a field that is also a command-line flag."""
    return {"flag": Flag(names, help, type)}


def read_secret_file(path: Path, flag: str, what: str) -> str:
    """A secret kept in a file (`flag` names it in errors; `what` says what belongs in it), stripped."""
    try:
        secret = Path(path).read_text().strip()
    except OSError as e:
        raise ValueError(f"cannot read {flag} {path}: {e.strerror}") from None
    if not secret:
        raise ValueError(f"{flag} {path} is empty; put {what} in it")
    return secret


def read_token(token_file: Path | None) -> str:
    """The cluster token: from --token-file, else $FIDDLER_TOKEN; never printed."""
    if token_file is None:
        return os.environ.get("FIDDLER_TOKEN", "")
    return read_secret_file(token_file, "--token-file", "the cluster token")


def parse_device_memory(text: str | None) -> int | Literal["all"] | None:
    """--device-memory as bytes, "all" (every expert hot), or None (the device's default)."""
    if text in (None, ""):
        return None
    if text == "all":
        return "all"
    try:
        return parse_size(text)
    except ValueError as e:
        raise ValueError(f"--device-memory: {e}, or 'all'") from None


def _at_least(name: str, value: int | None, minimum: int) -> None:
    if value is not None and value < minimum:
        raise ValueError(f"{name} must be {minimum} or more, got {value}")


@dataclass
class ClusterOptions:
    """A cluster's knobs, by name. Making one checks them; a bad value raises ValueError naming the flag."""

    model: Path | None = field(default=None, metadata=flag(
        "--model", "-m", help="Checkpoint folder (config.json, safetensors, tokenizer). "
        "Default: the built-in tiny model, random weights."))
    workers: int | None = field(default=None, metadata=flag(
        "--workers", "-w", help="Local CPU expert worker processes. Default: one per NUMA node."))
    workers_per_socket: int | None = field(default=None, metadata=flag(
        "--workers-per-socket", help="Local workers on each NUMA node (instead of --workers)."))
    threads_per_worker: int | None = field(default=None, metadata=flag(
        "--threads-per-worker", "-t", help="torch threads per worker. Default: the physical cores left to the "
        "workers, shared evenly (see --dry-run)."))
    numa: str = field(default="on", metadata=flag(
        "--numa", help="on: pin each worker to its node's cores and memory; off: let the OS place them."))
    device: str = field(default="auto", metadata=flag("--device", help="Coordinator device: cuda, cpu or auto."))
    device_memory: str | None = field(default=None, metadata=flag(
        "--device-memory", help="Weights the device may hold, e.g. 20GiB; 'all' makes every expert hot. "
        "Default: on CUDA the free memory less 2 GiB, on CPU 0 (every expert on the workers)."))
    dtype: str = field(default="auto", metadata=flag(
        "--dtype", help="auto (the checkpoint's), bfloat16, float16 or float32."))
    quantize: str = field(default="none", metadata=flag(
        "--quantize", help="Cold experts on the workers in int8 (llama.cpp's Q8_0) or int4 (Q4_0), quantized from "
        "the checkpoint on first use and cached; none keeps the compute dtype. Hot experts keep the compute dtype."))
    hot_experts: int | None = field(default=None, metadata=flag(
        "--hot-experts", help="Exact number of hot experts (overrides --device-memory)."))
    coordinator_threads: int | None = field(default=None, metadata=flag(
        "--coordinator-threads", help="torch threads of the coordinator process. Default: 1 driving a GPU; node "
        "0's cores on a CPU-only machine with every expert cold (it takes turns with the workers), and 1 in its "
        "decoding steps there; else an eighth of the cores. Given, it holds for prefill and decoding alike."))
    transport: str = field(default="shm", metadata=flag(
        "--transport", help="shm: shared memory to local workers (ZeroMQ for control); zmq: ZeroMQ only."))
    remote_workers: list[str] = field(default_factory=list, metadata=flag(
        "--remote-worker", type=list[str] | None, help="tcp://HOST:PORT of a `fiddler-worker --listen` on another "
        "machine (repeatable)."))
    token_file: Path | None = field(default=None, metadata=flag(
        "--token-file", help="File with the cluster token that remote workers require."))
    handshake_timeout: float = field(default=10.0, metadata=flag(
        "--handshake-timeout", help="Seconds a remote worker has to answer the handshake before the start fails "
        "naming its address (loading its shard may take longer)."))
    profile: Path | str | ExpertProfile | None = field(default=None, metadata=flag(
        "--profile", type=Path | None, help="Expert profile from `fiddler profile` or `fiddler stats "
        "--save-profile`: the most used experts that fit --device-memory become hot, cold ones are spread by "
        "expected load."))
    restart_workers: bool = field(default=True, metadata=flag(
        "--restart-workers/--no-restart-workers", help="Start a local worker that died again, with its shard."))
    max_restarts: int = field(default=3, metadata=flag(
        "--max-restarts", help="Restarts per worker before the cluster reports itself degraded."))
    max_batch_size: int = field(default=8, metadata=flag(
        "--max-batch-size", help="Requests decoded together in one step; more wait for a place."))
    # For Python callers only.
    shm_rows: int = 4096  # rows per shared-memory slot; larger batches travel over ZeroMQ
    scheduling: str = "auto"  # auto: move cold experts to a GPU when it pays; never; always (tests of the move path)
    token: str | None = field(default=None, repr=False)  # None: read from token_file, else $FIDDLER_TOKEN
    quiet: bool = False
    # --device-memory read once: bytes, "all", or None for the device's default.
    device_budget: int | Literal["all"] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.model = Path(self.model) if self.model else None
        if isinstance(self.numa, bool):  # Python callers may say numa=True / False
            self.numa = "on" if self.numa else "off"
        self.remote_workers = list(self.remote_workers or [])
        _at_least("--workers", self.workers, 0)
        _at_least("--workers-per-socket", self.workers_per_socket, 0)
        _at_least("--threads-per-worker", self.threads_per_worker, 1)
        if self.numa not in ("on", "off"):
            raise ValueError(f"--numa must be on or off, got {self.numa!r}")
        self.device_budget = parse_device_memory(self.device_memory)
        check_format(self.quantize)
        _at_least("--hot-experts", self.hot_experts, 0)
        _at_least("--coordinator-threads", self.coordinator_threads, 1)
        if self.transport not in ("shm", "zmq"):
            raise ValueError(f"--transport must be shm or zmq, got {self.transport!r}")
        if self.token is None:
            self.token = read_token(self.token_file)
        if not 0 < self.handshake_timeout < float("inf"):
            raise ValueError(f"--handshake-timeout must be a number of seconds above 0, got {self.handshake_timeout}")
        _at_least("--max-restarts", self.max_restarts, 0)
        _at_least("--max-batch-size", self.max_batch_size, 1)
        if self.scheduling not in ("auto", "never", "always"):
            raise ValueError(f"scheduling must be auto, never or always, got {self.scheduling!r}")
