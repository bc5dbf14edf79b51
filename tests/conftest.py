"""Shared fixtures: real checkpoints written by transformers' save_pretrained, an isolated runtime folder so tests can
assert that nothing (sockets, run folders) is left behind, clusters that read-only tests share, transformers'
reference models, and console commands run in this process."""

from __future__ import annotations

import collections
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from fiddler_moe.launch.cluster import Cluster
from fiddler_moe.launch.synthetic import write_checkpoint

TINY_PRESETS = ["tiny", "tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-gpt-oss"]


def pytest_configure(config):
    # A shell that starts the suite in the background (`make test &` without job control) ignores SIGINT, and an
    # ignored signal stays ignored across exec: the launchers the tests stop with Ctrl-C would never stop. Their
    # own default is to take it, so the suite gives it back to the processes it starts.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    config.addinivalue_line(
        "markers", "cluster(preset, **options): the test's `cluster` fixture is a running Cluster of this tiny "
        "checkpoint with these options, shared with every other test that names the same ones")


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


@pytest.fixture(scope="session")
def reference():
    """transformers' own model of a checkpoint folder, float32, loaded once per folder: what the cluster must match.
    Callers only run it (inference mode); nobody changes its weights."""

    @functools.cache
    def load(folder: Path):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    yield load
    load.cache_clear()


# --- clusters that read-only tests share ---


class SharedClusters:
    """Running clusters, one per (preset, options), for the tests marked `@pytest.mark.cluster(preset, **options)`.
    Each is started when the first such test needs it and stopped after the last one, so that at most a few run at
    once. They live in a runtime folder of their own: the leftover checks of other tests see only their own."""

    def __init__(self, runtime: Path, items):
        self.runtime = runtime
        self.users = collections.Counter(key for item in items if (key := self.key_of(item)) is not None)
        self.running: dict[tuple, Cluster] = {}
        self.stopping: list[threading.Thread] = []
        self.worker_pids: list[int] = []

    @staticmethod
    def key_of(item) -> tuple | None:
        marker = item.get_closest_marker("cluster")
        if marker is None:
            return None
        (preset,) = marker.args
        return preset, tuple(sorted(marker.kwargs.items()))

    def acquire(self, key: tuple, checkpoints: dict[str, Path]) -> Cluster:
        if key not in self.running:
            preset, options = key
            cluster = Cluster(checkpoints[preset], **{"device": "cpu", "quiet": True, **dict(options)})
            outer = os.environ["FIDDLER_RUNTIME_DIR"]
            os.environ["FIDDLER_RUNTIME_DIR"] = str(self.runtime)
            try:
                cluster.start()
            finally:
                os.environ["FIDDLER_RUNTIME_DIR"] = outer
            self.running[key] = cluster
            self.worker_pids += cluster.worker_pids
        return self.running[key]

    def release(self, key: tuple) -> None:
        """After its last user a cluster stops in the background, while the next test starts its own."""
        self.users[key] -= 1
        if self.users[key] <= 0 and key in self.running:
            stopping = threading.Thread(target=self.running.pop(key).stop)
            stopping.start()
            self.stopping.append(stopping)

    def settle(self) -> None:
        """Wait until the clusters stopping in the background are gone."""
        while self.stopping:
            self.stopping.pop().join()

    def stop_all(self) -> None:
        while self.running:
            self.running.popitem()[1].stop()
        self.settle()


@pytest.fixture(scope="session")
def shared_clusters(request, tmp_path_factory):
    runtime = tmp_path_factory.mktemp("shared-runtime")
    runtime.chmod(0o700)
    clusters = SharedClusters(runtime, request.session.items)
    yield clusters
    clusters.stop_all()
    # the shared clusters leave nothing behind either
    assert sorted(p.name for p in runtime.iterdir()) == []
    assert all(process_gone(pid) for pid in clusters.worker_pids)
    assert shm_files() == set()


@pytest.fixture(autouse=True)
def shared_clusters_settled(request, shared_clusters):
    """A test without a shared cluster sees none stopping in the background: its checks of this process's children
    see only its own."""
    if "cluster" not in request.fixturenames:
        shared_clusters.settle()


