"""Loading: turn a checkpoint folder into (a) transformers' own model with every non-expert weight on the device
and (b) a map of where each routed expert's weights sit in the safetensors files.

The model is built by transformers from the folder's config with parameters on the meta device, so nothing is
allocated for experts; then only the non-expert tensors are read in. Which checkpoint key feeds which model
parameter comes from transformers' own conversion mapping (e.g. Mixtral's `block_sparse_moe.experts.N.w1` ->
`mlp.experts.gate_up_proj`), so every architecture transformers can load is addressed the same way. Expert
tensors are never read here: the workers (and the hot-expert store) read them from the ExpertSource map.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import transformers
from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    Concatenate,
    MergeModulelist,
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
)

from fiddler_moe.coordinator.experts import IMPLEMENTATION_NAME
from fiddler_moe.experts import quant
from fiddler_moe.experts.checkpoint import CheckpointError, TensorReader, fingerprint, tensor_table
from fiddler_moe.experts import fp8, mxfp4
from fiddler_moe.experts.compute import ExpertKernel, activation
from fiddler_moe.protocol.messages import ExpertSource, KernelSpec, TensorRef
from fiddler_moe.protocol.wire import dtype_name


@dataclass
class MoELayer:
    name: str  # module path of the experts module, e.g. "model.layers.3.mlp.experts"
    layer: int  # decoder layer index, taken from the path
    num_experts: int
    module: nn.Module


@dataclass
class ModelLayout:
    """Everything placement and loading need to know about a checkpoint, from config and headers alone."""

    folder: Path
    config: transformers.PreTrainedConfig
    dtype: torch.dtype
    fingerprint: str
    kernel: KernelSpec
    moe_layers: list[MoELayer]
    experts: dict[tuple[int, int], ExpertSource]
    expert_bytes: int  # one expert's weights in `dtype`
    non_expert: dict[str, TensorRef] = field(default_factory=dict)  # model parameter name -> checkpoint tensor
    # Non-expert weights transformers builds with a conversion (q/k/v parts concatenated, one tensor split):
    # the converter's first target name -> [(checkpoint key, the converter's source pattern, where it lies)]
    non_expert_converted: dict[str, list[tuple[str, str, TensorRef]]] = field(default_factory=dict)
    non_expert_bytes: int = 0
    layer_bytes: int = 0  # one decoder layer's non-expert weights (attention, norms, router, shared experts), mean
    quantization: str = ""  # "mxfp4" or "fp8": the checkpoint's weights, dequantized to `dtype` when loaded
    # FP8 checkpoints: the block scales of each quantized non-expert weight, by the weight's checkpoint key
    non_expert_scales: dict[str, TensorRef] = field(default_factory=dict)
    checkpoint_expert_bytes: int = 0  # all experts' tensors as the checkpoint stores them

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def expert_matrices(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """The [out, in] shapes of one expert's gate_up and down matrices (the first MoE layer's)."""
        module = self.moe_layers[0].module
        gate_up = getattr(module, "gate_up_proj", None)
        if gate_up is None:
            gate_up = module.up_proj
        shapes = [tuple(gate_up.shape[1:]), tuple(module.down_proj.shape[1:])]
        if self.kernel.is_transposed:
            shapes = [(cols, rows) for rows, cols in shapes]
        return shapes[0], shapes[1]

    def cold_expert_bytes(self, quantize: str = "none") -> int:
        """Bytes of one expert on a worker: in the compute dtype, or in the --quantize format (biases stay in the
        compute dtype)."""
        if quantize == "none":
            return self.expert_bytes
        gate_up, down = self.expert_matrices()
        matrices = (gate_up[0] * gate_up[1] + down[0] * down[1]) * self.dtype.itemsize
        return quant.expert_nbytes(quantize, gate_up, down, bias_bytes=self.expert_bytes - matrices)

    def check_quantize(self, quantize: str) -> None:
        """Refuse --quantize for experts whose matrices do not cut into blocks, naming the fix. Experts stored
        quantized (MXFP4, FP8) are quantized again from their dequantized weights."""
        if quantize != "none":
            gate_up, down = self.expert_matrices()
            quant.check_shape(quantize, *gate_up, "the experts' gate/up matrix")
            quant.check_shape(quantize, *down, "the experts' down matrix")


@contextlib.contextmanager
def _parameters_on_meta():
    """Create parameters on the meta device but buffers (rotary tables) for real, as accelerate's
    init_empty_weights(include_buffers=False) does: buffers are computed at construction, weights are loaded."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def read_config(folder: Path) -> transformers.PreTrainedConfig:
    if not folder.exists():
        raise CheckpointError(f"model folder {folder} does not exist; pass --model with a local checkpoint folder")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; pass --model with the checkpoint folder that holds config.json")
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder} has no config.json; pass the Hugging Face checkpoint folder itself")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); download it again") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}; check its permissions") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise CheckpointError(f"{path} has no model_type; it is not a transformers config, download it again")
    if model_type not in CONFIG_MAPPING:
        raise CheckpointError(
            f"transformers {transformers.__version__} does not know the architecture {model_type!r} named in "
            f"{path}; upgrade transformers (pip install -U transformers) or check the model_type"
        )
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # ValueError, KeyError, huggingface_hub's strict-dataclass errors, ...
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CheckpointError(
            f"transformers {transformers.__version__} cannot read {path} ({'; '.join(lines[:2])[:200]}); "
            "the config is damaged or from a newer transformers: download it again or upgrade transformers"
        ) from None


