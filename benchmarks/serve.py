"""`fiddler bench serve`: concurrent clients of the HTTP API against one cluster, side by side with transformers'
batched `generate` on the same folder and threads.

    fiddler bench serve --preset mini --clients 1,2,4,8

The cluster starts once (the launcher's defaults, the workers' experts in --quantize's format; on a CPU every
expert is cold) with its HTTP API on a loopback port, as `fiddler-launch --http` serves it. For each number of
clients, that many clients each stream one completion of a distinct random prompt (--prompt-len token ids, greedy,
--new-tokens tokens, EOS ignored), all sent at once, --repeats times. The clients run in a process of their own (benchmarks/serve_clients.py: one asyncio
loop, a connection per client), as real clients do: threads of this process would compete with the cluster's
engine and HTTP threads for the interpreter's lock. Per round:
- time to first token (TTFT): from sending the request to the first streamed text, per client;
- per-stream decode tok/s: a client's tokens after its first over the time from its first text to its end;
- aggregate decode tok/s: every client's tokens after its first, over the time from the first client's first text
  to the last client's end (what the cluster decodes per second with that many streams);
- experts a layer call: how many experts a layer call routed to, on average (prefills included): each one's weights
  are read once a call for all its rows, so N streams read that many over one stream's count times the expert
  bytes a step, which bounds what batching can win in a step bound by reading weights.
Then transformers: `generate` on a left-padded batch of the same prompts (the same count), eager, the same dtype
and total threads as the cluster (up to the cores there are), timed the same way (its first token is the whole
batch's).
Medians over the rounds; the JSON keeps every round, with the CPU seconds it took this process (the coordinator,
its engine and the HTTP server; not the workers) and the clients' process.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fiddler_moe.benchmarks.bench import (BenchOptions, describe_machine, prepare_checkpoint, random_prompt,
                                          torch_dtype)
from fiddler_moe.benchmarks.runners import first_token_streamer, pad_token_id
from fiddler_moe.benchmarks.serve_clients import Stream
from fiddler_moe.launch.cluster import Cluster
from fiddler_moe.launch.options import ClusterOptions
from fiddler_moe.serving.app import Served, make_app
from fiddler_moe.serving.server import HttpOptions, HttpServer


@dataclass
class ServeOptions:
    preset: str | None = "mini"
    model: Path | None = None
    dtype: str = "bfloat16"
    clients: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    prompt_len: int = 64
    new_tokens: int = 32
    repeats: int = 2
    device: str = "cpu"
    quantize: str = "none"  # the workers' format (--quantize); transformers keeps the compute dtype
    baseline: bool = True
    out: Path = Path("bench-results")
    chart: bool = True
    seed: int = 0


def round_figures(streams: list[Stream], **cpu_seconds: float) -> dict:
    first = min(s.first or s.end for s in streams)
    last = max(s.end for s in streams)
    decoded = sum(max(0, s.tokens - 1) for s in streams)
    return {
        "aggregate_decode_tokens_per_second": decoded / (last - first) if last > first else 0.0,
        "ttft_seconds": [s.ttft for s in streams],
        "stream_decode_tokens_per_second": [s.decode_tokens_per_second for s in streams],
        "tokens": [s.tokens for s in streams],
        "seconds": last - min(s.sent for s in streams),
        **cpu_seconds,
    }


def summarize(rounds: list[dict], clients: int) -> dict:
    return {
        "clients": clients,
        "aggregate_decode_tokens_per_second": statistics.median(r["aggregate_decode_tokens_per_second"]
                                                                for r in rounds),
        "ttft_seconds": statistics.median(statistics.median(r["ttft_seconds"]) for r in rounds),
        "stream_decode_tokens_per_second": statistics.median(statistics.median(r["stream_decode_tokens_per_second"])
                                                             for r in rounds),
        "rounds": rounds,
    }


# --- the cluster over HTTP ---


class ClientProcess:
    """The clients of every round: one process of their own (benchmarks/serve_clients.py), started once."""

    def __init__(self, url: str, model: str):
        self.process = subprocess.Popen([sys.executable, "-m", "fiddler_moe.benchmarks.serve_clients", url, model],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def round(self, prompts: list[list[int]], new_tokens: int) -> tuple[list[Stream], float]:
        """Each prompt streamed by a client of its own, all at once: the streams and the clients' CPU seconds."""
        self.process.stdin.write(json.dumps({"prompts": prompts, "new_tokens": new_tokens}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the benchmark's client process ended (exit status {self.process.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"a client failed: {answer['error']}")
        return [Stream(**s) for s in answer["streams"]], answer["cpu_seconds"]

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def bench_cluster(folder: Path, dtype: str, options: ServeOptions, prompts: list[list[int]],
                  log: Callable[[str], None]) -> tuple[list[dict], dict]:
    cluster_options = ClusterOptions(model=folder, device=options.device, dtype=dtype, quantize=options.quantize,
                                     quiet=True)
    with Cluster(cluster_options) as cluster:
        threads = torch.get_num_threads() + sum(slot.threads for slot in cluster.slots)
        served = Served(cluster.engine, cluster.tokenizer, folder, health=lambda: cluster.coordinator.degraded,
                        coordinator=cluster.coordinator)
        listener = HttpOptions.parse("127.0.0.1:0").bind()
        server = HttpServer(make_app(served), listener)
        server.start()
        clients = None
        try:
            log(f"cluster: {len(cluster.slots)} worker(s), {threads} threads in all, HTTP at {server.url}")
            clients = ClientProcess(server.url, folder.name)
            clients.round(prompts[:1], 4)  # warm-up
            results = []
            stats = cluster.coordinator.dispatcher.stats
            for n in options.clients:
                rounds = []
                reads, calls = stats.expert_reads, stats.layer_calls
                for r in range(options.repeats):
                    server_cpu = time.process_time()
                    streams, client_cpu = clients.round(prompts[:n], options.new_tokens)
                    rounds.append(round_figures(streams, server_cpu_seconds=time.process_time() - server_cpu,
                                                client_cpu_seconds=client_cpu))
                    log(f"fiddler, {n} client(s), round {r + 1}: "
                        f"{rounds[-1]['aggregate_decode_tokens_per_second']:.1f} decode tok/s in all")
                results.append(summarize(rounds, n))
                made = stats.layer_calls - calls  # the steps of n streams, and their prefills
                results[-1]["experts_per_layer_call"] = (stats.expert_reads - reads) / made if made else None
        finally:
            if clients is not None:
                clients.close()
            served.shutting_down = "the benchmark is over"
            served.cancel_all()
            server.stop()
        # transformers gets the same threads, up to the cores there are (the cluster's sides take turns on them)
        layout = {"workers": len(cluster.slots), "threads_per_worker": [s.threads for s in cluster.slots],
                  "coordinator_threads": torch.get_num_threads(), "total_threads": threads,
                  "transformers_threads": min(os.cpu_count() or 1, threads),
                  "cold_format": cluster.coordinator.placement.cold_format or dtype}
    return results, layout


# --- transformers on a padded batch ---


def bench_transformers(folder: Path, dtype: str, options: ServeOptions, prompts: list[list[int]], threads: int,
                       log: Callable[[str], None]) -> list[dict]:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype)).eval()
    pad = pad_token_id(model)

    def run(batch: list[list[int]], new_tokens: int) -> list[Stream]:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        streamer = first_token_streamer()
        sent = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=pad, streamer=streamer)
        end = time.perf_counter()
        return [Stream(sent, streamer.first_at, end, new_tokens) for _ in batch]

    run(prompts[:1], 4)  # warm-up
    results = []
    for n in options.clients:
        rounds = []
        for r in range(options.repeats):
            rounds.append(round_figures(run(prompts[:n], options.new_tokens)))
            log(f"transformers, batch of {n}, round {r + 1}: "
                f"{rounds[-1]['aggregate_decode_tokens_per_second']:.1f} decode tok/s in all")
        results.append(summarize(rounds, n))
    return results


