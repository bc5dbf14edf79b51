"""Bad messages on the wire (issue 6 item 6): random and mutated frames of every message kind. The decoder raises
ProtocolError and nothing else; a real worker and a real prompt service answer each with an Error, stay alive and
still serve a valid request; a header declaring a huge tensor is refused before anything is allocated."""

from __future__ import annotations

import dataclasses
import random
import signal
import subprocess
import sys
import types
import typing
from pathlib import Path

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import process_gone, shm_files
from fiddler_moe.coordinator import loading
from fiddler_moe.protocol import messages as m
from fiddler_moe.protocol import transport
from fiddler_moe.protocol.transport import MAX_MESSAGE_BYTES, Client, Server
from fiddler_moe.protocol.wire import MAX_HEADER_BYTES, MAX_TENSOR_BYTES, ProtocolError, decode, encode

# --- valid messages of every kind, and ways to break them ---


def sample(hint):
    """A valid value for a type hint of the protocol: every message kind, including ones added later."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return sample(next(a for a in typing.get_args(hint) if a is not type(None)))
    if origin is list:
        return [sample(typing.get_args(hint)[0]) for _ in range(2)]
    if hint is torch.Tensor:
        return torch.randn(3, 8)
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        return hint(**{f.name: sample(hints[f.name]) for f in dataclasses.fields(hint)})
    return {int: 2, float: 0.5, str: "fiddler", bool: True}[hint]


def valid_frames(messages: list[m.Message]) -> list[list[bytes]]:
    return [[bytes(f) for f in encode(msg)] for msg in messages]


ALL_SAMPLES = [sample(cls) for cls in m.ALL_MESSAGES.values()]

VALUES = [None, True, False, 0, -1, 1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 0.0, -1.5, float("nan"), float("inf"),
          "", "x", "\u00e9\u2603", "a" * 300, b"", b"\x00\xff", [], [1, "a"], [[[]]], {}, {"a": 1}, {1: 2},
          {"field": "rows", "dtype": "float32", "shape": [1]}]
SHAPES = [[], [0], [3, 8], [2**39, 2**39], [1 << 20, 1 << 20], [-1], [1, 2, 3, 4, 5], [1.5], [True], "3x8", None]
DTYPES = ["float32", "bfloat16", "float16", "int64", "complex64", "", 3, None]


class Chooser:
    """Random choices from a seeded generator or from hypothesis' data (which then shrinks failures)."""

    def __init__(self, rng: random.Random | None = None, data=None):
        self.rng, self.data = rng, data

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi)) if self.data is not None else self.rng.randint(lo, hi)

    def choice(self, seq):
        return seq[self.int(0, len(seq) - 1)]

    def bytes(self, size: int) -> bytes:
        return bytes(self.int(0, 255) for _ in range(size))


def mutate_bytes(data: bytes, c: Chooser) -> bytes:
    data = bytearray(data)
    for _ in range(c.int(1, 4)):
        op = c.int(0, 3)
        if op == 0 and data:
            data[c.int(0, len(data) - 1)] = c.int(0, 255)
        elif op == 1:
            data.insert(c.int(0, len(data)), c.int(0, 255))
        elif op == 2 and data:
            del data[c.int(0, len(data) - 1)]
        else:
            data = data[: c.int(0, len(data))]
    return bytes(data)


