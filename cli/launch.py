"""`fiddler-launch`: start the workers and the coordinator service, serve prompts until Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from fiddler_moe.host import numa

# Cluster flags, shared with `fiddler run`.
ModelOption = Annotated[
    Path | None,
    typer.Option("--model", "-m", help="Checkpoint folder (config.json, safetensors, tokenizer). "
                 "Default: the built-in tiny model, random weights."),
]
WorkersOption = Annotated[
    int | None, typer.Option("--workers", "-w", help="Local CPU expert worker processes. Default: one per NUMA node.")
]
ThreadsOption = Annotated[
    int | None, typer.Option("--threads-per-worker", "-t", help="torch threads per worker. Default: the "
                             "physical cores left to the workers, shared evenly (see --dry-run).")
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
    int | None, typer.Option("--coordinator-threads", help="torch threads of the coordinator process. "
                 "Default: 1 driving a GPU; node 0's cores on a CPU-only machine with every expert cold (it takes "
                 "turns with the workers); else an eighth of the cores.")
]
WorkersPerSocketOption = Annotated[
    int | None, typer.Option("--workers-per-socket", help="Local workers on each NUMA node (instead of --workers).")
]
NumaOption = Annotated[
    str, typer.Option("--numa", help="on: pin each worker to its node's cores and memory; off: let the OS place them.")
]
TransportOption = Annotated[
    str, typer.Option("--transport", help="shm: shared memory to local workers (ZeroMQ for control); zmq: ZeroMQ only.")
]
RemoteWorkerOption = Annotated[
    list[str] | None,
    typer.Option("--remote-worker", help="tcp://HOST:PORT of a `fiddler-worker --listen` on another machine "
                 "(repeatable)."),
]
ProfileOption = Annotated[
    Path | None,
    typer.Option("--profile", help="Expert profile from `fiddler profile` or `fiddler stats --save-profile`: the "
                 "most used experts that fit --device-memory become hot, cold ones are spread by expected load."),
]
TokenFileOption = Annotated[
    Path | None, typer.Option("--token-file", help="File with the cluster token that remote workers require.")
]


def read_token(token_file: Path | None) -> str:
    """The cluster token: from --token-file, else $FIDDLER_TOKEN; never printed."""
    if token_file is None:
        return os.environ.get("FIDDLER_TOKEN", "")
    try:
        token = token_file.read_text().strip()
    except OSError as e:
        raise ValueError(f"cannot read --token-file {token_file}: {e.strerror}") from None
    if not token:
        raise ValueError(f"--token-file {token_file} is empty; put the cluster token in it")
    return token


def check_workers(workers: int) -> None:
    cores = len(os.sched_getaffinity(0))
    if workers < 0:
        raise ValueError(f"--workers must be 0 or more, got {workers}")
    if workers > cores:
        raise ValueError(f"--workers {workers} is more than the {cores} cores of this machine; use at most {cores}")


def cluster_from_options(model, workers, threads, device, device_memory, dtype, hot_experts, coordinator_threads,
                         quiet=False, workers_per_socket=None, numa="on", transport="shm", remote_workers=None,
                         token_file=None, profile=None):
    """A Cluster for the command-line flags; a bad flag ends the command with one line saying how to fix it."""
    from fiddler_moe.launch.cluster import Cluster

    try:
        if numa not in ("on", "off"):
            raise ValueError(f"--numa must be on or off, got {numa!r}")
        if transport not in ("shm", "zmq"):
            raise ValueError(f"--transport must be shm or zmq, got {transport!r}")
        if workers_per_socket is not None and workers_per_socket < 0:
            raise ValueError(f"--workers-per-socket must be 0 or more, got {workers_per_socket}")
        token = read_token(token_file)
        if threads is not None and threads < 1:
            raise ValueError(f"--threads-per-worker must be 1 or more, got {threads}")
        if workers is not None:
            check_workers(workers)
        if coordinator_threads is not None and coordinator_threads < 1:
            raise ValueError(f"--coordinator-threads must be 1 or more, got {coordinator_threads}")
        if hot_experts is not None and hot_experts < 0:
            raise ValueError(f"--hot-experts must be 0 or more, got {hot_experts}")
    except ValueError as e:
        raise fail(str(e)) from None
    return Cluster(model, workers=workers, threads_per_worker=threads, device=device, dtype=dtype,
                   device_memory=device_memory, hot_experts=hot_experts, coordinator_threads=coordinator_threads,
                   quiet=quiet, workers_per_socket=workers_per_socket, numa=numa == "on", transport=transport,
                   remote_workers=list(remote_workers or []), token=token, profile=profile)


def fail(message: str) -> typer.Exit:
    """Print one line, `error: <what and how to fix it>`, and give the exit to raise (status 2)."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    return typer.Exit(2)


def _terminate_as_interrupt() -> None:
    """SIGTERM takes the same clean path as Ctrl-C."""

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)


@app.command()
def launch(
    model: ModelOption = None,
    workers: WorkersOption = None,
    workers_per_socket: WorkersPerSocketOption = None,
    threads_per_worker: ThreadsOption = None,
    numa: NumaOption = "on",
    device: DeviceOption = "auto",
    device_memory: DeviceMemoryOption = None,
    dtype: DtypeOption = "auto",
    hot_experts: HotExpertsOption = None,
    coordinator_threads: CoordinatorThreadsOption = None,
    transport: TransportOption = "shm",
    remote_worker: RemoteWorkerOption = None,
    token_file: TokenFileOption = None,
    profile: ProfileOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and exit; start nothing.")] = False,
    restart_workers: Annotated[bool, typer.Option(help="Start a local worker that died again, with its shard.")] = True,
    max_restarts: Annotated[int, typer.Option(help="Restarts per worker before the cluster reports itself "
                                              "degraded.")] = 3,
) -> None:
    """Start a cluster and serve prompts (send them with `fiddler generate`)."""
    from fiddler_moe.coordinator.dispatch import WorkerFailed
    from fiddler_moe.coordinator.service import PromptService
    from fiddler_moe.experts.checkpoint import CheckpointError
    from fiddler_moe.launch import rundir

    _terminate_as_interrupt()
    cluster = cluster_from_options(model, workers, threads_per_worker, device, device_memory, dtype, hot_experts,
                                   coordinator_threads, workers_per_socket=workers_per_socket, numa=numa,
                                   transport=transport, remote_workers=remote_worker, token_file=token_file,
                                   profile=profile)
    if max_restarts < 0:
        raise fail(f"--max-restarts must be 0 or more, got {max_restarts}")
    cluster.config.restart_workers, cluster.config.max_restarts = restart_workers, max_restarts
    if dry_run:
        try:
            for line in cluster.dry_run():
                print(line)
        except (CheckpointError, ValueError) as e:
            raise fail(str(e)) from None
        return
    try:
        with cluster:
            service = PromptService(cluster.coordinator, f"ipc://{cluster.run_dir}/coordinator.sock",
                                    on_failure=cluster.recover, on_idle=cluster.check_workers)
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
    numa.use_openmp_settings()  # before anything imports torch
    app()


if __name__ == "__main__":
    main()
