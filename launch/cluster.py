"""A cluster: expert worker processes plus the coordinator in this process, started and stopped together.

    with Cluster(model="path/to/mixtral", workers=4, threads_per_worker=8) as cluster:
        print(cluster.generate("The capital of France is").text)

Everything the cluster starts (processes, sockets, its private run folder) is gone when the block exits, also on
errors and Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from coordinator.coordinator import Coordinator, Generation, prepare
from launch import rundir


@dataclass
class ClusterConfig:
    model: Path | None = None  # None: the built-in tiny model (random weights)
    workers: int = 1
    threads_per_worker: int = 1
    device: str = "auto"
    dtype: str | None = None
    device_memory: str | None = None  # a size, "all", or None for the device's default
    hot_experts: int | None = None  # overrides device_memory with an explicit count
    coordinator_threads: int | None = None
    quiet: bool = False


class Cluster:
    def __init__(self, model: str | Path | None = None, **kwargs):
        self.config = ClusterConfig(model=Path(model) if model else None, **kwargs)
        self.processes: list[subprocess.Popen] = []
        self.run_dir: Path | None = None
        self.coordinator: Coordinator | None = None

    # --- lifecycle ---

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self, text: str) -> None:
        if not self.config.quiet:
            print(text, file=sys.stderr, flush=True)

    def start(self) -> None:
        cfg = self.config
        if cfg.workers < 0 or cfg.threads_per_worker < 1:
            raise ValueError("--workers must be 0 or more and --threads-per-worker 1 or more")
        if cfg.model is None:
            from coordinator.synthetic import builtin_model_path

            cfg.model = builtin_model_path()
            self.log(f"using the built-in tiny model at {cfg.model} (random weights: its text is gibberish)")
        # Everything that can be wrong with the checkpoint or flags is found here, before any process starts.
        prepared = prepare(cfg.model, cfg.workers, cfg.device, cfg.dtype, cfg.device_memory, cfg.hot_experts)
        if cfg.coordinator_threads:
            torch.set_num_threads(cfg.coordinator_threads)
        self.log(f"model: {prepared.layout.folder} ({prepared.layout.config.model_type}, {prepared.layout.dtype}), "
                 f"device: {prepared.device}")
        for line in prepared.placement.describe():
            self.log(line)
        try:
            self.run_dir = rundir.create()
            addresses = [f"ipc://{self.run_dir}/worker-{i}.sock" for i in range(cfg.workers)]
            for i, address in enumerate(addresses):
                self.processes.append(self._spawn_worker(i, address))
            alive = [lambda p=p: p.poll() is None for p in self.processes]
            self.coordinator = Coordinator(prepared, addresses, alive, progress=not cfg.quiet)
        except BaseException:
            self.stop()
            raise

    def _spawn_worker(self, index: int, address: str) -> subprocess.Popen:
        command = [
            sys.executable, "-m", "expert_worker",
            "--listen", address,
            "--threads", str(self.config.threads_per_worker),
            "--parent-pid", str(os.getpid()),
            "--name", f"worker-{index}",
        ]
        env = dict(os.environ, OMP_NUM_THREADS=str(self.config.threads_per_worker))
        if self.config.quiet:
            env["FIDDLER_WORKER_QUIET"] = "1"
        # Own session: a Ctrl-C at the terminal reaches the launcher, which stops the workers in order.
        return subprocess.Popen(command, env=env, start_new_session=True)

    def stop(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        if self.coordinator is not None:
            self.coordinator.close()  # asks every worker to shut down
            self.coordinator = None
            for p in self.processes:
                try:
                    p.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    pass
        for p in self.processes:
            if p.poll() is None:
                p.terminate()
        for p in self.processes:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.processes = []
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    # --- using it ---

    def _running(self) -> Coordinator:
        if self.coordinator is None:
            raise RuntimeError("the cluster is not running; use it inside `with Cluster(...) as cluster:`")
        return self.coordinator

    def generate(self, prompt: str | list[int], **kwargs) -> Generation:
        return self._running().generate(prompt, **kwargs)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._running().logits(input_ids, attention_mask)

    @property
    def tokenizer(self):
        return self._running().tokenizer

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.processes]
