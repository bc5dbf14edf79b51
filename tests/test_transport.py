"""Shared-memory and ZeroMQ transports, NUMA layout, workers on other hosts (loopback tcp)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import runtime_leftovers, shm_files
from fiddler_moe.coordinator.dispatch import WorkerFailed
from fiddler_moe.host import numa
from fiddler_moe.launch.cluster import Cluster
from fiddler_moe.protocol import messages as m
from fiddler_moe.protocol.shm import ShmChannel
from fiddler_moe.protocol.wire import decode, encode

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46], [1, 50, 51, 52, 53, 54, 55, 56]])


@pytest.fixture(scope="module")
def want(checkpoints, reference) -> torch.Tensor:
    """transformers' logits for IDS on the tiny checkpoint."""
    with torch.inference_mode():
        return reference(checkpoints["tiny"])(input_ids=IDS).logits


def close(got, want) -> bool:
    return ((got - want).abs().max() / want.abs().max()).item() < 1e-5


# --- the shared-memory channel itself ---


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shm_slot_carries_every_dtype_bit_exact(dtype, shm_pair):
    coordinator, worker = shm_pair(1 << 16)
    rows = torch.randn(3, 32).to(dtype)
    view = coordinator.request_view(dtype, (3, 32))
    view.copy_(rows)
    request = m.ExpertRequest(1, 0, [2], [3], view)
    seq = coordinator.post_request(encode(request)[0], view.numel() * view.element_size())
    got_seq, frames = worker.wait_request(timeout_s=1)
    assert got_seq == seq
    received = decode(frames)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(received.rows.view(bits), rows.view(bits))
    assert received.rows.data_ptr() != rows.data_ptr()  # a view of the slot, not of our tensor
    assert not os.path.exists(coordinator.path)


@pytest.mark.parametrize("spin", [True, False])
def test_shm_reply_is_matched_to_its_request_and_never_read_early(spin, shm_pair):
    coordinator, worker = shm_pair(4096, spin=spin)  # sleeping at once (cores taken in turns) must not miss anything
    first = coordinator.post_request(encode(m.Ping())[0], 0)
    second_started = threading.Event()

    def serve():
        seq, _ = worker.wait_request(timeout_s=2)
        second_started.wait(2)
        time.sleep(0.05)
        worker.post_reply(seq, encode(m.Pong(seq))[0], 0)

    thread = threading.Thread(target=serve)
    thread.start()
    assert coordinator.wait_reply(first + 1, timeout_s=0.02) is None  # nothing for a request not yet sent
    second_started.set()
    frames = coordinator.wait_reply(first, timeout_s=2)
    thread.join()
    assert decode(frames) == m.Pong(first)
    assert coordinator.wait_reply(first + 1, timeout_s=0.05) is None  # the old reply does not answer a new seq


def test_worker_waits_as_the_coordinator_says(tmp_path):
    """AttachShm.spin reaches the worker's channel: no spinning where it takes turns with the coordinator."""
    from fiddler_moe.expert_worker.server import Worker, WorkerConfig

    worker = Worker(WorkerConfig(listen=f"ipc://{tmp_path}/w.sock"))
    channel = ShmChannel.create(capacity=4096)
    try:
        for spin in (False, True):
            assert worker.on_attach_shm(b"", m.AttachShm(channel.path, 4096, spin=spin)) == m.Pong(os.getpid())
            assert worker.channel.spin is spin
    finally:
        worker.channel.close()
        channel.close()
    assert shm_files() == set()


