"""RMS norms of a CPU coordinator's decoding steps in one C call.

transformers' RMS norm (Llama's, which Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3, OLMoE and GLM-4-MoE copy) is
seven PyTorch operations (a cast, pow, mean, add, rsqrt, a product, a cast and the weight's product). A decoding
step runs two a layer, and Qwen3's per-head query and key norms two more, each on one row per sequence, where the
operations' own cost is far above the arithmetic: on mini about 70 us a norm of 1024 values on a 2-core VM, 1.3 ms a
step (docs/performance-log.md). `fuse_rms_norms` gives each such module a forward that takes the C kernel
(native/rms_norm.c) for bfloat16 on the CPU up to FUSED_MAX_ELEMENTS values (decoding steps) and the module's own
forward otherwise (prefill, other dtypes). The kernel rounds where the PyTorch code rounds; only its float32 sum of
squares is taken in another order, so a value may differ by one bfloat16 step where the two sums differ in the last
bit (the tests hold it to that).

A module is taken when its class's forward is Llama's operation for operation (the same bytecode, names and
constants), so a family whose norm differs keeps its own: gpt-oss rounds once after the weight's product, Gemma
multiplies by one plus the weight.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from fiddler_moe.native import kernels

# Values up to which a call takes the kernel (one thread): decoding steps' rows; prefill keeps PyTorch's operations,
# which spread over the threads.
FUSED_MAX_ELEMENTS = 1 << 16


def is_llama_rms_norm(module: nn.Module) -> bool:
    """Whether `module` computes transformers' Llama RMS norm: its class's forward is that code, and it has the
    attributes that code reads."""
    code = getattr(type(module).forward, "__code__", None)
    reference = LlamaRMSNorm.forward.__code__
    weight = getattr(module, "weight", None)
    return (code is not None and code.co_code == reference.co_code and code.co_names == reference.co_names
            and code.co_consts == reference.co_consts and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), float))


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if (hidden_states.dtype is torch.bfloat16 and weight.dtype is torch.bfloat16 and hidden_states.is_cpu
            and weight.is_cpu and hidden_states.numel() <= FUSED_MAX_ELEMENTS
            and hidden_states.shape[-1] == weight.shape[0]):
        return kernels.rms_norm(hidden_states, weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def fuse_rms_norms(model: nn.Module, skip: tuple[str, ...] = ()) -> int:
    """Give every Llama RMS norm of `model` outside `skip` (module name prefixes) the one-call forward above, where
    the kernel library is built. Returns how many."""
    if not kernels.available():
        return 0
    fused = 0
    for name, module in model.named_modules():
        if name.startswith(skip) or not is_llama_rms_norm(module):
            continue
        module.forward = types.MethodType(_fused_forward, module)
        fused += 1
    return fused
