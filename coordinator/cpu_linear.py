"""bfloat16 linear layers on a CPU coordinator at memory speed.

On a CPU-only machine the coordinator runs attention, routers, shared experts and the head through transformers'
`nn.Linear` modules, and PyTorch's plain bfloat16 `linear` is slow on a CPU: about half the memory bandwidth with
oneDNN bfloat16 support, and a loop of matrix-vector products without it (AVX2). The expert kernel has a fast path
for each (experts/compute.py, docs/performance-log.md); this gives the coordinator's own linear layers the same,
by giving each module a forward over its packed weight (oneDNN) or one over its dense weight that takes the
decoding kernel for a few rows (native/kernels.py: AVX512-BF16 or AVX2) and, for batches of rows, float32
products (AVX2) or PyTorch's own linear (AVX512-BF16). transformers' modeling code is untouched: the modules stay
where they are and compute the same function.

With --quantize int8 or int4 a CPU coordinator's own linear layers take the workers' format too
(`quantize_linear_layers`): attention projections, shared experts and the head hold their weights quantized
(experts/quant.py) and compute through the same kernels, any number of rows, their inputs quantized per block.
Routers (a MoE block's gate, a shared expert's gate) stay in the compute dtype, as llama.cpp keeps them: they
pick the experts, are small, and an error there changes which experts run. A layer whose input is not a whole
number of blocks stays in the compute dtype too. benchmarks/quant_accuracy.py's `quantized_reference` computes
the same function.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn

from fiddler_moe.native import kernels
from fiddler_moe.experts import quant
from fiddler_moe.experts import compute
from fiddler_moe.experts.compute import fast_linear


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]).contiguous(), self.packed_weight, self.bias,
                                            "none", [None], "")
    return out.view(*shape[:-1], out.shape[-1])


def _dense_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bound = self.bound_linear
    if bound is not None and bound.matches(self.weight, self.bias):
        out = bound(x)  # a decoding step's few rows
        if out is not None:
            return out
    shape = x.shape
    out = fast_linear(x.reshape(-1, shape[-1]), self.weight, self.bias, isa=self.bf16_isa)
    if out is None:
        return nn.functional.linear(x, self.weight, self.bias)
    return out.view(*shape[:-1], out.shape[-1])


def _owners(model: nn.Module) -> dict[int, int]:
    """id(parameter) -> how many modules hold it: a weight held by more than one (a tied head's embedding) must stay
    dense, since the other module reads it."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    return owners


def is_router(name: str) -> bool:
    """Whether the nn.Linear at module path `name` chooses or weighs experts (kept in the compute dtype)."""
    last = name.rsplit(".", 1)[-1]
    return last in ("gate", "router") or last.endswith("_gate")


def quantizable_linear_layers(model: nn.Module, skip: tuple[str, ...] = ()) -> list[tuple[str, nn.Linear]]:
    """The (name, module) of the linear layers --quantize applies to on a CPU coordinator: every nn.Linear on the
    CPU outside `skip` (the experts modules) but the routers, whose input is a whole number of blocks."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not name.startswith(skip) and not is_router(name)
            and module.weight.device.type == "cpu" and module.in_features % quant.BLOCK == 0]


def _quantized_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    out = quant.linear(x.reshape(-1, shape[-1]), self.quant_weight)
    if self.bias is not None:
        out += self.bias
    return out.view(*shape[:-1], out.shape[-1])


@torch.no_grad()
def quantize_linear_layers(model: nn.Module, name: str, skip: tuple[str, ...] = ()) -> int:
    """Quantize `quantizable_linear_layers` to format `name` (int8, int4) and compute them through the quantized
    kernels; the dense weight is dropped unless another module shares it (a tied head's embedding). Returns how
    many."""
    owners = _owners(model)
    layers = quantizable_linear_layers(model, skip)
    for _, module in layers:
        weight = module.weight
        module.quant_weight = quant.quantize(weight.detach(), name)
        if owners.get(id(weight), 0) <= 1:  # a meta placeholder keeps the shape and dtype readable
            module.weight = nn.Parameter(torch.empty_like(weight, device="meta"), requires_grad=False)
        module.forward = types.MethodType(_quantized_forward, module)
    return len(layers)


def pack_linear_layers(model: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Give every bfloat16 nn.Linear on the CPU a fast forward: packed (oneDNN bfloat16), where no other module
    shares its weight (a tied head keeps its embedding's dense weight), or the dense paths (AVX512-BF16, AVX2).
    Returns how many."""
    isa = compute.decoding_kernel()  # the C kernel's path on dense weights; 0 with packed weights (or none)
    if not (compute.PACK_BFLOAT16 or isa):
        return 0
    if isa:
        kernels.available()  # build the decoding kernel now (once per machine), not during the first token
    owners = _owners(model)
    packed = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.startswith(skip) or hasattr(module, "quant_weight"):
            continue
        weight = module.weight
        if weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
            continue
        if isa:  # the dense weight stays: nothing to share or drop
            module.bf16_isa = isa
            module.bound_linear = kernels.BoundLinear.of(weight, module.bias, isa)
            module.forward = types.MethodType(_dense_forward, module)
            packed += 1
            continue
        if owners.get(id(weight), 0) > 1:
            continue
        module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
        # The dense weight is dropped; the module keeps a meta placeholder so its shape and dtype still read right.
        module.weight = nn.Parameter(torch.empty_like(weight, device="meta"), requires_grad=False)
        module.forward = types.MethodType(_packed_forward, module)
        packed += 1
    return packed