def test_decoding_requests_are_served_in_c_as_in_python(decoding_kernel_path, shm_pair):
    """The worker's C loop over the slot (shm_serve.c) answers the requests it takes with the bits the Python path
    computes, on each path of the decoding kernel, and leaves every other one in the slot for Python, unconsumed."""
    from fiddler_moe.native import kernels
    from fiddler_moe.experts.compute import ExpertKernel, ExpertWeights
    from fiddler_moe.native.shm_serve import ShmServeLoop
    from fiddler_moe.protocol.wire import encode_header

    if not kernels.available():
        pytest.skip("the bfloat16 kernel library is not built on this machine")
    generator = torch.Generator().manual_seed(4)
    shard = {(layer, expert): ExpertWeights((torch.randn(2 * 96, 64, generator=generator) * 0.2).bfloat16(),
                                            (torch.randn(64, 96, generator=generator) * 0.2).bfloat16())
             for layer in (0, 1) for expert in (0, 2, 3)}
    kernel = ExpertKernel(m.KernelSpec(activation="silu", dtype="bfloat16"))
    coordinator, worker = shm_pair(1 << 16, spin=False)
    loop = ShmServeLoop.build(worker, shard, kernel)
    assert loop is not None and loop.bf16_isa == kernel.bf16_isa != 0

    def post(request):
        coordinator.request_view(request.rows.dtype, tuple(request.rows.shape)).copy_(request.rows)
        return coordinator.post_request(encode_header(request), request.rows.numel() * 2)

    rows = (torch.randn(4, 64, generator=generator) * 2).bfloat16()
    seq = post(m.ExpertRequest(request_id=2**40, layer=1, expert_ids=[3, 0, 2], row_counts=[1, 0, 3], rows=rows))
    assert loop.serve(timeout_s=0.01) == 1 and worker.last_request_seq == seq
    reply = decode(coordinator.wait_reply(seq, timeout_s=1))
    assert (reply.request_id, reply.layer, reply.compute_seconds > 0) == (2**40, 1, True)
    want = torch.cat([kernel.forward(shard[(1, 3)], rows[:1]), kernel.forward(shard[(1, 2)], rows[1:])])
    assert torch.equal(reply.outputs, want)

    refused = [m.ExpertRequest(1, 0, [1], [1], rows[:1]),  # an expert this worker does not hold
               m.ExpertRequest(1, 0, [0], [9], torch.zeros(9, 64, dtype=torch.bfloat16)),  # more rows than it takes
               m.ExpertRequest(1, 0, [0], [1], rows[:1].float()),  # float32 rows
               m.ExpertRequest(1, 5, [0], [1], rows[:1]),  # a layer it does not hold
               m.Echo(1, rows[:1])]  # another message
    for request in refused:
        seq = post(request)
        assert loop.serve(timeout_s=0.01) == 0
        assert worker.wait_request(timeout_s=0)[0] == seq  # still there for Python


def test_decoding_layer_calls_in_c_are_the_python_path(avx2_bfloat16_path, shm_pair):
    """A decoding step's layer call through shm_call.c (grouping, gather, request, wait, combine in C), answered
    by the worker's C loop: the bits of the dispatcher's Python path, for Mixtral's float32 routing weights and
    bfloat16 ones. A reply that is not the call's ExpertReply (an error) is left for Python."""
    import threading

    from fiddler_moe.coordinator.dispatch import _combine, _group_by_expert
    from fiddler_moe.native.shm_call import ShmCall
    from fiddler_moe.native import kernels
    from fiddler_moe.experts.compute import ExpertKernel, ExpertWeights
    from fiddler_moe.native.shm_serve import ShmServeLoop
    from fiddler_moe.protocol.wire import encode_header

    if not kernels.available():
        pytest.skip("the bfloat16 kernel library is not built on this machine")
    generator = torch.Generator().manual_seed(6)
    shard = {(2, expert): ExpertWeights((torch.randn(2 * 96, 64, generator=generator) * 0.2).bfloat16(),
                                        (torch.randn(64, 96, generator=generator) * 0.2).bfloat16())
             for expert in range(4)}
    kernel = ExpertKernel(m.KernelSpec(activation="silu", dtype="bfloat16"))
    coordinator, worker = shm_pair(1 << 16, spin=False)
    loop = ShmServeLoop.build(worker, shard, kernel)
    lane = ShmCall(coordinator)
    for tokens, weight_dtype in [(1, torch.float32), (3, torch.float32), (2, torch.bfloat16)]:
        hidden = (torch.randn(tokens, 64, generator=generator) * 2).bfloat16()
        top_k_index = torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(tokens)])
        weights = torch.rand(tokens, 2, generator=generator).to(weight_dtype)
        serving = threading.Thread(target=loop.serve, args=(0.2,))
        serving.start()
        result = torch.empty(tokens, 64, dtype=torch.bfloat16)
        assert lane.post(hidden, top_k_index, weights, request_id=9, layer=2, result=result)
        while (status := lane.finish(1.0)) == 0:
            pass
        serving.join()
        order, token_of, groups = _group_by_expert(top_k_index)
        rows = hidden[token_of]
        outputs, start = [], 0
        for expert, count in groups:
            outputs.append(kernel.forward(shard[(2, expert)], rows[start : start + count]))
            start += count
        assert status == 1 and lane.routed() == groups and lane.order() == order
        assert torch.equal(result, _combine(torch.cat(outputs), order, weights))
        assert lane.call.compute_seconds > 0

    assert lane.post(hidden, top_k_index, weights, request_id=10, layer=2, result=result)  # answered with an error
    seq, _ = worker.wait_request(timeout_s=1)
    worker.post_reply(seq, encode_header(m.Error(code="internal", message="no")), 0)
    assert lane.finish(1.0) == -1
    assert decode(coordinator.wait_reply(seq, timeout_s=0)) == m.Error(code="internal", message="no")


