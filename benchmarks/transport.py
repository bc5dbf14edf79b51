"""`fiddler bench transport`: round-trip latency and throughput of each way activations can travel.

The first row, "wake (doorbell)", is two processes waking each other through the shared-memory futex with no
message: the cost of waking a process, the floor under every transport.

Per decode token the coordinator makes one round trip to the workers per MoE layer, so the transport's latency,
not its bandwidth, sets our overhead. This measures, side by side in one run, a real worker process echoing rows
back over shared memory, ZeroMQ ipc and ZeroMQ tcp (loopback), for one decode row and a 512-row prefill batch at
the hidden sizes of Mixtral (4096) and DeepSeek-V3 (7168) in bfloat16, with the in-process copy of the same bytes
(there and back) as the floor.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from fiddler_moe.protocol import messages as m
from fiddler_moe.protocol.shm import ShmChannel, available
from fiddler_moe.protocol.transport import Client
from fiddler_moe.protocol.wire import decode, encode_header


@dataclass
class TransportResult:
    transport: str
    rows: int
    hidden: int
    median_us: float
    p99_us: float
    gbytes_per_s: float  # payload bytes moved (there and back) per second


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _measure(name: str, rows: torch.Tensor, round_trip: Callable[[], None], iterations: int) -> TransportResult:
    for _ in range(max(10, iterations // 2)):  # warm-up: the first round trips of a fresh worker are slow
        round_trip()
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        round_trip()
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    nbytes = 2 * rows.numel() * rows.element_size()
    return TransportResult(name, rows.shape[0], rows.shape[1], median * 1e6, _percentile(times, 0.99) * 1e6,
                           nbytes / median / 1e9)


def _spawn_worker(address: str) -> subprocess.Popen:
    env = dict(os.environ, FIDDLER_WORKER_QUIET="1")
    return subprocess.Popen([sys.executable, "-m", "fiddler_moe.cli.worker", "--listen", address, "--parent-pid",
                             str(os.getpid())], env=env)


def _wait_hello(client: Client) -> None:
    client.send(m.Hello(m.PROTOCOL_VERSION))
    reply = client.receive(timeout_s=60)
    if not isinstance(reply, m.HelloReply):
        raise RuntimeError(f"benchmark worker at {client.address} did not start: {reply}")


def _zmq_round_trip(client: Client, rows: torch.Tensor) -> Callable[[], None]:
    def round_trip():
        client.send(m.Echo(1, rows))
        reply = client.receive(timeout_s=30)
        if not isinstance(reply, m.ExpertReply):
            raise RuntimeError(f"echo failed: {reply}")
        rows.copy_(reply.outputs)  # the coordinator copies every reply into its output buffer

    return round_trip


def _shm_round_trip(channel: ShmChannel, rows: torch.Tensor) -> Callable[[], None]:
    shape = tuple(rows.shape)

    def round_trip():
        view = channel.request_view(rows.dtype, shape)
        view.copy_(rows)
        seq = channel.post_request(encode_header(m.Echo(1, view)), view.numel() * view.element_size())
        frames = channel.wait_reply(seq, timeout_s=30)
        reply = decode(frames)
        rows.copy_(reply.outputs)

    return round_trip


_DOORBELL_ECHO = """
import sys
from fiddler_moe.protocol.shm import ShmChannel
channel = ShmChannel.attach(sys.argv[1], int(sys.argv[2]))
while True:
    request = channel.wait_request(timeout_s=5.0)
    if request is None:
        break
    channel.post_reply(request[0], b"", 0)
"""


def _doorbell_round_trip(channel: ShmChannel) -> Callable[[], None]:
    """Wake another process and be woken back, with no message at all: the floor under any transport."""

    def round_trip():
        seq = channel.post_request(b"", 0)
        if channel.wait_reply(seq, timeout_s=30) is None:
            raise RuntimeError("the doorbell echo process did not answer")

    return round_trip


def _copy_round_trip(rows: torch.Tensor) -> Callable[[], None]:
    buffer = torch.empty_like(rows)

    def round_trip():
        buffer.copy_(rows)
        rows.copy_(buffer)

    return round_trip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(row_counts=(1, 512), hidden_sizes=(4096, 7168), dtype=torch.bfloat16, iterations=300) -> list[TransportResult]:
    largest = max(row_counts) * max(hidden_sizes) * torch.empty((), dtype=dtype).element_size()
    results: list[TransportResult] = []
    with tempfile.TemporaryDirectory(prefix="fiddler-bench-") as folder:
        os.chmod(folder, 0o700)
        # one worker per transport, so that each is measured as a cluster would use it
        addresses = {"shm": f"ipc://{folder}/shm.sock", "zmq-ipc": f"ipc://{folder}/zmq.sock",
                     "zmq-tcp": f"tcp://127.0.0.1:{_free_port()}"}
        workers = [_spawn_worker(address) for address in addresses.values()]
        clients = {name: Client(address) for name, address in addresses.items()}
        channel = None
        try:
            for client in clients.values():
                _wait_hello(client)
            if available():
                channel = ShmChannel.create(largest)
                clients["shm"].send(m.AttachShm(channel.path, largest))
                if not isinstance(clients["shm"].receive(timeout_s=30), m.Pong):
                    raise RuntimeError("the benchmark worker could not map the shared-memory slot")
                channel.unlink()
            if channel is not None:
                bell = ShmChannel.create(4096)
                echo = subprocess.Popen([sys.executable, "-c", _DOORBELL_ECHO, bell.path, "4096"])
                try:
                    deadline = time.monotonic() + 60
                    while bell.wait_reply(bell.post_request(b"", 0), timeout_s=0.5) is None:  # until it attached
                        if time.monotonic() > deadline or echo.poll() is not None:
                            raise RuntimeError("the doorbell echo process did not start")
                    results.append(_measure("wake (doorbell)", torch.empty(0, 0), _doorbell_round_trip(bell),
                                            iterations))
                finally:
                    echo.terminate()
                    echo.wait(timeout=10)
                    bell.close()
            for hidden in hidden_sizes:
                for count in row_counts:
                    rows = torch.randn(count, hidden).to(dtype)
                    n = iterations if count == 1 else max(20, iterations // 5)
                    results.append(_measure("in-process copy", rows, _copy_round_trip(rows), n))
                    if channel is not None:
                        results.append(_measure("shared memory", rows, _shm_round_trip(channel, rows), n))
                    results.append(_measure("zeromq ipc", rows, _zmq_round_trip(clients["zmq-ipc"], rows), n))
                    results.append(_measure("zeromq tcp", rows, _zmq_round_trip(clients["zmq-tcp"], rows), n))
        finally:
            for client in clients.values():
                client.close()
            if channel is not None:
                channel.close()
            for proc in workers:
                proc.terminate()
            for proc in workers:
                proc.wait(timeout=10)
    return results


def table(results: list[TransportResult]) -> str:
    lines = [f"{'transport':<16} {'rows':>5} {'hidden':>6} {'median us':>10} {'p99 us':>9} {'GB/s':>7}"]
    for r in results:
        lines.append(f"{r.transport:<16} {r.rows:>5} {r.hidden:>6} {r.median_us:>10.1f} {r.p99_us:>9.1f} "
                     f"{r.gbytes_per_s:>7.2f}")
    return "\n".join(lines)


def as_dicts(results: list[TransportResult]) -> list[dict]:
    return [asdict(r) for r in results]