# --- the whole benchmark ---


def run_serve_bench(options: ServeOptions, log: Callable[[str], None] = lambda text: print(text, file=sys.stderr)
                    ) -> dict:
    if not options.clients or min(options.clients) < 1:
        given = ",".join(str(n) for n in options.clients) or "nothing"
        raise ValueError(f"--clients {given}: give counts of 1 or more, e.g. 1,2,4,8")
    folder, dtype = prepare_checkpoint(BenchOptions(preset=options.preset, model=options.model,
                                                    dtype=options.dtype), log)
    from fiddler_moe.coordinator.loading import read_config

    config = read_config(folder)
    avoid = {t for t in (getattr(config, "eos_token_id", None), getattr(config, "bos_token_id", None),
                         getattr(config, "pad_token_id", None)) if isinstance(t, int)}
    prompts = [random_prompt(config.vocab_size, options.prompt_len, options.seed + i, avoid)
               for i in range(max(options.clients))]
    cluster, layout = bench_cluster(folder, dtype, options, prompts, log)
    baseline = bench_transformers(folder, dtype, options, prompts, layout["transformers_threads"], log) \
        if options.baseline else []
    one = cluster[0]["aggregate_decode_tokens_per_second"] if cluster[0]["clients"] == 1 else None
    for row in cluster:
        row["versus_one_client"] = row["aggregate_decode_tokens_per_second"] / one if one else None
    for row, base in zip(cluster, baseline):
        ratio = base["aggregate_decode_tokens_per_second"]
        row["versus_transformers"] = row["aggregate_decode_tokens_per_second"] / ratio if ratio else None
    return {
        "benchmark": "serve",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "model": {"name": options.preset if options.model is None else str(options.model), "folder": str(folder),
                  "dtype": dtype},
        "settings": {"clients": options.clients, "prompt_len": options.prompt_len, "new_tokens": options.new_tokens,
                     "repeats": options.repeats, "device": options.device, "seed": options.seed,
                     "quantize": options.quantize},
        "machine": describe_machine(torch.device("cpu")),
        "cluster_layout": layout,
        "fiddler": cluster,
        "transformers": baseline,
    }


