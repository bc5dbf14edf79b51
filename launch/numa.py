"""CPU topology: which cpus exist and how to write them. (NUMA node discovery builds on this.)"""

from __future__ import annotations


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
