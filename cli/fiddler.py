"""`fiddler`: send prompts to a running cluster (`generate`), or launch, generate and stop in one go (`run`);
record an expert profile (`profile`); show a running cluster's live statistics (`stats`)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from fiddler_moe.cli.options import cluster_options_command, fail, run_then_exit
from fiddler_moe.host import numa
from fiddler_moe.launch.options import ClusterOptions

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True, rich_markup_mode=None)

PromptArg = Annotated[str, typer.Argument(help="The prompt text.")]
MaxNewTokensOption = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate at most.")]
TemperatureOption = Annotated[float, typer.Option("--temperature", help="0 = greedy; above 0 samples.")]
TopPOption = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass in (0, 1].")]
TopKOption = Annotated[int, typer.Option("--top-k", help="Sample among the k likeliest tokens; 0 = off.")]
SeedOption = Annotated[int | None, typer.Option("--seed", help="Random seed for sampling.")]
NumBeamsOption = Annotated[int, typer.Option("--num-beams", help="Beam search with this many beams (greedy); 1 = "
                                            "off.")]
ChatOption = Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the tokenizer's chat template.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object: ids, text and timings.")]
AddressOption = Annotated[str | None, typer.Option(help="Coordinator address; default: the newest local cluster.")]


@dataclass
class Result:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    prefill_seconds: float
    decode_seconds: float

    def as_json(self, **extra) -> str:
        return json.dumps(
            {
                "prompt_token_ids": self.prompt_token_ids,
                "token_ids": self.token_ids,
                "text": self.text,
                "prefill_seconds": self.prefill_seconds,
                "decode_seconds": self.decode_seconds,
                "prefill_tokens_per_second": rate(len(self.prompt_token_ids), self.prefill_seconds),
                "decode_tokens_per_second": rate(len(self.token_ids) - 1, self.decode_seconds),
                **extra,
            }
        )

    def summary(self) -> str:
        return (
            f"prefill: {len(self.prompt_token_ids)} tokens in {self.prefill_seconds:.3f}s "
            f"({rate(len(self.prompt_token_ids), self.prefill_seconds):.1f} tok/s); "
            f"decode: {len(self.token_ids)} tokens ({rate(len(self.token_ids) - 1, self.decode_seconds):.1f} tok/s)"
        )


def rate(n: int, seconds: float) -> float:
    return n / seconds if n > 0 and seconds > 0 else 0.0


def _print_piece(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _find_cluster(address: str | None) -> tuple[str, int | None]:
    """(address, pid of the launcher when known): the given address, else the newest running local cluster."""
    from fiddler_moe.launch import rundir

    if address is not None:
        return address, None
    clusters = rundir.live_clusters()
    if not clusters:
        raise fail('no running cluster found; start one with `fiddler-launch --model PATH` or use `fiddler run "..."`')
    return clusters[0].address, clusters[0].pid


def _ask_stats(client, address: str, owner_pid: int | None, timeout: float, reset: bool = False):
    """Send a StatsRequest and wait for the StatsReply."""
    from fiddler_moe.launch import rundir
    from fiddler_moe.protocol import messages as m

    client.send(m.StatsRequest(reset=reset))
    waited = 0.0
    while True:
        msg = client.receive(timeout_s=1.0)
        if isinstance(msg, m.StatsReply):
            return msg
        if isinstance(msg, m.Error):
            raise fail(msg.message)
        if msg is None:
            waited += 1.0
            if owner_pid is not None and not rundir.alive(owner_pid):
                raise fail(f"the cluster at {address} stopped before answering")
            if waited >= timeout:
                raise fail(f"no answer from {address} within {timeout:.0f}s; is `fiddler-launch` running?")


@app.command()
def generate(
    prompt: PromptArg,
    address: AddressOption = None,
    max_new_tokens: MaxNewTokensOption = 128,
    temperature: TemperatureOption = 0.0,
    top_p: TopPOption = 1.0,
    top_k: TopKOption = 0,
    seed: SeedOption = None,
    chat: ChatOption = False,
    num_beams: NumBeamsOption = 1,
    as_json: JsonOption = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the cluster between tokens.")] = 600.0,
    show_stats: Annotated[bool, typer.Option("--stats", help="After the answer, show this request's statistics: "
                                             "hit rate, moved experts, per-worker busy time and requests.")] = False,
) -> None:
    """Send a prompt to the running cluster and stream the answer."""
    from fiddler_moe.coordinator import stats
    from fiddler_moe.coordinator.coordinator import check_sampling
    from fiddler_moe.launch import rundir
    from fiddler_moe.protocol import messages as m
    from fiddler_moe.protocol.transport import Client

    try:
        check_sampling(max_new_tokens, temperature, top_p, top_k, seed, num_beams)
    except ValueError as e:
        raise fail(str(e)) from None
    address, owner_pid = _find_cluster(address)
    client = Client(address)
    try:
        before = _ask_stats(client, address, owner_pid, timeout) if show_stats else None
        client.send(m.GenerateRequest(prompt, max_new_tokens, temperature, top_p, top_k, seed, chat, num_beams))
        waited = 0.0
        while True:
            msg = client.receive(timeout_s=1.0)
            if msg is None:
                waited += 1.0
                if owner_pid is not None and not rundir.alive(owner_pid):
                    raise fail(f"the cluster at {address} stopped before answering")
                if waited >= timeout:
                    raise fail(f"no answer from {address} within {timeout:.0f}s; is `fiddler-launch` running?")
                continue
            waited = 0.0
            if isinstance(msg, m.TokenChunk):
                if not as_json:
                    _print_piece(msg.text)
            elif isinstance(msg, m.GenerateDone):
                result = Result(msg.prompt_token_ids, msg.token_ids, msg.text, msg.prefill_seconds, msg.decode_seconds)
                break
            elif isinstance(msg, m.Error):
                raise fail(msg.message)
        used = stats.difference(before, _ask_stats(client, address, owner_pid, timeout)) if show_stats else None
    finally:
        client.close()
    if as_json:
        print(result.as_json(**({"stats": stats.as_dict(used)} if used else {})))
    else:
        print()
        typer.echo(result.summary(), err=True)
        if used:
            typer.echo("\n".join(["stats of this request:"] + ["  " + line for line in stats.describe(used)]), err=True)


@app.command()
@cluster_options_command(exclude=("restart_workers", "max_restarts"))  # one prompt: a dead worker ends it anyway
def run(
    prompt: PromptArg,
    options: ClusterOptions,
    max_new_tokens: MaxNewTokensOption = 128,
    temperature: TemperatureOption = 0.0,
    top_p: TopPOption = 1.0,
    top_k: TopKOption = 0,
    seed: SeedOption = None,
    chat: ChatOption = False,
    num_beams: NumBeamsOption = 1,
    as_json: JsonOption = False,
) -> None:
    """Launch a cluster, generate for one prompt, and stop everything."""
    from fiddler_moe.coordinator.coordinator import check_sampling
    from fiddler_moe.coordinator.dispatch import WorkerFailed
    from fiddler_moe.coordinator.service import TextStream
    from fiddler_moe.experts.checkpoint import CheckpointError
    from fiddler_moe.cli.launch import _terminate_as_interrupt
    from fiddler_moe.launch.cluster import Cluster

    _terminate_as_interrupt()
    try:
        check_sampling(max_new_tokens, temperature, top_p, top_k, seed, num_beams)
        options.quiet = as_json
        with Cluster(options) as cluster:
            stream = None if as_json else TextStream(cluster.tokenizer, lambda text, ids: _print_piece(text))
            out = cluster.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   top_k=top_k, seed=seed, chat=chat, on_token=stream, num_beams=num_beams)
    except KeyboardInterrupt:
        raise fail("interrupted; the cluster was stopped") from None
    except (CheckpointError, ValueError, WorkerFailed, PermissionError) as e:
        raise fail(str(e)) from None
    result = Result(out.prompt_token_ids, out.token_ids, out.text, out.prefill_seconds, out.decode_seconds)
    if as_json:
        print(result.as_json())
    else:
        print()
        typer.echo(result.summary(), err=True)


@app.command()
def stats(
    address: AddressOption = None,
    save_profile: Annotated[Path | None, typer.Option("--save-profile", help="Also write the routing counts as an "
                                                      "expert profile, for the next `fiddler-launch --profile`.")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with every count.")] = False,
    reset: Annotated[bool, typer.Option("--reset", help="Start counting afresh after this answer.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the cluster (it answers between requests).")]
    = 600.0,
) -> None:
    """Show the running cluster's live statistics: hit rate, per-worker busy time and requests, routing counts."""
    from fiddler_moe.coordinator import stats as live
    from fiddler_moe.coordinator.profile import ProfileError
    from fiddler_moe.protocol.transport import Client

    address, owner_pid = _find_cluster(address)
    client = Client(address)
    try:
        reply = _ask_stats(client, address, owner_pid, timeout, reset=reset)
    finally:
        client.close()
    if save_profile is not None:
        if reply.tokens == 0:
            raise fail("the cluster has not counted any tokens yet; send it some prompts first, then save the profile")
        try:
            path = live.to_profile(reply).save(save_profile)
        except (ProfileError, OSError) as e:
            raise fail(f"cannot write {save_profile}: {e}") from None
        typer.echo(f"wrote {path}: {reply.tokens} tokens; use it with fiddler-launch --profile {path}", err=True)
    if as_json:
        print(json.dumps(live.as_dict(reply)))
    else:
        print("\n".join(live.describe(reply)))


