"""A cluster: expert worker processes plus the coordinator in this process, started and stopped together.

    with Cluster(ClusterOptions(model="path/to/mixtral", workers=4, threads_per_worker=8)) as cluster:
        print(cluster.generate("The capital of France is").text)

`Cluster("path/to/mixtral", workers=4)` is the short form: the model, then ClusterOptions' fields by name.

Everything the cluster starts (processes, sockets, its private run folder) is gone when the block exits, also on
errors and Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from fiddler_moe.coordinator.coordinator import Coordinator, Generation, Prepared, prepare
from fiddler_moe.coordinator.dispatch import WorkerFailed
from fiddler_moe.coordinator import cpu_attention
from fiddler_moe.coordinator.placement import Placement, format_size
from fiddler_moe.coordinator.loading import ModelLayout
from fiddler_moe.experts import compute, quant
from fiddler_moe.experts.compute import check_bfloat16_path
from fiddler_moe.host import numa
from fiddler_moe.launch import rundir
from fiddler_moe.launch.options import ClusterOptions


def drives_gpu(options: ClusterOptions) -> bool:
    """Whether the coordinator runs on a CUDA device (--device cuda, or auto where one is present)."""
    device = options.device
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def coordinator_cores(options: ClusterOptions, topology: numa.Topology) -> int:
    """Cores kept for the coordinator alone. Driving a GPU: one. On a CPU-only machine with every expert cold, the
    coordinator and the workers take turns (it waits while they compute a layer's experts, they wait while it runs
    attention and the head), so it keeps none and runs on node 0's cores in the workers' gaps: each side gets every
    core when it computes (docs/performance-log.md, item 6). With hot experts on the CPU it computes beside the workers, so
    it keeps an eighth of the cores."""
    if drives_gpu(options):
        return 1
    hot = bool(options.hot_experts or options.device_budget)  # a count, a size above 0, or "all"
    return max(1, topology.physical_cores // 8) if hot else 0


# A decoder layer's own weights from which a coordinator taking turns decodes on every core (bytes as it holds them).
DECODE_ON_EVERY_CORE_LAYER_BYTES = 16 << 20


def held_layer_bytes(model: ModelLayout, quantize: str = "none") -> int:
    """About the bytes of one decoder layer's own weights (attention, norms, router, shared experts) as a CPU
    coordinator holds them: with --quantize its linear layers take that format (coordinator/cpu_linear.py)."""
    if quantize == "none":
        return model.layer_bytes
    return quant.FORMATS[quantize].nbytes(1, model.layer_bytes // model.dtype.itemsize)  # as one row of its weights


def converts_bfloat16_layers(model: ModelLayout, quantize: str = "none") -> bool:
    """Whether a CPU coordinator's linear layers are bfloat16 ones on the AVX2 path (experts/compute.py), which turns
    every weight into float32 as it reads it: more work a byte than any other path, so more cores read faster."""
    return quantize == "none" and model.dtype == torch.bfloat16 and compute.chosen_path() == "avx2"


def coordinator_decode_threads(options: ClusterOptions, layout: numa.Layout, layer_bytes: int = 0,
                               converts: bool = False) -> int | None:
    """torch threads of the coordinator's decoding steps; None: the same as its prefill. Taking turns with the
    workers on a CPU, one where a layer's own weights are small (`layer_bytes`, as `held_layer_bytes` counts them;
    0: not known): a decode step's operations are then a projection of a few MB, so a second thread buys little and
    costs a hand-over in each OpenMP region, and after each of them it spins (GOMP_SPINCOUNT) on a core the workers
    compute on next, as the workers' threads spin after their turn on the core the coordinator needs. From
    DECODE_ON_EVERY_CORE_LAYER_BYTES on, every core: one thread reads a layer's weights at one core's share of the
    bandwidth. Paired on the Xeon with AMX (docs/performance-log.md, 2026-12-02): every core took 0.79x the time a
    token with small's 20 MiB bfloat16 layers, and 1.07x, 1.16x, 1.46x with its 10.6 MiB int8 and 5.6 MiB int4
    layers and mini's 1.4 MiB int4 ones; mini's 5 MiB bfloat16 layers 0.94x there (0.73-1.17) and 1.10x on the Zen 5
    (an earlier round). Every core too where the layers are bfloat16 ones on the AVX2 path (`converts`, as
    `converts_bfloat16_layers` says): on a Zen 3, mini's 5 MiB layers 0.93x the time a token paired, its int4 ones
    0.99x. Prefill keeps every core; --coordinator-threads sets both."""
    if options.coordinator_threads is not None or not layout.takes_turns or drives_gpu(options):
        return None
    return None if layer_bytes >= DECODE_ON_EVERY_CORE_LAYER_BYTES or converts else 1


WORKER_TURN_SPIN_S = 2e-3  # longer than the coordinator's part of a layer in a decoding step on mini and small


def worker_turn_spin_s(options: ClusterOptions, layout: numa.Layout, layer_bytes: int = 0,
                       converts: bool = False) -> float:
    """How long a local worker that takes turns with the coordinator watches for the next layer's request after a
    decoding step's, its helper threads parked, before it sleeps. Asleep, its core goes idle, and waking it for
    the next layer was slow enough to show (a virtual machine's idle vCPU wakes slowly): paired on small, int8
    0.77x the time a token, mini int4 0.93x, bfloat16 unchanged (docs/performance-log.md, 2026-12-02). Only where
    that takes no core the coordinator decodes on: it decodes on one thread (`coordinator_decode_threads` with the
    same `layer_bytes` and `converts`), and the workers sharing its cores leave it one (one watching thread each);
    else 0, sleep at once."""
    if not layout.takes_turns or coordinator_decode_threads(options, layout, layer_bytes, converts) != 1:
        return 0.0
    mine = set(layout.coordinator_cpus)
    sharing = [slot for slot in layout.workers if not slot.cpus or mine & set(slot.cpus)]
    return WORKER_TURN_SPIN_S if len(sharing) + 1 <= len(mine) else 0.0


# A worker's memory beside its shard: the interpreter, torch and the kernels (226 MiB measured on `mini`,
# docs/performance-log.md 2026-12-02), and 10% of its shard for activations and allocator slack.
WORKER_OWN_BYTES = 256 << 20
WORKER_SHARD_MARGIN = 1.1


def memory_warnings(topology: numa.Topology, layout: numa.Layout, placement: Placement, prepared: Prepared,
                    quantize: str, available: int | None = None) -> list[str]:
    """Where the local processes will not fit: each NUMA node's pinned workers against its memory, and every local
    worker plus a CPU coordinator's weights against the memory this machine has available now (`available`,
    read when None). Each worker counts its shard in the --quantize format, +10%, and WORKER_OWN_BYTES."""
    cold_bytes = prepared.layout.cold_expert_bytes(quantize)

    def worker_bytes(slot: numa.WorkerSlot) -> int:
        return int(len(placement.shard(slot.index)) * cold_bytes * WORKER_SHARD_MARGIN) + WORKER_OWN_BYTES

    smaller = {"none": "; --quantize int8 or int4 holds the experts in 0.53x or 0.28x of bfloat16's bytes",
               "int8": "; --quantize int4 holds the experts in about half of int8's bytes"}.get(quantize, "")
    warnings = []
    for node in topology.nodes:
        pinned = [s for s in layout.workers if s.node == node.id]
        need = sum(worker_bytes(s) for s in pinned)
        if pinned and node.memory_bytes and need > node.memory_bytes:
            warnings.append(f"node {node.id}: its {len(pinned)} worker(s) need about {format_size(need)} (shards, "
                            f"+10%, and {format_size(WORKER_OWN_BYTES)} a worker) but it has "
                            f"{format_size(node.memory_bytes)}; add workers on other nodes or hosts, or hot "
                            f"experts{smaller}")
    coordinator = 0
    if prepared.device.type == "cpu":  # its own weights and hot experts live beside the workers
        coordinator = prepared.layout.non_expert_bytes + len(placement.hot) * prepared.layout.expert_bytes
    need = sum(worker_bytes(s) for s in layout.workers) + coordinator
    available = numa.available_memory_bytes() if available is None else available
    if layout.workers and available is not None and need > available:
        warnings.append(f"the {len(layout.workers)} local worker(s) need about {format_size(need)} of memory "
                        + (f"with the coordinator's weights ({format_size(coordinator)}) " if coordinator else "")
                        + f"but this machine has {format_size(available)} available; it would swap or be killed: "
                        f"free memory, or move workers to other hosts (--remote-worker){smaller}")
    return warnings


class Cluster:
    def __init__(self, options: ClusterOptions | str | Path | None = None, /, **kwargs):
        """Cluster(ClusterOptions(...)), or Cluster(model, **fields of ClusterOptions)."""
        if isinstance(options, ClusterOptions):
            if kwargs:
                raise TypeError("give Cluster a ClusterOptions or its fields by name, not both")
        else:
            options = ClusterOptions(**kwargs) if options is None else ClusterOptions(model=options, **kwargs)
        self.options = options
        self.processes: list[subprocess.Popen] = []  # local workers, index = worker index
        self.slots: list[numa.WorkerSlot] = []
        self.addresses: list[str] = []  # local workers' sockets, then the remote workers
        self.restarts: list[int] = []
        self.run_dir: Path | None = None
        self.coordinator: Coordinator | None = None

    # --- lifecycle ---

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self, text: str) -> None:
        if not self.options.quiet:
            print(text, file=sys.stderr, flush=True)

    def plan_workers(self, topology: numa.Topology | None = None) -> numa.Layout:
        cfg = self.options
        topology = topology or numa.read_topology()
        return numa.lay_out(topology, cfg.workers, cfg.workers_per_socket, cfg.threads_per_worker,
                            coordinator_cores=coordinator_cores(cfg, topology), numa=cfg.numa == "on")

    def plan_experts(self, layout: numa.Layout) -> tuple[Prepared, Placement]:
        """The checkpoint checked against the flags, and the experts placed on the local workers (weighted by their
        threads) and the remote ones: what --dry-run prints and the start checks the memory with."""
        cfg = self.options
        prepared = prepare(cfg.model, len(layout.workers) + len(cfg.remote_workers), cfg.device, cfg.dtype,
                           cfg.device_budget, cfg.hot_experts, cfg.profile, cfg.scheduling, cfg.quantize)
        return prepared, prepared.plan([float(slot.threads) for slot in layout.workers]
                                       + [1.0] * len(cfg.remote_workers))

    def dry_run(self) -> list[str]:
        """The plan, as `fiddler-launch --dry-run` prints it: nothing is started."""
        cfg = self.options
        if cfg.model is None:
            from fiddler_moe.launch.synthetic import builtin_model_path

            cfg.model = builtin_model_path()
        topology = numa.read_topology()
        layout = self.plan_workers(topology)
        prepared, placement = self.plan_experts(layout)
        model = prepared.layout
        cold_bytes = model.cold_expert_bytes(cfg.quantize)
        in_format = f" in {cfg.quantize}" if cfg.quantize != "none" else ""
        lines = [
            f"model: {model.folder} ({model.config.model_type}, {model.dtype}), {len(model.moe_layers)} MoE layers, "
            f"{model.num_experts} experts of {format_size(model.expert_bytes)}",
            f"device: {prepared.device}: non-expert weights {format_size(model.non_expert_bytes)}, "
            f"{len(placement.hot)} hot experts ({format_size(len(placement.hot) * model.expert_bytes)})",
            f"transport: {cfg.transport}; numa: {cfg.numa}"
            + (f"; cold experts in {cfg.quantize}, {format_size(cold_bytes)} each (quantized once, cached)"
               if in_format else ""),
            f"machine: {len(topology.nodes)} NUMA node(s), {topology.physical_cores} physical cores; "
            f"coordinator on cpu {numa.format_cpu_list(layout.coordinator_cpus)}"
            + (", taking turns with the workers" if coordinator_cores(cfg, topology) == 0 else ""),
        ]
        if placement.coordinator_format:
            lines.append(placement.coordinator_line())
        warnings = list(layout.warnings) + memory_warnings(topology, layout, placement, prepared, cfg.quantize)
        for node in topology.nodes:
            slots = [s for s in layout.workers if s.node in (node.id, None)]
            shard_bytes = sum(len(placement.shard(s.index)) for s in slots) * cold_bytes
            lines.append(f"  node {node.id}: cpus {numa.format_cpu_list(node.cpus)}, {len(node.cores)} cores, "
                         f"{format_size(node.memory_bytes)}, {len(slots)} worker(s), shards {format_size(shard_bytes)}")
        for slot in layout.workers:
            shard = placement.shard(slot.index)
            where = f"node {slot.node}, cpus {numa.format_cpu_list(slot.cpus)}" if slot.node is not None else "unpinned"
            lines.append(f"  worker {slot.index}: {where}, {slot.threads} thread(s), {len(shard)} experts "
                         f"({format_size(len(shard) * cold_bytes)}{in_format})")
        for i, address in enumerate(cfg.remote_workers):
            shard = placement.shard(len(layout.workers) + i)
            lines.append(f"  remote worker {address}: {len(shard)} experts ({format_size(len(shard) * cold_bytes)}"
                         f"{in_format})"
                         " (re-planned by its reported threads at launch)")
        if placement.expected_hit_rate is not None:
            lines.append(f"expected hit rate: {placement.expected_hit_rate:.1%}")
        return lines + [f"warning: {w}" for w in warnings]

    def start(self) -> None:
        cfg = self.options
        check_bfloat16_path()  # the workers read the same environment
        cpu_attention.attention_setting()  # a bad FIDDLER_CPU_ATTENTION stops here, before any process starts
        if cfg.model is None:
            from fiddler_moe.launch.synthetic import builtin_model_path

            cfg.model = builtin_model_path()
            self.log(f"using the built-in tiny model at {cfg.model} (random weights: its text is gibberish)")
        topology = numa.read_topology()
        layout = self.plan_workers(topology)
        for warning in layout.warnings:
            self.log(f"warning: {warning}")
        # Everything that can be wrong with the checkpoint or flags is found here, before any process starts.
        prepared, placement = self.plan_experts(layout)
        for warning in memory_warnings(topology, layout, placement, prepared, cfg.quantize):
            self.log(f"warning: {warning}")
        # The coordinator's threads are counted among the cores: left at torch's default (every core) they fight
        # the workers for the cores the layout gave them.
        torch.set_num_threads(cfg.coordinator_threads or len(layout.coordinator_cpus))
        layer_bytes = held_layer_bytes(prepared.layout, cfg.quantize)  # how many threads decode
        converts = converts_bfloat16_layers(prepared.layout, cfg.quantize)
        self.log(f"model: {prepared.layout.folder} ({prepared.layout.config.model_type}, {prepared.layout.dtype}), "
                 f"device: {prepared.device}, transport: {cfg.transport}")
        if prepared.layout.quantization:
            self.log(self.dequantization_note(prepared.layout, cfg.quantize))
        try:
            self.run_dir = rundir.create()
            self.slots = layout.workers
            self.addresses = [f"ipc://{self.run_dir}/worker-{slot.index}.sock" for slot in layout.workers]
            self.addresses += list(cfg.remote_workers)
            for slot, address in zip(layout.workers, self.addresses):
                self.processes.append(self._spawn_worker(slot, address))
            self.restarts = [0] * len(self.addresses)
            alive = [self._alive_check(i) for i in range(len(self.processes))]
            alive += [None] * len(cfg.remote_workers)  # remote: ZeroMQ heartbeats tell
            self.coordinator = Coordinator(prepared, self.addresses, alive, token=cfg.token,
                                           transport=cfg.transport, shm_rows=cfg.shm_rows,
                                           progress=not cfg.quiet, spin_waits=not layout.takes_turns,
                                           worker_turn_spin_s=worker_turn_spin_s(cfg, layout, layer_bytes, converts),
                                           handshake_timeout_s=cfg.handshake_timeout)
            # Every generation goes through one engine, whose thread restarts a failed worker between steps.
            self.coordinator.start_engine(cfg.max_batch_size, on_failure=self.recover,
                                          decode_threads=coordinator_decode_threads(cfg, layout, layer_bytes,
                                                                                     converts))
            for line in self.coordinator.placement.describe() + self.coordinator.describe_scheduling():
                self.log(line)
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def dequantization_note(layout, quantize: str = "none") -> str:
        stored = (f"experts: {layout.quantization.upper()} in the checkpoint "
                  f"({format_size(layout.checkpoint_expert_bytes)}); ")
        if quantize != "none":
            held = layout.cold_expert_bytes(quantize) * layout.num_experts
            return (stored + f"each worker dequantizes its experts one at a time and quantizes them to {quantize} "
                    f"(once, cached), so they take {format_size(held)} of memory, "
                    f"{held / max(1, layout.checkpoint_expert_bytes):.1f}x the checkpoint's")
        dequantized = layout.expert_bytes * layout.num_experts
        return (stored + f"each worker dequantizes its shard to {str(layout.dtype).removeprefix('torch.')} once as it "
                f"loads, so the experts take {format_size(dequantized)} of memory, "
                f"{dequantized / max(1, layout.checkpoint_expert_bytes):.1f}x the checkpoint's")

    def _spawn_worker(self, slot: numa.WorkerSlot, address: str) -> subprocess.Popen:
        command = [
            sys.executable, "-m", "fiddler_moe.cli.worker",
            "--listen", address,
            "--threads", str(slot.threads),
            "--parent-pid", str(os.getpid()),
            "--name", f"worker-{slot.index}",
        ]
        if slot.cpus:
            command += ["--cpus", numa.format_cpu_list(slot.cpus)]
        if slot.node is not None:
            command += ["--numa-node", str(slot.node)]
        # OpenMP threads spin briefly, then sleep between layers instead of spinning on cores others need.
        env = {**numa.OPENMP_SETTINGS, **os.environ, "OMP_NUM_THREADS": str(slot.threads),
               "OMP_WAIT_POLICY": "PASSIVE"}
        if self.options.quiet:
            env["FIDDLER_WORKER_QUIET"] = "1"
        # Own session: a Ctrl-C at the terminal reaches the launcher, which stops the workers in order.
        return subprocess.Popen(command, env=env, start_new_session=True)

    def stop(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        if self.coordinator is not None:
            self.coordinator.close()  # asks every worker to shut down
            self.coordinator = None
            for p in self.processes:
                try:
                    p.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    pass
        for p in self.processes:
            if p.poll() is None:
                p.terminate()
        for p in self.processes:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.processes = []
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    # --- keeping it whole ---

    def _alive_check(self, index: int):
        return lambda: self.processes[index].poll() is None

    def check_workers(self) -> None:
        """Restart local workers that died (called on idle ticks), between the engine's steps."""
        with self._running().engine.exclusive():
            for index, process in enumerate(self.processes):
                if process.poll() is not None:
                    self._recover(index, f"exited with code {process.returncode}")

    def recover(self, failure: WorkerFailed) -> None:
        """After a request failed on a worker: bring that worker back, or mark the cluster degraded."""
        if failure.worker is None:
            return
        if failure.worker < len(self.processes):
            process = self.processes[failure.worker]
            if process.poll() is None:  # alive but failing (e.g. stuck past the deadline): replace it
                process.kill()
                process.wait()
        self._recover(failure.worker, str(failure))

    def _recover(self, index: int, reason: str) -> None:
        coordinator = self._running()
        name = f"worker-{index}"
        if coordinator.degraded:
            return
        local = index < len(self.processes)
        if local and (not self.options.restart_workers or self.restarts[index] >= self.options.max_restarts):
            why = "restarts are off" if not self.options.restart_workers else f"{self.restarts[index]} restarts used"
            coordinator.degraded = f"{name} ({self.addresses[index]}) {reason}; {why}"
            self.log(f"error: cluster degraded: {coordinator.degraded}")
            return
        self.restarts[index] += 1
        try:
            if local:
                self.log(f"{name} {reason}; restarting it with the same shard")
                self.processes[index] = self._spawn_worker(self.slots[index], self.addresses[index])
                coordinator.restore_worker(index, self.addresses[index], self._alive_check(index), timeout_s=120)
            else:  # a remote worker cannot be started from here; reconnect if it is back
                coordinator.restore_worker(index, self.addresses[index], timeout_s=10)
            self.log(f"{name} is back")
        except WorkerFailed as e:
            coordinator.degraded = f"{name} ({self.addresses[index]}) could not be brought back: {e}"
            self.log(f"error: cluster degraded: {coordinator.degraded}")

    # --- using it ---

    def _running(self) -> Coordinator:
        if self.coordinator is None:
            raise RuntimeError("the cluster is not running; use it inside `with Cluster(...) as cluster:`")
        return self.coordinator

    def generate(self, prompt: str | list[int], **kwargs) -> Generation:
        """Coordinator.generate's arguments (num_beams among them). A request failed on a worker raises
        WorkerFailed once the engine has brought the worker back: the next one finds it there."""
        return self._running().generate(prompt, **kwargs)

    @property
    def engine(self):
        """The serving engine (coordinator/batching.py): submit requests that decode together."""
        return self._running().engine

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        coordinator = self._running()
        with coordinator.engine.exclusive():
            try:
                return coordinator.logits(input_ids, attention_mask)
            except WorkerFailed as e:
                self.recover(e)
                raise

    @property
    def tokenizer(self):
        return self._running().tokenizer

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.processes]
