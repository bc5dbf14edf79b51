"""`fiddler-worker`: one CPU process serving a shard of cold experts. Started by hand (on another machine) it serves
one cluster at a time, one after another, until Ctrl-C or SIGTERM; started by a launcher (--parent-pid) it exits
with its cluster."""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import signal
import socket
import sys
from pathlib import Path

import typer

from fiddler_moe.host.numa import bind_memory_to_node, parse_cpu_list
from fiddler_moe.launch.options import read_token

app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _is_loopback(host: str) -> bool:
    """Whether a tcp bind host accepts connections from this machine only. Unknown names count as not."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False
    return bool(found) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in found)


def _check_listen(listen: str, token: str) -> None:
    """Local only by default: ipc in an existing folder, or tcp on loopback; other addresses need a token."""
    if listen.startswith("ipc://"):
        folder = Path(listen[len("ipc://") :]).parent
        if not folder.is_dir():
            raise _fail(f"--listen {listen}: folder {folder} does not exist; create it (mode 0700) first")
        return
    if not listen.startswith("tcp://"):
        raise _fail(f"--listen {listen!r} must be ipc:///path/worker.sock (this machine) or tcp://HOST:PORT")
    host, _, port = listen[len("tcp://") :].rpartition(":")
    if not host or not (port == "*" or port.isdigit()):
        raise _fail(f"--listen {listen!r} must be tcp://HOST:PORT, e.g. tcp://127.0.0.1:5555")
    if not token and not _is_loopback(host):
        raise _fail(
            f"--listen {listen} accepts connections from other machines, so it needs the cluster token: pass "
            "--token-file FILE (or set FIDDLER_TOKEN), or listen on tcp://127.0.0.1:PORT"
        )


def _exit_with_parent() -> None:
    """Linux: get SIGTERM when the process that started us dies, so no worker outlives its cluster."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: the serve loop's parent check still ends us within a second


@app.command()
def serve(
    listen: str = typer.Option(..., help="Address to serve on: ipc:///path/worker.sock or tcp://HOST:PORT"),
    threads: int = typer.Option(1, min=1, help="torch threads for expert compute"),
    model: Path | None = typer.Option(None, help="This host's copy of the checkpoint (remote workers)"),
    cpus: str = typer.Option("", help="Pin to these cpus, e.g. 0-7,16-23"),
    numa_node: int | None = typer.Option(None, help="Allocate this worker's memory (its shard) on this NUMA node"),
    token_file: Path | None = typer.Option(None, help="File holding the cluster token required in the handshake"),
    parent_pid: int | None = typer.Option(None, help="Exit with its cluster, or when this process (the launcher) is "
                                          "gone. Without it: serve one cluster after another until stopped"),
    name: str = typer.Option("worker", help="Name used in logs"),
) -> None:
    from fiddler_moe.expert_worker.server import Worker, WorkerConfig

    try:
        token = read_token(token_file)
    except ValueError as e:
        raise _fail(str(e)) from None
    _check_listen(listen, token)
    quiet = os.environ.get("FIDDLER_WORKER_QUIET") == "1"
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    if cpus:
        os.sched_setaffinity(0, parse_cpu_list(cpus))
    if numa_node is not None and not bind_memory_to_node(numa_node):
        logging.getLogger("fiddler.worker").warning(
            "%s: could not bind memory to node %d; relying on first touch from its cpus", name, numa_node)
    import torch

    torch.set_num_threads(threads)
    if parent_pid:
        _exit_with_parent()
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            raise typer.Exit(1)
    # SIGTERM/SIGINT: leave the serve loop through its finally, which removes the socket file. Later signals
    # are ignored so that a second one cannot interrupt that cleanup.
    def leave(*_):
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        sys.exit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, leave)
    try:
        Worker(WorkerConfig(listen=listen, threads=threads, model_dir=model, token=token, parent_pid=parent_pid,
                            name=name)).serve()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    else:
        code = 0
    # The serve loop's `finally` has closed the socket and the shared memory; the interpreter's own shutdown with
    # torch loaded would add a second or more before the process is gone, which a relaunch or a test waits for.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
