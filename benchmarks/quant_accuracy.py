"""What quantizing the experts costs in accuracy, against the float model: each expert's output error, and how far
the next-token distributions move.

    .venv/bin/python benchmarks/quant_accuracy.py --preset tiny
    .venv/bin/python benchmarks/quant_accuracy.py --preset mini --tokens 256
    .venv/bin/python benchmarks/quant_accuracy.py --model ~/models/Mixtral-8x7B-Instruct-v0.1 --tokens 512

In float32, with transformers' own model: the float model as the checkpoint holds it, and the same model with every
routed expert's weights replaced by their int8 or int4 quantization, dequantized (the function a cluster with
--quantize computes: tests/test_quant_cluster.py holds it to that). Two figures per format:
- expert error: over each MoE layer's experts, ||y_q - y|| / ||y|| of the expert outputs for the rows the router
  really sends them (captured while the float model reads the text), in float64;
- next-token distributions: KL(float || quantized) at every position of the text, its mean and largest, and how
  often the most likely next token stays the same.
The text is --tokens ids drawn at random (seeded) from the vocabulary. On the random-weight presets these say how
the formats behave on those weights, not how a trained model's answers change: a trained checkpoint (--model) is
the measurement that means something for quality.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from fiddler_moe.benchmarks.bench import bench_checkpoint_path
from fiddler_moe.experts import quant
from fiddler_moe.launch.synthetic import write_checkpoint


def experts_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "down_proj") and hasattr(m, "_is_expert_parallel")]


def matrices(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [module.gate_up_proj if module.has_gate else module.up_proj, module.down_proj]


def expert_output(module: torch.nn.Module, expert: int, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """One expert's function in float64 ([out, in] weights; biases and transposed layouts as the module has them)."""
    gate_up, down = (w.double() for w in weights)
    if module.is_transposed:
        gate_up, down = gate_up.t(), down.t()
    h = x.double() @ gate_up.t()
    if getattr(module, "has_bias", False):
        h = h + module.gate_up_proj_bias[expert].double()
    if module.has_gate:
        gate, up = h.chunk(2, dim=-1)
        h = module.act_fn(gate) * up
    else:
        h = module.act_fn(h)
    y = h @ down.t()
    return y + module.down_proj_bias[expert].double() if getattr(module, "has_bias", False) else y


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--model", type=Path, default=None, help="a checkpoint folder instead of a preset")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    args = parser.parse_args()
    if args.model is not None:
        folder = args.model.expanduser()
    elif args.preset.startswith("tiny"):
        folder = write_checkpoint(args.preset, bench_checkpoint_path(args.preset, "float32"), dtype=torch.float32)
    else:
        folder = write_checkpoint(args.preset, bench_checkpoint_path(args.preset, "bfloat16"), dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(4, model.config.vocab_size, (1, args.tokens), generator=generator)

    # The rows each experts module gets, captured during the float forward (its input hidden states, and which
    # expert each row goes to).
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    modules = experts_modules(model)
    hooks = [m.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, (a[0].detach(), a[1].detach())))
             for i, m in enumerate(modules)]
    float_logits = model(ids).logits[0].double()
    for hook in hooks:
        hook.remove()
    originals = [[p.detach().clone() for p in matrices(m)] for m in modules]

    results = {"model": str(folder), "tokens": args.tokens, "created": time.strftime("%Y-%m-%d"), "formats": {}}
    for name in quant.FORMATS:
        errors = []
        for i, module in enumerate(modules):
            hidden, top_k_index = captured[i]
            hidden = hidden.reshape(-1, hidden.shape[-1])
            for e in range(originals[i][0].shape[0]):
                rows = (top_k_index.reshape(hidden.shape[0], -1) == e).any(dim=1)
                if not rows.any():
                    continue
                float_w = [p[e] for p in originals[i]]
                quant_w = [quant.dequantize(quant.quantize(w.t() if module.is_transposed else w, name))
                           for w in float_w]
                quant_w = [w.t() if module.is_transposed else w for w in quant_w]
                want = expert_output(module, e, hidden[rows], float_w)
                got = expert_output(module, e, hidden[rows], quant_w)
                errors.append(((got - want).norm() / want.norm()).item())
                for p, w in zip(matrices(module), quant_w):
                    p[e] = w
        logits = model(ids).logits[0].double()
        for module, saved in zip(modules, originals):  # the float weights back, for the next format
            for p, w in zip(matrices(module), saved):
                p.copy_(w)
        p_float, log_q = float_logits.log_softmax(-1), logits.log_softmax(-1)
        kl = (p_float.exp() * (p_float - log_q)).sum(-1)
        same_top = (float_logits.argmax(-1) == logits.argmax(-1)).double().mean().item()
        errors_t = torch.tensor(errors)
        results["formats"][name] = {
            "expert_relative_error": {"mean": errors_t.mean().item(), "median": errors_t.median().item(),
                                      "max": errors_t.max().item(), "experts": len(errors)},
            "kl_nats": {"mean": kl.mean().item(), "max": kl.max().item()},
            "same_top_token": same_top,
        }
        r = results["formats"][name]
        print(f"{name} ({quant.FORMATS[name].llama_cpp}): expert output error mean {r['expert_relative_error']['mean']:.2%}"
              f", max {r['expert_relative_error']['max']:.2%} over {len(errors)} experts; next-token KL mean "
              f"{r['kl_nats']['mean']:.2e}, max {r['kl_nats']['max']:.2e} nats; same top token {same_top:.1%} "
              f"of {args.tokens} positions")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