def mutate_header(frames: list[bytes], c: Chooser) -> list[bytes]:
    header = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
    body = header["body"]
    op = c.int(0, 8)
    if op == 0:
        header[c.choice(["v", "kind", "body", "tensors"])] = c.choice(VALUES)
    elif op == 1 and body:
        body[c.choice(sorted(body))] = c.choice(VALUES)
    elif op == 2 and body:
        del body[c.choice(sorted(body))]
    elif op == 3:
        body[c.choice(["rows", "outputs", "extra", "prompt", 7])] = c.choice(VALUES)
    elif op == 4:
        header["kind"] = c.choice([*m.ALL_MESSAGES, "launch_missiles", "", 1])
    elif op == 5:
        header["v"] = c.choice([m.PROTOCOL_VERSION + 1, 0, "1", None])
    elif op == 6:  # tensor specs of any shape and dtype, with frames of some length
        count = c.int(0, 2)
        header["tensors"] = [{"field": c.choice(["rows", "outputs", "prompt", "x", 1]), "dtype": c.choice(DTYPES),
                              "shape": c.choice(SHAPES)} for _ in range(count)]
        frames = [frames[0], *(bytes(c.choice([0, 4, 96, 95])) for _ in range(count))]
    elif op == 7 and header["tensors"]:  # the same tensor twice
        header["tensors"] = header["tensors"] * 2
        frames = [frames[0], *frames[1:], *frames[1:]]
    else:
        header[c.choice(["extra", "V", 0])] = c.choice(VALUES)
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


