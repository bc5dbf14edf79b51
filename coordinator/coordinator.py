"""The coordinator: transformers' model on the device, with every routed expert dispatched by fiddler.

`prepare` reads a checkpoint's config and tensor table and plans placement without starting anything; `Coordinator`
then connects to the workers, hands each its shard, loads the non-expert weights and the hot experts on the device
while the workers load theirs, and runs the model: `logits` for a batch, `generate` for text.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import transformers
from tqdm import tqdm
from transformers import AutoTokenizer

from fiddler_moe.coordinator import cpu_attention, loading
from fiddler_moe.coordinator.cpu_linear import pack_linear_layers, quantize_linear_layers
from fiddler_moe.coordinator.cpu_norm import fuse_rms_norms
from fiddler_moe.coordinator.dispatch import ClusterDegraded, Dispatcher, WorkerFailed, WorkerLink
from fiddler_moe.coordinator.placement import Placement, format_size, plan
from fiddler_moe.coordinator.profile import ExpertProfile
from fiddler_moe.coordinator.scheduling import MoveEveryExpert, Scheduler, load_or_measure
from fiddler_moe.coordinator.staging import STAGING_BUFFERS, MappedShard, Staging
from fiddler_moe.native import kernels
from fiddler_moe.experts.checkpoint import CheckpointError, TensorReader
from fiddler_moe.experts.compute import ExpertKernel
from fiddler_moe.experts.shard import load_expert
from fiddler_moe.protocol import messages as m
from fiddler_moe.protocol import shm
from fiddler_moe.protocol.transport import Client, readable
from fiddler_moe.protocol.wire import ProtocolError

DEVICE_MEMORY_MARGIN = 2 << 30  # left free on a CUDA device for activations, KV cache and the allocator
LOAD_NOTE_EVERY_S = 10.0  # while workers load their shards, a line this often says which are still at it


@dataclass
class Prepared:
    """A checkpoint understood and a placement planned; nothing started yet."""

    model: torch.nn.Module
    layout: loading.ModelLayout
    tokenizer: transformers.PreTrainedTokenizerBase
    placement: Placement  # for the local workers asked for; re-planned once remote workers report their size
    device: torch.device
    budget: int | None = None  # device bytes for weights (None: every expert hot), staging buffers taken out
    hot_experts: int | None = None
    profile: ExpertProfile | None = None  # expert popularity steering placement (checked against the checkpoint)
    scheduling: str = "auto"  # auto: the scheduler decides per layer call; never; always (tests: move all it can)
    staging_buffers: int = 0  # device buffers for moved experts; 0: nothing can move, no shard is shared
    quantize: str = "none"  # the workers' format for cold experts (experts/quant.py), or none: the compute dtype

    def plan(self, worker_weights: list[float]) -> Placement:
        """Placement over workers of the given relative compute capacity (e.g. their thread counts)."""
        layout = self.layout
        experts_per_layer = {layer.layer: layer.num_experts for layer in layout.moe_layers}
        return with_cold_format(plan(experts_per_layer, layout.expert_bytes, layout.non_expert_bytes, self.budget,
                                     len(worker_weights), self.hot_experts, profile=self.profile,
                                     worker_weights=worker_weights), layout, self.quantize, self.device)


def with_cold_format(placement: Placement, layout: loading.ModelLayout, quantize: str,
                     device: torch.device) -> Placement:
    """The placement, saying what a cold expert takes on a worker in the --quantize format, and whether the
    coordinator's own linear layers take it too (on a CPU: coordinator/cpu_linear.py)."""
    if quantize != "none":
        placement.cold_expert_bytes, placement.cold_format = layout.cold_expert_bytes(quantize), quantize
        if device.type == "cpu":
            placement.coordinator_format = quantize
    return placement


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match:
        if not torch.cuda.is_available():
            raise ValueError(
                "--device cuda but no CUDA GPU is visible to torch; run with --device cpu or install a CUDA build of torch"
            )
        count = torch.cuda.device_count()
        if match.group(1) is not None and int(match.group(1)) >= count:
            raise ValueError(f"--device {device} but this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
        return torch.device(device)
    if device != "cpu":
        raise ValueError(f"unknown device {device!r}; use cuda, cuda:N, cpu or auto")
    return torch.device("cpu")


# Files that can hold a tokenizer: the fast tokenizers' JSON, or the vocabularies slow tokenizers convert from.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "tiktoken.model")


def load_tokenizer(folder: Path) -> transformers.PreTrainedTokenizerBase:
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{folder} has no tokenizer (no tokenizer.json or tokenizer.model); copy the tokenizer files "
            "(tokenizer.json, tokenizer_config.json) from the original model into the folder"
        )
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers, tokenizers and sentencepiece each raise their own kinds
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CheckpointError(
            f"{folder} has no usable tokenizer ({first[:160]}); copy tokenizer.json / tokenizer_config.json "
            "from the original model into the folder"
        ) from None