def resolve_dtype(config: transformers.PreTrainedConfig, requested: str | None) -> torch.dtype:
    if requested and requested != "auto":
        names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        if requested not in names:
            raise ValueError(f"unknown dtype {requested!r}; use auto, float32, bfloat16 or float16")
        return names[requested]
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def build_skeleton(config: transformers.PreTrainedConfig, dtype: torch.dtype) -> nn.Module:
    """transformers' own model for this config, weights on meta, experts routed through our implementation."""
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise CheckpointError(
            f"{config.model_type!r} is not a text-generation (causal LM) architecture in transformers; "
            "fiddler-moe runs Mixture-of-Experts language models such as Mixtral or Qwen3-MoE"
        )
    try:
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation=IMPLEMENTATION_NAME)
    except Exception as e:
        text = (str(e).splitlines() or [type(e).__name__])[0][:200]
        if "experts implementation" in text or "experts_implementation" in text:
            raise CheckpointError(_not_through_interface(type(config).__name__)) from None
        raise CheckpointError(
            f"transformers cannot build a {config.model_type} model from this config.json ({text}); "
            "the config is damaged or needs a newer transformers"
        ) from None
    return model.eval()


def _not_through_interface(what: str) -> str:
    return (
        f"{what} computes its experts in its own code instead of through transformers' experts interface, so "
        "fiddler-moe cannot send them to workers; use an architecture whose experts class is decorated with "
        "@use_experts_implementation (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3, ...)"
    )


# Config fields that count routed experts, across transformers' MoE architectures.
_EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _unsupported_experts(model: nn.Module, config: transformers.PreTrainedConfig) -> str | None:
    """For a model with no experts module we can dispatch: the name of its MoE code if it has experts after all."""
    for module in model.modules():
        name = type(module).__name__
        if "Expert" in name or re.search(r"(MoE|Moe|SparseMoeBlock)$", name):
            return f"{type(config).__name__} ({name})"
    counts = [getattr(config, f, None) for f in _EXPERT_COUNT_FIELDS]
    if any(isinstance(n, int) and n > 1 for n in counts):
        return type(config).__name__
    return None


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    layers = []
    for name, module in model.named_modules():
        if hasattr(module, "has_gate") and hasattr(module, "_is_expert_parallel"):  # @use_experts_implementation
            numbers = re.findall(r"\.(\d+)\.", f".{name}.")
            layers.append(MoELayer(name, int(numbers[0]) if numbers else len(layers), module.num_experts, module))
    return layers


