"""A small Mixtral-shaped model trained on text every machine with Python has: the standard library's own sources.

Random weights say little about what quantizing costs a trained model (benchmarks/quant_accuracy.py), and nothing
can be downloaded here, so this trains one: transformers' MixtralForCausalLM (4 layers of 8 experts, top 2, hidden
size 128) with a byte-level BPE of 2048 tokens trained on the same text, on the running Python's Lib/*.py, every
tenth file (sorted by name) held out for evaluation. Training runs for a time budget (--minutes; the learning rate
follows a cosine over it), so a slower machine takes fewer steps. The model is saved with save_pretrained (float32),
with its tokenizer and a training.json (the plan, the steps taken, the losses, the held-out files), under

    cache_dir()/trained/tiny-stdlib-<hash of the plan and the Python version>/

and every later call with the same plan and Python reuses it:

    .venv/bin/python -m fiddler_moe.benchmarks.train_tiny --minutes 10
"""

from __future__ import annotations

if __name__ == "__main__":  # OpenMP's waiting as the fiddler commands set it, read once when torch loads OpenMP
    from fiddler_moe.host import numa

    numa.use_openmp_settings()

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from fiddler_moe.host.paths import cache_dir
from fiddler_moe.launch.synthetic import EOS, PAD, SPECIAL_TOKENS, BOS, build_tokenizer

VERSION = 1  # bump when what a plan trains changes, so that an old model is not reused


@dataclass(frozen=True)
class TrainingPlan:
    minutes: float = 10.0  # the time budget
    max_steps: int = 0  # also stop after this many steps (0: no limit); for a quick test of the pipeline
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 256  # per expert; both sizes are whole blocks of 32 for --quantize
    num_layers: int = 4
    num_experts: int = 8
    top_k: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    context: int = 256  # tokens per training sequence
    batch: int = 4  # sequences per step: more steps in the budget, which a small model gains more from
    learning_rate: float = 6e-3
    warmup_steps: int = 20
    held_out_every: int = 10  # every tenth file is held out
    threads: int = 1  # on a shared 2-core machine 1 thread trained 5x faster than 2 (OpenMP waiting at each op)
    seed: int = 0

    def key(self) -> str:
        material = {"version": VERSION, "python": sys.version.split()[0], **asdict(self)}
        material.pop("threads")  # how fast, not what
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:12]