@pytest.fixture
def cluster(request, shared_clusters, checkpoints) -> Cluster:
    """The running cluster that this test's `cluster` marker describes (shared; do not kill its workers)."""
    key = SharedClusters.key_of(request.node)
    assert key is not None, "the `cluster` fixture needs @pytest.mark.cluster(preset, **options)"
    try:
        yield shared_clusters.acquire(key, checkpoints)
    finally:
        shared_clusters.release(key)


# --- a running service that read-only tests share ---


@dataclass
class Launched:
    process: subprocess.Popen
    address: str  # where it takes prompts
    workers: list[int]  # its worker processes
    runtime: Path  # its FIDDLER_RUNTIME_DIR, apart from the tests' own
    model: Path  # the checkpoint it serves
    http_url: str  # its OpenAI-compatible HTTP API (--http on a free loopback port), without /v1
    api_key: str  # the key that API asks for


@pytest.fixture(scope="session")
def launched(checkpoints, tmp_path_factory) -> Launched:
    """`fiddler-launch` serving the tiny model with one worker, and its HTTP API with a key, for tests that only send
    it requests (good, bad and fuzzed ones). Stopped with Ctrl-C at the end of the session, and checked: a clean exit,
    no traceback, no process, socket, folder or shared-memory file left."""
    shm_before = shm_files()
    runtime = tmp_path_factory.mktemp("launched-runtime")
    runtime.chmod(0o700)
    log_file = runtime.parent / "launched.log"  # a file: a full pipe would stall the launcher
    key_file = runtime.parent / "launched-api-key"
    key_file.write_text("test-key-0123\n")
    with open(log_file, "w") as log:
        launcher = subprocess.Popen(
            [Path(sys.executable).parent / "fiddler-launch", "--model", str(checkpoints["tiny"]), "--workers", "1",
             "--threads-per-worker", "1", "--device", "cpu",
             "--http", "127.0.0.1:0", "--api-key-file", key_file],
            stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, "FIDDLER_RUNTIME_DIR": str(runtime)},
        )
    try:
        deadline = time.monotonic() + 120
        address = http_url = None
        while time.monotonic() < deadline and address is None:
            line = launcher.stdout.readline()
            if not line and launcher.poll() is not None:
                break
            if line.startswith("http: the OpenAI API at "):
                http_url = line.split()[5].removesuffix("/v1")
            if line.startswith("ready: prompts at "):
                address = line.split("ready: prompts at ", 1)[1].strip()
        assert address and http_url, f"the launcher never became ready: {log_file.read_text()[-2000:]}"
        workers = children_of(launcher.pid)
        yield Launched(launcher, address, workers, runtime, checkpoints["tiny"], http_url, "test-key-0123")
    finally:
        launcher.send_signal(signal.SIGINT)
        launcher.communicate(timeout=60)
    log = log_file.read_text()
    assert launcher.returncode == 0, log[-2000:]
    assert "Traceback" not in log, log[-2000:]
    assert all(process_gone(pid) for pid in [launcher.pid, *workers])
    assert list(runtime.iterdir()) == []
    assert shm_files() == shm_before


# --- console commands in this process ---


