"""What quantizing the experts costs in accuracy, against the float model: each expert's output error, how far
the next-token distributions move, and the perplexity of held-out text.

    .venv/bin/python benchmarks/quant_accuracy.py --trained --cluster        # the model benchmarks/train_tiny.py trains
    .venv/bin/python benchmarks/quant_accuracy.py --preset mini --tokens 256
    .venv/bin/python benchmarks/quant_accuracy.py --model ~/models/Mixtral-8x7B-Instruct-v0.1 --text held-out.txt

In float32, with transformers' own model: the float model as the checkpoint holds it, and the same model with every
routed expert's weights replaced by their int8 or int4 quantization, dequantized, and each expert product's input
quantized per block as the workers' kernels quantize it, and the linear layers a CPU coordinator quantizes
(attention, shared experts, head; not the routers) computed alike (`quantized_reference`: the function a cluster with
--quantize computes; tests/test_quant_cluster.py holds it to that). Three figures per format:
- expert error: over each MoE layer's experts, ||y_q - y|| / ||y|| of the expert outputs for the rows the router
  really sends them (captured while the float model reads the text), in float64;
- next-token distributions: KL(float || quantized) at every position of the text, its mean and largest, and how
  often the most likely next token stays the same.
- perplexity: exp of the mean negative log-likelihood of each next token of the text, in windows of --context
  tokens, for the float model and each format; with --cluster also through a real cluster (`--quantize`, every
  expert cold on one worker, float32), which must give the same figure as the reference.
The text: with --trained, the held-out modules of the model benchmarks/train_tiny.py trains on Python's standard
library (trained first, --minutes, when the cache has none); with --text, a file read through the model's
tokenizer; else --tokens ids drawn at random (seeded) from the vocabulary, whose perplexity means nothing. On the
random-weight presets the figures say how the formats behave on those weights, not how a trained model's answers
change: a trained model is the measurement that means something for quality.
"""

from __future__ import annotations

if __name__ == "__main__":  # OpenMP's waiting as the fiddler commands set it, read once when torch loads OpenMP
    from fiddler_moe.host import numa

    numa.use_openmp_settings()

import argparse
import functools
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.integrations import moe

from fiddler_moe.benchmarks import train_tiny
from fiddler_moe.benchmarks.bench import bench_checkpoint_path
from fiddler_moe.coordinator import cpu_attention
from fiddler_moe.coordinator.cpu_linear import quantizable_linear_layers
from fiddler_moe.experts import fp8, mxfp4, quant
from fiddler_moe.launch.synthetic import write_checkpoint


def experts_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "down_proj") and hasattr(m, "_is_expert_parallel")]