def corpus_files() -> list[Path]:
    """The running Python's standard library modules (Lib/*.py), sorted by name."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    if len(files) < 20:
        raise FileNotFoundError(f"found {len(files)} modules in {sysconfig.get_paths()['stdlib']}; this Python has "
                                "no standard library sources to train on (install its full distribution)")
    return files


def split(files: list[Path], every: int) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): every `every`-th file, from the middle of each group, is held out."""
    held = [f for i, f in enumerate(files) if i % every == every // 2]
    return [f for f in files if f not in held], held


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def token_stream(tokenizer: PreTrainedTokenizerFast, files: list[Path]) -> torch.Tensor:
    """The files' tokens one after another, each file closed by </s>."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for path in files:  # the fast tokenizer itself: a whole module is longer than the model's context
        ids += tokenizer.backend_tokenizer.encode(read(path), add_special_tokens=False).ids + [eos]
    return torch.tensor(ids, dtype=torch.long)


def build_config(plan: TrainingPlan) -> transformers.MixtralConfig:
    return transformers.MixtralConfig(
        vocab_size=plan.vocab_size, hidden_size=plan.hidden_size, intermediate_size=plan.intermediate_size,
        num_hidden_layers=plan.num_layers, num_attention_heads=plan.num_heads, num_key_value_heads=plan.num_kv_heads,
        head_dim=plan.hidden_size // plan.num_heads, num_local_experts=plan.num_experts,
        num_experts_per_tok=plan.top_k, max_position_embeddings=4 * plan.context, tie_word_embeddings=False,
        bos_token_id=SPECIAL_TOKENS.index(BOS), eos_token_id=SPECIAL_TOKENS.index(EOS),
        pad_token_id=SPECIAL_TOKENS.index(PAD), router_aux_loss_coef=0.02, dtype=torch.float32,
    )


def checkpoint_path(plan: TrainingPlan) -> Path:
    return cache_dir() / "trained" / f"tiny-stdlib-{plan.key()}"


def train(plan: TrainingPlan, folder: Path, log=print) -> Path:
    """Train the model of `plan` and save it into `folder` (written in a sibling folder, then renamed)."""
    torch.set_num_threads(plan.threads)
    train_files, held_out = split(corpus_files(), plan.held_out_every)
    log(f"training on {len(train_files)} modules of {sysconfig.get_paths()['stdlib']}, {len(held_out)} held out")
    tokenizer = build_tokenizer(plan.vocab_size, 4 * plan.context, texts=(read(f) for f in train_files))
    ids = token_stream(tokenizer, train_files)
    config = build_config(plan)
    config.output_router_logits = True  # the router's load-balancing loss, so that every expert learns
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed)
        model = transformers.MixtralForCausalLM(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=plan.learning_rate, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(plan.seed)
    budget = plan.minutes * 60
    started = last_log = time.monotonic()
    step, losses = 0, []
    while True:
        elapsed = time.monotonic() - started
        if elapsed >= budget or (plan.max_steps and step >= plan.max_steps):
            break
        lr = plan.learning_rate * min(1.0, (step + 1) / plan.warmup_steps) * (
            0.1 + 0.45 * (1 + math.cos(math.pi * elapsed / budget)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(ids) - plan.context, (plan.batch,), generator=generator).tolist()
        batch = torch.stack([ids[s : s + plan.context] for s in starts])
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item() - plan_aux(out, config))
        step += 1
        if time.monotonic() - last_log >= 30:
            last_log = time.monotonic()
            recent = losses[-20:]
            log(f"step {step}, {elapsed / 60:.1f} of {plan.minutes:g} min: loss {sum(recent) / len(recent):.3f}")
    model.config.output_router_logits = False
    model.eval()
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id, do_sample=False)
    recent = losses[-20:] or [float("nan")]
    record = {"plan": asdict(plan), "python": sys.version.split()[0], "steps": step,
              "tokens_seen": step * plan.batch * plan.context, "corpus_tokens": len(ids),
              "seconds": round(time.monotonic() - started, 1), "final_loss": sum(recent) / len(recent),
              "held_out": [f.name for f in held_out], "created": time.strftime("%Y-%m-%d")}
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        staging.chmod(0o755)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"trained {step} steps ({record['tokens_seen']} tokens) in {record['seconds']:.0f}s, loss "
        f"{record['final_loss']:.3f}: {folder}")
    return folder


def plan_aux(out, config) -> float:
    """The load-balancing term transformers added to the loss, so that the losses logged are the language model's."""
    aux = getattr(out, "aux_loss", None)
    return config.router_aux_loss_coef * aux.item() if aux is not None else 0.0


def trained_checkpoint(plan: TrainingPlan = TrainingPlan(), log=print) -> Path:
    """The cached model of `plan`, trained first when the cache has none."""
    folder = checkpoint_path(plan)
    if (folder / "training.json").is_file():
        return folder
    return train(plan, folder, log)


def held_out_ids(folder: Path, tokens: int, context: int) -> torch.Tensor:
    """The first `tokens` tokens of a trained model's held-out modules, as [tokens // context, context] windows."""
    record = json.loads((folder / "training.json").read_text())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    missing = [name for name in record["held_out"] if not (stdlib / name).is_file()]
    if missing:
        raise FileNotFoundError(f"the held-out module {missing[0]} is not in {stdlib}; train the model again with "
                                "this Python (delete " + str(folder) + ")")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    ids = token_stream(tokenizer, [stdlib / name for name in record["held_out"]])
    windows = min(tokens, len(ids)) // context
    return ids[: windows * context].view(windows, context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=TrainingPlan.minutes, help="the time budget")
    parser.add_argument("--threads", type=int, default=TrainingPlan.threads)
    parser.add_argument("--again", action="store_true", help="train again even when the cache holds this model")
    args = parser.parse_args()
    plan = TrainingPlan(minutes=args.minutes, threads=args.threads)
    if args.again:
        shutil.rmtree(checkpoint_path(plan), ignore_errors=True)
    print(trained_checkpoint(plan))


if __name__ == "__main__":
    main()
