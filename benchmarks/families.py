"""Every MoE family transformers routes through its experts interface, and what fiddler-moe does with each.

    python -m fiddler_moe.benchmarks.families            # the README's coverage table, as markdown
    python -m fiddler_moe.benchmarks.families --quick    # refusals and checkpoint maps only, no processes

A family is a model folder of transformers (`transformers/models/<name>/`) whose modeling code has an experts class
decorated with `@use_experts_implementation`; they are found by importing each modeling module, so a transformers
release that adds one adds a row. For each family a tiny random checkpoint is written by transformers' own
`save_pretrained` from the family's config class with small sizes (`tiny_config`), then either fiddler-moe refuses
it before any process starts (the reason is its one-line error), or a cluster with every expert cold on one worker
computes its logits on one prompt and they are compared with transformers' own model on the same checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import inspect as pyinspect
import json
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM, GenerationConfig
from transformers.models.auto.configuration_auto import model_type_to_module_name

from fiddler_moe.coordinator import loading
from fiddler_moe.coordinator.placement import format_size
from fiddler_moe.experts.checkpoint import CheckpointError
from fiddler_moe.launch.synthetic import INIT_STD, build_tokenizer

VOCAB = 300  # the smallest vocabulary build_tokenizer trains without filler
PROMPT = [1, *range(40, 55)]  # 16 tokens: longer than the sliding windows below
TOLERANCE = 1e-5  # relative to the largest logit, float32

# Small sizes, each set where the family's config has the field.
SMALL = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts=8,
    n_routed_experts=8, moe_num_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    shared_expert_intermediate_size=32, max_position_embeddings=512, first_k_dense_replace=1, n_group=2,
    topk_group=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    initializer_range=INIT_STD, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3,
)
# What SMALL does not cover, per family: layer patterns whose first two layers would have no experts or no
# attention, sizes of parts only that family has, and its validators' rules.
_MLA = {"num_key_value_heads": 4, "index_n_heads": 2, "index_head_dim": 16, "index_topk": 4}
OVERRIDES: dict[str, dict] = {
    "axk2": _MLA,
    "deepseek_v32": _MLA,
    "glm_moe_dsa": _MLA,
    "dots3_note": {**_MLA, "per_layer_config": {}, "sliding_window": 8, "shared_experts_intermediate_size": 32,
                   "head_dim": 16},
    "flint": {"mlp_only_layers": [0]},
    "gemma4": {"per_layer_config": {}, "enable_moe_block": True, "num_experts": 8, "top_k_experts": 2,
               "moe_intermediate_size": 32, "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": VOCAB,
               "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"], "mamba_n_heads": 4, "mamba_d_head": 32,
                         "mamba_d_state": 16, "mamba_chunk_size": 16, "shared_intermediate_size": 32},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 1, "expert_layer_offset": 0,
              "mamba_dt_rank": 8, "mamba_d_state": 4, "use_mamba_kernels": False},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "qwen4_exp": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
                  "indexer_compress_ratio": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                  "linear_num_key_heads": 2, "linear_num_value_heads": 4, "hc_lowrank": 16, "ple_embed_dim": 32,
                  "ngram_vocab_size_base": 1000, "split_ngram_parts": 4, "heads_per_ngram": 2},
    "zaya": {"num_experts_per_tok": 1, "router_hidden_size": 32},
}
# Families with a preset in launch/synthetic.py (architecture -> preset), which the test suite runs further:
# tests/test_exactness.py in every placement, tests/test_gpt_oss.py in bfloat16 and from MXFP4.
PRESET_TESTS = {
    "mixtral": ("tiny", "all cold, mixed, all hot; 1 and 3 workers; float32, bfloat16"),
    "qwen3_moe": ("tiny-qwen3-moe", "all cold, mixed, all hot; 1 and 3 workers; float32"),
    "qwen2_moe": ("tiny-qwen2-moe", "all cold, mixed, all hot; 1 and 3 workers; float32"),
    "gpt_oss": ("tiny-gpt-oss", "all cold, mixed, all hot; 1 and 3 workers; float32, bfloat16, MXFP4"),
}
ONE_PLACEMENT = "all cold, 1 worker; float32"


@dataclass
class Family:
    name: str  # transformers' model folder, e.g. "qwen3_moe"
    experts: list[str]  # its experts classes
    model_types: list[str]  # every config of the folder
    model_type: str | None  # the causal-LM config a checkpoint of the family is written with; None when none is


@dataclass
class Row:
    family: Family
    status: str = ""  # "exact", "refused", "differs" or "failed"
    reason: str = ""
    checkpoint_bytes: int = 0
    placements: str = ""
    coordinator: str = ""  # what else runs on the coordinator (coordinator_parts)
    error: float | None = None
    # Families of one group compute the same expert function from the same checkpoint layout: KernelSpec, expert
    # tensors per expert or fused, biases, and whether non-expert weights need transformers' conversions.
    group: str = ""
    folder: Path | None = None


def _experts_classes(module) -> list[str]:
    return sorted(name for name, cls in vars(module).items()
                  if pyinspect.isclass(cls) and cls.__module__ == module.__name__
                  and getattr(cls, "_apply_gate", None) is not None and hasattr(cls.__init__, "__wrapped__"))


def discover() -> list[Family]:
    """Every model folder of transformers whose modeling code decorates an experts class with
    `@use_experts_implementation` (the text transformers itself looks for), with its experts classes and configs.
    A folder whose modeling code does not import comes back with no experts classes: a row that fails."""
    root = Path(transformers.__file__).parent / "models"
    names = sorted(path.parent.name for path in root.glob("*/modeling_*.py")
                   if "@use_experts_implementation" in path.read_text(encoding="utf-8", errors="replace"))
    types: dict[str, list[str]] = {}
    for model_type in sorted(CONFIG_MAPPING.keys()):
        types.setdefault(model_type_to_module_name(model_type), []).append(model_type)
    found = []
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
            experts = _experts_classes(module)
        except Exception:  # a model needing another package: reported by check()
            experts = []
        causal = [t for t in types.get(name, []) if CONFIG_MAPPING[t] in MODEL_FOR_CAUSAL_LM_MAPPING]
        text = [t for t in causal if t.endswith("_text")]  # a multimodal family's language model
        found.append(Family(name, experts, types.get(name, []), (text or causal or [None])[0]))
    return found


def _has(config, key: str) -> bool:
    try:
        return hasattr(config, key)
    except Exception:  # heterogeneous configs refuse to read a per-layer field globally: it is a field
        return True


def tiny_config(family: Family) -> transformers.PreTrainedConfig:
    """The family's config class with SMALL sizes and its OVERRIDES. Per-layer patterns (layer_types and the like,
    one entry per layer) keep one layer of each kind, so that a hybrid keeps an attention layer and a model with
    dense first layers keeps an MoE one."""
    cls = CONFIG_MAPPING[family.model_type or family.model_types[0]]
    default = cls()
    raw = default.to_dict()
    fields = set(raw) | {k for k in SMALL if _has(default, k)}
    values = {k: v for k, v in SMALL.items() if k in fields}
    if "qk_rope_head_dim" in values and "head_dim" in values:  # multi-head latent attention ropes head_dim
        values["head_dim"] = values["qk_rope_head_dim"]
    layers = raw.get("num_hidden_layers")
    kinds = {k: list(dict.fromkeys(v)) for k, v in raw.items()
             if isinstance(v, list | str) and layers and len(v) == layers and len(set(v)) > 1 and k != "model_type"}
    if kinds:
        values["num_hidden_layers"] = max(2, *(len(v) for v in kinds.values()))
        for k, v in kinds.items():
            v = v + v[-1:] * (values["num_hidden_layers"] - len(v))
            values[k] = "".join(v) if isinstance(raw[k], str) else v
    values.update(OVERRIDES.get(family.name, {}))
    return cls(**values)


def _draw_zeros(model: torch.nn.Module, seed: int) -> None:
    """Parameters transformers starts at zero (routers, biases, gates of shared experts) drawn from N(0, 0.02),
    so that none of them hides a mistake."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.numel() and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * INIT_STD)


