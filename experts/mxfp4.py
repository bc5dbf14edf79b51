"""MXFP4, the 4-bit format gpt-oss ships its experts in, read as transformers reads it (integrations/mxfp4.py).

A weight of shape [out, in] is stored as two tensors: `blocks` [out, in / 32, 16] uint8, each byte two 4-bit codes
(low nibble first) of the values in FP4_VALUES, and `scales` [out, in / 32] uint8, one power of two per 32 values
(stored as exponent + 127). Dequantized, the weight comes out transposed, [in, out], the orientation of
GptOssExperts' parameters. The values are exact in float32 and bfloat16 (a 2-bit mantissa times a power of two).

`quantize` is the inverse, for writing small test checkpoints; it is not how gpt-oss was quantized, but it writes
the layout transformers reads.
"""

from __future__ import annotations

import torch

FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32  # values per scale
SCALE_BIAS = 127


def dequantized_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape `dequantize` gives for blocks of this shape ([..., out, groups, 16] -> [..., in, out])."""
    *prefix, out, groups, pair_bytes = blocks_shape
    return (*prefix, groups * pair_bytes * 2, out)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., out, in / 32, 16] uint8 blocks and [..., out, in / 32] uint8 scales -> the [..., in, out] weight in
    `dtype`: transformers' `convert_moe_packed_tensors`, the same table, ldexp and transpose."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} {blocks.dtype} do not match scales "
                         f"{list(scales.shape)} {scales.dtype}; the checkpoint is damaged")
    *prefix, out, groups, pair_bytes = blocks.shape
    lut = torch.tensor(FP4_VALUES, dtype=dtype)
    rows = blocks.reshape(-1, pair_bytes)
    values = torch.empty(rows.shape[0], pair_bytes * 2, dtype=dtype)
    values[:, 0::2] = lut[(rows & 0x0F).to(torch.int)]
    values[:, 1::2] = lut[(rows >> 4).to(torch.int)]
    torch.ldexp(values, scales.reshape(-1, 1).to(torch.int32) - SCALE_BIAS, out=values)
    return values.reshape(*prefix, out, groups * pair_bytes * 2).transpose(-2, -1).contiguous()


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An [..., in, out] weight -> (blocks, scales) that `dequantize` turns into the nearest MXFP4 values: per 32
    inputs the smallest power of two that brings the largest value within +-6, each value rounded to the table."""
    w = weight.float().transpose(-2, -1)  # [..., out, in]
    *prefix, out, inputs = w.shape
    if inputs % BLOCK:
        raise ValueError(f"MXFP4 needs the input size to be a multiple of {BLOCK}, got {inputs}")
    groups = w.reshape(*prefix, out, inputs // BLOCK, BLOCK)
    peak = groups.abs().amax(-1).clamp(min=2.0**-126)
    exponent = torch.ceil(torch.log2(peak / 6.0)).clamp(-SCALE_BIAS, SCALE_BIAS)
    scaled = groups / torch.exp2(exponent).unsqueeze(-1)
    table = torch.tensor(FP4_VALUES[:8])
    code = (scaled.abs().unsqueeze(-1) - table).abs().argmin(-1).to(torch.uint8)
    code |= (scaled < 0).to(torch.uint8) << 3
    pairs = code.reshape(*prefix, out, inputs // BLOCK, BLOCK // 2, 2)
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    return blocks.contiguous(), (exponent + SCALE_BIAS).to(torch.uint8).contiguous()