@app.command()
@cluster_options_command(exclude=("profile", "restart_workers", "max_restarts"))  # it records a profile, once
def profile(
    prompts: Annotated[Path, typer.Option("--prompts", help="Calibration prompts: a text file with one prompt per "
                                          'line, or JSONL with {"prompt": ...}, {"text": ...} or {"messages": [...]} '
                                          "per line.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the profile.")] = Path("profile.json"),
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens to generate after each prompt, so that "
                                            "decoding is counted too; 0 reads the prompts only.")] = 0,
    *,
    options: ClusterOptions,
) -> None:
    """Run calibration prompts through a cluster and write how often each expert was routed (an expert profile)."""
    import torch

    from fiddler_moe.coordinator import stats as live
    from fiddler_moe.coordinator.dispatch import WorkerFailed
    from fiddler_moe.coordinator.profile import ProfileError, read_calibration_prompts
    from fiddler_moe.experts.checkpoint import CheckpointError
    from fiddler_moe.cli.launch import _terminate_as_interrupt
    from fiddler_moe.launch.cluster import Cluster

    _terminate_as_interrupt()
    if max_tokens < 0:
        raise fail(f"--max-tokens must be 0 or more, got {max_tokens}")
    try:
        calibration = read_calibration_prompts(prompts)
    except ProfileError as e:
        raise fail(str(e)) from None
    try:
        with Cluster(options) as cluster:
            coordinator = cluster.coordinator
            shortened = 0
            for number, prompt in enumerate(calibration, start=1):
                ids, cut = _calibration_ids(coordinator, prompt, number, max_tokens)
                shortened += cut
                if max_tokens:
                    cluster.generate(ids, max_new_tokens=max_tokens)
                else:
                    cluster.logits(torch.tensor([ids]))
                if sys.stderr.isatty():
                    typer.echo(f"\rprofiling: {number}/{len(calibration)} prompts, "
                               f"{coordinator.dispatcher.stats.tokens} tokens", err=True, nl=False)
            if sys.stderr.isatty():
                typer.echo("", err=True)
            recorded = live.to_profile(live.snapshot(coordinator))
        path = recorded.save(out)
    except KeyboardInterrupt:
        raise fail("interrupted; the cluster was stopped and no profile was written") from None
    except (CheckpointError, ValueError, WorkerFailed, PermissionError) as e:
        raise fail(str(e)) from None
    except OSError as e:
        raise fail(f"cannot write {out}: {e}") from None
    if shortened:
        typer.echo(f"note: {shortened} prompt(s) were longer than the model's context and were cut", err=True)
    typer.echo(f"wrote {path}: {len(calibration)} prompts, {recorded.tokens} tokens, {recorded.total} routings; "
               f"{_concentration(recorded)}; use it with fiddler-launch --profile {path}", err=True)


