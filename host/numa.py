"""NUMA: read the machine's nodes (cpus, memory, physical cores) and lay workers out on them.

On a multi-socket server every worker is pinned to cpus of one node and its memory bound to that node, so the
experts it owns live in the memory next to the cores that compute them. Topology comes from
/sys/devices/system/node (one node holding every cpu when that is missing, e.g. in some containers).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

# How OpenMP threads wait, for the coordinator and the workers. They take turns on the same cores every layer:
# threads that spin long after their parallel regions (libgomp's default) steal those cores from the other side,
# and threads that sleep at once are woken, on a virtual machine slowly, for each product of the next layer. So they
# spin about as long as the gaps between one layer's products, then sleep. The count was chosen by paired runs of
# several values (docs/performance-log.md, item 8); the coordinator's spin matters most.
OPENMP_SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "30000"}
_user_openmp_settings: dict[str, str | None] | None = None  # as the user set them, before use_openmp_settings()


def use_openmp_settings() -> None:
    """Set OPENMP_SETTINGS in this process's environment where the user has not set them. The commands call it
    first thing in main(), before anything imports torch (OpenMP reads them once, when it loads)."""
    global _user_openmp_settings
    if _user_openmp_settings is None:
        _user_openmp_settings = {name: os.environ.get(name) for name in OPENMP_SETTINGS}
    for name, value in OPENMP_SETTINGS.items():
        os.environ.setdefault(name, value)


def user_openmp_settings() -> dict[str, str | None]:
    """The OpenMP variables as the user set them (None: unset), for a benchmark's baseline, which should run as
    the user would run it rather than with our defaults."""
    if _user_openmp_settings is None:
        return {name: os.environ.get(name) for name in OPENMP_SETTINGS}
    return dict(_user_openmp_settings)

SYS_ROOT = Path("/sys/devices/system")


def parse_cpu_list(text: str) -> set[int]:
    """'0-3,8,10-11' -> {0, 1, 2, 3, 8, 10, 11}, the format of /sys and taskset."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"bad cpu list {text!r}; write it like 0-3,8,10-11") from None
        if first > last or first < 0:
            raise ValueError(f"bad cpu range {part!r} in {text!r}")
        cpus.update(range(first, last + 1))
    return cpus


def format_cpu_list(cpus: set[int] | list[int]) -> str:
    out, run = [], []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


@dataclass
class Node:
    id: int
    cpus: list[int]  # every logical cpu
    cores: list[list[int]]  # physical cores, each the list of its hardware threads (first one used)
    memory_bytes: int


@dataclass
class Topology:
    nodes: list[Node]

    @property
    def physical_cores(self) -> int:
        return sum(len(n.cores) for n in self.nodes)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _node_memory(node_dir: Path) -> int:
    text = _read(node_dir / "meminfo") or ""
    for line in text.splitlines():
        if "MemTotal:" in line:
            return int(line.split()[-2]) * 1024
    return 0


def _cores(cpus: list[int], root: Path) -> list[list[int]]:
    """Group cpus into physical cores by their thread siblings."""
    seen: set[int] = set()
    cores = []
    for cpu in sorted(cpus):
        if cpu in seen:
            continue
        siblings = _read(root / "cpu" / f"cpu{cpu}" / "topology" / "thread_siblings_list")
        group = sorted(parse_cpu_list(siblings) & set(cpus)) if siblings else [cpu]
        if cpu not in group:
            group = [cpu]
        seen.update(group)
        cores.append(group)
    return cores


