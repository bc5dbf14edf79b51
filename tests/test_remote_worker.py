"""A worker on another machine (`fiddler-worker --listen tcp://...`, started by hand) as its users meet it: it serves
one cluster after another without a restart, keeps a shard that the next cluster asks for again, refuses a second
cluster while it serves one, and stops on SIGTERM. A cluster pointed at an address where no worker answers says so
within the handshake bound, and a start shows which workers are still loading."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import process_gone, runtime_leftovers, shm_files
from fiddler_moe.coordinator import coordinator
from fiddler_moe.coordinator.dispatch import WorkerFailed
from fiddler_moe.launch.cluster import Cluster

BIN = Path(sys.executable).parent
IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
TOKEN = "r3mote-cluster-token"


def free_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reference_logits(folder: Path) -> torch.Tensor:
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.inference_mode():
        return ref(input_ids=IDS).logits


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return ((got - want).abs().max() / want.abs().max()).item() < 1e-5


class RemoteWorker:
    """`fiddler-worker --listen tcp://127.0.0.1:PORT` as a user starts it on another machine: no parent, its own
    checkpoint copy and token; its log goes to a file that the test reads while it runs."""

    def __init__(self, folder: Path, tmp_path: Path):
        self.token_file = tmp_path / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.log_file = tmp_path / "worker.log"
        with open(self.log_file, "w") as log:
            self.proc = subprocess.Popen([BIN / "fiddler-worker", "--listen", self.address, "--model", str(folder),
                                          "--token-file", str(self.token_file), "--threads", "1"], stderr=log)

    def log(self) -> str:
        return self.log_file.read_text()

    def wait_for_log(self, text: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.log():
            assert self.proc.poll() is None, f"the worker exited: {self.log()}"
            assert time.monotonic() < deadline, f"the worker never logged {text!r}: {self.log()}"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


def cluster_of(folder: Path, worker: RemoteWorker, **options) -> Cluster:
    return Cluster(folder, workers=0, remote_workers=[worker.address], token=TOKEN, device="cpu", quiet=True,
                   **options)


def test_a_remote_worker_serves_one_cluster_after_another_keeping_its_shard(checkpoints, tmp_path):
    folder = checkpoints["tiny"]
    want = reference_logits(folder)
    worker = RemoteWorker(folder, tmp_path)
    try:
        with cluster_of(folder, worker) as cluster:
            assert close(cluster.logits(IDS), want)
        # The launch after it, with the same checkpoint: the same worker, still running, serves it too.
        with cluster_of(folder, worker) as cluster:
            assert close(cluster.logits(IDS), want)
            # Another cluster while this one is served is refused, and the one served goes on.
            with pytest.raises(WorkerFailed, match=r"refused start-up: this worker serves another cluster"):
                with cluster_of(folder, worker):
                    pass
            assert close(cluster.logits(IDS), want)
        assert worker.proc.poll() is None
    finally:
        code = worker.stop()
    log = worker.log()
    assert code == 0 and process_gone(worker.proc.pid), log
    assert len(re.findall(r"loaded \d+ experts", log)) == 1, log  # read once, by the first cluster
    assert "kept its shard of" in log, log
    assert "Traceback" not in log and TOKEN not in log
    assert runtime_leftovers() == [] and shm_files() == set()


def test_a_remote_worker_whose_cluster_was_killed_serves_the_next(checkpoints, tmp_path):
    folder = checkpoints["tiny"]
    worker = RemoteWorker(folder, tmp_path)
    launcher = subprocess.Popen([BIN / "fiddler-launch", "--model", str(folder), "--device", "cpu", "--workers", "0",
                                 "--remote-worker", worker.address, "--token-file", str(worker.token_file)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        while "ready" not in (line := launcher.stdout.readline()):
            assert line, "the launcher exited before it was ready"
        launcher.kill()  # no Shutdown is sent: the worker sees its coordinator's connection close
        launcher.wait()
        worker.wait_for_log("is gone; waiting for the next cluster")
        with cluster_of(folder, worker) as cluster:
            assert close(cluster.logits(IDS), reference_logits(folder))
            code = worker.stop()  # SIGTERM while it serves a cluster
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        worker.stop()
    log = worker.log()
    assert code == 0 and process_gone(worker.proc.pid), log
    assert "Traceback" not in log
    assert runtime_leftovers() == [] and shm_files() == set()  # the killed launcher's folder went at the next launch


def test_no_worker_at_a_remote_address_fails_the_start_within_the_handshake_bound(checkpoints):
    address = f"tcp://127.0.0.1:{free_port()}"
    out = subprocess.run([BIN / "fiddler", "run", "--model", str(checkpoints["tiny"]), "--device", "cpu",
                          "--workers", "0", "--remote-worker", address, "--handshake-timeout", "1", "hi"],
                         capture_output=True, text=True, timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(errors) == 1 and errors[0] == out.stderr.splitlines()[-1], out.stderr
    assert f"no worker answers at {address} (worker-0) within 1s" in errors[0]
    assert "`fiddler-worker --listen` running there" in errors[0] and "--handshake-timeout" in errors[0]
    assert runtime_leftovers() == []


def test_a_remote_worker_that_accepts_but_never_answers_is_named(checkpoints, tmp_path):
    folder = checkpoints["tiny"]
    worker = RemoteWorker(folder, tmp_path)
    try:
        worker.wait_for_log("listening on")
        os.kill(worker.proc.pid, signal.SIGSTOP)  # its socket still accepts connections; nobody answers on them
        try:
            with pytest.raises(WorkerFailed, match=r"accepts connections but did not answer the handshake within 1s"):
                with cluster_of(folder, worker, handshake_timeout=1):
                    pass
        finally:
            os.kill(worker.proc.pid, signal.SIGCONT)
    finally:
        code = worker.stop()
    assert code == 0 and "Traceback" not in worker.log()
    assert runtime_leftovers() == []


def test_a_start_says_which_workers_are_still_loading(checkpoints, capfd, monkeypatch):
    """The wait for the workers' shards is never silent: the bar names the workers waited for, and a line says which
    are still loading (every LOAD_NOTE_EVERY_S; at once here)."""
    monkeypatch.setattr(coordinator, "LOAD_NOTE_EVERY_S", 0.0)
    with Cluster(checkpoints["tiny"], workers=2, threads_per_worker=1, device="cpu") as cluster:
        addresses = cluster.addresses
    err = capfd.readouterr().err
    assert "waiting for worker-0, worker-1" in err
    assert f"still loading their shards after 0s: worker-0 ({addresses[0]}), worker-1 ({addresses[1]})" in err
    assert runtime_leftovers() == []


def test_the_handshake_bound_is_checked_when_the_options_are_made():
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="--handshake-timeout must be a number of seconds above 0"):
            Cluster(handshake_timeout=bad)