def _probe(dtype: torch.dtype, width: int, reach: float) -> torch.Tensor:
    """Rows of gate_up outputs for comparing gates: spread over [-reach, reach] (past any clamp), fixed seed."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(4, width, generator=generator) * reach / 3
    rows[0] = torch.linspace(-reach, reach, width)
    return rows.to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _number(module: nn.Module, names: tuple[str, ...]) -> float | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _activation_name(module: nn.Module, config, dtype: torch.dtype) -> str:
    """The name in transformers' ACT2FN of the experts module's act_fn: the config's activation fields first (the
    module reads one of them), then any name that computes the same on probe values."""
    fields = [getattr(c, "to_dict", dict)() for c in (module.config, config)]
    named = [v for d in fields for k, v in d.items() if isinstance(v, str) and k.endswith(("_act", "activation"))]
    act_fn = getattr(module, "act_fn", None)
    if act_fn is None:  # a gate of its own that uses no activation module (GPT-OSS): checked with the gate
        return next(iter(named), "silu")
    from transformers.activations import ACT2FN

    probe = _probe(dtype, 16, 8.0)
    try:
        want = act_fn(probe)
    except Exception:  # e.g. an activation of the gate and up together
        want = None
    for name in dict.fromkeys([*named, *ACT2FN]):
        try:
            if want is not None and _same(activation(name)(probe), want):
                return name
        except (ValueError, KeyError, TypeError):
            continue
    raise CheckpointError(f"{type(module).__name__}'s activation ({type(act_fn).__name__}) is no function of one "
                          "tensor in transformers' ACT2FN, which is what fiddler-moe's expert kernel computes")


def kernel_spec(config, layer: MoELayer, dtype: torch.dtype) -> KernelSpec:
    """The KernelSpec of an experts module: read from its interface flags and attributes, then checked against
    the module's own code (its activation and `_apply_gate`) on probe values in the model's dtype. A module whose
    expert function KernelSpec cannot describe is refused here, with the missing piece named."""
    module = layer.module
    cls = type(module).__name__
    if module.has_post_expert_norm:
        raise CheckpointError(
            f"{cls} normalizes each expert's output (a post-expert norm), which fiddler-moe's expert kernel does not "
            "compute yet"
        )
    width = 2 * 8
    activation_name = _activation_name(module, config, dtype)
    base = dict(activation=activation_name, has_gate=module.has_gate, has_bias=module.has_bias,
                is_transposed=module.is_transposed, dtype=dtype_name(dtype))
    if not module.has_gate:  # activation(up), checked by _activation_name
        return KernelSpec(**base)
    # Gated: the simplest description whose gate computes the module's own `_apply_gate` bit for bit.
    limit = _number(module, ("limit", "swiglu_limit"))
    alpha = _number(module, ("alpha", "swiglu_alpha"))
    probe = _probe(dtype, width, 3 * (limit or 4.0))
    try:
        with torch.no_grad():
            want = module._apply_gate(probe.clone())
    except Exception as e:  # a gate that reads weights or takes other arguments
        raise CheckpointError(f"{cls}'s gate ({cls}._apply_gate: {type(e).__name__}) is not one fiddler-moe's "
                              "expert kernel computes yet") from None
    for interleaved in (False, True):
        for clamp in dict.fromkeys((None, limit)):
            for glu_alpha in dict.fromkeys((None, alpha)):
                for up_offset in (0.0, 1.0):
                    spec = KernelSpec(**base, interleaved=interleaved, limit=clamp, alpha=glu_alpha,
                                      up_offset=up_offset)
                    try:
                        got = ExpertKernel(spec).gate(probe.clone())
                    except (ValueError, KeyError, TypeError, RuntimeError):
                        continue
                    if _same(got, want):
                        return spec
    raise CheckpointError(
        f"{cls}'s gate ({cls}._apply_gate) is none that fiddler-moe's expert kernel computes (activation "
        f"{activation_name!r} of the gate times up, with GPT-OSS's clamp, alpha, offset and interleaving as options)"
    )


# Experts-module parameter -> ExpertSource field
_EXPERT_FIELDS = {
    "gate_up_proj": "gate_up",
    "up_proj": "gate_up",
    "down_proj": "down",
    "gate_up_proj_bias": "gate_up_bias",
    "up_proj_bias": "gate_up_bias",
    "down_proj_bias": "down_bias",
}
# The same in an MXFP4 checkpoint (gpt-oss): each weight is a `_blocks` and a `_scales` tensor
_MXFP4_FIELDS = {
    "gate_up_proj_blocks": "gate_up",
    "gate_up_proj_scales": "gate_up_scales",
    "down_proj_blocks": "down",
    "down_proj_scales": "down_scales",
}


def checkpoint_quantization(config: transformers.PreTrainedConfig) -> str:
    """"" for float weights, "mxfp4" for gpt-oss's 4-bit experts, "fp8" for FP8 weights with block scales
    (DeepSeek-V3/R1, Qwen3 FP8); any other quantization is refused, naming what is not read."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return ""
    spec = quantization if isinstance(quantization, dict) else quantization.to_dict()
    method = spec.get("quant_method")
    method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
    if method == "mxfp4":
        return "mxfp4"
    if method == "fp8":
        if spec.get("expert_dtype", "fp8") != "fp8":
            raise CheckpointError(f"the checkpoint's experts are {spec['expert_dtype']} in an FP8 checkpoint, which "
                                  "fiddler-moe does not read yet; use its bfloat16 or FP8 release")
        block = spec.get("weight_block_size")
        if not (isinstance(block, list | tuple) and len(block) == 2):
            raise CheckpointError(f"the checkpoint's FP8 weights have no weight_block_size ({block!r}); fiddler-moe "
                                  "reads FP8 with block scales (DeepSeek-V3, Qwen3 FP8): use the bfloat16 release")
        return "fp8"
    raise CheckpointError(
        f"the checkpoint's weights are quantized ({method}), which fiddler-moe does not read yet; use a bfloat16 "
        "or float32 checkpoint of the model (or its FP8 block-scaled or gpt-oss's MXFP4 one)"
    )


