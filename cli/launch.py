"""`fiddler-launch`: start the workers and the coordinator service, serve prompts until Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Annotated

import typer

from fiddler_moe.cli.options import cluster_options_command, fail
from fiddler_moe.host import numa
from fiddler_moe.launch.options import ClusterOptions


def _terminate_as_interrupt() -> None:
    """SIGTERM takes the same clean path as Ctrl-C."""

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)


@app.command()
@cluster_options_command()
def launch(
    options: ClusterOptions,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and exit; start nothing.")] = False,
) -> None:
    """Start a cluster and serve prompts (send them with `fiddler generate`)."""
    from fiddler_moe.coordinator.dispatch import WorkerFailed
    from fiddler_moe.coordinator.service import PromptService
    from fiddler_moe.experts.checkpoint import CheckpointError
    from fiddler_moe.launch import rundir
    from fiddler_moe.launch.cluster import Cluster

    _terminate_as_interrupt()
    cluster = Cluster(options)
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
                                    on_idle=cluster.check_workers)
            rundir.publish(cluster.run_dir, rundir.ClusterInfo(os.getpid(), service.address,
                                                               str(cluster.options.model), time.time()))
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
