"""The CPU coordinator's attention of short queries: one query's heads grouped per key head, or float32.

A decoding step asks attention for one query per row against the whole KV cache, and PyTorch's CPU SDPA kernel is
slow there in bfloat16 on CPUs without AMX, for two reasons measured apart:
- Without a mask (one sequence), transformers passes `enable_gqa` and the kernel works through each query head
  alone against its key head. Where a mask is given (rows of a batch), transformers instead lays the heads that
  share a key head out as that head's query positions (its `pack_gqa`), one product of a few rows a key head. On an
  AVX2 CPU (Zen 3, 1 thread, mini's 16 heads over 4 key heads) one layer at 256 / 1024 cached positions took
  854 / 3535 us the first way and 84 / 346 the second (1204 at 4096); a mini decoding step of the coordinator's
  layers ~28 -> ~23 ms at 256 positions, ~45 -> ~24 at 1024 (docs/performance-log.md, 2026-12-02).
- On CPUs with AVX512-BF16 but no AMX (Zen 5) the bfloat16 products themselves are slow: one mini layer at 330
  cached positions took 468 us for one row and 4.0 ms for 8 rows, against 73 us and 470 us with the inputs
  converted to float32 first (conversions included). On an AVX2 CPU float32 is the slower at every length
  measured (1-64 query positions, 256 and 1024 cached), so this second remedy is for those CPUs only. From 128
  query positions on bfloat16 is the faster everywhere (a 256-token prefill: 3.7 against 4.4 ms on the Zen 5).
On a CPU with AMX the bfloat16 kernel is the fast one as it comes: a Xeon took 34 us (1 row) and 446 us (8 rows)
in bfloat16 against 242 us and 6.0 ms through float32, most of it the conversions.

So a CPU coordinator's model can take one of two implementations registered in transformers' attention interface,
both transformers' own SDPA attention (`sdpa_attention_forward`) with its mask for a single query position always
built (`sdpa_mask` with `allow_is_causal_skip` off there: the mask that is all True for one sequence), so that one
query takes transformers' grouped path: `GROUPED_NAME` as is, `SDPA_NAME` with queries of at most
FLOAT32_MAX_QUERY positions converted to float32 and the output rounded back to the model's dtype. Nothing of the
modeling code changes; the function is PyTorch's SDPA on the same values, summed in another order (and with
float32, the attention probabilities kept in float32 where the bfloat16 kernel rounds them to bfloat16 before
multiplying the values): within bfloat16 rounding of transformers' result, but not its bits, so on a random-weight
model a near-tie can change a greedy token.

FIDDLER_CPU_ATTENTION chooses: `auto` (the default) takes the grouped path on CPUs without AVX512-BF16 (AVX2), the
float32 one with --quantize int8/int4 on CPUs with AVX512-BF16 but no AMX (where the results are held to the
quantized reference rather than to transformers' bits), and transformers' attention as it comes otherwise;
`float32` takes the float32 path always; `model` never changes it. Float32 models are untouched either way.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from fiddler_moe.experts import compute

SDPA_NAME = "fiddler_cpu_sdpa"  # float32 for short queries
GROUPED_NAME = "fiddler_cpu_sdpa_grouped"  # transformers' own, one query's heads grouped
SETTINGS = ("auto", "float32", "model")
FLOAT32_MAX_QUERY = 64  # query positions up to which float32 was faster on the Zen 5 at every length measured
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


def sdpa_mask_for_one_query(**kwargs):
    """transformers' `sdpa_mask`, built also where a single query could attend without one (see above)."""
    if kwargs.get("q_length") == 1:
        kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(**kwargs)


for _name, _forward in ((SDPA_NAME, sdpa_short_queries_in_float32), (GROUPED_NAME, sdpa_attention_forward)):
    AttentionInterface.register(_name, _forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_name, sdpa_mask_for_one_query)


def attention_setting() -> str:
    """FIDDLER_CPU_ATTENTION, checked: ValueError says what it takes."""
    value = os.environ.get("FIDDLER_CPU_ATTENTION", "auto").strip().lower() or "auto"
    if value not in SETTINGS:
        raise ValueError(f"FIDDLER_CPU_ATTENTION={value!r} is not one of {', '.join(SETTINGS)}: auto (the faster "
                         "attention for this CPU), float32 (short queries in float32 always), model (transformers' "
                         "own as it comes)")
    return value


def bfloat16_sdpa_is_fast() -> bool:
    """Whether PyTorch's bfloat16 SDPA is the faster for short queries on this CPU: where it has AMX (above)."""
    return compute.has_amx()


def attention_for(quantized: bool) -> str | None:
    """The attention implementation a CPU coordinator takes (FIDDLER_CPU_ATTENTION, above), None for the model's."""
    setting = attention_setting()
    if setting == "float32":
        return SDPA_NAME
    if setting == "model" or bfloat16_sdpa_is_fast():
        return None
    if not compute.has_avx512_bfloat16():  # AVX2
        return GROUPED_NAME
    return SDPA_NAME if quantized else None  # AVX512-BF16 without AMX


def use_cpu_attention(model: nn.Module, name: str | None) -> bool:
    """Give a bfloat16 or float16 model that attends through SDPA on the CPU the implementation `name`
    (`attention_for`'s). Returns whether it did (float32 models, other attention implementations and devices, and
    None keep theirs)."""
    param = next(model.parameters(), None)
    if (name is None or param is None or param.dtype not in REDUCED
            or getattr(model.config, "_attn_implementation", None) != "sdpa"):
        return False
    model.set_attn_implementation(name)
    return model.config._attn_implementation == name
