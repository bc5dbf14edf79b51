"""Attention of short queries in float32 on a CPU coordinator.

A decoding step asks attention for one query per row against the whole KV cache. On CPUs without AMX, PyTorch's CPU
SDPA kernel is slow there in bfloat16 (its bfloat16 products through oneDNN's small-matrix path): on a Zen 5 (AVX-512
with BF16, no AMX) one mini layer's attention at 330 cached positions took 468 us for one row and 4.0 ms for 8 rows,
against 73 us and 470 us with the same inputs converted to float32 first (conversions included; 1 thread,
docs/performance-log.md 2026-12-02). From 128 query positions on bfloat16 is the faster (a 256-token prefill: 3.7
against 4.4 ms). On a CPU with AMX the bfloat16 kernel is the fast one: a Xeon with AMX took 34 us (1 row) and 446 us
(8 rows) in bfloat16 against 242 us and 6.0 ms through float32, most of it the conversions (same shapes, 1 thread).

So the coordinator's model on a CPU can take `SDPA_NAME`, registered in transformers' attention interface:
transformers' own SDPA attention (`sdpa_attention_forward`, the same masks), with queries of at most
FLOAT32_MAX_QUERY positions converted to float32 and the output rounded back to the model's dtype. Nothing of the
modeling code changes; the function is PyTorch's SDPA on the same values, with the attention probabilities kept in
float32 where the bfloat16 kernel rounds them to bfloat16 before multiplying the values: within bfloat16 rounding
of transformers' result and nearer the exact one, but not its bits, so on a random-weight model a near-tie can
change a greedy token.

FIDDLER_CPU_ATTENTION chooses: `auto` (the default) takes it with --quantize int8/int4 on a CPU without AMX, where
it is the faster and the results are held to the quantized reference rather than to transformers' bits, and keeps
transformers' attention in the compute dtype otherwise; `float32` takes it always; `model` never. Float32 models are
untouched either way.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from fiddler_moe.experts import compute

SDPA_NAME = "fiddler_cpu_sdpa"
SETTINGS = ("auto", "float32", "model")
FLOAT32_MAX_QUERY = 64  # query positions up to which float32 was faster at every length measured (1-64)
REDUCED = (torch.bfloat16, torch.float16)


def sdpa_short_queries_in_float32(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                  attention_mask: torch.Tensor | None, **kwargs):
    """transformers' SDPA attention; a short query in bfloat16 or float16 on the CPU through float32."""
    if query.dtype not in REDUCED or query.device.type != "cpu" or query.shape[2] > FLOAT32_MAX_QUERY:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.float()  # an additive mask takes the query's dtype
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


AttentionInterface.register(SDPA_NAME, sdpa_short_queries_in_float32)
ALL_MASK_ATTENTION_FUNCTIONS.register(SDPA_NAME, sdpa_mask)


def attention_setting() -> str:
    """FIDDLER_CPU_ATTENTION, checked: ValueError says what it takes."""
    value = os.environ.get("FIDDLER_CPU_ATTENTION", "auto").strip().lower() or "auto"
    if value not in SETTINGS:
        raise ValueError(f"FIDDLER_CPU_ATTENTION={value!r} is not one of {', '.join(SETTINGS)}: auto (float32 "
                         "attention for decoding with --quantize where the CPU lacks AMX), float32 (always), model "
                         "(transformers' own)")
    return value


def bfloat16_sdpa_is_fast() -> bool:
    """Whether PyTorch's bfloat16 SDPA is the faster for short queries on this CPU: where it has AMX (above)."""
    return compute.has_amx()


def wants_float32(quantized: bool) -> bool:
    """Whether a CPU coordinator takes the float32 path for short queries (FIDDLER_CPU_ATTENTION, above)."""
    setting = attention_setting()
    return setting == "float32" or (setting == "auto" and quantized and not bfloat16_sdpa_is_fast())


def use_float32_short_queries(model: nn.Module) -> bool:
    """Give a bfloat16 or float16 model that attends through SDPA on the CPU the float32 path for short queries.
    Returns whether it did (float32 models, other attention implementations and devices keep theirs)."""
    param = next(model.parameters(), None)
    if param is None or param.dtype not in REDUCED or getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(SDPA_NAME)
    return model.config._attn_implementation == SDPA_NAME