def read_topology(root: Path = SYS_ROOT, allowed: set[int] | None = None) -> Topology:
    """Nodes with the cpus this process may use (its affinity mask), from a /sys tree."""
    if allowed is None:
        allowed = os.sched_getaffinity(0) if root == SYS_ROOT else None
    nodes = []
    for node_dir in sorted((root / "node").glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        cpus = sorted(parse_cpu_list(_read(node_dir / "cpulist") or ""))
        if allowed is not None:
            cpus = [c for c in cpus if c in allowed]
        if cpus:
            nodes.append(Node(int(node_dir.name[4:]), cpus, _cores(cpus, root), _node_memory(node_dir)))
    if not nodes:  # no NUMA information: one node with every usable cpu
        cpus = sorted(allowed if allowed is not None else range(os.cpu_count() or 1))
        nodes = [Node(0, cpus, _cores(cpus, root), _total_memory())]
    return Topology(nodes)


def available_memory_bytes() -> int | None:
    """Memory this process can still allocate: MemAvailable, capped by a cgroup v2 limit; None if unknown."""
    available = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    # In a container MemAvailable describes the host; the cgroup limit is what gets us killed. Its usage
    # counts the page cache, so give back the inactive file pages the kernel would reclaim first.
    with contextlib.suppress(OSError, ValueError):
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
            used = int((cgroup / "memory.current").read_text()) - int(stat.get("inactive_file", 0))
            headroom = max(0, int(limit) - used)
            available = headroom if available is None else min(available, headroom)
    return available


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


@dataclass
class WorkerSlot:
    """Where one local worker runs."""

    index: int
    node: int | None  # None: not bound (NUMA off)
    cpus: list[int] = field(default_factory=list)
    threads: int = 1


@dataclass
class Layout:
    workers: list[WorkerSlot]
    coordinator_cpus: list[int]
    warnings: list[str]
    takes_turns: bool = False  # the coordinator shares cores with workers: each waits while the other computes


def lay_out(
    topology: Topology,
    workers: int | None = None,
    workers_per_node: int | None = None,
    threads_per_worker: int | None = None,
    coordinator_cores: int = 1,
    numa: bool = True,
) -> Layout:
    """Place local workers on nodes, each on its own physical cores; the first `coordinator_cores` cores of node 0
    stay with the coordinator (0: it keeps none and takes turns with the workers on node 0's cores). `workers` (a
    total, spread evenly over nodes) or `workers_per_node`; neither: one per node. Threads default to the node's
    free physical cores shared evenly, so every core is used once."""
    warnings = []
    free = {n.id: [core[0] for core in n.cores] for n in topology.nodes}
    first = topology.nodes[0].id
    takes_turns = coordinator_cores == 0
    if coordinator_cores == 0:
        coordinator_cpus = list(free[first])
    else:
        coordinator_cpus = free[first][:coordinator_cores]
        if len(free[first]) > coordinator_cores:
            free[first] = free[first][coordinator_cores:]
        else:
            warnings.append(f"node {first} has no core left beside the coordinator's; workers share it")
            takes_turns = True
    nodes = topology.nodes
    if workers_per_node is not None:
        counts = {n.id: workers_per_node for n in nodes}
    elif workers is not None:
        counts = {n.id: workers // len(nodes) + (1 if i < workers % len(nodes) else 0) for i, n in enumerate(nodes)}
    else:
        counts = {n.id: 1 for n in nodes}
    slots = []
    for node in nodes:
        cores, k = free[node.id], counts[node.id]
        if k == 0:
            continue
        t = threads_per_worker or max(1, len(cores) // k)
        if k * t > len(cores):
            warnings.append(
                f"node {node.id}: {k} worker(s) x {t} thread(s) need {k * t} cores but {len(cores)} are free; "
                "cores are oversubscribed (use fewer workers or threads per worker)"
            )
        if k * t > len(cores):  # oversubscribed anyway: spread over every core of the node, the coordinator's too
            cores = [core[0] for core in node.cores]
            takes_turns = takes_turns or node.id == first
        for i in range(k):
            cpus = sorted({cores[(i * t + j) % len(cores)] for j in range(t)}) if cores else []
            slots.append(WorkerSlot(len(slots), node.id if numa else None, cpus if numa else [], t))
    return Layout(slots, coordinator_cpus, warnings, takes_turns)


# --- binding a process's memory to its node ---

_MPOL_BIND = 2
_SYS_SET_MEMPOLICY = {"x86_64": 238, "aarch64": 237}.get(platform.machine())


def bind_memory_to_node(node: int) -> bool:
    """Allocate this process's memory on `node` from now on (set_mempolicy, as libnuma's numa_set_membind).
    Returns False where the kernel refuses; the worker then relies on first touch after pinning."""
    if _SYS_SET_MEMPOLICY is None:
        return False
    mask_words = node // 64 + 1
    mask = (ctypes.c_ulong * mask_words)()
    mask[node // 64] = 1 << (node % 64)
    libc = ctypes.CDLL(None, use_errno=True)
    result = libc.syscall(_SYS_SET_MEMPOLICY, _MPOL_BIND, mask, ctypes.c_ulong(mask_words * 64 + 1))
    return result == 0