def _converter_for(pattern: str, converters: list[WeightConverter]) -> WeightConverter:
    for converter in converters:
        if pattern in converter.source_patterns:
            for op in converter.operations:
                ok = (isinstance(op, MergeModulelist) and op.dim == 0) or (isinstance(op, Concatenate) and op.dim == 1)
                if not ok:
                    raise CheckpointError(f"expert weights need a conversion ({op!r}) fiddler-moe does not support")
            return converter
    raise CheckpointError(f"no converter for pattern {pattern}")


def check_architecture(config: transformers.PreTrainedConfig, dtype: torch.dtype
                       ) -> tuple[nn.Module, list[MoELayer], KernelSpec, str]:
    """Everything that can refuse a model from its config alone: transformers' model built on meta with our
    experts implementation, its MoE layers, their KernelSpec and the checkpoint's quantization. Raises
    CheckpointError with one line naming what is missing."""
    model = build_skeleton(config, dtype)
    moe_layers = find_moe_layers(model)
    if not moe_layers:
        unsupported = _unsupported_experts(model, config)
        if unsupported:
            raise CheckpointError(_not_through_interface(unsupported))
        raise CheckpointError(
            f"the checkpoint holds a dense {config.model_type} model with no routed experts; fiddler-moe runs "
            "Mixture-of-Experts models (run dense models with transformers directly)"
        )
    kernel = kernel_spec(config, moe_layers[0], dtype)
    for layer in moe_layers[1:]:
        if kernel_spec(config, layer, dtype) != kernel:
            raise CheckpointError(
                f"{layer.name} computes its experts differently from {moe_layers[0].name}; fiddler-moe's workers "
                "compute one expert function per model"
            )
    return model, moe_layers, kernel, checkpoint_quantization(config)