# --- clusters over each transport ---


# Two local workers, one thread each: shared with the affinity test below.
TRANSPORTS = [pytest.param(transport, id=transport, marks=pytest.mark.cluster("tiny", workers=2, threads_per_worker=1,
                                                                               transport=transport))
              for transport in ("shm", "zmq")]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_exact_over_each_transport(cluster, want, transport):
    got = cluster.logits(IDS)
    channels = [link.channel for link in cluster.coordinator.links]
    assert all(c is not None for c in channels) if transport == "shm" else all(c is None for c in channels)
    # CPU only, every expert cold: the coordinator and the workers take turns on the cores, so nobody spins
    assert cluster.plan_workers().takes_turns and not cluster.coordinator.spin_waits
    assert all(not c.spin for c in channels if c is not None)
    assert shm_files() == set(), "shared-memory names are dropped as soon as both sides map them"
    assert close(got, want)


@pytest.mark.cluster("tiny", workers=2, threads_per_worker=1, transport="shm")
def test_decoding_steps_run_on_one_thread_when_taking_turns(cluster):
    """Taking turns with the workers, the coordinator reads prompts on its cores and decodes on one thread
    (launch/cluster.py's coordinator_decode_threads); the counts are read inside the model's forward, in the
    engine's thread. The head, read while the workers rest, takes the coordinator's threads in both."""
    seen: list[tuple[int, int]] = []  # (tokens in the forward, torch threads)
    in_head: list[int] = []
    model = cluster.coordinator.model
    hooks = [model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["input_ids"].shape[1], torch.get_num_threads())),
        with_kwargs=True),
        model.get_output_embeddings().register_forward_pre_hook(lambda *_: in_head.append(torch.get_num_threads()))]
    try:
        cluster.generate(IDS[0].tolist(), max_new_tokens=4, ignore_eos=True)
    finally:
        for hook in hooks:
            hook.remove()
    cores = len(cluster.plan_workers().coordinator_cpus)
    assert seen[0] == (IDS.shape[1], cores), "the prompt is read with the coordinator's threads"
    assert seen[1:] == [(1, 1)] * 3, "each decoding step runs on one thread, back to one after the head"
    assert in_head == [cores] * 4, "the head of every forward on the coordinator's threads"


def test_batches_larger_than_the_slot_fall_back_to_zeromq(checkpoints, want):
    with Cluster(checkpoints["tiny"], workers=1, shm_rows=2, device="cpu", quiet=True) as cluster:
        got = cluster.logits(IDS)
    assert close(got, want)


@pytest.mark.cluster("tiny", workers=2, threads_per_worker=1, transport="shm")
def test_worker_affinity_is_the_planned_one(cluster):
    planned = [slot.cpus for slot in cluster.plan_workers().workers]
    reported = [hello.cpus for hello in cluster.coordinator.hellos]  # sched_getaffinity inside each worker
    threads = [hello.threads for hello in cluster.coordinator.hellos]
    environ = [Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in cluster.worker_pids]
    assert reported == planned and threads == [1, 1]
    spin = os.environ.get("GOMP_SPINCOUNT", numa.OPENMP_SETTINGS["GOMP_SPINCOUNT"])
    for env in environ:  # OpenMP threads spin briefly, then sleep: the workers take turns with the coordinator
        assert b"OMP_WAIT_POLICY=PASSIVE" in env and f"GOMP_SPINCOUNT={spin}".encode() in env


# A worker killed under a cluster, and a launcher stopped with SIGTERM, leave no shared memory behind either:
# test_reliability.py::test_dead_worker_fails_the_request_naming_it_then_is_restarted and
# test_cli.py::test_launch_generate_stop_leaves_nothing_behind check /dev/shm.