def _memory_total() -> int | None:
    """This machine's RAM in bytes (the CPU device's memory)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def staging_bytes(layout: loading.ModelLayout, quantize: str) -> int:
    """Device bytes of one staging buffer (coordinator/staging.py): an expert in the compute dtype, or in the
    --quantize format plus its matrices dequantized to float32."""
    if quantize == "none":
        return layout.expert_bytes
    gate_up, down = layout.expert_matrices()
    return layout.cold_expert_bytes(quantize) + 4 * (gate_up[0] * gate_up[1] + down[0] * down[1])


def prepare(
    model: Path,
    workers: int,
    device: str = "auto",
    dtype: str | None = None,
    device_memory: int | Literal["all"] | None = None,
    hot_experts: int | None = None,
    profile: str | os.PathLike | ExpertProfile | None = None,
    scheduling: str = "auto",
    quantize: str = "none",
) -> Prepared:
    """device_memory: bytes for weights on the device, "all" (every expert hot), or None (the device's default).
    profile: a profile file (`fiddler profile`) or an ExpertProfile, refused unless recorded on this checkpoint.
    scheduling: auto (the scheduler moves cold experts to a GPU when that finishes a layer call sooner), never, or
    always (every cold expert with several rows moves, also to a CPU device: for tests of the move path).
    quantize: the workers' format for cold experts (none, int8, int4); a moved expert travels in that format and
    is dequantized on the device.
    The caller has checked each value on its own (sizes read, counts not negative); here they meet the device and
    the checkpoint, so that every mistake is found before any process starts."""
    torch_device = resolve_device(device)
    requested = device_memory if isinstance(device_memory, int) else None
    if requested is not None:
        if torch_device.type == "cuda":
            total, where = torch.cuda.get_device_properties(torch_device).total_memory, "the GPU has"
        else:
            total, where = _memory_total(), "this machine has"
        if total is not None and requested > total:
            raise ValueError(
                f"--device-memory {format_size(requested)} is more than {where} ({format_size(total)}); lower it "
                "or leave it out for the default"
            )
    skeleton, layout = loading.inspect(Path(model), dtype)
    layout.check_quantize(quantize)
    tokenizer = load_tokenizer(layout.folder)
    if device_memory is None:
        if torch_device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(torch_device)
            budget: int | None = max(0, free - DEVICE_MEMORY_MARGIN)
        else:
            budget = 0  # CPU: the workers are the CPU experts; nothing gains from hot copies by default
    elif device_memory == "all":
        budget = None
        if torch_device.type == "cuda":
            need = layout.non_expert_bytes + layout.expert_bytes * layout.num_experts
            total = torch.cuda.get_device_properties(torch_device).total_memory
            if need > total:
                raise ValueError(
                    f"--device-memory all needs {format_size(need)} for every weight but the GPU has "
                    f"{format_size(total)}; give a size such as 20GiB instead"
                )
    else:
        budget = requested
    if torch_device.type == "cuda" and budget is not None and budget < layout.non_expert_bytes:
        raise ValueError(
            f"the non-expert weights need {format_size(layout.non_expert_bytes)} on the GPU but the budget is "
            f"{format_size(budget)}; raise --device-memory or use --device cpu"
        )
    if isinstance(profile, ExpertProfile):
        profile.check(layout.fingerprint)
    elif profile is not None:
        profile = ExpertProfile.load(profile, expected_fingerprint=layout.fingerprint)
    # Staging buffers for moved experts come out of the device budget, when some experts will be cold. A quantized
    # expert's buffer holds its format's bytes and, beside them, the expert dequantized to float32.
    staging, per_buffer = 0, staging_bytes(layout, quantize)
    if scheduling == "always":
        staging = STAGING_BUFFERS
    elif scheduling == "auto" and torch_device.type == "cuda" and budget is not None:
        spare = budget - layout.non_expert_bytes
        if hot_experts is not None:  # an exact hot count: what the budget holds beyond it can stage
            some_cold = hot_experts < layout.num_experts
            spare -= min(hot_experts, layout.num_experts) * layout.expert_bytes
        else:
            some_cold = spare < layout.expert_bytes * layout.num_experts
        if some_cold and spare >= STAGING_BUFFERS * per_buffer:
            staging = STAGING_BUFFERS
            budget -= staging * per_buffer
    experts_per_layer = {layer.layer: layer.num_experts for layer in layout.moe_layers}
    placement = plan(experts_per_layer, layout.expert_bytes, layout.non_expert_bytes, budget, workers, hot_experts,
                     profile=profile)
    placement = with_cold_format(placement, layout, quantize, torch_device)
    return Prepared(skeleton, layout, tokenizer, placement, torch_device, budget,
                    hot_experts, profile, scheduling, staging, quantize)


def chat_prompt_ids(tokenizer: transformers.PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """The token ids of a conversation through the tokenizer's chat template, the assistant's turn opened."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # some tokenizers answer with an encoding
        ids = ids["input_ids"]
    return list(ids)


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None = None,
                   num_beams: int = 1) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"--temperature must be 0 (greedy) or a positive number, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"--top-k must be 0 (off) or more, got {top_k}")
    if seed is not None and not 0 <= seed < 2**64:
        raise ValueError(f"--seed must be between 0 and 2**64 - 1, got {seed}")
    if num_beams < 1:
        raise ValueError(f"--num-beams must be at least 1, got {num_beams}")
    if num_beams > 1 and temperature > 0:
        raise ValueError("beam search here is greedy: give --num-beams with --temperature 0, or sample with one beam")