@pytest.fixture
def cli():
    """Run a console command in this process, as typed: `cli(fiddler.app, "run", "--top-p", "0", "hi")`; a finished
    CliRunner result (exit_code, stdout, stderr, exception). A subprocess would spend seconds importing torch for
    each error path; each console command still runs once as a real executable (test_cli.py, test_bad_input.py).
    What a command changes in this process is put back afterwards: the SIGTERM handler it installs, environment
    variables and torch's thread count."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    environ = dict(os.environ)
    threads = torch.get_num_threads()
    runner = CliRunner()

    def invoke(app, *args, env: dict[str, str] | None = None):
        return runner.invoke(app, [str(a) for a in args], env=env)

    yield invoke
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(threads)


def error_line(out) -> str:
    """A failed command's whole stderr: exactly one line, `error: ...`, no traceback, exit status not 0. `out` is a
    finished subprocess or a `cli` result (whose exception may only be its exit)."""
    status = out.returncode if hasattr(out, "returncode") else out.exit_code
    assert status != 0, f"exit status 0; stdout: {out.stdout}"
    if not hasattr(out, "returncode"):
        assert isinstance(out.exception, SystemExit), repr(out.exception)  # not an uncaught error
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


# --- what a test may leave behind ---


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
    """Shared-memory files of this project in /dev/shm (slots and shards are unlinked once both sides map them).
    Their names carry the pid of the process that made them: a file whose maker is alive and not a process of this
    test session belongs to another run on the same machine, still at work, and is not ours to count."""
    found = set()
    for name in os.listdir("/dev/shm"):
        if "fiddler" not in name:
            continue
        maker = next((int(part) for part in name.split("-") if part.isdigit()), None)
        if maker is not None and not process_gone(maker) and not descends_from_this_session(maker):
            continue
        found.add(name)
    return found


def descends_from_this_session(pid: int) -> bool:
    """Whether pid is this test process or one of its descendants (from /proc, following parents)."""
    while pid > 1:
        if pid == os.getpid():
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


def _bfloat16_path(monkeypatch, path: str) -> None:
    """FIDDLER_BF16_PATH=path in this process and the worker processes it starts meanwhile."""
    from fiddler_moe.experts import compute

    for flag, value in compute.flags_of(path).items():  # coordinator/cpu_linear.py reads these too
        monkeypatch.setattr(compute, flag, value)
    monkeypatch.setenv("FIDDLER_BF16_PATH", path)


@pytest.fixture
def avx2_bfloat16_path(monkeypatch):
    """The AVX2 bfloat16 path in this process (FIDDLER_BF16_PATH=avx2), also on a CPU with oneDNN bfloat16 support,
    where `auto` takes another: the C decoding paths are tested on the AVX2 kernel, the one every x86-64 CPU the
    library is built for runs."""
    _bfloat16_path(monkeypatch, "avx2")


@pytest.fixture
def avx512_bfloat16_path(monkeypatch):
    """The AVX512-BF16 bfloat16 path in this process (FIDDLER_BF16_PATH=avx512); skips where the CPU lacks it."""
    from fiddler_moe.experts import compute

    if not compute.has_avx512_bfloat16():
        pytest.skip("this CPU has no AVX512-BF16 instructions")
    _bfloat16_path(monkeypatch, "avx512")


@pytest.fixture
def amx_bfloat16_path(monkeypatch):
    """The AMX bfloat16 path in this process (FIDDLER_BF16_PATH=amx); skips where the CPU lacks AMX tiles."""
    from fiddler_moe.experts import compute

    if not (compute.has_avx512_bfloat16() and compute.has_amx()):
        pytest.skip("this CPU has no AMX tiles")
    _bfloat16_path(monkeypatch, "amx")


@pytest.fixture
def onednn_bfloat16_path(monkeypatch):
    """oneDNN's packed weights in this process (FIDDLER_BF16_PATH=onednn), also where `auto` takes the AMX kernel
    (CPUs with AMX); skips where PyTorch has no oneDNN bfloat16 support here."""
    from fiddler_moe.experts import compute

    if not compute._onednn_bfloat16():
        pytest.skip("no oneDNN bfloat16 support on this CPU")
    _bfloat16_path(monkeypatch, "onednn")


@pytest.fixture(params=["avx2", "avx512", "amx"])
def decoding_kernel_path(request, monkeypatch) -> str:
    """Each bfloat16 path that decodes through the C kernel on dense weights (FIDDLER_BF16_PATH=avx2, avx512, amx),
    in this process and the worker processes it starts meanwhile; avx512 and amx skip where the CPU lacks them."""
    request.getfixturevalue(f"{request.param}_bfloat16_path")
    return request.param


@pytest.fixture
def shm_pair():
    """Makes shared-memory channels as a cluster does: the coordinator's, the worker's attachment to it, and the
    file already unlinked. Returns (coordinator, worker); both are closed after the test. spin=None keeps the
    channels' default waiting."""
    from fiddler_moe.protocol.shm import ShmChannel

    made = []

    def make(capacity: int = 1 << 16, spin: bool | None = None):
        coordinator = ShmChannel.create(capacity=capacity)
        worker = ShmChannel.attach(coordinator.path, capacity)
        coordinator.unlink()
        if spin is not None:
            coordinator.spin = worker.spin = spin
        made.append((coordinator, worker))
        return coordinator, worker

    yield make
    for coordinator, worker in made:
        worker.close()
        coordinator.close()
