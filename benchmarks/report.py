"""What `fiddler bench` shows: tables on the terminal, the JSON file, and the PNG chart (matplotlib, optional)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from fiddler_moe.benchmarks.runners import BREAKDOWN_PARTS, NOT_BANDWIDTH
from fiddler_moe.coordinator.placement import format_size


def _versus(versus: dict | None) -> str:
    if not versus:
        return ""
    rounds = versus.get("rounds")
    if not rounds:
        return f"{versus['prefill']:.2f}x, {versus['decode']:.2f}x"
    return f"{rounds['prefill']['median']:.2f}x, {rounds['decode']['median']:.2f}x"


def _gbps(x: float) -> str:
    return f"{x / 1e9:.1f} GB/s"


def print_tables(result: dict, console: Console | None = None) -> None:
    console = console or Console(stderr=False)
    model, machine, settings = result["model"], result["machine"], result["settings"]
    needed = model["decode_bytes_per_token"]
    console.print(
        f"[bold]{model['name']}[/bold] ({model['architecture']}, {model['dtype']}, "
        f"{format_size(model['weight_bytes'])}): prompt {settings['prompt_len']} tokens, "
        f"{settings['new_tokens']} new tokens, median of {settings['repeats']} runs"
    )
    console.print(
        f"machine: {machine['cpu_model']}, {machine['logical_cpus']} cpus, {machine['numa_nodes']} NUMA node(s), "
        f"{format_size(machine['memory_bytes'] or 0)}, device {machine['device']}"
    )
    console.print(
        f"ceiling: {_gbps(result['bandwidth']['bytes_per_second'])} read bandwidth / "
        f"{format_size(needed['total'])} per decode token = "
        f"{result['ceiling']['decode_tokens_per_second']:.1f} tok/s"
    )

    table = Table(title="tokens per second", box=box.SIMPLE_HEAD)
    for column in ("run", "hot", "prefill", "decode", "of ceiling", "vs transformers", "same tokens"):
        table.add_column(column, justify="left" if column == "run" else "right", no_wrap=column == "run")
    for c in result["cluster"]:
        cfg = c["config"]
        versus = c.get("vs_transformers")
        table.add_row(
            f"fiddler {cfg['label']}",
            f"{c['hot_share']:.0%}",
            f"{c['prefill_tokens_per_second']:.1f}",
            f"{c['decode_tokens_per_second']:.2f}",
            f"{c['share_of_ceiling']:.0%}"
            + (f" (own {c['share_of_own_ceiling']:.0%})" if cfg.get("quantize", "none") != "none" else ""),
            _versus(versus),
            f"{versus['same_greedy_tokens']}/{len(c['token_ids'])}" if versus else "",
        )
    for b in result["transformers"]:
        table.add_row(
            f"transformers {b['threads']}", "",
            f"{b['prefill_tokens_per_second']:.1f}", f"{b['decode_tokens_per_second']:.2f}",
            f"{b['share_of_ceiling']:.0%}", "", "",
        )
    for o in result.get("offload", []):
        table.add_row(
            f"offload {o['device_memory']}", "",
            f"{o['prefill_tokens_per_second']:.1f}", f"{o['decode_tokens_per_second']:.2f}",
            f"{o['share_of_ceiling']:.0%}", "", "",
        )
    table.add_row("ceiling", "", "", f"{result['ceiling']['decode_tokens_per_second']:.2f}", "100%", "", "")
    console.print(table)
    for c in result["cluster"]:
        rounds = (c.get("vs_transformers") or {}).get("rounds")
        if rounds and "decode" in rounds:
            console.print(f"fiddler {c['config']['label']} vs transformers, range over rounds: prefill "
                          f"{rounds['prefill']['min']:.2f}-{rounds['prefill']['max']:.2f}x, decode "
                          f"{rounds['decode']['min']:.2f}-{rounds['decode']['max']:.2f}x")
    for c in result["cluster"]:
        if c.get("vs_offload"):
            console.print(f"fiddler {c['config']['label']} vs accelerate's offloading at the same budget: "
                          f"{_versus(c['vs_offload'])} (prefill, decode)")
    console.print("fiddler C+WxT: C coordinator threads (P/D: P in prefill, D in decoding steps), W workers of T threads (int8/int4: their experts in that "
                  "format; own: the ceiling of the bytes that format reads); transformers N: N threads; "
                  "vs transformers: prefill, decode (above 1x is faster; interleaved runs: the median of each "
                  "round's ratio); offload M: transformers with accelerate's offloading, M on the device; "
                  "same tokens: greedy tokens equal to transformers' before the first difference; "
                  "transformers' experts implementation: "
                  f"{', '.join(sorted({b['experts_implementation'] for b in result['transformers']})) or '-'}")

    parts = Table(title="one decode token, ms", box=box.SIMPLE_HEAD)
    parts.add_column("")
    for c in result["cluster"]:
        parts.add_column(c["config"]["label"], justify="right")
    for key, label in BREAKDOWN_PARTS.items():
        parts.add_row(label, *(f"{c['decode_ms_per_token'][key]:.2f}" for c in result["cluster"]))
    parts.add_row("total", *(f"{c['decode_ms_per_token']['total']:.2f}" for c in result["cluster"]))
    parts.add_row("workers busy", *(" ".join(f"{v:.0%}" for v in c["worker_busy_share"].values())
                                    for c in result["cluster"]))
    parts.add_row("hit rate", *(f"{c['hit_rate']:.0%}" for c in result["cluster"]))
    bound = [c["bound"] for c in result["cluster"] if "bound" in c]
    if len(bound) == len(result["cluster"]):
        parts.add_row("at bandwidth", *(f"{b['floor_total_ms']:.2f}" for b in bound))
        parts.add_row("beyond it", *(f"{b['beyond_total_ms']:.2f}" for b in bound))
    console.print(parts)
    for c in result["cluster"]:
        if "bound" not in c:
            continue
        beyond = sorted(c["bound"]["beyond_ms"].items(), key=lambda item: -item[1])
        why = dict(NOT_BANDWIDTH)
        if "non_expert_one_thread_ms" in c["bound"]:  # the coordinator decodes on one thread
            why["non_expert"] = (f"{why['non_expert']}; its bytes at one thread's read bandwidth, the coordinator's in "
                                 f"decoding steps (the head at every core's): {c['bound']['non_expert_one_thread_ms']:.2f}"
                                 " ms")
        text = "; ".join(f"{BREAKDOWN_PARTS[key]} {ms:.2f} ({why[key]})" for key, ms in beyond if ms >= 0.05)
        console.print(f"fiddler {c['config']['label']}, ms a decode token beyond its bytes at the read bandwidth: "
                      f"{text or 'none'}")


def result_stem(result: dict) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(result["model"]["name"])).name)
    return f"bench-{name}-{result['model']['dtype']}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_json(result: dict, out: Path, stem: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def write_chart(result: dict, out: Path, stem: str) -> Path | None:
    """tok/s per configuration against transformers and the ceiling, and the decode time breakdown as stacked
    bars. None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    clusters, baselines = result["cluster"], result["transformers"]
    labels = [f"fiddler\n{c['config']['label']}" for c in clusters]
    labels += [f"transformers\n{b['threads']} thr" for b in baselines]
    colors = ["tab:blue"] * len(clusters) + ["tab:gray"] * len(baselines)
    prefill = [c["prefill_tokens_per_second"] for c in clusters] + [b["prefill_tokens_per_second"] for b in baselines]
    decode = [c["decode_tokens_per_second"] for c in clusters] + [b["decode_tokens_per_second"] for b in baselines]
    ceiling = result["ceiling"]["decode_tokens_per_second"]

    width = min(18.0, 7.0 + 1.8 * len(labels))
    fig, axes = plt.subplots(1, 3, figsize=(width, 4.8), gridspec_kw={"width_ratios": [1, 1, 1.2]})
    ax = axes[0]
    ax.bar(range(len(labels)), prefill, color=colors)
    ax.set_title("prefill, tokens/s")
    ax = axes[1]
    bars = ax.bar(range(len(labels)), decode, color=colors)
    if ceiling > 0:
        ax.bar_label(bars, [f"{v:.1f}\n{v / ceiling:.0%}" for v in decode], fontsize="x-small")
    ax.axhline(ceiling, color="tab:red", linestyle="--", label=f"memory-bandwidth ceiling {ceiling:.1f}")
    ax.set_title("decode, tokens/s")
    ax.legend(loc="upper right", fontsize="x-small")
    for ax in axes[:2]:
        ax.set_xticks(range(len(labels)), labels, fontsize="small")
        ax.grid(axis="y", alpha=0.3)

    ax = axes[2]
    bottom = [0.0] * len(clusters)
    for key, label in BREAKDOWN_PARTS.items():
        values = [c["decode_ms_per_token"][key] for c in clusters]
        ax.bar(range(len(clusters)), values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    if ceiling > 0:
        ax.axhline(1e3 / ceiling, color="tab:red", linestyle="--", label="ceiling")
    ax.set_xticks(range(len(clusters)), [c["config"]["label"] for c in clusters], fontsize="small")
    ax.set_title("one decode token, ms")
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)

    model, machine = result["model"], result["machine"]
    fig.suptitle(f"{model['name']} ({model['dtype']}), prompt {result['settings']['prompt_len']}, "
                 f"{result['settings']['new_tokens']} new tokens: {machine['cpu_model']}, "
                 f"{machine['logical_cpus']} cpus, {machine['device']}", fontsize="medium")
    fig.tight_layout()
    path = out / f"{stem}.png"
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
