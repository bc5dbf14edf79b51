"""FP8 block-scaled weights, as DeepSeek-V3/R1 and the Qwen3 FP8 releases ship them, read as transformers reads them
on a CPU (integrations/finegrained_fp8.py, Fp8Dequantize).

config.json's quantization_config says {"quant_method": "fp8", "weight_block_size": [128, 128], ...}. A linear
weight `X.weight` [out, in] is stored in float8_e4m3fn beside `X.weight_scale_inv` [out / bm, in / bn] (float32,
or one E8M0 byte per block under scale_fmt "ue8m0"), and a fused experts tensor `X` beside `X_scale_inv`. The block
size comes from the two shapes, as transformers takes it: each weight of block (i, j) is q * scale_inv[i, j],
computed in float32 and rounded once to the compute dtype. Activation scales (static activation quantization) are
not part of the weights; transformers' dequantized model ignores them, and so does fiddler-moe.

`quantize` is the inverse, for writing small test checkpoints: transformers' own Fp8Quantize (a block's largest
magnitude maps to 448, the largest float8_e4m3fn).
"""

from __future__ import annotations

import torch

FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn}  # the safetensors dtype of the weights transformers reads
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv, and a fused X -> X_scale_inv


def scale_key(weight_key: str) -> str:
    return weight_key + SCALE_SUFFIX


def weight_key(key: str) -> str | None:
    """The weight a scale tensor belongs to, or None when `key` is no scale."""
    return key.removesuffix(SCALE_SUFFIX) if key.endswith(SCALE_SUFFIX) else None


def is_activation_scale(key: str) -> bool:
    return key.endswith((".activation_scale", ".input_scale"))


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An FP8 weight [..., rows, cols] and its per-block scales [..., rows / bm, cols / bn] -> `dtype`: q * s in
    float32, rounded once to `dtype`, as transformers' Fp8Dequantize. Blocks at the edge may be partial."""
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"an FP8 weight must be float8_e4m3fn, got {weight.dtype}")
    rows, cols = weight.shape[-2:]
    if scale_inv.dim() < 2:
        scale_inv = scale_inv.reshape(*weight.shape[:-2], 1, 1)
    scale_rows, scale_cols = scale_inv.shape[-2:]
    block_m, block_n = -(-rows // scale_rows), -(-cols // scale_cols)
    if (-(-rows // block_m) != scale_rows or -(-cols // block_n) != scale_cols
            or scale_inv.shape[:-2] != weight.shape[:-2]):
        raise ValueError(f"FP8 weight {list(weight.shape)} does not match its block scales {list(scale_inv.shape)}")
    if scale_inv.dtype == torch.uint8:  # E8M0: the scale is 2 ** (byte - 127)
        scale = (scale_inv.float() - 127.0).exp2()
    else:
        scale = scale_inv.float()
    scale = scale.repeat_interleave(block_m, dim=-2)[..., :rows, :].repeat_interleave(block_n, dim=-1)[..., :cols]
    return (weight.float() * scale).to(dtype)


def quantize(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [..., rows, cols] (whole blocks) -> (float8_e4m3fn weight, float32 scale_inv per block), as
    transformers' Fp8Quantize computes them."""
    rows, cols = weight.shape[-2:]
    bm, bn = block
    if rows % bm or cols % bn:
        raise ValueError(f"FP8 blocks of {bm}x{bn} do not tile a [{rows}, {cols}] weight")
    lead = weight.shape[:-2]
    tiles = weight.float().reshape(*lead, rows // bm, bm, cols // bn, bn)
    peak = tiles.abs().amax(dim=(-3, -1))
    scale = torch.where(peak > 0, FP8_MAX / torch.where(peak > 0, peak, torch.ones_like(peak)), torch.ones_like(peak))
    q = (tiles * scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(weight.shape).contiguous(), (1.0 / scale).float().contiguous()