def _calibration_ids(coordinator, prompt, number: int, max_tokens: int) -> tuple[list[int], int]:
    """A calibration prompt's token ids (a chat through the tokenizer's template), cut to fit the context; and
    1 if it was cut, else 0."""
    if isinstance(prompt, str):
        ids = coordinator.encode_prompt(prompt)
    else:
        if not getattr(coordinator.tokenizer, "chat_template", None):
            raise ValueError(f"prompt {number} is a chat but this model's tokenizer has no chat template; give it "
                             'as {"prompt": "..."} instead')
        ids = coordinator.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        ids = list(ids)
    context = getattr(coordinator.layout.config, "max_position_embeddings", None)
    room = context - max_tokens - 1 if context else None
    if room is not None and len(ids) > room:
        if room < 1:
            raise ValueError(f"--max-tokens {max_tokens} leaves no room for a prompt in the model's context of "
                             f"{context} tokens; lower it")
        return ids[:room], 1
    return ids, 0


def _concentration(profile) -> str:
    """How skewed the counts are: the share of routings that the most used quarter of the experts received."""
    counts = sorted(profile.counts.values(), reverse=True)
    quarter = max(1, len(counts) // 4)
    share = sum(counts[:quarter]) / profile.total if profile.total else 0.0
    return f"the most used {quarter} of {len(counts)} experts got {share:.0%} of them"


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise fail(f"{flag} takes a comma-separated list of whole numbers, like 1,2,4; got {text!r}") from None


def _bench_transport(out) -> None:
    import json
    import platform

    from fiddler_moe.benchmarks import transport as bench_transport

    results = bench_transport.run()
    print(bench_transport.table(results))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "transport.json"
    path.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                                "results": bench_transport.as_dicts(results)}, indent=1))
    typer.echo(f"wrote {path}", err=True)