def write_tiny_checkpoint(family: Family, folder: Path, seed: int = 0) -> Path:
    """A random float32 checkpoint of the family, written by transformers' save_pretrained, with a tokenizer."""
    config = tiny_config(family)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _draw_zeros(model, seed)
        model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3)
        model.save_pretrained(folder)
    build_tokenizer(VOCAB).save_pretrained(folder)
    return Path(folder)


def refusal(family: Family) -> str | None:
    """fiddler-moe's one-line refusal of the family from its config alone (no weights, no processes), or None."""
    config = tiny_config(family) if family.model_type else CONFIG_MAPPING[family.model_types[0]]()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loading.check_architecture(config, torch.float32)
    except CheckpointError as e:
        return str(e)
    return None


def coordinator_parts(model: torch.nn.Module, config, moe_layers: list[loading.MoELayer]) -> str:
    """The parts of the family, beyond attention, norms and the router, that stay on the coordinator as
    transformers' own code (the routed experts alone go to the workers, or to the device when hot), named from the
    model's modules and config."""
    parts = []
    names = [n for n, _ in model.named_modules()]
    if any("shared_expert_gate" in n or "shared_experts_gate" in n for n in names):
        parts.append("gated shared expert")
    elif any("shared_expert" in n or "shared_mlp" in n for n in names):
        parts.append("shared expert")
    scaling = getattr(config, "routed_scaling_factor", None)
    if isinstance(scaling, int | float) and scaling != 1.0:
        parts.append("routed scaling")
    if (getattr(config, "n_group", None) or 1) > 1 and (getattr(config, "topk_group", None) or 0) >= 1:
        parts.append("grouped top-k")
    # Decoder layers with a feed-forward block of their own and no routed experts (DeepSeek's first layers).
    layers_path = moe_layers[0].name.split(f".{moe_layers[0].layer}.")[0]
    moe = {layer.layer for layer in moe_layers}
    dense = 0
    for index, layer in enumerate(model.get_submodule(layers_path)):
        mlp = next((m for n, m in layer.named_children() if n in ("mlp", "feed_forward", "ffn")), None)
        dense += index not in moe and mlp is not None and any(True for _ in mlp.parameters())
    if dense:
        parts.append("dense layer" + ("s" if dense > 1 else ""))
    return ", ".join(parts)


