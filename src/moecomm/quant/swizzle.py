"""The swizzled 128x4 layout of NVFP4 block scales, as CUTLASS / FlashInfer block-scaled FP4 GEMMs read them.

Linear scales ``[M, Kb]`` are padded to ``[round_up(M, 128), round_up(Kb, 4)]`` and tiled in 128 x 4
tiles of 512 bytes; inside a tile row ``m`` and column ``k`` land at ``(m % 32) * 16 + ((m % 128) // 32) *
4 + k % 4`` (the layout of CUTLASS's ``Sm100BlkScaledConfig`` and FlashInfer's ``fp4_quantize`` with
``is_sf_swizzled_layout=True``). Scales travel linear on the wire: per-rank swizzled scales cannot be
concatenated, so a kernel that wants them swizzles after the gather.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from moecomm.quant.common import _describe, round_up

__all__ = ["swizzle_block_scales", "unswizzle_block_scales"]


def swizzle_block_scales(scales: Tensor) -> Tensor:
    """Linear block scales ``[M, Kb]`` -> swizzled 128x4 layout ``[round_up(M,128), round_up(Kb,4)]``.

    Linear entry ``(m, k)`` lands at flat offset
    ``(m//128)*(nKT*512) + (k//4)*512 + (m%32)*16 + ((m%128)//32)*4 + (k%4)`` with
    ``nKT = round_up(Kb,4)/4``; padding bytes are 0. Any 1-byte dtype (e4m3, e8m0 as uint8), any M.
    """
    if not isinstance(scales, torch.Tensor) or scales.dim() != 2 or scales.element_size() != 1:
        raise ValueError(f"swizzle_block_scales: scales must be a 2-D 1-byte tensor, got {_describe(scales)}")
    m, kb = scales.shape
    mp, kp = round_up(m, 128), round_up(kb, 4)
    padded = torch.zeros((mp, kp), dtype=torch.uint8, device=scales.device)
    padded[:m, :kb] = scales.view(torch.uint8)
    # (m//128, (m%128)//32, m%32, k//4, k%4) -> (m//128, k//4, m%32, (m%128)//32, k%4)
    tiles = padded.reshape(mp // 128, 4, 32, kp // 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(mp, kp).view(scales.dtype)


def unswizzle_block_scales(swizzled: Tensor, rows: int, cols: int) -> Tensor:
    """Inverse of ``swizzle_block_scales``: swizzled ``[round_up(rows,128), round_up(cols,4)]`` -> ``[rows, cols]``."""
    for name, v in (("rows", rows), ("cols", cols)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"unswizzle_block_scales: {name} must be an int >= 0, got {v!r}")
    mp, kp = round_up(rows, 128), round_up(cols, 4)
    if not isinstance(swizzled, torch.Tensor) or swizzled.element_size() != 1 or swizzled.numel() != mp * kp:
        raise ValueError(
            f"unswizzle_block_scales: expected a 1-byte tensor of {mp}x{kp} elements for rows={rows}, "
            f"cols={cols}, got {_describe(swizzled)}"
        )
    tiles = swizzled.contiguous().view(torch.uint8).reshape(mp // 128, kp // 4, 32, 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(mp, kp)[:rows, :cols].contiguous().view(swizzled.dtype)