# --- workers on other hosts ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_loopback_tcp_worker_refuses_a_wrong_token_then_serves_beside_a_local_one(checkpoints, tmp_path, want):
    """`fiddler-worker --listen tcp://...` as on another host: a cluster with the wrong token is refused and leaves
    nothing behind; with the right one it computes beside a local worker. The token is never logged."""
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-cluster-token\n")
    address = f"tcp://127.0.0.1:{free_port()}"
    remote = subprocess.Popen([sys.executable, "-m", "fiddler_moe.cli.worker", "--listen", address, "--model",
                               str(checkpoints["tiny"]), "--token-file", str(token_file), "--threads", "1"],
                              stderr=subprocess.PIPE, text=True)
    try:
        with pytest.raises(WorkerFailed, match="token"):
            with Cluster(checkpoints["tiny"], workers=0, remote_workers=[address], token="guess", device="cpu",
                         quiet=True):
                pass
        assert runtime_leftovers() == []
        assert remote.poll() is None

        with Cluster(checkpoints["tiny"], workers=1, remote_workers=[address], token="s3cret-cluster-token",
                     device="cpu", quiet=True) as cluster:
            got = cluster.logits(IDS)
            links = cluster.coordinator.links
            assert links[1].channel is None and links[0].channel is not None  # tcp keeps ZeroMQ, local uses shm
            assert all(link.requests > 0 for link in links)
        assert close(got, want)
    finally:
        remote.terminate()
        log = remote.communicate(timeout=10)[1]
    assert "s3cret" not in log, "tokens are never logged"


# --- topology ---


def write_sys_tree(root: Path, nodes: dict[int, list[int]], siblings: dict[int, list[int]], mem_kb: int) -> Path:
    for node, cpus in nodes.items():
        d = root / "node" / f"node{node}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(numa.format_cpu_list(cpus) + "\n")
        (d / "meminfo").write_text(f"Node {node} MemTotal:       {mem_kb} kB\nNode {node} MemFree: 1 kB\n")
    for cpu, group in siblings.items():
        t = root / "cpu" / f"cpu{cpu}" / "topology"
        t.mkdir(parents=True)
        (t / "thread_siblings_list").write_text(numa.format_cpu_list(group) + "\n")
    return root


def test_two_socket_topology_with_hyperthreads(tmp_path):
    # 2 sockets x 4 cores x 2 threads; Linux numbers sibling threads 0-7 then 8-15 across both sockets
    nodes = {0: [0, 1, 2, 3, 8, 9, 10, 11], 1: [4, 5, 6, 7, 12, 13, 14, 15]}
    siblings = {c: [c % 8, c % 8 + 8] for c in range(16)}
    topo = numa.read_topology(write_sys_tree(tmp_path, nodes, siblings, 64 << 20), allowed=set(range(16)))
    assert [n.id for n in topo.nodes] == [0, 1] and topo.physical_cores == 8
    assert topo.nodes[1].cores == [[4, 12], [5, 13], [6, 14], [7, 15]]
    assert topo.nodes[0].memory_bytes == 64 << 30
    layout = numa.lay_out(topo, workers_per_node=1)
    assert layout.coordinator_cpus == [0] and not layout.takes_turns
    assert [(s.node, s.cpus, s.threads) for s in layout.workers] == [(0, [1, 2, 3], 3), (1, [4, 5, 6, 7], 4)]
    assert layout.warnings == []
    over = numa.lay_out(topo, workers_per_node=2, threads_per_worker=4)
    assert any("oversubscribed" in w for w in over.warnings)
    assert over.takes_turns  # node 0's workers spread over the coordinator's core too
    turns = numa.lay_out(topo, workers_per_node=1, coordinator_cores=0)  # CPU only, every expert cold
    assert turns.takes_turns and turns.coordinator_cpus == [0, 1, 2, 3]
    assert [(s.node, s.cpus) for s in turns.workers] == [(0, [0, 1, 2, 3]), (1, [4, 5, 6, 7])]


def test_a_worker_watches_between_decoding_layers_only_where_a_core_is_left_for_the_coordinator(tmp_path):
    """Taking turns on a CPU, the coordinator decodes on one thread: workers sharing its cores watch for the next
    layer's request (one thread each) only while that leaves it a core; other layouts sleep at once."""
    from fiddler_moe.launch.cluster import WORKER_TURN_SPIN_S, coordinator_decode_threads, worker_turn_spin_s
    from fiddler_moe.launch.options import ClusterOptions

    nodes = {0: [0, 1], 1: [2, 3]}
    topo = numa.read_topology(write_sys_tree(tmp_path, nodes, {c: [c] for c in range(4)}, 8 << 20),
                              allowed=set(range(4)))
    cpu = ClusterOptions(device="cpu")
    one = numa.lay_out(topo, workers_per_node=1, coordinator_cores=0)  # node 0: one worker of 2 threads
    assert coordinator_decode_threads(cpu, one) == 1 and worker_turn_spin_s(cpu, one) == WORKER_TURN_SPIN_S
    two = numa.lay_out(topo, workers_per_node=2, coordinator_cores=0)  # node 0: two workers of 1 thread
    assert worker_turn_spin_s(cpu, two) == 0.0, "two watchers would take both of the coordinator's cores"
    assert worker_turn_spin_s(ClusterOptions(device="cpu", coordinator_threads=2), one) == 0.0
    kept = numa.lay_out(topo, workers_per_node=1, coordinator_cores=1)  # the coordinator keeps a core
    assert not kept.takes_turns and worker_turn_spin_s(cpu, kept) == 0.0