def check(family: Family, root: Path) -> Row:
    """Refusal from the config, or a tiny checkpoint and its map (loading.inspect), without processes."""
    row = Row(family)
    if not family.experts or not family.model_types:
        row.status, row.reason = "failed", f"transformers.models.{family.name} does not import or has no config"
        return row
    try:
        reason = refusal(family)
        if reason is not None:
            row.status, row.reason = "refused", reason
            return row
        folder = write_tiny_checkpoint(family, root / family.name)
    except Exception as e:  # the small sizes do not suit this family's config: it needs OVERRIDES
        row.status = "failed"
        row.reason = (f"no tiny checkpoint ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}); give its "
                      "config's sizes in benchmarks/families.py OVERRIDES")
        return row
    row.folder = folder
    row.checkpoint_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, layout = loading.inspect(folder, "float32")
    except CheckpointError as e:
        row.status, row.reason = "refused", str(e)
        return row
    row.coordinator = coordinator_parts(model, layout.config, layout.moe_layers)
    source = next(iter(layout.experts.values()))
    kernel = {k: v for k, v in vars(layout.kernel).items() if k != "dtype"}
    shapes = [len(source.gate_up), source.gate_up[0].index is None, bool(source.gate_up_bias),
              bool(layout.non_expert_converted)]
    row.group = json.dumps([kernel, shapes], sort_keys=True)
    return row


def run(row: Row, **cluster_options) -> Row:
    """The cluster (every expert cold, one worker, float32) against transformers on PROMPT. `cluster_options` go to
    Cluster: the test suite points every family's cluster at one worker it started with `fiddler-worker --listen`,
    which serves one cluster after another, instead of starting (importing torch in) a worker per family."""
    from fiddler_moe.launch.cluster import Cluster

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = AutoModelForCausalLM.from_pretrained(row.folder, dtype=torch.float32).eval()
    prompt = torch.tensor([PROMPT])
    with torch.inference_mode():
        want = reference(input_ids=prompt).logits
    try:
        options = {"workers": 1, "device": "cpu", "dtype": "float32", "quiet": True, **cluster_options}
        with Cluster(row.folder, **options) as cluster:
            got = cluster.logits(prompt, torch.ones_like(prompt))
            cold = cluster.coordinator.dispatcher.stats.cold_pairs
    except Exception as e:  # a family that passes the checks but fails in the cluster: a row, not a crash
        row.status, row.reason = "failed", f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
        return row
    row.error = ((got - want).abs().max() / want.abs().max()).item()
    exact = row.error < TOLERANCE and cold > 0
    row.status = "exact" if exact else "differs"
    row.placements = PRESET_TESTS[row.family.name][1] if row.family.name in PRESET_TESTS else ONE_PLACEMENT
    return row


def representatives(rows: list[Row]) -> list[Row]:
    """The first family of each group: one cluster run per expert function and checkpoint layout."""
    first: dict[str, Row] = {}
    for row in rows:
        if row.group:
            first.setdefault(row.group, row)
    return list(first.values())


def survey(root: Path, run_clusters: bool = True) -> list[Row]:
    rows = [check(family, root) for family in discover()]
    if run_clusters:
        rows = [run(row) if row.status == "" else row for row in rows]
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| family | experts class | result | tiny checkpoint | tested | also on the coordinator |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        f = row.family
        if row.status in ("refused", "failed"):
            result = f"{row.status}: {row.reason}"
        elif row.status == "differs":
            result = f"differs: relative error {row.error:.1e}"
        else:
            result = row.status or "not run (--quick)"
        size = format_size(row.checkpoint_bytes) if row.checkpoint_bytes else "-"
        name = f.name if f.model_type in (None, f.name) else f"{f.name} ({f.model_type})"
        lines.append(f"| {name} | {', '.join(f.experts) or '-'} | {result.replace('|', '/')} | {size} | "
                     f"{row.placements or '-'} | {row.coordinator or '-'} |")
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    counts = {status: sum(r.status == status for r in rows) for status in ("exact", "refused", "differs", "failed")}
    return (f"transformers {transformers.__version__}: {len(rows)} families with experts behind the experts "
            "interface; " + ", ".join(f"{n} {status}" for status, n in counts.items() if n))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fiddler_moe.benchmarks.families", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="refusals and checkpoint maps only: start no cluster")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fiddler-families-") as root:
        rows = survey(Path(root), run_clusters=not args.quick)
    print(summary(rows) + "\n")
    print(markdown(rows))
    return 0 if all(r.status in ("exact", "refused", "") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
