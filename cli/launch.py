"""`fiddler-launch`: start the workers and the coordinator service, serve prompts until Ctrl-C or SIGTERM; with
`--http HOST:PORT` also the OpenAI-compatible HTTP API (serving/)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from fiddler_moe.cli.options import cluster_options_command, fail, run_then_exit
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
    http: Annotated[str | None, typer.Option(
        "--http", help="Also serve the OpenAI-compatible API at HOST:PORT (a bare PORT or :PORT is 127.0.0.1); "
        "anything but loopback needs an API key.")] = None,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", help="Key HTTP clients must send (Authorization: Bearer KEY); prefer --api-key-file or "
        "FIDDLER_API_KEY, which other users cannot read from the process list.")] = None,
    api_key_file: Annotated[Path | None, typer.Option("--api-key-file", help="File holding the API key.")] = None,
) -> None:
    """Start a cluster and serve prompts (send them with `fiddler generate`, or over HTTP with --http)."""
    from fiddler_moe.coordinator.dispatch import WorkerFailed
    from fiddler_moe.coordinator.service import PromptService
    from fiddler_moe.experts.checkpoint import CheckpointError
    from fiddler_moe.launch import rundir
    from fiddler_moe.launch.cluster import Cluster

    http_options = None
    if http is not None:
        from fiddler_moe.serving.server import HttpOptions

        try:
            http_options = HttpOptions.parse(http, api_key, api_key_file)
        except ValueError as e:
            raise fail(str(e)) from None
    elif api_key is not None or api_key_file is not None:
        raise fail("--api-key and --api-key-file are for the HTTP API; add --http HOST:PORT")

    _terminate_as_interrupt()
    cluster = Cluster(options)
    if dry_run:
        try:
            for line in cluster.dry_run():
                print(line)
        except (CheckpointError, ValueError) as e:
            raise fail(str(e)) from None
        return
    http_server = None
    try:
        listener = http_options.bind() if http_options else None  # a port in use fails here, before any process
        with cluster:
            service = PromptService(cluster.coordinator, f"ipc://{cluster.run_dir}/coordinator.sock",
                                    on_idle=cluster.check_workers)
            rundir.publish(cluster.run_dir, rundir.ClusterInfo(os.getpid(), service.address,
                                                               str(cluster.options.model), time.time()))
            if listener is not None:
                http_server = _serve_http(cluster, listener, http_options.api_key)
            print(f"ready: prompts at {service.address}", flush=True)
            print('send one with: fiddler generate "Hello"   (Ctrl-C stops the cluster)', flush=True)
            try:
                service.serve()
            finally:
                if http_server is not None:
                    _stop_http(http_server)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    except (CheckpointError, ValueError, WorkerFailed, PermissionError) as e:
        raise fail(str(e)) from None


def _serve_http(cluster, listener, api_key: str | None):
    """The HTTP API over the cluster's engine, started on its own thread; prints where it listens."""
    from fiddler_moe.serving.app import Served, make_app
    from fiddler_moe.serving.server import HttpServer

    coordinator = cluster.coordinator
    served = Served(cluster.engine, coordinator.tokenizer, Path(cluster.options.model),
                    health=lambda: coordinator.degraded, coordinator=coordinator)
    server = HttpServer(make_app(served, api_key), listener)
    server.start()
    print(f"http: the OpenAI API at {server.url}/v1 (model {served.name!r})"
          + ("" if api_key else ", no API key"), flush=True)
    return server


def _stop_http(server) -> None:
    """New requests get 503 while the open ones are cancelled and told; then the server stops."""
    served = server.app.state.served
    served.shutting_down = "the server is shutting down"
    served.cancel_all()
    server.stop()


def main() -> None:
    numa.use_openmp_settings()  # before anything imports torch
    run_then_exit(app)


if __name__ == "__main__":
    main()
