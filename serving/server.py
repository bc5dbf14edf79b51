"""Where the HTTP API listens, with which key, and the uvicorn server that runs it on a thread of its own.

    options = HttpOptions.parse("0.0.0.0:8000", api_key_file=Path("key.txt"))   # checked before anything starts
    listener = options.bind()                                                  # the port is taken now, or never
    server = HttpServer(make_app(served, options.api_key), listener)
    server.start(); ...; server.stop()

`--http PORT` or `--http :PORT` listens on 127.0.0.1; anything but loopback needs an API key (`--api-key`,
`--api-key-file` or $FIDDLER_API_KEY), as `fiddler-worker --listen` needs a token.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from fiddler_moe.launch.options import read_secret_file

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def parse_address(text: str) -> tuple[str, int]:
    """"HOST:PORT", ":PORT", "PORT" or "[V6]:PORT" as (host, port); a missing host is 127.0.0.1."""
    text = text.strip()
    host, port = "127.0.0.1", text
    if text.startswith("["):  # [::1]:8000
        inside, _, rest = text[1:].partition("]")
        host, port = inside, rest.removeprefix(":")
    elif ":" in text:
        host, port = text.rsplit(":", 1)
        host = host or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--http {text}: give HOST:PORT, :PORT or PORT with a port from 0 to 65535, "
                         "e.g. --http 127.0.0.1:8000")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def read_api_key(api_key: str | None, api_key_file: Path | None) -> str | None:
    """The key from --api-key, else --api-key-file, else $FIDDLER_API_KEY; None if none is given."""
    if api_key is not None and api_key_file is not None:
        raise ValueError("give --api-key or --api-key-file, not both")
    if api_key is not None:
        if not api_key.strip():
            raise ValueError("--api-key is empty; give a key, or leave the flag out to serve loopback only")
        return api_key.strip()
    if api_key_file is not None:
        return read_secret_file(api_key_file, "--api-key-file", "the API key")
    return os.environ.get("FIDDLER_API_KEY", "").strip() or None


@dataclass
class HttpOptions:
    host: str
    port: int
    api_key: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, address: str, api_key: str | None = None, api_key_file: Path | None = None) -> HttpOptions:
        """Checks everything, raising ValueError with the fix: a non-loopback address without a key is refused."""
        host, port = parse_address(address)
        key = read_api_key(api_key, api_key_file)
        if not is_loopback(host) and not key:
            raise ValueError(f"--http {address} listens beyond this machine without an API key; give --api-key-file "
                             "(or --api-key, or FIDDLER_API_KEY), or listen on 127.0.0.1")
        return cls(host, port, key)

    def bind(self) -> socket.socket:
        """The listening socket, taken now so that a port in use fails the launch before anything starts."""
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise ValueError(f"--http {self.host}:{self.port}: cannot resolve {self.host!r} ({e.strerror})") from None
        family, _, _, _, address = infos[0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(address)
            listener.listen(128)
        except OSError as e:
            listener.close()
            raise ValueError(f"--http {self.host}:{self.port}: cannot listen there ({e.strerror}); pick another port "
                             "or stop what holds it") from None
        listener.set_inheritable(True)
        return listener


def url_of(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class HttpServer:
    """uvicorn serving an app on a listening socket, on a thread of its own (the launcher's main thread serves
    the ZeroMQ prompt endpoint and takes Ctrl-C)."""

    def __init__(self, app, listener: socket.socket, graceful_s: float = 2.0):
        self.app, self.listener = app, listener
        self.url = url_of(listener)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=graceful_s)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listener]}, daemon=True,
                                       name="http")

    def start(self, timeout_s: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the HTTP server at {self.url} stopped while starting (see the log above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server at {self.url} did not start within {timeout_s:.0f}s")
            time.sleep(0.01)

    def stop(self, timeout_s: float = 5.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout_s)
        self.listener.close()
