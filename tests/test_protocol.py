"""Wire format: bit-exact tensors, strict decoding, and a real worker that survives bad frames."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import pytest
import torch

from fiddler_moe.protocol import messages as m
from fiddler_moe.protocol.transport import Client
from fiddler_moe.protocol.wire import ProtocolError, decode, encode


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensors_round_trip_bit_exact(dtype):
    rows = torch.randn(5, 64).to(dtype)
    rows[0, 0] = float("nan")
    rows[0, 1] = float("-inf")
    msg = m.ExpertRequest(request_id=7, layer=3, expert_ids=[1, 4], row_counts=[2, 3], rows=rows)
    back = decode([bytes(f) for f in encode(msg)])
    assert back.rows.dtype == dtype and back.rows.shape == rows.shape
    bits = {torch.float32: torch.int32}.get(dtype, torch.int16)
    assert torch.equal(back.rows.view(bits), rows.view(bits))
    assert (back.request_id, back.layer, back.expert_ids, back.row_counts) == (7, 3, [1, 4], [2, 3])


def test_layer_call_headers_are_the_generic_ones():
    """Expert requests and replies have their own header encoder (the hot path): the same bytes as the generic
    one, and they decode back."""
    from fiddler_moe.protocol.wire import _header, encode_header

    for msg in (m.ExpertRequest(5, 3, [1, 6], [2, 1], torch.randn(3, 16).bfloat16()),
                m.ExpertReply(5, 3, torch.randn(3, 16), 0.25)):
        assert encode_header(msg) == _header(msg)[0]
        back = decode(encode(msg))
        assert (back.request_id, back.layer) == (5, 3)


def test_decoding_into_a_given_view():
    """The shared-memory transport decodes a layer call's tensor as a view it keeps, after the same checks."""
    rows = torch.randn(2, 8).bfloat16()
    slot = torch.zeros(2, 8, dtype=torch.bfloat16)
    frames = encode(m.ExpertReply(request_id=3, layer=1, outputs=rows, compute_seconds=1))  # an int: still a float
    seen = []

    def view(dtype, shape):
        seen.append((dtype, shape))
        return slot.copy_(rows)

    back = decode(frames, view)
    assert back.outputs is slot and seen == [(torch.bfloat16, (2, 8))] and back.compute_seconds == 1.0
    with pytest.raises(ProtocolError) as info:
        decode([frames[0], bytes(frames[1])[:-2]], view)
    assert info.value.code == "truncated" and len(seen) == 1


def test_nested_messages_round_trip():
    source = m.ExpertSource(2, 5, [m.TensorRef("a.safetensors", "w1"), m.TensorRef("a.safetensors", "w3")],
                            [m.TensorRef("b.safetensors", "down", 5)])
    msg = m.LoadShard("/x", "abc", m.KernelSpec("silu", dtype="bfloat16"), [source])
    assert decode(encode(msg)) == msg


def header(**overrides):
    h = {"v": m.PROTOCOL_VERSION, "kind": "ping", "body": {}, "tensors": []}
    h.update(overrides)
    return msgpack.packb(h)


