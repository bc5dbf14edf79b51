"""The expert worker's serve loop: load the shard it is told to own, then compute experts for routed rows.

It knows nothing of attention, tokenizers or the model as a whole: it sees (layer, expert) weights and rows of
activations. Anything it cannot decode or serve gets an Error reply; the loop itself keeps going.

It serves one cluster at a time: the coordinator whose Hello it accepted, until that one sends Shutdown or its
connection closes. A worker started by a launcher (with a parent pid) then exits with its cluster; one started by
hand (`fiddler-worker --listen`, another machine's worker) forgets that cluster and waits for the next, keeping
its shard in case the next one asks for the same.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fiddler_moe.native import kernels
from fiddler_moe.experts.checkpoint import CheckpointError, fingerprint
from fiddler_moe.experts import quant
from fiddler_moe.experts.compute import ExpertKernel, ExpertWeights
from fiddler_moe.experts.quantized_shard import load_quantized_shard
from fiddler_moe.experts.shard import SharedMemoryUnavailable, SharedShard, load_shard, load_shard_shared
from fiddler_moe.native.shm_serve import ShmServeLoop
from fiddler_moe.host import memory
from fiddler_moe.host.numa import available_memory_bytes
from fiddler_moe.protocol import messages as m
from fiddler_moe.protocol.shm import ShmChannel
from fiddler_moe.protocol.transport import Server
from fiddler_moe.protocol.wire import ProtocolError, decode, encode_header

log = logging.getLogger("fiddler.worker")

# How long a Hello from a new coordinator waits for the served one's connection to be seen closed: a relaunch or a
# reconnection opens the new connection right after closing the old, and the two events may arrive in either order.
SESSION_HANDOVER_S = 0.5
# At most this many rows in a request: a decoding step's (8 streams of a top-8 model), after which a worker that
# takes turns watches for the next layer's request a while (AttachShm.turn_spin_s) instead of sleeping at once.
DECODE_ROWS = 64


@dataclass
class WorkerConfig:
    listen: str
    threads: int = 1
    model_dir: Path | None = None  # a host's own checkpoint copy; local workers get it in LoadShard
    token: str = ""  # required in Hello when set (remote workers)
    parent_pid: int | None = None  # exit with this process (the launcher) or its cluster; None: serve many clusters
    name: str = "worker"

    @property
    def serves_many(self) -> bool:
        return self.parent_pid is None


@dataclass
class Session:
    """The cluster being served: its coordinator's socket identity, and the connection it came on."""

    peer: bytes
    connection: int | None
    address: str = ""  # the coordinator's network address (tcp), for logs and refusals

    @property
    def where(self) -> str:
        return f" (from {self.address})" if self.address else ""


