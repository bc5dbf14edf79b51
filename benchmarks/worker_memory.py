"""Each worker's resident memory against its shard's bytes: after loading and after a prefill, per --quantize format.

    .venv/bin/python benchmarks/worker_memory.py --preset mini --workers 2 --quantize none,int8,int4 --prefill 256

The goal (issue 13): a worker's RSS is at most its shard's bytes in the chosen format + 10% + the interpreter's own.
Per worker and moment it prints the RSS split as /proc/PID/status does (anonymous: the worker's private memory;
file: pages of mapped files, such as the checkpoint's safetensors or the kernel libraries; shmem: /dev/shm files),
the shard's bytes (Ready.shard_bytes), and what is left over against the interpreter's own RSS, measured in an idle
interpreter that imported what a worker imports (torch and the worker module). Every expert is cold (CPU, no hot
experts), so the workers hold the whole model's experts between them. --json writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fiddler_moe.benchmarks.bench import bench_checkpoint_path
from fiddler_moe.launch.cluster import Cluster
from fiddler_moe.launch.synthetic import write_checkpoint

FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
IDLE_WORKER = ("import os, torch; import fiddler_moe.expert_worker.server; torch.ones(1) @ torch.ones(1); "
               "print(open(f'/proc/{os.getpid()}/status').read())")


def memory(pid: int | str) -> dict[str, int]:
    """The RSS fields of /proc/PID/status, in bytes."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            found[key] = int(value.split()[0]) * 1024
    return found


def interpreter_rss() -> int:
    """RSS of an idle interpreter that imported torch and the worker module (what a worker holds before a shard)."""
    text = subprocess.run([sys.executable, "-c", IDLE_WORKER], capture_output=True, text=True, check=True).stdout
    return next(int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith("VmRSS:"))


def measure(folder: Path, quantize: str, workers: int, prefill: int, idle: int) -> list[dict]:
    rows = []
    with Cluster(folder, workers=workers, device="cpu", quantize=quantize, quiet=True) as cluster:
        shard_bytes = [r.shard_bytes for r in cluster.coordinator.readies]
        cache = [r.quantize_cache or "-" for r in cluster.coordinator.readies]
        prompt = torch.randint(3, 1000, (1, prefill), generator=torch.Generator().manual_seed(0))
        moments = [("after load", lambda: None), (f"after a {prefill}-token prefill", lambda: cluster.logits(prompt))]
        for moment, run in moments:
            run()
            time.sleep(0.5)
            for i, pid in enumerate(cluster.worker_pids):
                m = memory(pid)
                goal = shard_bytes[i] * 1.1 + idle
                rows.append({"quantize": quantize, "cache": cache[i], "moment": moment, "worker": i,
                             "shard_bytes": shard_bytes[i],
                             **{k.lower(): v for k, v in m.items()}, "interpreter_bytes": idle,
                             "over_shard_and_interpreter": m["VmRSS"] - shard_bytes[i] - idle,
                             "meets_goal": m["VmRSS"] <= goal})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quantize", default="none,int8,int4")
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--first-launch", action="store_true",
                        help="quantize into a fresh cache folder, as a first launch does, instead of reading the cache")
    args = parser.parse_args()
    folder = write_checkpoint(args.preset, bench_checkpoint_path(args.preset, "bfloat16"), dtype=torch.bfloat16)
    if args.first_launch:  # the workers inherit it; the checkpoint stays where it is
        os.environ["FIDDLER_CACHE"] = tempfile.mkdtemp(prefix="fiddler-first-launch-")
    idle = interpreter_rss()
    print(f"idle interpreter (torch and the worker module imported): {idle / 2**20:.0f} MiB")
    mib = lambda b: f"{b / 2**20:7.0f}"  # noqa: E731
    print(f"{'format':6} {'cache':7} {'moment':28} {'w':>2} {'shard':>7} {'RSS':>7} {'anon':>7} {'file':>7} "
          f"{'shmem':>7} {'over':>7} goal (MiB)")
    rows = []
    for quantize in args.quantize.split(","):
        for r in measure(folder, quantize, args.workers, args.prefill, idle):
            rows.append(r)
            print(f"{quantize:6} {r['cache']:7} {r['moment']:28} {r['worker']:2} {mib(r['shard_bytes'])} "
                  f"{mib(r['vmrss'])} {mib(r['rssanon'])} {mib(r['rssfile'])} {mib(r['rssshmem'])} "
                  f"{mib(r['over_shard_and_interpreter'])} {'met' if r['meets_goal'] else 'MISSED'}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"interpreter_bytes": idle, "rows": rows}, indent=2))
    if args.first_launch:
        shutil.rmtree(os.environ["FIDDLER_CACHE"], ignore_errors=True)


if __name__ == "__main__":
    main()
