"""Hostile messages built with knowledge of the protocol's structure: maps and lists nested thousands deep in every
place a header holds a value, huge lengths, and wrong types in every field of every message kind. The decoder
refuses each with a ProtocolError (nothing else, no recursion); a running prompt service and a running worker answer
each with an Error and go on serving; a coordinator whose worker answers the handshake with one fails with a
WorkerFailed naming the worker."""

from __future__ import annotations

import dataclasses
import threading
import types
import typing

import msgpack
import pytest
import torch
import zmq

from fiddler_moe.coordinator.dispatch import WorkerFailed
from fiddler_moe.coordinator.service import PromptService
from fiddler_moe.launch.cluster import Cluster
from fiddler_moe.protocol import messages as m
from fiddler_moe.protocol.transport import Client
from fiddler_moe.protocol.wire import MAX_HEADER_DEPTH, ProtocolError, decode, encode


class Deep:
    """A list (or map) nested `depth` deep, written as raw msgpack: msgpack's own packer refuses more than 512."""

    def __init__(self, depth: int, as_map: bool = False):
        self.depth, self.as_map = depth, as_map

    def raw(self) -> bytes:
        return (b"\x81\xa1a" if self.as_map else b"\x91") * self.depth + b"\x00"


def pack(value) -> bytes:
    """msgpack bytes of `value`, with each Deep in it written out."""
    raws: dict[str, bytes] = {}

    def swap(v):
        if isinstance(v, Deep):
            token = f"@deep{len(raws)}@"
            raws[token] = v.raw()
            return token
        if isinstance(v, dict):
            return {swap(k): swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    data = msgpack.packb(swap(value))
    for token, raw in raws.items():
        data = data.replace(msgpack.packb(token), raw)
    return data


DEEP = 1000  # the depth of the message that once took the cluster down: within msgpack's unpacker's own limit
def header(kind: str, body: dict, tensors: list | None = None, v=m.PROTOCOL_VERSION) -> dict:
    return {"v": v, "kind": kind, "body": body, "tensors": tensors or []}


def sample(hint):
    """A valid value of a protocol type hint, lists of one item: every message kind, including ones added later."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return sample(next(a for a in typing.get_args(hint) if a is not type(None)))
    if origin is list:
        return [sample(typing.get_args(hint)[0])]
    if hint is torch.Tensor:
        return torch.zeros(1, 4)
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        return hint(**{f.name: sample(hints[f.name]) for f in dataclasses.fields(hint)})
    return {int: 1, float: 0.5, str: "x", bool: True}[hint]


def depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


def valid_body(cls) -> dict:
    """A valid body for a message class, as its header carries it."""
    return msgpack.unpackb(encode(sample(cls))[0])["body"]


WRONG_VALUES = [Deep(DEEP), Deep(DEEP, as_map=True), "x", 1.5, None, True, 2**64 - 1, b"\x00", [1, "a"], {"a": 1}]


def structural() -> list[list[bytes]]:
    """Deep nesting and huge lengths in every place of a header, as the frames a client would send."""
    cases = []
    # Deep nesting in each place of the envelope, and of a tensor spec.
    spec = {"field": "rows", "dtype": "float32", "shape": [1, 4]}
    for place in ("v", "kind", "body", "tensors"):
        h = header("ping", {"payload": 0})
        h[place] = Deep(DEEP)
        cases.append([pack(h)])
    for key in ("field", "dtype", "shape"):
        bad_spec = {**spec, key: Deep(DEEP)}
        body = {"request_id": 1, "layer": 0, "expert_ids": [0], "row_counts": [1]}
        for kind in ("expert_request", "echo"):
            cases.append([pack(header(kind, body, [bad_spec])), b"\x00" * 16])
    for value in (Deep(DEEP), Deep(DEEP, as_map=True), Deep(100_000)):
        cases.append([pack(value)])
    # Huge lengths.
    cases.append([pack(header("k" * 1_000_000, {}))])
    cases.append([pack(header("ping", {str(i): i for i in range(200_000)}))])
    cases.append([pack(header("ping", {}, [spec] * 100_000))])
    body = {"request_id": 1, "layer": 0, "expert_ids": list(range(1_000_000)), "row_counts": [Deep(100_000)]}
    cases.append([pack(header("expert_request", body, [spec])), b"\x00" * 16])
    cases.append([pack(header("generate", {"prompt": Deep(100_000, as_map=True)}))])
    return cases


def wrong_types() -> list[list[bytes]]:
    """Wrong types in every field of every kind."""
    cases = []
    for kind, cls in m.ALL_MESSAGES.items():
        body = valid_body(cls)
        for name in body:
            for value in WRONG_VALUES:
                if type(value) is type(body[name]) and not isinstance(value, list | dict):
                    continue  # not wrong for this field
                cases.append([pack(header(kind, {**body, name: value}))])
    return cases


def refused(frames: list[bytes]) -> bool:
    try:
        decode(frames)
    except ProtocolError:
        return True
    return False


STRUCTURAL = structural()
CASES = STRUCTURAL + wrong_types()
REFUSED = [frames for frames in CASES if refused(frames)]  # the rest are valid messages (a None where allowed)


def test_every_real_message_fits_the_nesting_bound():
    for cls in m.ALL_MESSAGES.values():
        frames = [bytes(f) for f in encode(sample(cls))]
        assert depth(msgpack.unpackb(frames[0])) <= MAX_HEADER_DEPTH, cls.KIND
        assert type(decode(frames)) is cls


def test_the_decoder_refuses_every_hostile_header_with_a_protocol_error():
    for frames in CASES:
        try:
            decode(frames)
        except ProtocolError as e:  # anything else (RecursionError, TypeError, MemoryError) propagates: a failure
            assert len(e.message) <= 400
    # Only a wrong value that the field allows gets through (a null where the field is optional).
    assert len(REFUSED) >= len(CASES) - 2 * len(m.ALL_MESSAGES)
    assert all(refused(frames) for frames in STRUCTURAL)


def ask(client: Client, frames: list[bytes], timeout_s: float = 30) -> m.Message:
    client.send_frames(frames)
    replies = []
    while True:
        reply = client.receive(timeout_s=timeout_s)
        assert reply is not None, "no reply (the endpoint hung or died)"
        replies.append(reply)
        if not isinstance(reply, m.TokenChunk):
            return replies[-1]


@pytest.fixture(scope="module")
def running_service(checkpoints, tmp_path_factory):
    """A real cluster (one worker process) with its prompt service serving in a thread."""
    folder = tmp_path_factory.mktemp("service")
    with Cluster(checkpoints["tiny"], workers=1, threads_per_worker=1, device="cpu", quiet=True) as cluster:
        service = PromptService(cluster.coordinator, f"ipc://{folder}/prompts.sock")
        stop = threading.Event()
        thread = threading.Thread(target=service.serve, kwargs={"should_stop": stop.is_set}, daemon=True)
        thread.start()
        try:
            yield cluster, service
        finally:
            stop.set()
            thread.join(timeout=30)


def test_the_prompt_service_answers_every_hostile_message_and_serves_on(running_service):
    cluster, service = running_service
    client = Client(service.address)
    try:
        for frames in REFUSED:
            reply = ask(client, frames)
            assert isinstance(reply, m.Error), reply
        reply = ask(client, [bytes(f) for f in encode(m.GenerateRequest("The experts", max_new_tokens=2))])
        assert isinstance(reply, m.GenerateDone) and 1 <= len(reply.token_ids) <= 2
    finally:
        client.close()


def test_a_worker_answers_every_hostile_message_and_computes_on(running_service):
    cluster, _ = running_service
    client = Client(cluster.addresses[0])
    bell = cluster.coordinator.links[0].channel  # as the coordinator does: wake the worker from the slot's wait
    try:
        # Every structural case, a quarter of the wrong types (the same decoder as the prompt service's above)
        for frames in STRUCTURAL + REFUSED[len(STRUCTURAL) :: 4]:
            client.send_frames(frames)
            if bell is not None:
                bell.ring()
            reply = client.receive(timeout_s=30)
            assert isinstance(reply, m.Error), reply
        assert cluster.processes[0].poll() is None
    finally:
        client.close()
    # The cluster still computes through that worker.
    logits = cluster.logits(torch.tensor([[1, 2, 3, 4]]))
    assert logits.shape == (1, 4, cluster.coordinator.layout.config.vocab_size) and torch.isfinite(logits).all()


def test_a_worker_answering_the_handshake_with_garbage_is_named(checkpoints, tmp_path):
    """A peer at a remote worker's address that answers Hello with a hostile header: start-up fails with a
    WorkerFailed naming the worker and its address, not a RecursionError or a hang."""
    context = zmq.Context.instance()
    fake = context.socket(zmq.ROUTER)
    fake.setsockopt(zmq.LINGER, 0)
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    address = f"tcp://127.0.0.1:{port}"

    def answer_with_garbage():
        if fake.poll(60_000):
            identity, *_ = fake.recv_multipart()
            fake.send_multipart([identity, pack(header("hello_reply", {"v": Deep(DEEP)}))])

    thread = threading.Thread(target=answer_with_garbage, daemon=True)
    thread.start()
    try:
        with pytest.raises(WorkerFailed, match=address.replace(".", r"\.")):
            with Cluster(checkpoints["tiny"], workers=0, remote_workers=[address], device="cpu", quiet=True):
                pass
    finally:
        thread.join(timeout=30)
        fake.close()