def _shard_key(folder: Path, msg: m.LoadShard) -> tuple:
    """What makes a loaded shard the one asked for: the checkpoint folder, fingerprint (names, dtypes, shapes) and
    the files' sizes and times (the fingerprint does not see weights copied over with the same shapes), the
    kernel, the experts and the format they are held in."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors"))
    return (str(folder.resolve()), msg.fingerprint, files, msg.kernel, msg.experts, msg.quantize)


class RequestError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Worker:
    def __init__(self, config: WorkerConfig):
        self.config = config
        self.shard: dict[tuple[int, int], ExpertWeights | quant.QuantizedExpertWeights] = {}
        self.shared: SharedShard | None = None  # the shard's shared-memory file, when LoadShard.shared asked for it
        self.kernel: ExpertKernel | None = None
        self.shard_key: tuple | None = None  # _shard_key of the loaded shard, for a later cluster asking the same
        self.session: Session | None = None
        self.authenticated: set[bytes] = set()
        self.channel: ShmChannel | None = None
        self.serve_loop: ShmServeLoop | None = None  # decoding requests served in C; rebuilt with shard or channel
        self.running = True

    # --- handlers: each returns the reply message ---

    def on_hello(self, peer: bytes, msg: m.Hello) -> m.Message:
        if self.config.token and not hmac.compare_digest(msg.token.encode(), self.config.token.encode()):
            raise RequestError("unauthorized", "wrong or missing cluster token; start the cluster with the "
                               "worker's token in --token-file FILE or FIDDLER_TOKEN")
        self.authenticated.add(peer)
        cpus = sorted(os.sched_getaffinity(0))
        return m.HelloReply(m.PROTOCOL_VERSION, os.getpid(), torch.get_num_threads(), cpus, available_memory_bytes() or 0)

    def on_load_shard(self, peer: bytes, msg: m.LoadShard) -> m.Message:
        folder = Path(msg.model_dir) if msg.model_dir else self.config.model_dir
        if folder is None:
            raise RequestError("no_model", "this worker has no checkpoint folder; start it with --model PATH")
        try:
            has_config = (folder / "config.json").is_file()
        except OSError as e:  # e.g. a name too long for the file system
            raise RequestError("no_model", f"cannot read the checkpoint folder: {e.strerror}") from None
        if not has_config:
            raise RequestError("no_model", f"{folder} has no config.json; point --model at the checkpoint folder")
        started = time.perf_counter()
        try:
            if fingerprint(folder) != msg.fingerprint:
                raise RequestError(
                    "fingerprint_mismatch",
                    f"checkpoint at {folder} differs from the coordinator's; copy the same checkpoint to this host",
                )
            key = _shard_key(folder, msg)
            if not msg.shared and self.shared is None and self.kernel is not None and key == self.shard_key:
                return self._reuse_shard(started, msg.quantize)
            kernel = ExpertKernel(msg.kernel)
            quant.check_format(msg.quantize)
            self._drop_shard()  # before loading the new one, so that the two are never in memory together
            note, cache = "", ""
            if msg.quantize != "none":  # in shared memory when asked: the coordinator moves the quantized bytes
                args = (folder, msg.fingerprint, msg.experts, msg.quantize, msg.kernel.dtype, msg.kernel.is_transposed,
                        self.config.name)
                try:
                    self.shard, from_cache, _, self.shared = load_quantized_shard(*args, shared=msg.shared)
                except SharedMemoryUnavailable as e:
                    note = f"{self.config.name} keeps its shard in private memory: {e}"
                    log.warning("%s", note)
                    self.shard, from_cache, _, _ = load_quantized_shard(*args)
                cache = "hit" if from_cache else "written"
            elif msg.shared:
                try:
                    self.shard, self.shared = load_shard_shared(folder, msg.experts, msg.kernel.dtype)
                except SharedMemoryUnavailable as e:
                    note = f"{self.config.name} keeps its shard in private memory: {e}"
                    log.warning("%s", note)
            if self.shared is None and msg.quantize == "none":
                self.shard = load_shard(folder, msg.experts, msg.kernel.dtype)
        except (CheckpointError, ValueError, ProtocolError, OSError) as e:
            raise RequestError("load_failed", str(e)) from None
        self.kernel = kernel
        self.shard_key = key
        self._build_serve_loop()
        memory.return_freed_memory()  # the loading's temporaries: resident memory is the shard, not more
        nbytes = sum(w.nbytes for w in self.shard.values())
        memory.map_large_allocations_apart(memory.large_allocation(nbytes))  # and a prefill's, once it is done
        seconds = time.perf_counter() - started
        where = " in shared memory" if self.shared is not None else ""
        if any(source.gate_up_scales or source.down_scales for source in msg.experts):
            where += f", dequantized from the checkpoint's MXFP4 to {msg.kernel.dtype}"
        if cache:
            where = (f" in {msg.quantize}, " + ("read from the cache" if cache == "hit" else "quantized and cached")
                     + (", in shared memory" if self.shared is not None else ""))
        log.info("%s: loaded %d experts (%.1f MiB)%s in %.2fs", self.config.name, len(self.shard), nbytes / 2**20,
                 where, seconds)
        if self.shared is None:
            return m.Ready(len(self.shard), nbytes, seconds, shared_note=note, quantize_cache=cache)
        return m.Ready(len(self.shard), nbytes, seconds, shared_path=self.shared.path, shared_bytes=self.shared.size,
                       shared_tensors=self.shared.tensors, quantize_cache=cache)

    def _reuse_shard(self, started: float, quantize: str) -> m.Message:
        """The shard asked for is the one in memory, kept from an earlier cluster: ready without reading it."""
        if self.serve_loop is None:
            self._build_serve_loop()
        nbytes = sum(w.nbytes for w in self.shard.values())
        log.info("%s: kept its shard of %d experts (%.1f MiB) from the last cluster; nothing to read",
                 self.config.name, len(self.shard), nbytes / 2**20)
        return m.Ready(len(self.shard), nbytes, time.perf_counter() - started,
                       quantize_cache="kept" if quantize != "none" else "")

    def _build_serve_loop(self) -> None:
        if self.channel is not None and self.kernel is not None:
            self.serve_loop = ShmServeLoop.build(self.channel, self.shard, self.kernel)

    def _drop_shard(self) -> None:
        self.serve_loop = None  # it points into the shard
        self.shard = {}
        self.kernel = None
        self.shard_key = None
        if self.shared is not None:  # the coordinator has normally unlinked its name already
            self.shared.close()
            self.shared = None

    def on_expert_request(self, peer: bytes, msg: m.ExpertRequest) -> m.Message:
        started = time.perf_counter()
        out = torch.empty_like(msg.rows)
        self.compute(msg, out)
        return m.ExpertReply(msg.request_id, msg.layer, out, time.perf_counter() - started)

    def compute(self, msg: m.ExpertRequest, out: torch.Tensor) -> None:
        """Each expert's output rows into `out` (shaped and typed as msg.rows), in request order."""
        if self.kernel is None:
            raise RequestError("not_loaded", "no shard loaded yet; send load_shard first")
        rows = msg.rows
        if rows.dim() != 2 or len(msg.expert_ids) != len(msg.row_counts) or sum(msg.row_counts) != rows.shape[0]:
            raise RequestError("bad_request", "rows must be 2-D and row_counts must sum to its number of rows")
        offset = 0
        for expert, count in zip(msg.expert_ids, msg.row_counts):
            weights = self.shard.get((msg.layer, expert))
            if weights is None:
                raise RequestError("not_owned", f"layer {msg.layer} expert {expert} is not in this worker's shard")
            if isinstance(weights, quant.QuantizedExpertWeights):
                hidden = weights.hidden
            else:
                hidden = weights.down.shape[1] if self.kernel.spec.is_transposed else weights.down.shape[0]
            if rows.shape[1] != hidden or count < 0:
                raise RequestError("bad_request", f"rows have width {rows.shape[1]}, experts expect {hidden}")
            self.kernel.forward(weights, rows[offset : offset + count], out[offset : offset + count])
            offset += count

    def on_echo(self, peer: bytes, msg: m.Echo) -> m.Message:
        return m.ExpertReply(msg.request_id, -1, msg.rows.clone(), 0.0)

    def on_attach_shm(self, peer: bytes, msg: m.AttachShm) -> m.Message:
        try:
            channel = ShmChannel.attach(msg.path, msg.capacity)
        except (OSError, ValueError) as e:
            raise RequestError("shm_failed", f"cannot map {msg.path}: {e}") from None
        channel.turn_spin_s = min(max(msg.turn_spin_s, 0.0), 0.1)  # a watch, never a busy loop of seconds
        self.serve_loop = None  # it points into the old channel
        if self.channel is not None:
            self.channel.close()
        kernels.set_waiting(channel, msg.spin)
        self.channel = channel
        self._build_serve_loop()
        return m.Pong(os.getpid())

    def serve_shm_request(self, seq: int, frames: list) -> None:
        """One request from the shared-memory slot; the reply goes back through the slot."""
        channel = self.channel
        started = time.perf_counter()
        try:
            msg = decode(frames, channel.request_view)
            if not isinstance(msg, m.ExpertRequest | m.Echo):
                raise RequestError("unexpected", f"only expert requests travel through shared memory, not {msg.KIND}")
            if not channel.fits(msg.rows.numel() * msg.rows.element_size()):
                raise RequestError("too_large", "reply does not fit the shared-memory slot")
            view = channel.reply_view(msg.rows.dtype, tuple(msg.rows.shape))
            if isinstance(msg, m.ExpertRequest):
                self.compute(msg, view)
            else:
                view.copy_(msg.rows)
            layer = msg.layer if isinstance(msg, m.ExpertRequest) else -1
            reply: m.Message = m.ExpertReply(msg.request_id, layer, view, time.perf_counter() - started)
            data_bytes = view.numel() * view.element_size()
        except (ProtocolError, RequestError) as e:
            log.warning("%s: refused a request: %s", self.config.name, e)
            reply, data_bytes = m.Error(code=e.code, message=str(e)), 0
        except Exception as e:
            log.exception("%s: request failed", self.config.name)
            reply, data_bytes = m.Error(code="internal", message=f"{type(e).__name__}: {e}"), 0
        # A decoding step's request (few rows): the next layer's follows soon (protocol/shm.py's watch_next)
        channel.watch_next = isinstance(reply, m.ExpertReply) and 0 < reply.outputs.shape[0] <= DECODE_ROWS
        channel.post_reply(seq, encode_header(reply), data_bytes)

    def on_ping(self, peer: bytes, msg: m.Ping) -> m.Message:
        return m.Pong(os.getpid())

    def on_shutdown(self, peer: bytes, msg: m.Shutdown) -> m.Message:
        if self.config.serves_many:
            self.end_session("its cluster stopped")
        else:
            self.running = False
        return m.Pong(os.getpid())

    # --- one cluster at a time ---

    def begin_session(self, peer: bytes, connection: int | None, address: str) -> None:
        if self.session is None or self.session.peer != peer:
            self.session = Session(peer, connection, address)
            log.info("%s: serving a cluster%s", self.config.name, self.session.where)

    def end_session(self, why: str) -> None:
        """Forget the cluster served: who it was and its shared-memory slots. A private shard stays for the next
        cluster, which may ask for the same; a shared one goes, since its coordinator held the other mapping."""
        self.session = None
        self.authenticated.clear()
        self.serve_loop = None  # it points into the channel
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.shared is not None:
            self._drop_shard()
        log.info("%s: %s; waiting for the next cluster", self.config.name, why)

    def _check_session(self, peer: bytes, msg: m.Message, server: Server | None) -> None:
        """Refuse a peer other than the served cluster's coordinator. A Hello from a new coordinator may come just
        before the old one's closed connection is seen (a relaunch, a reconnection): look once more first."""
        session = self.session
        if session is None or peer == session.peer:
            return
        if isinstance(msg, m.Hello) and server is not None:
            deadline = time.monotonic() + SESSION_HANDOVER_S
            while server.connection_open(session.connection) and time.monotonic() < deadline:
                time.sleep(0.01)
            if not server.connection_open(session.connection):
                self.end_session(f"its cluster's coordinator{session.where} is gone")
                return
        raise RequestError("busy", f"this worker serves another cluster{session.where}; stop that cluster first, "
                           "or start another `fiddler-worker --listen` on another port for this one")

    HANDLERS = {
        m.Hello: on_hello,
        m.LoadShard: on_load_shard,
        m.ExpertRequest: on_expert_request,
        m.AttachShm: on_attach_shm,
        m.Echo: on_echo,
        m.Ping: on_ping,
        m.Shutdown: on_shutdown,
    }

    def handle(self, peer: bytes, frames: list, server: Server | None = None, connection: int | None = None,
               address: str = "") -> m.Message:
        """The reply to one request; `server` (watching its connections) and where the request came from, to
        tell one cluster from another."""
        request_id = -1
        try:
            msg = decode(frames)
            request_id = getattr(msg, "request_id", -1)
            handler = self.HANDLERS.get(type(msg))
            if handler is None:
                raise RequestError("unexpected", f"a worker does not accept {msg.KIND!r} messages")
            self._check_session(peer, msg, server)
            if self.config.token and not isinstance(msg, m.Hello) and peer not in self.authenticated:
                raise RequestError("unauthorized", "send hello with the cluster token first")
            reply = handler(self, peer, msg)
            if isinstance(reply, m.HelloReply):
                self.begin_session(peer, connection, address)
            return reply
        except (ProtocolError, RequestError) as e:
            log.warning("%s: refused a request: %s", self.config.name, e)
            return m.Error(code=e.code, message=str(e), request_id=request_id)
        except Exception as e:  # a bug must not kill the worker: report it to the asker
            log.exception("%s: request failed", self.config.name)
            return m.Error(code="internal", message=f"{type(e).__name__}: {e}", request_id=request_id)

    def serve(self) -> None:
        serves_many = self.config.serves_many
        server = Server(self.config.listen, watch_connections=serves_many)
        log.info("%s: listening on %s (pid %d, %d threads)%s", self.config.name, server.address, os.getpid(),
                 torch.get_num_threads(), "; serves one cluster at a time until stopped" if serves_many else "")
        try:
            while self.running:
                if self.channel is not None:
                    # Expert requests ring the shared-memory doorbell; control messages still come over ZeroMQ.
                    # Decoding requests are served in C as they come; the loop returns for anything else.
                    if self.serve_loop is not None:
                        self.serve_loop.serve(timeout_s=0.5)
                    request = self.channel.wait_request(timeout_s=0.5 if self.serve_loop is None else 0.0)
                    if request is not None:
                        self.serve_shm_request(*request)
                        envelope = server.receive(timeout_s=0)
                    else:  # the bell rang for a control message (which may still be in flight) or we timed out
                        envelope = server.receive(timeout_s=0.005)
                else:
                    envelope = server.receive(timeout_s=1.0)
                if envelope is None:
                    if self.config.parent_pid and os.getppid() != self.config.parent_pid:
                        log.warning("%s: coordinator (pid %d) is gone; exiting", self.config.name,
                                    self.config.parent_pid)
                        break
                    if serves_many:
                        # Asked on every idle tick, with a session or without, so that the connection events are read
                        # before they can pile up past the monitor's queue.
                        session = self.session
                        connected = server.connection_open(session.connection if session else None)
                        if session is not None and not connected:
                            self.end_session(f"its cluster's coordinator{session.where} is gone")
                    continue
                try:
                    reply = self.handle(envelope.identity, envelope.frames, server if serves_many else None,
                                        envelope.connection, envelope.peer_address)
                    server.reply(envelope.identity, reply)
                except Exception:  # handle() answers every error; this covers the reply itself failing
                    log.exception("%s: could not answer a request; serving on", self.config.name)
        finally:
            self.serve_loop = None
            if self.channel is not None:
                self.channel.close()
            if self.shared is not None:  # the coordinator unlinks it once mapped; this covers it never doing so
                self.shared.unlink()
            server.close()