def test_the_coordinator_decodes_on_every_core_where_a_layer_s_own_weights_are_large(tmp_path, checkpoints, reference):
    """A decoder layer's own weights (attention, norms, router), counted from the checkpoint's headers, are what
    transformers' model holds in each layer beside its experts; with --quantize the coordinator holds them in that
    format. From DECODE_ON_EVERY_CORE_LAYER_BYTES on, a coordinator taking turns decodes on every core, and then
    no worker watches (it would take a core the coordinator decodes on)."""
    from fiddler_moe.coordinator import loading
    from fiddler_moe.launch.cluster import (DECODE_ON_EVERY_CORE_LAYER_BYTES, coordinator_decode_threads,
                                            held_layer_bytes, worker_turn_spin_s)
    from fiddler_moe.launch.options import ClusterOptions

    _, layout = loading.inspect(checkpoints["tiny"])
    model = reference(checkpoints["tiny"])
    own = [sum(p.numel() * p.element_size() for name, p in layer.named_parameters() if ".experts." not in f".{name}")
           for layer in model.model.layers]
    assert layout.layer_bytes == sum(own) // len(own) > 0
    assert held_layer_bytes(layout) == layout.layer_bytes
    assert held_layer_bytes(layout, "int8") == int(layout.layer_bytes * (8 + 16 / 32) / 32)  # float32 weights
    assert held_layer_bytes(layout, "int4") < held_layer_bytes(layout, "int8") < layout.layer_bytes

    topo = numa.read_topology(write_sys_tree(tmp_path, {0: [0, 1]}, {0: [0], 1: [1]}, 8 << 20), allowed={0, 1})
    turns, cpu = numa.lay_out(topo, workers_per_node=1, coordinator_cores=0), ClusterOptions(device="cpu")
    small, large = DECODE_ON_EVERY_CORE_LAYER_BYTES - 1, DECODE_ON_EVERY_CORE_LAYER_BYTES
    assert coordinator_decode_threads(cpu, turns, small) == 1 and worker_turn_spin_s(cpu, turns, small) > 0
    assert coordinator_decode_threads(cpu, turns, large) is None and worker_turn_spin_s(cpu, turns, large) == 0.0
    # bfloat16 layers on the AVX2 path convert every weight they read: every core, whatever their size
    assert coordinator_decode_threads(cpu, turns, small, converts=True) is None
    assert worker_turn_spin_s(cpu, turns, small, converts=True) == 0.0


@pytest.mark.parametrize("path", ["avx2", "onednn", "amx", "avx512", "off"])
def test_only_bfloat16_layers_on_the_avx2_path_count_as_converting(checkpoints, monkeypatch, path):
    from fiddler_moe.coordinator import loading
    from fiddler_moe.experts import compute
    from fiddler_moe.launch.cluster import converts_bfloat16_layers

    for flag, value in compute.flags_of(path).items():
        monkeypatch.setattr(compute, flag, value)
    _, bfloat16 = loading.inspect(checkpoints["tiny"], "bfloat16")
    _, float32 = loading.inspect(checkpoints["tiny"], "float32")
    assert converts_bfloat16_layers(bfloat16) == (path == "avx2")
    assert not converts_bfloat16_layers(bfloat16, "int8") and not converts_bfloat16_layers(float32)


def test_four_node_topology(tmp_path):
    nodes = {n: list(range(n * 4, n * 4 + 4)) for n in range(4)}
    siblings = {c: [c] for c in range(16)}
    topo = numa.read_topology(write_sys_tree(tmp_path, nodes, siblings, 32 << 20), allowed=set(range(16)))
    layout = numa.lay_out(topo, workers=8, threads_per_worker=1)
    per_node = [sum(1 for s in layout.workers if s.node == n) for n in range(4)]
    assert per_node == [2, 2, 2, 2]
    assert all(set(s.cpus) <= set(nodes[s.node]) for s in layout.workers)
    assert len({c for s in layout.workers for c in s.cpus}) == 8  # no core given twice
    off = numa.lay_out(topo, workers=2, numa=False)
    assert all(s.node is None and s.cpus == [] for s in off.workers)


def test_missing_numa_information_falls_back_to_one_node(tmp_path):
    topo = numa.read_topology(tmp_path, allowed={0, 1, 2})
    assert len(topo.nodes) == 1 and topo.nodes[0].cpus == [0, 1, 2]