def mutate_values(frames: list[bytes], c: Chooser) -> list[bytes]:
    """Keep the message decodable but give it values its handler must cope with: edge numbers, odd strings,
    empty or long lists, tensors of other shapes and dtypes."""
    header = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
    body, frames = header["body"], list(frames)
    if header["tensors"] and c.int(0, 1):
        i = c.int(0, len(header["tensors"]) - 1)
        dtype = c.choice(["float32", "bfloat16", "float16", "int64", "float64"])
        shape = c.choice([[0, 64], [3, 64], [1, 64], [3, 7], [2, 3, 64], [64], [0], [4, 0]])
        header["tensors"][i].update(dtype=dtype, shape=shape)
        size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
        for d in shape:
            size *= d
        frames[i + 1] = c.bytes(min(size, 64)) * (size // 64) + c.bytes(size % 64) if size > 64 else c.bytes(size)
    elif body:
        key = c.choice(sorted(body))
        value = body[key]
        if isinstance(value, bool):
            body[key] = not value
        elif isinstance(value, int):
            body[key] = c.choice([0, -1, 1, 3, 7, 2**31, 2**63 - 1, -(2**63)])
        elif isinstance(value, float):
            body[key] = c.choice([0.0, -1.0, 1e308, float("nan"), float("inf"), float("-inf")])
        elif isinstance(value, str):
            body[key] = c.choice(["", " ", "../" * 8 + "etc/passwd", "/dev/zero", "\u00e9" * 200, "\x00", value * 3])
        elif isinstance(value, list):
            body[key] = c.choice([[], value[:1], value * 40, value[::-1]])
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


def mutate(frames: list[bytes], c: Chooser) -> list[bytes]:
    frames = list(frames)
    op = c.int(0, 9)
    if op >= 7:
        frames = mutate_values(frames, c)
    elif op == 0:
        frames[0] = mutate_bytes(frames[0], c)
    elif op in (1, 2):
        frames = mutate_header(frames, c)
    elif op == 3 and len(frames) > 1:
        i = c.int(1, len(frames) - 1)
        frames[i] = mutate_bytes(frames[i], c)
    elif op == 4:
        frames += [c.bytes(c.int(0, 40)) for _ in range(c.int(1, 3))]
    elif op == 5:
        frames = frames[: c.int(0, len(frames) - 1)]
    else:
        frames = [c.bytes(c.int(0, 64)) for _ in range(c.int(0, 3))]
    return frames


def fuzz_frames(bases: list[list[bytes]], count: int, seed: int):
    rng = random.Random(seed)
    chooser = Chooser(rng)
    sent = 0
    while sent < count:
        frames = mutate(rng.choice(bases), chooser)
        if frames:  # a ZeroMQ message has at least one frame
            sent += 1
            yield frames


def expected_code(frames: list[bytes]) -> tuple[str | None, m.Message | None]:
    """What the peer should answer: the ProtocolError code, or None and the message when it decodes."""
    try:
        return None, decode(frames)
    except ProtocolError as e:
        return e.code, None


# --- the decoder ---


@settings(max_examples=2000, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_decoder_raises_only_protocol_errors_on_mutated_frames(data):
    frames = mutate(data.draw(st.sampled_from(valid_frames(ALL_SAMPLES))), Chooser(data=data))
    try:
        decode(frames)
    except ProtocolError as e:
        assert e.code and len(e.message) <= 400


def test_c_paths_over_the_slot_take_only_what_the_decoder_accepts(avx2_bfloat16_path, shm_pair):
    """The worker's C loop (shm_serve.c) and the coordinator's reply check (shm_call.c) read msgpack headers of
    their own: mutated requests and replies never crash them, and what they take the Python decoder accepts as
    that very message (anything else they leave to Python)."""
    from fiddler_moe.native.shm_call import ShmCall
    from fiddler_moe.native import kernels
    from fiddler_moe.experts.compute import ExpertKernel, ExpertWeights
    from fiddler_moe.native.shm_serve import ShmServeLoop

    if not kernels.available():
        pytest.skip("the bfloat16 kernel library is not built on this machine")
    shard = {(0, e): ExpertWeights(torch.randn(32, 16).bfloat16(), torch.randn(16, 16).bfloat16()) for e in (0, 1)}
    coordinator, worker = shm_pair(4096, spin=False)
    rng = random.Random(11)
    chooser = Chooser(rng)
    loop = ShmServeLoop.build(worker, shard, ExpertKernel(m.KernelSpec(activation="silu", dtype="bfloat16")))
    request = valid_frames([m.ExpertRequest(7, 0, [0, 1], [1, 1], torch.randn(2, 16).bfloat16())])[0]
    served = 0
    for _ in range(600):
        frames = mutate(request, chooser) or [b""]
        data = frames[1] if len(frames) > 1 and len(frames[1]) <= 4096 else b""
        coordinator.request_view(torch.uint8, (len(data),)).copy_(torch.frombuffer(bytearray(data) or b"0",
                                                                                   dtype=torch.uint8)[:len(data)])
        seq = coordinator.post_request(frames[0][:60000], len(data))
        if loop.serve(timeout_s=0) == 1:
            served += 1
            message = decode([frames[0], data])
            assert isinstance(message, m.ExpertRequest) and message.rows.dtype == torch.bfloat16
            assert all((0, e) in shard for e in message.expert_ids) and sum(message.row_counts) == len(message.rows)
            coordinator.wait_reply(seq, timeout_s=1)
        else:
            assert worker.wait_request(timeout_s=0)[0] == seq  # left for Python
    assert served > 0

    lane = ShmCall(coordinator)
    hidden, top_k_index, weights = torch.randn(1, 16).bfloat16(), torch.tensor([[1, 0]]), torch.rand(1, 2)
    result = torch.empty(1, 16, dtype=torch.bfloat16)
    reply = valid_frames([m.ExpertReply(8, 0, torch.randn(2, 16).bfloat16(), 0.5)])[0]
    taken = 0
    for request_id in range(8, 608):
        assert lane.post(hidden, top_k_index, weights, request_id, 0, result)
        seq, _ = worker.wait_request(timeout_s=1)
        frames = mutate([msgpack.packb({**msgpack.unpackb(reply[0]), "body": {
            "request_id": request_id, "layer": 0, "compute_seconds": 0.5}}), reply[1]], chooser) or [b""]
        data = frames[1] if len(frames) > 1 and len(frames[1]) <= 4096 else b""
        worker.post_reply(seq, frames[0][:60000], len(data))
        if lane.finish(1.0) == 1:
            taken += 1
            message = decode([frames[0], data])
            assert isinstance(message, m.ExpertReply) and message.request_id == request_id
            assert message.outputs.shape == (2, 16) and message.outputs.dtype == torch.bfloat16
    assert taken > 0


@settings(max_examples=1000, deadline=None, database=None, derandomize=True)
@given(st.lists(st.binary(max_size=200), max_size=4))
def test_decoder_raises_only_protocol_errors_on_random_frames(frames):
    try:
        decode(frames)
    except ProtocolError:
        pass


def test_every_kind_round_trips_and_huge_declarations_are_refused_before_allocation():
    for msg, frames in zip(ALL_SAMPLES, valid_frames(ALL_SAMPLES)):
        back = decode(frames)
        assert type(back) is type(msg)
    body = {"request_id": 1, "layer": 0, "compute_seconds": 0.0}
    spec = {"field": "outputs", "dtype": "float32", "shape": [1 << 20, 1 << 20]}
    header = {"v": m.PROTOCOL_VERSION, "kind": "expert_reply", "body": body, "tensors": [spec]}
    with pytest.raises(ProtocolError) as info:
        decode([msgpack.packb(header), b""])  # 4 TiB declared: refused from the header alone
    assert info.value.code == "too_large"
    header["tensors"][0]["shape"] = [MAX_TENSOR_BYTES // 4 + 1]
    with pytest.raises(ProtocolError) as info:
        decode([msgpack.packb(header), b""])
    assert info.value.code == "too_large"
    with pytest.raises(ProtocolError) as info:
        decode([b"\x00" * (MAX_HEADER_BYTES + 1)])  # never handed to msgpack
    assert info.value.code == "too_large"


def test_zeromq_drops_an_oversized_message_before_we_allocate_it(tmp_path, monkeypatch):
    """Every socket sets MAXMSGSIZE; ZeroMQ refuses a larger message when it reads its length, so the receiver
    never buffers it. Shown with the limit lowered to 1 MiB; the next peer is served as usual."""
    default = Server(f"ipc://{tmp_path}/default.sock")
    assert default.socket.getsockopt(zmq.MAXMSGSIZE) == MAX_MESSAGE_BYTES
    default.close()
    monkeypatch.setattr(transport, "MAX_MESSAGE_BYTES", 1 << 20)
    server = Server(f"ipc://{tmp_path}/limit.sock")
    big, small = Client(server.address), Client(server.address)
    try:
        big.send_frames([b"\x00" * (2 << 20)])
        assert server.receive(timeout_s=1.0) is None
        small.send(m.Ping())
        envelope = server.receive(timeout_s=10)
        assert envelope is not None and isinstance(decode(envelope.frames), m.Ping)
    finally:
        big.close()
        small.close()
        server.close()
    assert not (tmp_path / "limit.sock").exists()


# --- real processes ---


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def ask(client: Client, frames: list[bytes], timeout_s: float = 30) -> list[m.Message]:
    """Send raw frames; the replies up to the last one of this request (generation streams several)."""
    client.send_frames(frames)
    replies = []
    while True:
        reply = client.receive(timeout_s=timeout_s)
        assert reply is not None, f"no reply within {timeout_s}s (hang?) to {[f[:60] for f in frames]}"
        replies.append(reply)
        if not isinstance(reply, m.TokenChunk):
            return replies


def test_worker_answers_thousands_of_bad_frames_and_keeps_serving(checkpoints, tmp_path):
    folder = checkpoints["tiny"]
    _, layout = loading.inspect(folder)
    shard = [layout.experts[(0, e)] for e in range(4)]
    load = m.LoadShard(str(folder), layout.fingerprint, layout.kernel, shard)
    hidden = layout.config.hidden_size
    request = m.ExpertRequest(1, 0, [0, 2], [2, 1], torch.randn(3, hidden))
    bases = valid_frames([*ALL_SAMPLES, load, request, m.Hello(m.PROTOCOL_VERSION)])

    socket_file = tmp_path / "w.sock"
    log_file = tmp_path / "worker.log"  # a file, not a pipe: thousands of refusals are logged, none read meanwhile
    with open(log_file, "w") as log:
        worker = subprocess.Popen([sys.executable, "-m", "fiddler_moe.cli.worker", "--listen", f"ipc://{socket_file}"],
                                  stderr=log)
    client = Client(f"ipc://{socket_file}")
    shm_before = shm_files()
    try:
        assert isinstance(ask(client, encode(load), timeout_s=60)[0], m.Ready)
        sent = errors = 0
        for frames in fuzz_frames(bases, 2500, seed=6):
            code, decoded = expected_code(frames)
            if isinstance(decoded, m.Shutdown):
                continue  # a valid shutdown is obeyed, not an attack
            (reply,) = ask(client, frames)
            sent += 1
            if code is not None:
                assert isinstance(reply, m.Error) and reply.code == code, (code, reply)
            errors += isinstance(reply, m.Error)
        assert sent > 2000 and errors > 1500

        # A header declaring a 4 TiB tensor: refused without the worker's memory growing.
        before = rss_bytes(worker.pid)
        huge = msgpack.packb({"v": m.PROTOCOL_VERSION, "kind": "expert_request",
                              "body": {"request_id": 9, "layer": 0, "expert_ids": [0], "row_counts": [1 << 20]},
                              "tensors": [{"field": "rows", "dtype": "float32", "shape": [1 << 20, 1 << 20]}]})
        (reply,) = ask(client, [huge, b"\x00" * 16])
        assert isinstance(reply, m.Error) and reply.code == "too_large"
        assert rss_bytes(worker.pid) - before < 64 << 20

        # Still alive, and still computes: the shard reloaded, a valid request answered exactly as before.
        assert worker.poll() is None
        assert isinstance(ask(client, encode(load))[0], m.Ready)
        (reply,) = ask(client, [bytes(f) for f in encode(request)])
        assert isinstance(reply, m.ExpertReply) and reply.outputs.shape == (3, hidden)
        assert torch.isfinite(reply.outputs).all()
    finally:
        client.close()
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
    log = log_file.read_text(errors="replace")
    assert worker.returncode == 0, log[-2000:]
    assert "refused a request" in log
    assert process_gone(worker.pid) and not socket_file.exists()
    assert shm_files() == shm_before


def test_prompt_service_answers_thousands_of_bad_frames_and_keeps_serving(launched):
    """`fiddler-launch`'s prompt service (shared: conftest.launched checks at the end that it still stops cleanly,
    without a traceback, and leaves nothing behind)."""
    client = Client(launched.address)
    try:
        good = m.GenerateRequest("The mixture of experts", max_new_tokens=1)
        bases = valid_frames([*ALL_SAMPLES, good, m.GenerateRequest("hi", 1, 0.7, 0.9, 5, 3, True)])
        sent = 0
        for frames in fuzz_frames(bases, 2000, seed=7):
            code, decoded = expected_code(frames)
            if isinstance(decoded, m.GenerateRequest):
                # a valid request is served: keep it to one token so the fuzzing stays fast
                frames = [bytes(f) for f in encode(dataclasses.replace(decoded, max_new_tokens=1))]
            replies = ask(client, frames, timeout_s=60)
            sent += 1
            if code is not None:
                assert len(replies) == 1 and isinstance(replies[0], m.Error) and replies[0].code == code
            elif isinstance(decoded, m.Hello | m.LoadShard | m.ExpertRequest | m.Shutdown | m.Error):
                assert isinstance(replies[-1], m.Error) and replies[-1].code == "unexpected"  # worker messages
        assert sent == 2000
        replies = ask(client, [bytes(f) for f in encode(dataclasses.replace(good, max_new_tokens=3))], timeout_s=60)
        assert isinstance(replies[-1], m.GenerateDone) and 1 <= len(replies[-1].token_ids) <= 3
        assert launched.process.poll() is None
        assert all(not process_gone(pid) for pid in launched.workers)
    finally:
        client.close()
