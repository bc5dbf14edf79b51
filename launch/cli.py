"""`fiddler-launch`: start the workers and the coordinator service, serve prompts until Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

# Cluster flags, shared with `fiddler run`.
ModelOption = Annotated[
    Path | None,
    typer.Option("--model", "-m", help="Checkpoint folder (config.json, safetensors, tokenizer). "
                 "Default: the built-in tiny model, random weights."),
]
WorkersOption = Annotated[int, typer.Option("--workers", "-w", help="CPU expert worker processes.")]
ThreadsOption = Annotated[
    int | None, typer.Option("--threads-per-worker", "-t", help="torch threads per worker. Default: the cores "
                             "left after the coordinator, shared evenly.")
]
DeviceOption = Annotated[str, typer.Option("--device", help="Coordinator device: cuda, cpu or auto.")]
DeviceMemoryOption = Annotated[
    str | None,
    typer.Option("--device-memory", help="Weights the device may hold, e.g. 20GiB; 'all' makes every expert hot. "
                 "Default: on CUDA the free memory less 2 GiB, on CPU 0 (every expert on the workers)."),
]
DtypeOption = Annotated[str, typer.Option("--dtype", help="auto (the checkpoint's), bfloat16, float16 or float32.")]
HotExpertsOption = Annotated[
    int | None, typer.Option("--hot-experts", help="Exact number of hot experts (overrides --device-memory).")
]
CoordinatorThreadsOption = Annotated[
    int | None, typer.Option("--coordinator-threads", help="torch threads of the coordinator process.")
]


def default_threads(workers: int, threads: int | None) -> int:
    if threads is not None:
        if threads < 1:
            raise typer.BadParameter("--threads-per-worker must be 1 or more")
        return threads
    cores = os.cpu_count() or 1
    return max(1, (cores - 1) // max(1, workers))


def check_workers(workers: int, threads: int) -> None:
    cores = os.cpu_count() or 1
    if workers < 0:
        raise typer.BadParameter("--workers must be 0 or more")
    if workers > cores:
        raise typer.BadParameter(f"--workers {workers} is more than the {cores} cores of this machine; use at most {cores}")


def cluster_from_options(model, workers, threads, device, device_memory, dtype, hot_experts, coordinator_threads,
                         quiet=False):
    from launch.cluster import Cluster

    threads = default_threads(workers, threads)
    check_workers(workers, threads)
    return Cluster(model, workers=workers, threads_per_worker=threads, device=device, dtype=dtype,
                   device_memory=device_memory, hot_experts=hot_experts, coordinator_threads=coordinator_threads,
                   quiet=quiet)


def fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _terminate_as_interrupt() -> None:
    """SIGTERM takes the same clean path as Ctrl-C."""

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def launch(
    model: ModelOption = None,
    workers: WorkersOption = 1,
    threads_per_worker: ThreadsOption = None,
    device: DeviceOption = "auto",
    device_memory: DeviceMemoryOption = None,
    dtype: DtypeOption = "auto",
    hot_experts: HotExpertsOption = None,
    coordinator_threads: CoordinatorThreadsOption = None,
) -> None:
    """Start a cluster and serve prompts (send them with `fiddler generate`)."""
    from coordinator.dispatch import WorkerFailed
    from coordinator.service import PromptService
    from expert_worker.checkpoint import CheckpointError
    from launch import rundir

    _terminate_as_interrupt()
    cluster = cluster_from_options(model, workers, threads_per_worker, device, device_memory, dtype, hot_experts,
                                   coordinator_threads)
    try:
        with cluster:
            service = PromptService(cluster.coordinator, f"ipc://{cluster.run_dir}/coordinator.sock")
            rundir.publish(cluster.run_dir, rundir.ClusterInfo(os.getpid(), service.address,
                                                               str(cluster.config.model), time.time()))
            print(f"ready: prompts at {service.address}", flush=True)
            print('send one with: fiddler generate "Hello"   (Ctrl-C stops the cluster)', flush=True)
            service.serve()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    except (CheckpointError, ValueError, WorkerFailed, PermissionError) as e:
        raise fail(str(e)) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