def inspect(folder: Path, dtype: str | None = None) -> tuple[nn.Module, ModelLayout]:
    """Build the meta model and map every checkpoint tensor to its owner, reading no weights."""
    folder = Path(folder).expanduser().resolve()
    config = read_config(folder)
    model_dtype = resolve_dtype(config, dtype)
    model, moe_layers, kernel, quantization = check_architecture(config, model_dtype)
    fields = {**_EXPERT_FIELDS, **(_MXFP4_FIELDS if quantization == "mxfp4" else {})}
    table = tensor_table(folder)
    meta_state = model.state_dict()
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_prefix = {layer.name + ".": layer for layer in moe_layers}

    parts: dict[tuple[int, int, str], list[tuple[int, TensorRef]]] = {}
    per_expert: dict[tuple[int, str, int], list[tuple[str, TensorRef, TensorRef | None]]] = {}
    non_expert: dict[str, TensorRef] = {}
    converted: dict[str, list[tuple[str, str, TensorRef]]] = {}
    # FP8: each weight's block scales go with the weight (experts.fp8), and activation scales are not weights
    scales = {fp8.weight_key(k): TensorRef(info.file, k) for k, info in table.items()
              if quantization == "fp8" and fp8.weight_key(k) in table}
    for key, info in table.items():
        if quantization == "fp8" and (fp8.weight_key(key) in table or fp8.is_activation_scale(key)):
            continue
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        if target not in meta_state and key in meta_state:  # as transformers does: a key renamed by mistake
            target, pattern = rename_source_key(key, [], [], model.base_model_prefix, meta_state)
        owner = next((layer for prefix, layer in by_prefix.items() if target.startswith(prefix)), None)
        if owner is None and pattern is not None:
            converted.setdefault(target, []).append((key, pattern, TensorRef(info.file, key)))
            continue
        if owner is None:
            if target in meta_state:
                expected = tuple(meta_state[target].shape)
                if info.shape != expected:
                    raise CheckpointError(
                        f"tensor {key} in {info.file} has shape {list(info.shape)}, but the config expects "
                        f"{list(expected)}; the checkpoint does not match its config.json"
                    )
                non_expert[target] = TensorRef(info.file, key)
            continue
        param = target[len(owner.name) + 1 :]
        if param not in fields:
            raise CheckpointError(f"unexpected expert tensor {key} (maps to {target})")
        slot = fields[param]
        scale = scales.get(key)
        if pattern is None:  # fused checkpoint: one [num_experts, ...] tensor for the whole layer
            if not info.shape or info.shape[0] != owner.num_experts:
                raise CheckpointError(
                    f"tensor {key} has shape {list(info.shape)}; expected {owner.num_experts} experts on dim 0"
                )
            for e in range(owner.num_experts):
                parts.setdefault((owner.layer, e, slot), []).append((0, TensorRef(info.file, key, e)))
                if scale is not None:
                    parts.setdefault((owner.layer, e, f"{slot}_scales"), []).append(
                        (0, TensorRef(scale.file, scale.key, e)))
        else:  # one tensor per expert, fused by transformers' converter in source-pattern order
            converter = _converter_for(pattern, converters)
            order = converter.source_patterns.index(pattern)
            per_expert.setdefault((owner.layer, slot, order), []).append((key, TensorRef(info.file, key), scale))
    # transformers stacks a layer's per-expert tensors in the natural order of their keys (MergeModulelist over
    # the state dict sorted by dot_natural_key): the n-th key is expert n.
    for (layer_index, slot, order), keyed in per_expert.items():
        count = next(layer.num_experts for layer in moe_layers if layer.layer == layer_index)
        if len(keyed) != count:
            raise CheckpointError(
                f"layer {layer_index} has {len(keyed)} tensors like {keyed[0][0]} but {count} experts; the "
                "checkpoint is incomplete or does not match its config.json"
            )
        for expert, (_, ref, scale) in enumerate(sorted(keyed, key=lambda item: dot_natural_key(item[0]))):
            parts.setdefault((layer_index, expert, slot), []).append((order, ref))
            if scale is not None:
                parts.setdefault((layer_index, expert, f"{slot}_scales"), []).append((order, scale))

    experts: dict[tuple[int, int], ExpertSource] = {}
    for layer in moe_layers:
        for e in range(layer.num_experts):

            def refs(slot: str) -> list[TensorRef]:
                return [ref for _, ref in sorted(parts.get((layer.layer, e, slot), []), key=lambda p: p[0])]

            source = ExpertSource(layer.layer, e, refs("gate_up"), refs("down"), refs("gate_up_bias"),
                                  refs("down_bias"), refs("gate_up_scales"), refs("down_scales"))
            if not source.gate_up or not source.down:
                raise CheckpointError(
                    f"the checkpoint has no weights for layer {layer.layer} expert {e}; it is incomplete "
                    "or does not match its config.json"
                )
            experts[(layer.layer, e)] = source

    _check_expert_shapes(moe_layers, experts, table)
    converted_shapes = _check_converted(model, config, converters, converted, table, meta_state)
    missing = [
        name
        for name in meta_state
        if name not in non_expert
        and name not in converted_shapes
        and not any(name.startswith(p) for p in by_prefix)
        and name not in getattr(model, "all_tied_weights_keys", {})
    ]
    if missing:
        raise CheckpointError(
            f"the checkpoint lacks {len(missing)} weight(s) the model needs, e.g. {missing[0]}; "
            "a shard is missing or the checkpoint does not match its config.json"
        )
    itemsize = torch.empty((), dtype=model_dtype).element_size()
    first = moe_layers[0].module
    per_expert = sum(p.numel() // first.num_experts for _, p in first.named_parameters(recurse=False))
    layout = ModelLayout(
        folder=folder,
        config=config,
        dtype=model_dtype,
        fingerprint=fingerprint(folder),
        kernel=kernel,
        moe_layers=moe_layers,
        experts=experts,
        expert_bytes=per_expert * itemsize,
        non_expert=non_expert,
        non_expert_converted=converted,
        non_expert_bytes=sum(meta_state[n].numel() * meta_state[n].element_size()
                             for n in [*non_expert, *converted_shapes]),
        layer_bytes=_mean_layer_bytes(meta_state, [*non_expert, *converted_shapes]),
        quantization=quantization,
        non_expert_scales={ref.key: scales[ref.key] for ref in [*non_expert.values(),
                           *(r for parts in converted.values() for _, _, r in parts)] if ref.key in scales},
        checkpoint_expert_bytes=sum(_stored_bytes(source, table) for source in experts.values()),
    )
    return model, layout


def _convert(converters: list[WeightConverter], target: str, parts: list[tuple[str, str, TensorRef]],
             tensors: list[torch.Tensor], model: nn.Module, config) -> dict[str, torch.Tensor]:
    """transformers' own conversion of checkpoint tensors into model parameters (WeightConverter.convert), fed in
    the order transformers feeds it: each source pattern's keys in natural order."""
    converter = copy.deepcopy(next(c for c in converters if parts[0][1] in c.source_patterns))
    for (key, pattern, _), tensor in sorted(zip(parts, tensors), key=lambda item: dot_natural_key(item[0][0])):
        converter.add_tensor(target, key, pattern, lambda tensor=tensor: tensor)
    out = converter.convert(target, model=model, config=config)
    return {name: value[0] if isinstance(value, list) else value for name, value in out.items()}


def _check_converted(model: nn.Module, config, converters: list[WeightConverter], converted: dict, table: dict,
                     meta_state: dict) -> dict[str, tuple[int, ...]]:
    """Run each non-expert conversion on meta tensors of the checkpoint's shapes: the parameters it fills and their
    shapes, checked against the model's."""
    shapes = {}
    for target, parts in converted.items():
        metas = [torch.empty(table[ref.key].shape, device="meta") for _, _, ref in parts]
        try:
            out = _convert(converters, target, parts, metas, model, config)
        except Exception as e:
            raise CheckpointError(f"transformers' conversion of {parts[0][0]} into {target} fails ({type(e).__name__}: "
                                  f"{(str(e).splitlines() or [''])[0][:120]}); the checkpoint does not match its "
                                  "config.json") from None
        for name, tensor in out.items():
            expected = tuple(meta_state[name].shape) if name in meta_state else None
            if expected != tuple(tensor.shape):
                raise CheckpointError(
                    f"{', '.join(k for k, _, _ in parts)} convert to {name} of shape {list(tensor.shape)}, but the "
                    f"config expects {list(expected) if expected else 'no such weight'}; the checkpoint does not "
                    "match its config.json"
                )
            shapes[name] = expected
    return shapes


_DECODER_LAYER = re.compile(r"^(.*\.layers\.\d+)\.")  # "model.layers.3.self_attn.q_proj.weight" -> "model.layers.3"


def _mean_layer_bytes(meta_state: dict[str, torch.Tensor], names: list[str]) -> int:
    """The non-expert bytes of one decoder layer (`...layers.N.` in the parameter's name), the mean over layers;
    0 where no name says which layer it is in."""
    per_layer: dict[str, int] = {}
    for name in names:
        match = _DECODER_LAYER.match(name)
        if match:
            tensor = meta_state[name]
            per_layer[match.group(1)] = per_layer.get(match.group(1), 0) + tensor.numel() * tensor.element_size()
    return sum(per_layer.values()) // len(per_layer) if per_layer else 0


def _stored_bytes(source: ExpertSource, table: dict) -> int:
    """One expert's bytes in the checkpoint (a fused tensor counts its share)."""
    refs = [*source.gate_up, *source.down, *source.gate_up_bias, *source.down_bias, *source.gate_up_scales,
            *source.down_scales]
    return sum(table[r.key].nbytes // (table[r.key].shape[0] if r.index is not None else 1) for r in refs)


def _check_expert_shapes(moe_layers: list[MoELayer], experts: dict, table: dict) -> None:
    """Catch a checkpoint whose expert tensors disagree with the config before any worker loads them: every
    expert's every tensor, from the safetensors headers alone."""
    for layer in moe_layers:
        module = layer.module
        params = {
            "gate_up": "gate_up_proj" if module.has_gate else "up_proj",
            "down": "down_proj",
            "gate_up_bias": "gate_up_proj_bias" if module.has_gate else "up_proj_bias",
            "down_bias": "down_proj_bias",
        }
        for e in range(layer.num_experts):
            source = experts[(layer.layer, e)]
            for slot, param in params.items():
                refs = getattr(source, slot)
                if not refs or getattr(module, param, None) is None:
                    continue
                expected = tuple(getattr(module, param).shape[1:])
                # per-expert parts are concatenated on dim 0 (Mixtral's w1 + w3): each holds an equal share
                share = (expected[0] // len(refs), *expected[1:]) if expected else expected
                scales = getattr(source, f"{slot}_scales", None) or [None] * len(refs)
                if len(scales) != len(refs):
                    raise CheckpointError(f"layer {layer.layer} expert {e} {param} has {len(refs)} quantized "
                                          f"tensor(s) but {len(scales)} scale tensor(s); the checkpoint is incomplete")
                for ref, scale in zip(refs, scales):
                    shape = table[ref.key].shape[1:] if ref.index is not None else table[ref.key].shape
                    if scale is not None and table[ref.key].dtype != "U8":  # FP8: the weight's shape, block scales
                        scale_shape = table[scale.key].shape[1:] if scale.index is not None else table[scale.key].shape
                        if len(scale_shape) not in (0, 2) or any(s > d for s, d in zip(scale_shape, shape)):
                            raise CheckpointError(f"FP8 weight {ref.key} {list(shape)} and its scales {scale.key} "
                                                  f"{list(scale_shape)} do not match; the checkpoint is damaged")
                    elif scale is not None:  # MXFP4: blocks [out, groups, 16] and scales [out, groups]
                        scale_shape = table[scale.key].shape[1:] if scale.index is not None else table[scale.key].shape
                        if len(shape) != 3 or tuple(scale_shape) != tuple(shape[:-1]):
                            raise CheckpointError(
                                f"MXFP4 tensors {ref.key} {list(shape)} and {scale.key} {list(scale_shape)} do not "
                                "match; the checkpoint is damaged"
                            )
                        shape = mxfp4.dequantized_shape(tuple(shape))
                    if tuple(shape) != share:
                        raise CheckpointError(
                            f"expert tensor {ref.key} in {table[ref.key].file} has shape {list(shape)}, but the "
                            f"config expects {list(share)} (layer {layer.layer} expert {e} {param}); the checkpoint "
                            "does not match its config.json"
                        )


def load_non_expert(model: nn.Module, layout: ModelLayout, device: torch.device) -> None:
    """Read every non-expert weight onto the device; experts modules keep meta parameters (no memory)."""
    reader = TensorReader(layout.folder)

    def put(name: str, tensor: torch.Tensor) -> None:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        current = module._parameters.get(attr)
        if current is None:
            current = module._buffers[attr]
        tensor = tensor.to(device=device, dtype=current.dtype)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[attr] = tensor

    def read(ref: TensorRef, dtype: torch.dtype | None) -> torch.Tensor:
        """A tensor as stored, or an FP8 weight dequantized to `dtype` (the parameter's, else the model's) as
        transformers does on a CPU."""
        tensor = reader.read(ref.file, ref.key)
        scale = layout.non_expert_scales.get(ref.key)
        if scale is None:
            return tensor
        try:
            return fp8.dequantize(tensor, reader.read(scale.file, scale.key), dtype or layout.dtype)
        except ValueError as e:
            raise CheckpointError(f"{ref.key}: {e}; the checkpoint is damaged") from None

    try:
        for name, ref in layout.non_expert.items():
            module_name, _, attr = name.rpartition(".")
            current = getattr(model.get_submodule(module_name), attr, None)
            put(name, read(ref, getattr(current, "dtype", None)))
        if layout.non_expert_converted:
            converters = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightConverter)]
            for target, parts in layout.non_expert_converted.items():
                tensors = [read(ref, layout.dtype) for _, _, ref in parts]
                for name, tensor in _convert(converters, target, parts, tensors, model, layout.config).items():
                    put(name, tensor)
    finally:
        reader.close()
    model.tie_weights()
    for module in model.modules():  # buffers built at construction (rotary tables) follow the weights
        for attr, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type != "meta":
                module._buffers[attr] = buffer.to(device)
    experts_prefixes = tuple(layer.name + "." for layer in layout.moe_layers)
    left = [n for n, p in model.named_parameters() if p.device.type == "meta" and not n.startswith(experts_prefixes)]
    if left:
        raise CheckpointError(f"weights not found in the checkpoint: {left[:3]}")
