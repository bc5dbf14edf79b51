"""ZeroMQ transport: how encoded messages move between processes (ipc:// on one host, tcp:// across hosts).

A worker binds a ROUTER socket and answers whoever asks; the coordinator holds one DEALER per worker, so it can
send to every worker before reading any reply. Sends hand ZeroMQ the tensor memory without a copy; receives keep
the frames as zero-copy buffers that `protocol.wire.decode` wraps as tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from fiddler_moe.protocol.messages import Message
from fiddler_moe.protocol.wire import decode, encode

# A received frame above this size is dropped by ZeroMQ itself, before we allocate for it.
MAX_MESSAGE_BYTES = 4 << 30


def ipc_path(address: str) -> str | None:
    return address[len("ipc://") :] if address.startswith("ipc://") else None


def check_address(address: str) -> str:
    if not (address.startswith("ipc://") or address.startswith("tcp://")):
        raise ValueError(f"address {address!r} must start with ipc:// (same host) or tcp:// (host:port)")
    return address


@dataclass
class Envelope:
    """A request as the serving side sees it: who sent it and its raw frames; with a server that watches its
    connections, also the connection it came on and the sender's network address (tcp only)."""

    identity: bytes
    frames: list[zmq.Frame]
    connection: int | None = None
    peer_address: str = ""


def _heartbeat(socket: zmq.Socket) -> None:
    """Across hosts there is no process to poll: ZeroMQ heartbeats drop a silent peer's connection within
    HEARTBEAT_TIMEOUT (its host lost power or its network), even while this side is busy computing."""
    socket.setsockopt(zmq.HEARTBEAT_IVL, 1000)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
    socket.setsockopt(zmq.HEARTBEAT_TTL, 6000)


class Server:
    """The serving end (worker, coordinator service): ROUTER bound to one address.

    watch_connections: keep track of which connections are open, so that the server can tell when the peer it
    serves has gone (`connection_open`). A ROUTER socket hides its connections; the socket monitor reports each
    one opened or closed by its file descriptor, and each received message carries the descriptor it came on
    (ZMQ_SRCFD, deprecated in libzmq but present through 4.3; where it is missing, `connection` is None).
    """

    def __init__(self, address: str, context: zmq.Context | None = None, max_message_bytes: int | None = None,
                 watch_connections: bool = False):
        self.address = check_address(address)
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        # larger messages are dropped unread
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_message_bytes or MAX_MESSAGE_BYTES)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a vanished client must not block a reply
        if address.startswith("tcp://"):
            _heartbeat(self.socket)
        self._monitor = None
        self._open: set[int] = set()  # file descriptors of the open connections, when watched
        if watch_connections:
            self._monitor = self.socket.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        path = ipc_path(address)
        if path:
            # A stale file from a crashed run would make bind fail; only our own private folder holds these.
            if os.path.exists(path):
                os.unlink(path)
        self.socket.bind(address)
        if self.address.startswith("tcp://") and self.address.endswith(":0"):
            self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def receive(self, timeout_s: float | None) -> Envelope | None:
        if not self.socket.poll(None if timeout_s is None else int(timeout_s * 1000)):
            return None
        parts = self.socket.recv_multipart(copy=False)
        envelope = Envelope(identity=parts[0].bytes, frames=parts[1:])
        if self._monitor is not None:
            try:
                envelope.connection = parts[0].get(zmq.SRCFD)
            except (zmq.ZMQError, AttributeError):
                pass
            try:
                envelope.peer_address = parts[0].get("Peer-Address")
            except zmq.ZMQError:  # ipc connections have no network address
                pass
        return envelope

    def connection_open(self, connection: int | None) -> bool:
        """Whether that connection (an Envelope's) is still open; for None (the descriptor was not known), whether
        any is. Only for a server made with watch_connections."""
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._open.add(event["value"])
            else:
                self._open.discard(event["value"])
        return connection in self._open if connection is not None else bool(self._open)

    def reply(self, identity: bytes, message: Message) -> None:
        self.socket.send_multipart([identity, *encode(message)], copy=False)

    def close(self) -> None:
        if self._monitor is not None:
            self.socket.disable_monitor()
            self._monitor.close(linger=0)
        self.socket.close(linger=0)
        path = ipc_path(self.address)
        if path and os.path.exists(path):
            os.unlink(path)


class Client:
    """The asking end: a DEALER connected to one server; many may be outstanding at once."""

    def __init__(self, address: str, context: zmq.Context | None = None):
        self.address = check_address(address)
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._monitor = None
        self._connected = True
        self.ever_connected = False  # tcp: whether a connection was made at all (ipc: not watched, False)
        if address.startswith("tcp://"):
            # The heartbeats drop a silent peer's connection, and the monitor tells us.
            _heartbeat(self.socket)
            self._monitor = self.socket.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.socket.connect(address)

    def peer_alive(self) -> bool:
        """False once the connection to a tcp peer was lost (and not made again); always True for ipc. Before any
        connection was made it is True too: ZeroMQ keeps trying, and `ever_connected` tells the two apart."""
        if self._monitor is None:
            return True
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            self._connected = event["event"] == zmq.EVENT_CONNECTED
            self.ever_connected = self.ever_connected or self._connected
        return self._connected

    def send(self, message: Message) -> None:
        self.socket.send_multipart(encode(message), copy=False)

    def send_frames(self, frames: list) -> None:
        """Raw frames, for tests that speak a broken protocol on purpose."""
        self.socket.send_multipart(frames)

    def receive(self, timeout_s: float | None) -> Message | None:
        """The next message, or None when nothing arrived within timeout_s."""
        if not self.socket.poll(None if timeout_s is None else int(timeout_s * 1000)):
            return None
        return decode(self.socket.recv_multipart(copy=False))

    def close(self) -> None:
        if self._monitor is not None:
            self.socket.disable_monitor()
            self._monitor.close(linger=0)
        self.socket.close(linger=0)


def readable(clients: list[Client], timeout_s: float) -> list[Client]:
    """Those of `clients` with a message waiting, after waiting up to timeout_s for the first."""
    poller = zmq.Poller()
    for client in clients:
        poller.register(client.socket, zmq.POLLIN)
    ready = dict(poller.poll(int(timeout_s * 1000)))
    return [client for client in clients if client.socket in ready]