def _bench_serve(preset: str, model: str | None, dtype: str, clients: list[int], prompt_len: int, new_tokens: int,
                 repeats: int, device: str, quantize: str, baseline: bool, out, chart: bool, seed: int) -> None:
    """`fiddler bench serve`: concurrent HTTP clients against one cluster, beside transformers (benchmarks/serve.py)."""
    from pathlib import Path

    from fiddler_moe.cli.launch import _terminate_as_interrupt
    from fiddler_moe.coordinator.dispatch import WorkerFailed
    from fiddler_moe.experts.checkpoint import CheckpointError

    try:
        from fiddler_moe.benchmarks import serve
    except ImportError as e:
        raise fail(f"`fiddler bench serve` needs {e.name}: pip install -e '.[bench]'") from None
    _terminate_as_interrupt()
    options = serve.ServeOptions(preset=preset, model=Path(model) if model else None, dtype=dtype, clients=clients,
                                 prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats,
                                 device="cpu" if device == "auto" else device, quantize=quantize,
                                 baseline=baseline, out=out,
                                 chart=chart, seed=seed)
    try:
        result = serve.run_serve_bench(options)
    except KeyboardInterrupt:
        raise fail("interrupted; the cluster was stopped") from None
    except (CheckpointError, ValueError, WorkerFailed, PermissionError, OSError, RuntimeError) as e:
        raise fail(str(e)) from None
    typer.echo(serve.table(result))
    written = serve.write_results(result, out, chart)
    typer.echo("wrote " + ", ".join(str(p) for p in written), err=True)


