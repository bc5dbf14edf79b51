"""Shared-memory transport between the coordinator and a worker on the same host.

Per worker one shared-memory file holds a request slot and a reply slot, each a metadata area (the msgpack header
of an ExpertRequest / ExpertReply, exactly as `protocol.wire` encodes it) and a data area sized for the largest
batch at the model's hidden size. The coordinator writes routed rows straight into the request data area and the
worker reads them as a tensor without a copy; the reply travels back the same way.

Doorbells are 32-bit sequence numbers in the file's first cache lines. The writer fills the slot, then bumps the
sequence and wakes the reader with a futex; the reader spins briefly on the sequence (a decode step's requests
come in quick succession) and then sleeps in futex_wait, so an idle worker burns no core. Spinning saves a wake-up
only where the waiter has a core to itself: where the coordinator and the workers take turns on the same cores
(CPU-only, every expert cold) the spinner takes the core the other side computes on, so `spin = False` there, and
both sides set `sleep` to a futex wait that sends their OpenMP threads to sleep too (native/kernels.py,
`parked_wait`).
A reply carries the sequence number of the request it answers and is published only after its data is written,
so it can neither be read early nor matched to the wrong request.

Decoding steps may be posted, served and answered by C code in both processes (native/shm_serve.c and
shm_call.c, through `slot_addresses`); they write and read the same headers and words as the methods here.

The file is unlinked as soon as both sides have mapped it: no name is left in /dev/shm even if every process is
killed. Futexes and the spin rely on x86-64's ordering of stores; elsewhere `available()` is False and the
ZeroMQ transport carries the data.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import secrets
import time
from collections.abc import Callable

import torch

SHM_DIR = "/dev/shm"
CONTROL_BYTES = 4096
META_BYTES = 64 * 1024  # a request header for 256 experts is ~2 KB
VIEW_CACHE_SIZE = 16

# control words, each on its own cache line. The bell counts everything the worker should wake for: a request
# in the slot, or a control message sent to it over ZeroMQ while it sleeps on the futex.
_REQ_SEQ, _REP_SEQ, _REQ_META, _REP_META, _REQ_DATA, _REP_DATA, _BELL = 0, 64, 128, 192, 256, 320, 384

_SYS_FUTEX = {"x86_64": 202}.get(platform.machine())
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_libc = ctypes.CDLL(None, use_errno=True)


class ShmTimeout(Exception):
    pass


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def available() -> bool:
    return _SYS_FUTEX is not None and os.path.isdir(SHM_DIR)


def _futex_wait(address: int, expected: int, timeout_s: float, watch_s: float = 0.0) -> None:
    """One futex wait on the word. No watch (`watch_s`): that needs the OpenMP helpers parked meanwhile, which
    native/kernels.py's parked_wait does where the library is built."""
    ts = _Timespec(int(timeout_s), int((timeout_s % 1) * 1e9))
    _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(address), _FUTEX_WAIT, ctypes.c_uint32(expected), ctypes.byref(ts),
                  None, 0)


def _futex_wake(address: int) -> None:
    _libc.syscall(_SYS_FUTEX, ctypes.c_void_p(address), _FUTEX_WAKE, 0x7FFFFFFF, None, None, 0)


def region_bytes(capacity: int) -> int:
    return CONTROL_BYTES + 2 * META_BYTES + 2 * capacity


class SlotAddresses(ctypes.Structure):  # lane_slots in native/fiddler_native.h
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "request_seq", "reply_seq", "request_meta_len", "reply_meta_len", "bell", "request_data_len",
        "reply_data_len", "request_meta", "reply_meta", "request_data", "reply_data")] + [
        ("meta_capacity", ctypes.c_uint64), ("data_capacity", ctypes.c_uint64)]


