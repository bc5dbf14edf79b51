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
    apply_renamings,
    rename_source_key,
)
from transformers.integrations.moe import _default_apply_gate

from fiddler_moe.coordinator.experts import IMPLEMENTATION_NAME
from fiddler_moe.experts import quant
from fiddler_moe.experts.checkpoint import CheckpointError, TensorReader, fingerprint, tensor_table
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
    non_expert_bytes: int = 0

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
        """Refuse --quantize for experts whose matrices it cannot cut into blocks, naming the fix."""
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


def kernel_spec(config, layer: MoELayer, dtype: torch.dtype) -> KernelSpec:
    module = layer.module
    cls = type(module)
    if cls._apply_gate is not _default_apply_gate or module.has_post_expert_norm or not module.is_concatenated:
        raise CheckpointError(
            f"{cls.__name__} uses a custom gate, a post-expert norm or an interleaved gate/up layout, which "
            "fiddler-moe's expert kernel does not compute yet"
        )
    activation = getattr(module.config, "hidden_act", None) or getattr(config, "hidden_act", "silu")
    return KernelSpec(
        activation=activation,
        has_gate=module.has_gate,
        has_bias=module.has_bias,
        is_transposed=module.is_transposed,
        dtype=dtype_name(dtype),
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


def _converter_for(pattern: str, converters: list[WeightConverter]) -> WeightConverter:
    for converter in converters:
        if pattern in converter.source_patterns:
            for op in converter.operations:
                ok = (isinstance(op, MergeModulelist) and op.dim == 0) or (isinstance(op, Concatenate) and op.dim == 1)
                if not ok:
                    raise CheckpointError(f"expert weights need a conversion ({op!r}) fiddler-moe does not support")
            return converter
    raise CheckpointError(f"no converter for pattern {pattern}")


def inspect(folder: Path, dtype: str | None = None) -> tuple[nn.Module, ModelLayout]:
    """Build the meta model and map every checkpoint tensor to its owner, reading no weights."""
    folder = Path(folder).expanduser().resolve()
    config = read_config(folder)
    model_dtype = resolve_dtype(config, dtype)
    model = build_skeleton(config, model_dtype)
    moe_layers = find_moe_layers(model)
    if not moe_layers:
        unsupported = _unsupported_experts(model, config)
        if unsupported:
            raise CheckpointError(_not_through_interface(unsupported))
        raise CheckpointError(
            f"{folder} holds a dense {config.model_type} model with no routed experts; fiddler-moe runs "
            "Mixture-of-Experts models (run dense models with transformers directly)"
        )
    table = tensor_table(folder)
    meta_state = model.state_dict()
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_prefix = {layer.name + ".": layer for layer in moe_layers}

    parts: dict[tuple[int, int, str], list[tuple[int, TensorRef]]] = {}
    non_expert: dict[str, TensorRef] = {}
    for key, info in table.items():
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        owner = next((layer for prefix, layer in by_prefix.items() if target.startswith(prefix)), None)
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
        if param not in _EXPERT_FIELDS:
            raise CheckpointError(f"unexpected expert tensor {key} (maps to {target})")
        slot = _EXPERT_FIELDS[param]
        if pattern is None:  # fused checkpoint: one [num_experts, ...] tensor for the whole layer
            if not info.shape or info.shape[0] != owner.num_experts:
                raise CheckpointError(
                    f"tensor {key} has shape {list(info.shape)}; expected {owner.num_experts} experts on dim 0"
                )
            for e in range(owner.num_experts):
                parts.setdefault((owner.layer, e, slot), []).append((0, TensorRef(info.file, key, e)))
        else:  # one tensor per expert, fused by transformers' converter in source-pattern order
            converter = _converter_for(pattern, converters)
            renamed = apply_renamings(key, renamings)
            regex = re.escape(pattern).replace(r"\*", r"(\d+)")
            match = re.search(regex, renamed)
            if match is None:
                raise CheckpointError(f"cannot find the expert index in {key}")
            expert = int(match.group(1))
            order = converter.source_patterns.index(pattern)
            parts.setdefault((owner.layer, expert, slot), []).append((order, TensorRef(info.file, key)))

    kernel = kernel_spec(config, moe_layers[0], model_dtype)
    experts: dict[tuple[int, int], ExpertSource] = {}
    for layer in moe_layers:
        for e in range(layer.num_experts):

            def refs(slot: str) -> list[TensorRef]:
                return [ref for _, ref in sorted(parts.get((layer.layer, e, slot), []), key=lambda p: p[0])]

            source = ExpertSource(layer.layer, e, refs("gate_up"), refs("down"), refs("gate_up_bias"),
                                  refs("down_bias"))
            if not source.gate_up or not source.down:
                raise CheckpointError(
                    f"the checkpoint has no weights for layer {layer.layer} expert {e}; it is incomplete "
                    "or does not match its config.json"
                )
            experts[(layer.layer, e)] = source

    _check_expert_shapes(moe_layers, experts, table)
    missing = [
        name
        for name in meta_state
        if name not in non_expert
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
        non_expert_bytes=sum(meta_state[n].numel() * meta_state[n].element_size() for n in non_expert),
    )
    return model, layout


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
                for ref in refs:
                    shape = table[ref.key].shape[1:] if ref.index is not None else table[ref.key].shape
                    if tuple(shape) != share:
                        raise CheckpointError(
                            f"expert tensor {ref.key} in {table[ref.key].file} has shape {list(shape)}, but the "
                            f"config expects {list(share)} (layer {layer.layer} expert {e} {param}); the checkpoint "
                            "does not match its config.json"
                        )


def load_non_expert(model: nn.Module, layout: ModelLayout, device: torch.device) -> None:
    """Read every non-expert weight onto the device; experts modules keep meta parameters (no memory)."""
    reader = TensorReader(layout.folder)
    try:
        for name, ref in layout.non_expert.items():
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            current = module._parameters.get(attr)
            if current is None:
                current = module._buffers[attr]
            tensor = reader.read(ref.file, ref.key).to(device=device, dtype=current.dtype)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
            else:
                module._buffers[attr] = tensor
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