BAD_FRAMES = {
    "not msgpack": ([b"\xc1\xff garbage"], "bad_header"),
    "not a map": ([msgpack.packb([1, 2])], "bad_header"),
    "other version": ([header(v=m.PROTOCOL_VERSION + 1)], "version_mismatch"),
    "unknown kind": ([header(kind="launch_missiles")], "unknown_kind"),
    "missing field": ([header(kind="hello", body={})], "missing_field"),
    "wrong type": ([header(kind="hello", body={"version": "one"})], "bad_field"),
    "unknown field": ([header(kind="ping", body={"x": 1})], "bad_field"),
    "missing tensor frame": (
        [header(kind="expert_reply", body={"request_id": 1, "layer": 0, "compute_seconds": 0.0},
                tensors=[{"field": "outputs", "dtype": "float32", "shape": [2, 4]}])], "truncated"),
    "truncated tensor": (
        [header(kind="expert_reply", body={"request_id": 1, "layer": 0, "compute_seconds": 0.0},
                tensors=[{"field": "outputs", "dtype": "float32", "shape": [2, 4]}]), b"\0" * 31], "truncated"),
    "bad dtype": (
        [header(kind="expert_reply", body={"request_id": 1, "layer": 0, "compute_seconds": 0.0},
                tensors=[{"field": "outputs", "dtype": "complex64", "shape": [1]}]), b"\0" * 8], "bad_dtype"),
    "oversized tensor": (
        [header(kind="expert_reply", body={"request_id": 1, "layer": 0, "compute_seconds": 0.0},
                tensors=[{"field": "outputs", "dtype": "float32", "shape": [1 << 20, 1 << 20]}]), b""], "too_large"),
    "empty": ([], "empty"),
    # the messages of every layer call take a shorter path through decode; lookalikes get the generic checks
    "request id not an int": (
        [header(kind="expert_request", body={"request_id": True, "layer": 0, "expert_ids": [1], "row_counts": [1]},
                tensors=[{"field": "rows", "dtype": "float32", "shape": [1, 4]}]), b"\0" * 16], "bad_field"),
    "expert id not an int": (
        [header(kind="expert_request", body={"request_id": 1, "layer": 0, "expert_ids": ["1"], "row_counts": [1]},
                tensors=[{"field": "rows", "dtype": "float32", "shape": [1, 4]}]), b"\0" * 16], "bad_field"),
    "extra request field": (
        [header(kind="expert_request", body={"request_id": 1, "layer": 0, "expert_ids": [1], "row_counts": [1],
                                             "x": 0}, tensors=[{"field": "rows", "dtype": "float32", "shape": [1, 4]}]),
         b"\0" * 16], "bad_field"),
    "request tensor misnamed": (
        [header(kind="expert_request", body={"request_id": 1, "layer": 0, "expert_ids": [1], "row_counts": [1]},
                tensors=[{"field": "outputs", "dtype": "float32", "shape": [1, 4]}]), b"\0" * 16], "missing_tensor"),
    "reply from another version": (
        [header(v=m.PROTOCOL_VERSION - 1, kind="expert_reply", body={"request_id": 1, "layer": 0,
                                                                     "compute_seconds": 0.0},
                tensors=[{"field": "outputs", "dtype": "float32", "shape": [1, 4]}]), b"\0" * 16],
        "version_mismatch"),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
def test_malformed_frames_are_refused_with_a_code(case):
    frames, code = BAD_FRAMES[case]
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert info.value.code == code


def test_worker_answers_bad_frames_with_errors_and_keeps_serving(checkpoints, tmp_path):
    """A real worker process: bad frames, a request before its shard and a shard of another checkpoint each get an
    Error; it keeps serving, and removes its socket when it ends."""
    socket_file = tmp_path / "w.sock"
    proc = subprocess.Popen([sys.executable, "-m", "fiddler_moe.cli.worker", "--listen", f"ipc://{socket_file}",
                             "--name", "test-worker"], stderr=subprocess.PIPE, text=True)
    client = Client(f"ipc://{socket_file}")
    try:
        client.send(m.Hello(m.PROTOCOL_VERSION))
        assert isinstance(client.receive(timeout_s=30), m.HelloReply)
        for case in ("not msgpack", "other version", "truncated tensor", "unknown kind"):
            frames, code = BAD_FRAMES[case]
            client.send_frames(frames)
            reply = client.receive(timeout_s=10)
            assert isinstance(reply, m.Error) and reply.code == code, case
        # a well-formed request it cannot serve yet is an error too, not a crash
        client.send(m.ExpertRequest(1, 0, [0], [1], torch.zeros(1, 8)))
        reply = client.receive(timeout_s=10)
        assert isinstance(reply, m.Error) and reply.code == "not_loaded"
        # so is a shard of another checkpoint
        client.send(m.LoadShard(str(checkpoints["tiny"]), "not-this-checkpoint", m.KernelSpec("silu"), []))
        reply = client.receive(timeout_s=30)
        assert isinstance(reply, m.Error) and reply.code == "fingerprint_mismatch"
        client.send(m.Ping())
        assert isinstance(client.receive(timeout_s=10), m.Pong)
        assert proc.poll() is None
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)
    assert not socket_file.exists()
    assert "refused a request" in proc.stderr.read()