class ShmChannel:
    """One worker's request and reply slots. `capacity` is the data bytes of each slot."""

    def __init__(self, path: str, capacity: int, create: bool):
        self.path = path
        self.owner = create  # only the creator removes the name: a peer's message never makes us unlink a file
        self.capacity = capacity
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            size = region_bytes(capacity)
            if create:
                os.ftruncate(fd, size)
            elif os.fstat(fd).st_size != size:
                raise ValueError(f"shared-memory file {path} has the wrong size for capacity {capacity}")
            self.mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._words = {off: ctypes.c_uint32.from_buffer(self.mm, off) for off in (_REQ_SEQ, _REP_SEQ, _REQ_META,
                                                                                     _REP_META, _BELL)}
        self._sizes = {off: ctypes.c_uint64.from_buffer(self.mm, off) for off in (_REQ_DATA, _REP_DATA)}
        self._meta = {_REQ_META: CONTROL_BYTES, _REP_META: CONTROL_BYTES + META_BYTES}
        self._data = {_REQ_DATA: CONTROL_BYTES + 2 * META_BYTES, _REP_DATA: CONTROL_BYTES + 2 * META_BYTES + capacity}
        self.last_request_seq = self._words[_REQ_SEQ].value
        self._views: dict[tuple[int, torch.dtype, tuple[int, ...]], torch.Tensor] = {}
        self.spin = True  # whether waits spin before sleeping (see the module docstring)
        self.turn_spin_s = 0.0  # a worker's watch after a decoding step's request (messages.AttachShm)
        self.watch_next = False  # set by the worker: the request just answered was a decoding step's
        # (address, value while asleep, timeout_s, seconds to watch the word first where the sleep can)
        self.sleep: Callable[..., None] = _futex_wait

    @classmethod
    def create(cls, capacity: int, prefix: str = "fiddler") -> ShmChannel:
        path = os.path.join(SHM_DIR, f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}")
        return cls(path, capacity, create=True)

    @classmethod
    def attach(cls, path: str, capacity: int) -> ShmChannel:
        if not os.path.realpath(path).startswith(SHM_DIR + "/") or "fiddler" not in os.path.basename(path):
            raise ValueError(f"refusing to map {path!r}: not a fiddler shared-memory file")
        return cls(path, capacity, create=False)

    def unlink(self) -> None:
        """Drop the name; the mapping lives on in both processes until they close it."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        if self.owner:
            self.unlink()
        self._views.clear()
        self._words.clear()
        self._sizes.clear()
        try:
            self.mm.close()
        except BufferError:
            pass  # a tensor still views the mapping; it is released with the process

    # --- views ---

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.capacity

    def _view(self, area: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor over the start of a data area. Decoding asks for the same few shapes every layer, so views
        are kept (a handful: a prefill's shapes vary, and the cache is dropped when it grows)."""
        key = (area, dtype, shape)
        view = self._views.get(key)
        if view is not None:
            return view
        count = 1
        for d in shape:
            count *= d
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        if len(self._views) >= VIEW_CACHE_SIZE:
            self._views.clear()
        view = self._views[key] = torch.frombuffer(self.mm, dtype=dtype, count=count,
                                                   offset=self._data[area]).view(shape)
        return view

    def request_view(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return self._view(_REQ_DATA, dtype, shape)

    def reply_view(self, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return self._view(_REP_DATA, dtype, shape)

    def slot_addresses(self) -> SlotAddresses:
        """Where each control word and area lies in this process, for the C paths over the slot (the worker's
        shm_serve.c, the coordinator's shm_call.c). Valid while the channel is open."""
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))
        return SlotAddresses(
            request_seq=base + _REQ_SEQ, reply_seq=base + _REP_SEQ, request_meta_len=base + _REQ_META,
            reply_meta_len=base + _REP_META, bell=base + _BELL, request_data_len=base + _REQ_DATA,
            reply_data_len=base + _REP_DATA, request_meta=base + self._meta[_REQ_META],
            reply_meta=base + self._meta[_REP_META], request_data=base + self._data[_REQ_DATA],
            reply_data=base + self._data[_REP_DATA], meta_capacity=META_BYTES, data_capacity=self.capacity)

    # --- publishing and waiting ---

    def _publish(self, meta_word: int, data_word: int, seq_word: int, header: bytes, data_bytes: int,
                 seq: int, wake: bool) -> None:
        if len(header) > META_BYTES:
            raise ValueError(f"message header of {len(header)} bytes exceeds the {META_BYTES}-byte slot")
        start = self._meta[meta_word]
        self.mm[start : start + len(header)] = header
        self._words[meta_word].value = len(header)
        self._sizes[data_word].value = data_bytes
        self._words[seq_word].value = seq  # last: the reader acts on this
        if wake:
            _futex_wake(ctypes.addressof(self._words[seq_word]))

    def _frames(self, meta_word: int, data_word: int) -> list[memoryview]:
        start, length = self._meta[meta_word], self._words[meta_word].value
        data_start, data_len = self._data[data_word], self._sizes[data_word].value
        if length > META_BYTES or data_len > self.capacity:
            return [memoryview(b"")]  # decodes to an error reply
        frames = [memoryview(self.mm)[start : start + length]]
        if data_len:
            frames.append(memoryview(self.mm)[data_start : data_start + data_len])
        return frames

    def _wait(self, seq_word: int, until: Callable[[int], bool], timeout_s: float, spin_s: float) -> int | None:
        word = self._words[seq_word]
        deadline = time.perf_counter() + spin_s
        while time.perf_counter() < deadline:
            value = word.value
            if until(value):
                return value
        address = ctypes.addressof(word)
        end = time.monotonic() + timeout_s
        while True:
            value = word.value
            if until(value):
                return value
            left = end - time.monotonic()
            if left <= 0:
                return None
            self.sleep(address, value, min(left, 0.1))

    # coordinator side
    def post_request(self, header: bytes, data_bytes: int) -> int:
        seq = (self.last_request_seq + 1) & 0xFFFFFFFF
        self.last_request_seq = seq
        # The worker only spins on the request sequence; asleep, it waits on the bell.
        self._publish(_REQ_META, _REQ_DATA, _REQ_SEQ, header, data_bytes, seq, wake=False)
        self.ring()
        return seq

    def ring(self) -> None:
        """Wake the worker: call after sending it anything over ZeroMQ too, or it notices only at its next poll."""
        bell = self._words[_BELL]
        bell.value = (bell.value + 1) & 0xFFFFFFFF
        _futex_wake(ctypes.addressof(bell))

    def wait_reply(self, seq: int, timeout_s: float, spin_s: float = 200e-6) -> list[memoryview] | None:
        if self._wait(_REP_SEQ, lambda v: v == seq, timeout_s, spin_s if self.spin else 0.0) is None:
            return None
        return self._frames(_REP_META, _REP_DATA)

    # worker side
    def wait_request(self, timeout_s: float, spin_s: float = 50e-6) -> tuple[int, list[memoryview]] | None:
        """The next request, or None when the bell rang for something else (or timeout_s passed)."""
        last, request_seq, bell = self.last_request_seq, self._words[_REQ_SEQ], self._words[_BELL]
        rung = bell.value
        if self._wait(_REQ_SEQ, lambda v: v != last, 0.0, spin_s if self.spin else 0.0) is None:
            # Sleep on the bell; a request or a control message rings it. futex_wait returns at once if it
            # rang since we read it, so nothing is missed. Between two layers of a decoding step, watch first.
            self.sleep(ctypes.addressof(bell), rung, timeout_s, self.turn_spin_s if self.watch_next else 0.0)
        seq = request_seq.value
        if seq == last:
            self.watch_next = False  # idle, or a control message: the decoding step is over
            return None
        self.last_request_seq = seq
        return seq, self._frames(_REQ_META, _REQ_DATA)

    def post_reply(self, seq: int, header: bytes, data_bytes: int) -> None:
        self._publish(_REP_META, _REP_DATA, _REP_SEQ, header, data_bytes, seq, wake=True)