def _quantize(result: dict) -> str:
    """The workers' format of a result (results written before --quantize reached `bench serve` have none)."""
    return result["settings"].get("quantize", "none")


def table(result: dict) -> str:
    """The figures as a Markdown table, as the README keeps it; `experts a call`: the experts a layer call routed
    to (their weights read once for all its rows), on average over the rounds' calls, prefills included."""
    rows = ["| clients | run | aggregate decode tok/s | per-stream decode tok/s | TTFT s | x one client | "
            "x transformers | experts a call |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    baseline = {b["clients"]: b for b in result["transformers"]}
    quantize = _quantize(result)
    name = "fiddler" if quantize == "none" else f"fiddler, {quantize}"
    for row in result["fiddler"]:
        versus, experts = row.get("versus_transformers"), row.get("experts_per_layer_call")
        rows.append(f"| {row['clients']} | {name} | {row['aggregate_decode_tokens_per_second']:.1f} | "
                    f"{row['stream_decode_tokens_per_second']:.1f} | {row['ttft_seconds']:.2f} | "
                    f"{row['versus_one_client']:.2f}x | {f'{versus:.2f}x' if versus else '-'} | "
                    f"{f'{experts:.1f}' if experts else '-'} |")
        base = baseline.get(row["clients"])
        if base:
            rows.append(f"| | transformers, batch of {base['clients']} | "
                        f"{base['aggregate_decode_tokens_per_second']:.1f} | "
                        f"{base['stream_decode_tokens_per_second']:.1f} | {base['ttft_seconds']:.2f} | | | |")
    return "\n".join(rows)


def write_results(result: dict, out: Path, chart: bool) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    quantize = _quantize(result)
    fmt = "" if quantize == "none" else f"-{quantize}"
    name = f"{Path(result['model']['name']).name}-{result['model']['dtype']}{fmt}"
    stem = f"serve-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = out / f"{stem}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    written = [path]
    if chart:
        png = write_chart(result, out / f"{stem}.png")
        if png is not None:
            written.append(png)
    return written


def write_chart(result: dict, path: Path) -> Path | None:
    """Aggregate decode tok/s and TTFT against the number of clients, fiddler and transformers. None without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    runs = [("fiddler (HTTP, batched engine)", result["fiddler"], "tab:blue"),
            ("transformers generate, padded batch", result["transformers"], "tab:gray")]
    for name, rows, color in runs:
        if not rows:
            continue
        clients = [r["clients"] for r in rows]
        axes[0].plot(clients, [r["aggregate_decode_tokens_per_second"] for r in rows], "o-", color=color, label=name)
        axes[1].plot(clients, [r["stream_decode_tokens_per_second"] for r in rows], "o-", color=color, label=name)
        axes[2].plot(clients, [r["ttft_seconds"] for r in rows], "o-", color=color, label=name)
    for ax, title in zip(axes, ("aggregate decode, tokens/s", "per-stream decode, tokens/s",
                                "time to first token, s")):
        ax.set_title(title)
        ax.set_xlabel("concurrent clients (streams)")
        ax.set_xticks(result["settings"]["clients"])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    model, machine = result["model"], result["machine"]
    fig.suptitle(f"{model['name']} ({model['dtype']}), prompt {result['settings']['prompt_len']}, "
                 f"{result['settings']['new_tokens']} new tokens, every expert cold: {machine['cpu_model']}, "
                 f"{machine['logical_cpus']} cpus", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