@app.command()
def bench(
    what: Annotated[str, typer.Argument(help="model: tokens/s of a cluster (default); serve: concurrent HTTP "
                                        "clients against one cluster (--clients) beside transformers' batched "
                                        "generate; transport: round-trip latency of shared memory, ZeroMQ ipc and "
                                        "tcp.")] = "model",
    preset: Annotated[str, typer.Option(help="Random-weight checkpoint of real shapes, written once and cached: "
                                        "tiny, mini, small, qwen3-moe-mini, mixtral-8x7b, ...")] = "mini",
    model: Annotated[str | None, typer.Option("--model", "-m", help="Benchmark this checkpoint folder "
                                               "instead of a preset.")] = None,
    dtype: Annotated[str, typer.Option(help="bfloat16, float16, float32, or auto (the checkpoint's).")] = "bfloat16",
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens (fixed random ids).")] = 256,
    new_tokens: Annotated[int, typer.Option(help="Tokens to generate, greedy, never stopping early.")] = 64,
    repeats: Annotated[int, typer.Option(help="Timed runs per configuration; the median is reported.")] = 3,
    warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 1,
    workers: Annotated[str, typer.Option("--workers", "-w", help="Worker counts to sweep, e.g. 1,2.")] = "1",
    threads_per_worker: Annotated[str | None, typer.Option("--threads-per-worker", "-t", help="Threads per worker "
                                  "to sweep, e.g. 1,2. Default: fiddler-launch's.")] = None,
    device_memory: Annotated[str | None, typer.Option(help="Device memory budgets to sweep (hot share), e.g. "
                             "0,500MiB,all. Default: the device's default.")] = None,
    device: Annotated[str, typer.Option(help="Coordinator device: cuda, cpu or auto.")] = "auto",
    quantize: Annotated[str, typer.Option(help="The workers' formats to sweep, e.g. none,int8,int4 (each run's "
                        "format is in the JSON).")] = "none",
    coordinator_threads: Annotated[str | None, typer.Option(help="Coordinator torch threads to sweep, e.g. 1,2. "
                                   "Default: fiddler-launch's (the cores it keeps for the coordinator).")] = None,
    interleave: Annotated[bool, typer.Option(help="Load every contestant at once and run them in turns, so "
                          "load from elsewhere hurts all alike (when memory allows).")] = True,
    baseline: Annotated[bool, typer.Option(help="Also run transformers' own generate.")] = True,
    offload: Annotated[bool, typer.Option(help="On a GPU, per --device-memory budget, also run transformers with "
                       "accelerate's weight offloading at that budget (needs accelerate: pip install -e "
                       "'.[bench]').")] = True,
    baseline_threads: Annotated[str | None, typer.Option(help="Thread counts for transformers, e.g. 1,2. Default: "
                                "each cluster's total threads, up to the cores.")] = None,
    out: Annotated[str, typer.Option(help="Folder for the JSON and PNG results.")] = "bench-results",
    chart: Annotated[bool, typer.Option(help="Draw the PNG chart (needs matplotlib: pip install -e '.[bench]').")]
    = True,
    seed: Annotated[int, typer.Option(help="Seed of the random prompt.")] = 0,
    bandwidth_mib: Annotated[int, typer.Option(help="Array size for the read-bandwidth measurement.")] = 1024,
    clients: Annotated[str, typer.Option(help="`bench serve`: concurrent clients to measure, e.g. 1,2,4,8.")]
    = "1,2,4,8",
) -> None:
    """Prefill and decode tokens/s of the cluster against transformers and the memory-bandwidth ceiling;
    `fiddler bench transport` measures the transports instead."""
    from pathlib import Path

    if what == "transport":
        _bench_transport(Path(out))
        return
    if what == "serve":
        if "," in quantize:
            raise fail(f"`fiddler bench serve` measures one format at a time, not --quantize {quantize}; run it once "
                       "per format, e.g. --quantize int4")
        _bench_serve(preset, model, dtype, _int_list(clients, "--clients"), prompt_len, new_tokens, repeats, device,
                     quantize.strip(), baseline, Path(out), chart, seed)
        return
    if what != "model":
        raise fail(f"unknown benchmark {what!r}; use `fiddler bench` (model), `fiddler bench serve` or "
                   "`fiddler bench transport`")

    from fiddler_moe.benchmarks import bench as bench_module
    from fiddler_moe.benchmarks import report as bench_report
    from fiddler_moe.coordinator.dispatch import WorkerFailed
    from fiddler_moe.experts.checkpoint import CheckpointError
    from fiddler_moe.cli.launch import _terminate_as_interrupt

    _terminate_as_interrupt()
    options = bench_module.BenchOptions(
        preset=preset, model=Path(model) if model else None, dtype=dtype, prompt_len=prompt_len,
        new_tokens=new_tokens, repeats=repeats,
        warmup=warmup, workers=_int_list(workers, "--workers"),
        threads_per_worker=_int_list(threads_per_worker, "--threads-per-worker") if threads_per_worker else [None],
        device_memory=[part.strip() for part in device_memory.split(",")] if device_memory else [None],
        device=device, baseline=baseline, offload=offload, out=Path(out), chart=chart, seed=seed,
        bandwidth_mib=bandwidth_mib,
        quantize=[part.strip() for part in quantize.split(",")],
        coordinator_threads=_int_list(coordinator_threads, "--coordinator-threads") if coordinator_threads else [None],
        interleave=interleave,
        baseline_threads=_int_list(baseline_threads, "--baseline-threads") if baseline_threads else None,
    )
    try:
        result = bench_module.run_bench(options)
    except KeyboardInterrupt:
        raise fail("interrupted; every cluster was stopped") from None
    except (CheckpointError, ValueError, WorkerFailed, PermissionError, OSError) as e:
        raise fail(str(e)) from None
    bench_report.print_tables(result)
    stem = bench_report.result_stem(result)
    written = [bench_report.write_json(result, options.out, stem)]
    if chart:
        png = bench_report.write_chart(result, options.out, stem)
        if png is None:
            typer.echo("no chart: matplotlib is not installed (pip install -e '.[bench]')", err=True)
        else:
            written.append(png)
    typer.echo("wrote " + ", ".join(str(p) for p in written), err=True)


def main() -> None:
    numa.use_openmp_settings()  # before anything imports torch
    run_then_exit(app)


if __name__ == "__main__":
    main()