@dataclass
class Generation:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    prefill_seconds: float
    decode_seconds: float

    @property
    def prefill_tokens_per_second(self) -> float:
        return len(self.prompt_token_ids) / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        n = len(self.token_ids) - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


def _who(link: WorkerLink) -> str:
    """A worker named in a start-up error: with its shard once it has one."""
    return link.describe() if link.shard else f"{link.name} ({link.client.address})"


def moved_as(staging: Staging) -> str:
    """The plan print's words on what a move copies, for a quantized shard."""
    if staging.format == "none":
        return ""
    return (f"; an expert moves as {staging.copy_nbytes / 2**20:.2f} MiB of {staging.format}, dequantized on "
            "the device")


class Coordinator:
    """Connects to the workers (local ones on ipc:// sockets, remote ones on tcp://), hands out the shards, loads
    the device's weights and attaches the dispatcher to transformers' experts modules."""

    def __init__(
        self,
        prepared: Prepared,
        worker_addresses: list[str],
        worker_alive: list[Callable[[], bool]] | None = None,
        token: str = "",
        transport: str = "shm",
        shm_rows: int = 4096,
        startup_timeout_s: float = 600.0,
        progress: bool = True,
        spin_waits: bool = True,
        handshake_timeout_s: float = 10.0,
        worker_turn_spin_s: float = 0.0,
    ):
        """startup_timeout_s: what a worker has to start and load its shard (a big one takes minutes);
        handshake_timeout_s: what a remote worker has to answer Hello (a local one is watched as a process).
        spin_waits: wait for shared-memory replies (and let workers wait for requests) by spinning briefly before
        sleeping; False where this process and its local workers take turns on the same cores (protocol/shm.py).
        worker_turn_spin_s: told to the workers (messages.AttachShm.turn_spin_s)."""
        if transport not in ("shm", "zmq"):
            raise ValueError(f"unknown transport {transport!r}; use shm or zmq")
        self.prepared = prepared
        self.model = prepared.model
        self.layout = prepared.layout
        self.tokenizer = prepared.tokenizer
        self.device = prepared.device
        # Liveness: the launcher's view of a local process; for a remote one, ZeroMQ's heartbeat on the connection.
        alive = worker_alive or [None] * len(worker_addresses)
        self.links = []
        for i, address in enumerate(worker_addresses):
            client = Client(address)
            self.links.append(WorkerLink(f"worker-{i}", client, [], alive[i] or client.peer_alive))
        # Shared shards (only when something may move to the device): worker index -> its mapped shard, and the
        # cold experts whose weights they hold. Notes for the plan print say what could not be done.
        self.mapped: dict[int, MappedShard] = {}
        self.reachable: dict[tuple[int, int], object] = {}
        self.notes: list[str] = []
        self.scheduling_line = ""
        self.degraded: str | None = None  # set when a worker is down for good
        self.spin_waits = spin_waits
        self.worker_turn_spin_s = worker_turn_spin_s
        self.handshake_timeout_s = handshake_timeout_s
        self._engine = None
        try:
            self._start(token, transport, shm_rows, startup_timeout_s, progress)
        except BaseException:
            self.close()
            raise

    def _start(self, token: str, transport: str, shm_rows: int, timeout_s: float, progress: bool) -> None:
        layout = self.layout
        self._token = token
        self._shm_capacity = 0
        if transport == "shm" and shm.available():
            self._shm_capacity = shm_rows * layout.config.hidden_size * layout.dtype.itemsize
        for link in self.links:
            link.client.send(m.Hello(m.PROTOCOL_VERSION, token))
        bounds = {i: self._hello_bound(link, timeout_s) for i, link in enumerate(self.links)}
        answers = self._gather(m.HelloReply, bounds)
        hellos = [answers[i] for i in range(len(self.links))]
        self.hellos = hellos  # what each worker reports of itself: pid, threads, cpus, memory
        for link in self.links:
            if self._shm_capacity and link.is_local:  # same host; tcp workers keep ZeroMQ
                self._attach_shm(link, self._shm_capacity, timeout_s)

        # Placement: the local plan, unless workers differ in size (remote hosts report their threads).
        weights = [float(h.threads) for h in hellos]
        placement = self.prepared.placement
        if len(self.links) != placement.num_workers or len(set(weights)) > 1:
            placement = self.prepared.plan(weights)
        self.placement = placement
        for i, link in enumerate(self.links):
            link.shard = placement.shard(i)

        # Shards first, so the workers read their experts while we read ours.
        for link in self.links:
            self._send_shard(link)
        total = layout.non_expert_bytes + layout.expert_bytes * layout.num_experts
        with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress,
                  leave=False) as bar:
            loading.load_non_expert(self.model, layout, self.device)
            if self.device.type == "cpu":  # bfloat16 attention and head at memory speed (coordinator/cpu_linear.py)
                experts = tuple(layer.name for layer in layout.moe_layers)
                if self.prepared.quantize != "none":  # --quantize applies to these too, routers aside
                    quantize_linear_layers(self.model, self.prepared.quantize, skip=experts)
                pack_linear_layers(self.model, skip=experts)
                fuse_rms_norms(self.model, skip=experts)  # a decoding step's norms in one call each
                attention = cpu_attention.attention_for(quantized=self.prepared.quantize != "none")
                cpu_attention.use_cpu_attention(self.model, attention)  # decoding steps' attention
            bar.update(layout.non_expert_bytes)
            hot = {}
            reader = TensorReader(layout.folder)
            try:
                for expert in placement.hot:
                    hot[expert] = load_expert(reader, layout.experts[expert], layout.dtype).to(self.device)
                    bar.update(layout.expert_bytes)
            finally:
                reader.close()
            readies = self._gather(m.Ready, dict.fromkeys(range(len(self.links)), timeout_s),
                                   self._loading_progress(bar) if progress else None)
            self.readies: list[m.Ready] = [readies[i] for i in range(len(self.links))]  # each worker's answer
            for i in range(len(self.links)):
                self._adopt_shard(i, readies[i])
        scheduler, staging = self._make_scheduler(placement)
        self.dispatcher = Dispatcher(ExpertKernel(layout.kernel), hot, placement.owner, self.links,
                                     scheduler=scheduler, reachable=self.reachable, staging=staging)
        for layer in layout.moe_layers:
            layer.module.fiddler_layer = layer.layer
            layer.module.fiddler_dispatcher = self.dispatcher

    def _loading_progress(self, bar: tqdm) -> Callable[[list[int], float], None]:
        """The wait for the workers' shards, shown: the bar grows as each is ready and names those still loading,
        and a line every LOAD_NOTE_EVERY_S says which they are and where, so that a long load is never silent."""
        shown: list[int] | None = None
        next_note = LOAD_NOTE_EVERY_S

        def on_wait(pending: list[int], elapsed: float) -> None:
            nonlocal shown, next_note
            if pending != shown:
                done = set(pending if shown is None else shown) - set(pending)
                bar.update(self.layout.expert_bytes * sum(len(self.links[i].shard) for i in done))
                shown = pending
                bar.set_postfix_str("waiting for " + ", ".join(self.links[i].name for i in pending) if pending else "")
            bar.refresh()
            if pending and elapsed >= next_note:
                next_note += LOAD_NOTE_EVERY_S
                where = ", ".join(f"{self.links[i].name} ({self.links[i].client.address})" for i in pending)
                tqdm.write(f"still loading their shards after {elapsed:.0f}s: {where}", file=sys.stderr)

        return on_wait

    def _send_shard(self, link: WorkerLink) -> None:
        layout = self.layout
        sources = [layout.experts[e] for e in link.shard]
        model_dir = str(layout.folder) if link.is_local else ""  # a remote host uses its own copy
        shared = self.prepared.staging_buffers > 0 and link.is_local  # only when something may move
        link.send(m.LoadShard(model_dir, layout.fingerprint, layout.kernel, sources, shared=shared,
                              quantize=self.prepared.quantize))

    def _adopt_shard(self, index: int, ready: m.Ready) -> None:
        """Map worker `index`'s shared shard read-only (and unlink its name), replacing an earlier mapping."""
        old = self.mapped.pop(index, None)
        if old is not None:
            for key in old.experts:
                self.reachable.pop(key, None)
            old.close()
        if not ready.shared_path:
            if ready.shared_note:
                self.notes.append(ready.shared_note + "; its experts are not moved to the device")
            return
        try:
            mapped = MappedShard(ready, self.layout.dtype, self.prepared.quantize)
        except (OSError, ValueError) as e:
            self.notes.append(f"{self.links[index].name}'s shard could not be mapped ({e}); its experts are not moved "
                              "to the device")
            return
        if self.device.type == "cuda":
            note = mapped.pin()
            if note:
                self.notes.append(f"{self.links[index].name}: {note}")
        self.mapped[index] = mapped
        self.reachable.update(mapped.experts)

    def _make_scheduler(self, placement: Placement):
        """The per-call decision (coordinator/scheduling.py) and the staging buffers, or (None, None); sets the
        plan print's line saying what the scheduler does."""
        prepared, layout = self.prepared, self.layout
        if prepared.scheduling == "never":
            self.scheduling_line = "scheduler: off (scheduling='never'); every cold expert is computed by its worker"
            return None, None
        if not placement.owner:
            self.scheduling_line = "scheduler: nothing to schedule, every expert is hot"
            return None, None
        if self.device.type == "cpu" and prepared.scheduling == "auto":
            scheduler = Scheduler(None, placement.owner, placement.num_workers, 0, device=self.device)
            self.scheduling_line = f"scheduler: off: {scheduler.disabled_reason}"
            return None, None
        if not self.reachable or prepared.staging_buffers == 0:
            why = ("no worker shares its shard" if prepared.staging_buffers else
                   "the device budget leaves no room for staging buffers")
            self.scheduling_line = f"scheduler: off: {why}; every cold expert is computed by its worker"
            return None, None
        template = next(iter(self.reachable.values()))
        staging = Staging(template, self.device, prepared.staging_buffers)
        if prepared.scheduling == "always":
            self.scheduling_line = (f"scheduler: forced to move every cold expert with several rows to {self.device} "
                                    f"({staging.nbytes / 2**20:.1f} MiB staging{moved_as(staging)})")
            return MoveEveryExpert(), staging
        threads = [h.threads for h in self.hellos]
        # template is shared: timed as the workers compute it, never re-laid out (experts/compute.py)
        cost = load_or_measure(ExpertKernel(layout.kernel), template, self.device, worker_threads=max(threads))
        per_layer = max(layer.num_experts for layer in layout.moe_layers)
        scheduler = Scheduler(cost, placement.owner, placement.num_workers, staging_slots=per_layer,
                              device=self.device, worker_scale=[max(threads) / t for t in threads])
        self.scheduling_line = (
            f"scheduler: moves a cold expert to {self.device} for a layer call when that ends the call sooner "
            f"(copy {cost.copy_seconds * 1e3:.2f} ms, worker {cost.worker_seconds(1) * 1e3:.2f} ms for 1 row and "
            f"{cost.worker_seconds(512) * 1e3:.1f} ms for 512; {staging.nbytes / 2**20:.0f} MiB staging"
            f"{moved_as(staging)})"
        )
        return scheduler, staging

    def describe_scheduling(self) -> list[str]:
        """The plan print's lines about moving experts: what the scheduler does, and anything that could not be
        set up."""
        return [self.scheduling_line] + [f"  note: {n}" for n in self.notes]

    def restore_worker(self, index: int, address: str, alive: Callable[[], bool] | None = None,
                       timeout_s: float = 600.0) -> None:
        """Connect worker `index` again (a restarted process, or a remote one that is back) and reload its shard."""
        link = self.links[index]
        link.client.close()
        if link.channel is not None:
            link.channel.close()
            link.channel = None
        link.client = Client(address)
        link.alive = alive or link.client.peer_alive
        link.client.send(m.Hello(m.PROTOCOL_VERSION, self._token))
        self.hellos[index] = self._expect(link, m.HelloReply, self._hello_bound(link, timeout_s))
        if self._shm_capacity and link.is_local:
            self._attach_shm(link, self._shm_capacity, timeout_s)
        self._send_shard(link)
        self.readies[index] = self._expect(link, m.Ready, timeout_s)
        self._adopt_shard(index, self.readies[index])

    def _attach_shm(self, link: WorkerLink, capacity: int, timeout_s: float) -> None:
        channel = shm.ShmChannel.create(capacity)
        kernels.set_waiting(channel, self.spin_waits)
        try:
            link.client.send(m.AttachShm(channel.path, capacity, spin=self.spin_waits,
                                         turn_spin_s=self.worker_turn_spin_s))
            self._expect(link, m.Pong, timeout_s)
        except BaseException:
            channel.close()
            raise
        channel.unlink()  # both sides hold the mapping; no name is left to clean up
        link.channel = channel

    def _hello_bound(self, link: WorkerLink, timeout_s: float) -> float:
        """How long a worker has to answer Hello: a local process may take long to start but is watched as a
        process; a remote one is running already, and silence means nobody is there."""
        return timeout_s if link.is_local else min(timeout_s, self.handshake_timeout_s)

    def _expect(self, link: WorkerLink, kind: type, timeout_s: float) -> m.Message:
        index = self.links.index(link)
        return self._gather(kind, {index: timeout_s})[index]

    def _gather(self, kind: type, bounds: dict[int, float],
                on_wait: Callable[[list[int], float], None] | None = None) -> dict[int, m.Message]:
        """The reply of `kind` from each worker in `bounds` (index -> the seconds it has), taken as they come.
        WorkerFailed names the first worker that refuses, dies, or stays silent past its bound. on_wait(the workers
        still waited for, seconds so far) is called about every second."""
        started = time.monotonic()
        pending = dict(bounds)
        replies: dict[int, m.Message] = {}
        while True:
            elapsed = time.monotonic() - started
            if on_wait is not None:
                on_wait(sorted(pending), elapsed)
            if not pending:
                return replies
            for i in sorted(pending):
                link = self.links[i]
                if not link.alive():
                    where = ("exited during start-up; see its log above" if link.is_local else "lost its connection "
                             "during start-up: the worker stopped or its host went away; see the worker's log there")
                    raise WorkerFailed(f"{_who(link)} {where}", i)
                if elapsed >= pending[i]:
                    raise WorkerFailed(self._silence(link, kind, pending[i]), i)
            clients = {id(self.links[i].client): i for i in pending}
            for client in readable([self.links[i].client for i in pending], timeout_s=1.0):
                i = clients[id(client)]
                reply = self._read_start_up(i)
                if isinstance(reply, kind):
                    replies[i] = reply
                    del pending[i]

    def _read_start_up(self, index: int) -> m.Message | None:
        link = self.links[index]
        try:
            reply = link.client.receive(timeout_s=0)
        except ProtocolError as e:  # not a fiddler-moe worker, or another version of it
            raise WorkerFailed(f"{_who(link)} answered start-up with a message that cannot be read: {e.message}",
                               index) from None
        if isinstance(reply, m.Error):
            raise WorkerFailed(f"{_who(link)} refused start-up: {reply.message}", index)
        return reply

    def _silence(self, link: WorkerLink, kind: type, waited_s: float) -> str:
        """Why a worker may not have answered in time, as far as this side can tell."""
        if kind is m.HelloReply and not link.is_local:
            address = link.client.address
            link.client.peer_alive()  # reads what the connection did meanwhile
            if not link.client.ever_connected:
                return (f"no worker answers at {address} ({link.name}) within {waited_s:g}s; is `fiddler-worker "
                        f"--listen` running there, and its port open to this machine? (--handshake-timeout sets "
                        "the wait)")
            return (f"{address} ({link.name}) accepts connections but did not answer the handshake within "
                    f"{waited_s:g}s; is it a `fiddler-worker --listen`, and not busy loading another cluster's "
                    "shard? (--handshake-timeout sets the wait)")
        return f"{_who(link)} did not answer within {waited_s:.0f}s during start-up"

    def check_serving(self) -> None:
        if self.degraded:
            raise ClusterDegraded(f"the cluster is degraded: {self.degraded}; restart fiddler-launch to recover")

    # --- running the model ---

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.check_serving()
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def encode_prompt(self, prompt: str, chat: bool = False) -> list[int]:
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError("this model's tokenizer has no chat template; drop --chat")
            return chat_prompt_ids(self.tokenizer, [{"role": "user", "content": prompt}])
        return self.tokenizer(prompt)["input_ids"]

    @property
    def vocab_size(self) -> int:
        return getattr(self.layout.config, "vocab_size", None) or len(self.tokenizer)  # the embedding's rows

    @property
    def eos_token_ids(self) -> list[int]:
        """The tokens that end a generation: the model's generation config's EOS, else the tokenizer's."""
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id or self.tokenizer.eos_token_id

    def check_prompt(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        """The prompt's token ids, or ValueError saying what is wrong with them."""
        prompt_ids = list(prompt_ids)
        vocab = self.vocab_size
        bad = next((t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab),
                   None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad!r} is not in the vocabulary (0 to {vocab - 1})")
        if not prompt_ids:
            raise ValueError("the prompt is empty; give some text")
        context = getattr(self.layout.config, "max_position_embeddings", None)
        if context and len(prompt_ids) >= context:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context is {context}; shorten the prompt"
            )
        if context and len(prompt_ids) + max_new_tokens > context:
            raise ValueError(
                f"the prompt ({len(prompt_ids)} tokens) plus --max-new-tokens {max_new_tokens} exceeds the model's "
                f"context of {context} tokens; ask for at most {context - len(prompt_ids)} new tokens"
            )
        return prompt_ids

    @property
    def engine(self):
        """The serving engine (coordinator/batching.py) every generation goes through; started on first use."""
        if self._engine is None:
            self.start_engine()
        return self._engine

    def start_engine(self, max_batch_size: int = 8, on_failure: Callable[[WorkerFailed], None] | None = None,
                     decode_threads: int | None = None):
        """Start the serving engine: on_failure(the failure) runs in its thread after a step failed on a worker;
        decode_threads: torch threads of its decoding steps (None: those of this thread, as prefill)."""
        from fiddler_moe.coordinator.batching import BatchEngine  # it builds on this module

        if self._engine is not None:
            self._engine.close()
        return BatchEngine(self, max_batch_size, on_failure, decode_threads)  # it makes itself this one's engine

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        chat: bool = False,
        ignore_eos: bool = False,
        on_token: Callable[[int], None] | None = None,
        num_beams: int = 1,
    ) -> Generation:
        """One request through the engine, beside whatever else it is running; on_token(id) per new token."""
        from fiddler_moe.coordinator.batching import SamplingParams

        self.check_serving()
        check_sampling(max_new_tokens, temperature, top_p, top_k, seed, num_beams)
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError("the prompt is empty; give some text")
            prompt = self.encode_prompt(prompt, chat)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, ignore_eos=ignore_eos, num_beams=num_beams)
        handle = self.engine.submit(prompt, params)
        try:
            for token in handle.tokens():
                if on_token is not None:
                    on_token(token)
        except BaseException:
            handle.cancel()  # Ctrl-C, or the callback failed: the request leaves the batch
            raise
        new_ids = handle.result()
        prefill_seconds, decode_seconds = handle.seconds()
        return Generation(handle.prompt_token_ids, new_ids, self.tokenizer.decode(new_ids, skip_special_tokens=True),
                          prefill_seconds, decode_seconds)

    def cold_expert_tensors_held(self) -> int:
        """How many cold-expert weight tensors this process holds (the design says: none)."""
        cold = set(self.placement.owner)
        hot = self.dispatcher.hot if hasattr(self, "dispatcher") else {}
        held = sum(1 for key in hot if key in cold)
        experts_params = [
            p for layer in self.layout.moe_layers for p in layer.module.parameters() if p.device.type != "meta"
        ]
        return held + len(experts_params)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        for link in self.links:
            try:
                link.send(m.Shutdown())
            except Exception:
                pass
            link.client.close()
            if link.channel is not None:
                link.channel.close()
                link.channel = None
        if hasattr(self, "mapped"):  # drop our views of the workers' shards, then the mappings
            self.reachable.clear()
            for mapped in self.mapped.values():
                mapped.close()
            self.mapped.clear()
