"""bfloat16 linear layers on a CPU coordinator at memory speed.

On a CPU-only machine the coordinator runs attention, routers, shared experts and the head through transformers'
`nn.Linear` modules, and PyTorch's plain bfloat16 `linear` reaches about half the memory bandwidth on CPUs with
oneDNN bfloat16 support. The expert kernel already re-lays its weights out into oneDNN's blocked layout
(expert_worker/compute.py, README "Performance"); this does the same for the coordinator's own linear layers, by
giving each module a forward over its packed weight. transformers' modeling code is untouched: the modules stay
where they are and compute the same function.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn

from expert_worker.compute import PACK_BFLOAT16


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]).contiguous(), self.packed_weight, self.bias,
                                            "none", [None], "")
    return out.view(*shape[:-1], out.shape[-1])


def pack_linear_layers(model: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Pack every bfloat16 nn.Linear on the CPU whose weight no other module shares (a tied head keeps its
    embedding's dense weight). Returns how many were packed."""
    if not PACK_BFLOAT16:
        return 0
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    packed = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.startswith(skip):
            continue
        weight = module.weight
        if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or owners.get(id(weight), 0) > 1:
            continue
        module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
        # The dense weight is dropped; the module keeps a meta placeholder so its shape and dtype still read right.
        module.weight = nn.Parameter(torch.empty_like(weight, device="meta"), requires_grad=False)
        module.forward = types.MethodType(_packed_forward, module)
        packed += 1
    return packed