def matrices(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [module.gate_up_proj if module.has_gate else module.up_proj, module.down_proj]


def expert_output(module: torch.nn.Module, expert: int, x: torch.Tensor, weights: list[torch.Tensor],
                  quantized_inputs: bool = False) -> torch.Tensor:
    """One expert's function in float64 ([out, in] weights; biases and transposed layouts as the module has them),
    with each product's input quantized per block as the workers quantize it when `quantized_inputs`."""
    gate_up, down = (w.double() for w in weights)
    if module.is_transposed:
        gate_up, down = gate_up.t(), down.t()
    given = (lambda t: quant.quantized_input(t.float()).double()) if quantized_inputs else (lambda t: t.double())
    h = given(x) @ gate_up.t()
    if getattr(module, "has_bias", False):
        h = h + module.gate_up_proj_bias[expert].double()
    if module.has_gate:
        gate, up = h.chunk(2, dim=-1)
        h = module.act_fn(gate) * up
    else:
        h = module.act_fn(h)
    y = given(h) @ down.t()
    return y + module.down_proj_bias[expert].double() if getattr(module, "has_bias", False) else y


def round_trip(w: torch.Tensor, name: str) -> torch.Tensor:
    """An [out, in] float32 matrix through format `name` and back: int8, int4, a checkpoint's mxfp4 or fp8 (blocks
    of 128x128, DeepSeek-V3's), or a chain such as mxfp4+int8 (a checkpoint's format, then --quantize)."""
    for step in name.split("+"):
        if step == "mxfp4":
            w = mxfp4.dequantize(*mxfp4.quantize(w.t()), torch.float32).t()
        elif step == "fp8":
            w = fp8.dequantize(*fp8.quantize(w, (min(128, w.shape[0]), min(128, w.shape[1]))), torch.float32)
        else:
            w = quant.dequantize(quant.quantize(w, step))
    return w


def quantizes_inputs(name: str) -> bool:
    """Whether the workers' products under format `name` (a chain such as mxfp4+int8) quantize their inputs: when
    they end in a --quantize format."""
    return name.split("+")[-1] in quant.FORMATS


@torch.no_grad()
def dequantize_experts(modules: list[torch.nn.Module], name: str) -> None:
    """Every routed expert's matrices replaced by their round trip through `name`, in place."""
    for module in modules:
        for p in matrices(module):
            for e in range(p.shape[0]):
                w = p[e].t() if module.is_transposed else p[e]
                q = round_trip(w.float(), name)
                p[e] = q.t() if module.is_transposed else q


# How far a float32 cluster with --quantize may be from quantized_reference, relative to the logits' largest: where
# the two sides' float32 sums differ in the last bit at an activation block's halfway point, that activation's code
# differs by one, an error of one step (1/127 of the block's largest value) times one weight, which later layers
# carry. A flip in the head's input (a CPU coordinator's layers are quantized too) goes straight to the logits.
# Measured up to 6e-3 (tiny, int8) with the coordinator's layers, 9e-5 without, and 3.2e-4 (an FP8 checkpoint's
# experts quantized to int4) on the tiny presets. The function itself is the same: the flips are rare, so the typical
# (median) logit stays far closer, which `check_logits` checks beside the largest (measured 2e-8 to 3e-6: a flip at
# an early position reaches the later ones through attention); a wrong scale, expert or layer moves most logits by
# far more (quantizing alone moves them by 1e-2 and more, test_quant_cluster's last check).
FLOAT32_TOLERANCE = 1e-2
FLOAT32_TYPICAL_TOLERANCE = 1e-4


def logit_errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(largest, median) of |got - want|, relative to want's largest magnitude."""
    difference, scale = (got.float() - want.float()).abs(), want.float().abs().max()
    return (difference.max() / scale).item(), (difference.median() / scale).item()


def check_logits(got: torch.Tensor, want: torch.Tensor) -> None:
    """A float32 cluster's logits against quantized_reference's: within FLOAT32_TOLERANCE at the largest and
    FLOAT32_TYPICAL_TOLERANCE typically."""
    largest, typical = logit_errors(got, want)
    assert largest < FLOAT32_TOLERANCE and typical < FLOAT32_TYPICAL_TOLERANCE, (largest, typical)


_GROUPED_MM = moe._grouped_mm


def _quantized_grouped_mm(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """transformers' grouped expert product as the workers compute it: the input quantized per block
    (quant.quantized_input), times the weights in float32, rounded once to the input's dtype."""
    return _GROUPED_MM(quant.quantized_input(input), weight.float(), offs).to(input.dtype)


def _with_quantized_inputs(forward):
    @functools.wraps(forward)
    def wrapped(*args, **kwargs):
        moe._grouped_mm = _quantized_grouped_mm
        try:
            return forward(*args, **kwargs)
        finally:
            moe._grouped_mm = _GROUPED_MM
    return wrapped


def _dequantized_linear_forward(module: torch.nn.Linear, weight: torch.Tensor):
    """A linear layer as a CPU coordinator computes it with --quantize (coordinator/cpu_linear.py): the input
    quantized per block, times the dequantized weight in float32, rounded once to the input's dtype, plus bias."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.linear(quant.quantized_input(x), weight).to(x.dtype)
        return out if module.bias is None else out + module.bias
    return forward


@torch.no_grad()
def quantize_coordinator_layers(model: torch.nn.Module, name: str) -> None:
    """The linear layers a CPU coordinator quantizes (attention, shared experts, head; not the routers) computed
    through format `name` and back, their inputs quantized, in place; a weight shared with another module (a tied
    head) is left as it is for that module."""
    experts = {id(m) for m in experts_modules(model)}
    skip = tuple(n for n, m in model.named_modules() if id(m) in experts)
    for _, module in quantizable_linear_layers(model, skip):
        weight = quant.dequantize(quant.quantize(module.weight.detach().float(), name))
        module.forward = _dequantized_linear_forward(module, weight)


def quantized_reference(model: torch.nn.Module, name: str, coordinator_layers: bool = True) -> torch.nn.Module:
    """`model` (transformers', its experts in the grouped_mm implementation) made into the function a cluster with
    --quantize computes, in place: every routed expert's weights through format `name` and back, and, where the
    format ends in int8 or int4, each expert product's input quantized per block as the workers' kernels quantize
    it; with `coordinator_layers`, also the linear layers a CPU coordinator quantizes (routers aside) through that
    last format, their inputs quantized alike, and its attention of short queries as the coordinator takes it
    (coordinator/cpu_attention.py). Returns the model. The references of the tests and of this script."""
    modules = experts_modules(model)
    dequantize_experts(modules, name)
    if quantizes_inputs(name):
        for module in modules:
            module.forward = _with_quantized_inputs(module.forward)
        if coordinator_layers:
            quantize_coordinator_layers(model, name.split("+")[-1])
            cpu_attention.use_cpu_attention(model, cpu_attention.attention_for(quantized=True))
    return model


def float_inputs(model: torch.nn.Module) -> None:
    """Undoes quantized_reference's input quantization and its coordinator layers (the experts' weights stay as
    they are)."""
    for module in experts_modules(model) + [m for m in model.modules() if isinstance(m, torch.nn.Linear)]:
        module.__dict__.pop("forward", None)


def expert_errors(modules: list[torch.nn.Module], captured: dict, originals: list, name: str) -> list[float]:
    """||y_q - y|| / ||y|| of each expert on the rows the router sent it during the float forward."""
    errors = []
    for i, module in enumerate(modules):
        hidden, top_k_index = captured[i]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        for e in range(originals[i][0].shape[0]):
            rows = (top_k_index.reshape(hidden.shape[0], -1) == e).any(dim=1)
            if not rows.any():
                continue
            float_w = [p[e] for p in originals[i]]
            quant_w = [round_trip((w.t() if module.is_transposed else w).float(), name) for w in float_w]
            quant_w = [w.t() if module.is_transposed else w for w in quant_w]
            want = expert_output(module, e, hidden[rows], float_w)
            got = expert_output(module, e, hidden[rows], quant_w, quantizes_inputs(name))
            errors.append(((got - want).norm() / want.norm()).item())
    return errors


def batched_logits(forward, ids: torch.Tensor, batch: int) -> torch.Tensor:
    """forward over windows [n, context] `batch` windows at a time, as float64 [n, context, vocab]."""
    return torch.cat([forward(ids[i : i + batch]).double() for i in range(0, len(ids), batch)])


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp(mean NLL) of every next token inside each window."""
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return nll.exp().item()


def kl_figures(float_logits: torch.Tensor, logits: torch.Tensor) -> dict:
    p_float, log_q = float_logits.log_softmax(-1), logits.log_softmax(-1)
    kl = (p_float.exp() * (p_float - log_q)).sum(-1)
    same_top = (float_logits.argmax(-1) == logits.argmax(-1)).double().mean().item()
    return {"kl_nats": {"mean": kl.mean().item(), "max": kl.max().item()}, "same_top_token": same_top}


def cluster_logits(folder: Path, name: str, ids: torch.Tensor, batch: int) -> torch.Tensor:
    """Logits of a real cluster (one worker, every expert cold, float32) with --quantize `name`."""
    from fiddler_moe.launch.cluster import Cluster

    with Cluster(model=folder, quantize=name, workers=1, device="cpu", dtype="float32", quiet=True) as cluster:
        return batched_logits(lambda x: cluster.logits(x), ids, batch)


def text_ids(folder: Path, path: Path, tokens: int, context: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder).backend_tokenizer.encode(path.read_text()).ids[:tokens]
    windows = len(ids) // context
    if not windows:
        raise SystemExit(f"{path} holds {len(ids)} tokens, fewer than one window of --context {context}")
    return torch.tensor(ids[: windows * context]).view(windows, context)


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--model", type=Path, default=None, help="a checkpoint folder instead of a preset (one that "
                        "train_tiny.py trained is measured on its held-out text)")
    parser.add_argument("--trained", action="store_true", help="the model benchmarks/train_tiny.py trains, on its "
                        "held-out text")
    parser.add_argument("--minutes", type=float, default=train_tiny.TrainingPlan.minutes,
                        help="with --trained: the training budget, when the cache has no model of it")
    parser.add_argument("--text", type=Path, default=None, help="held-out text to measure on (else random ids)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens of text (default: 16384 with --trained or "
                        "--text, else 128)")
    parser.add_argument("--context", type=int, default=256, help="tokens per window of text")
    parser.add_argument("--batch", type=int, default=4, help="windows per forward")
    parser.add_argument("--cluster", action="store_true", help="also measure the perplexity through a real cluster")
    parser.add_argument("--checkpoint-formats", action="store_true", help="also the experts as an MXFP4 or FP8 "
                        "checkpoint would hold them, alone and quantized again with int8 and int4 (transformers only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    results: dict = {"created": time.strftime("%Y-%m-%d"), "formats": {}}
    if args.trained:
        folder = train_tiny.trained_checkpoint(train_tiny.TrainingPlan(minutes=args.minutes))
    elif args.model is not None:
        folder = args.model.expanduser()
    elif args.preset.startswith("tiny"):
        folder = write_checkpoint(args.preset, bench_checkpoint_path(args.preset, "float32"), dtype=torch.float32)
    else:
        folder = write_checkpoint(args.preset, bench_checkpoint_path(args.preset, "bfloat16"), dtype=torch.bfloat16)
    if args.text is not None:
        ids, text = text_ids(folder, args.text, args.tokens or 16384, args.context), str(args.text)
    elif (folder / "training.json").is_file():  # a model train_tiny.py trained: its held-out modules
        ids = train_tiny.held_out_ids(folder, args.tokens or 16384, args.context)
        results["training"] = json.loads((folder / "training.json").read_text())
        text = "held-out standard library modules"
    else:
        generator = torch.Generator().manual_seed(args.seed)
        config = json.loads((folder / "config.json").read_text())
        ids = torch.randint(4, config["vocab_size"], (1, args.tokens or 128), generator=generator)
        text = "random ids"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    results.update({"model": str(folder), "text": text, "tokens": ids.numel(), "windows": len(ids)})

    # The rows each experts module gets, captured during the float forward (its input hidden states, and which
    # expert each row goes to), over every window.
    captured: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    modules = experts_modules(model)
    hooks = [m.register_forward_pre_hook(
        lambda m, a, i=i: captured.setdefault(i, []).append((a[0].detach().reshape(-1, a[0].shape[-1]),
                                                             a[1].detach().reshape(-1, a[1].shape[-1]))))
             for i, m in enumerate(modules)]
    float_logits = batched_logits(lambda x: model(x).logits, ids, args.batch)
    for hook in hooks:
        hook.remove()
    captured_rows = {i: (torch.cat([h for h, _ in parts]), torch.cat([k for _, k in parts]))
                     for i, parts in captured.items()}
    originals = [[p.detach().clone() for p in matrices(m)] for m in modules]
    results["float"] = {"perplexity": perplexity(float_logits, ids)}
    print(f"{folder.name}: {ids.numel()} tokens of {text}; float32 perplexity {results['float']['perplexity']:.4f}")
    names = ["none", *quant.FORMATS] if args.cluster else list(quant.FORMATS)
    if args.checkpoint_formats:
        names += [f"{stored}{again}" for stored in ("mxfp4", "fp8") for again in ("", "+int8", "+int4")]
    for name in names:
        r = results["formats"].setdefault(name, {})
        if name != "none":
            errors = torch.tensor(expert_errors(modules, captured_rows, originals, name))
            quantized_reference(model, name)
            logits = batched_logits(lambda x: model(x).logits, ids, args.batch)
            float_inputs(model)
            for module, saved in zip(modules, originals):  # the float weights back, for the next format
                for p, w in zip(matrices(module), saved):
                    p.copy_(w)
            r.update({"expert_relative_error": {"mean": errors.mean().item(), "median": errors.median().item(),
                                                "max": errors.max().item(), "experts": len(errors)},
                      "perplexity": perplexity(logits, ids), **kl_figures(float_logits, logits)})
        else:
            logits = float_logits
            r["perplexity"] = results["float"]["perplexity"]
        if args.cluster and name in quant.CHOICES:
            got = cluster_logits(folder, name, ids, args.batch)
            r["cluster"] = {"perplexity": perplexity(got, ids),
                            "max_logit_difference": (got - logits).abs().max().item(),
                            **kl_figures(float_logits, got)}
        line = f"{name}: perplexity {r['perplexity']:.4f} ({r['perplexity'] / results['float']['perplexity'] - 1:+.2%})"
        if name != "none":
            line += (f"; expert output error mean {r['expert_relative_error']['mean']:.2%}, max "
                     f"{r['expert_relative_error']['max']:.2%} over {len(errors)} experts; next-token KL mean "
                     f"{r['kl_nats']['mean']:.2e}, max {r['kl_nats']['max']:.2e} nats; same top token "
                     f"{r['same_top_token']:.1%}")
        if "cluster" in r:
            line += (f"; cluster perplexity {r['cluster']['perplexity']:.4f}, logits within "
                     f"{r['cluster']['max_logit_difference']:.1e} of the reference")
        print(line)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
