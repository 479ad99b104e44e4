"""Triton kernel of the dequantize-and-sum of quantized partials (private; the public function and its torch
reference are in ``moecomm.quant.reduce``).

One program owns a tile of rows x 128-column groups of the result. For each piece ``p = 0, 1, ..., P - 1``
in that order it loads the codes and the group scales, dequantizes (``float(code) * scale``, one IEEE
multiply: int8 codes convert exactly, e4m3 codes are built from their bits as in
``moecomm.quant._kernels_fp8``) and adds into an fp32 accumulator; the result is rounded once (bf16:
round to nearest even on the bits, NaN written as 0x7FC0). The launch disables fp contraction
(``enable_fp_fusion=False``), so ``acc + code * scale`` stays a multiply and an add, as in the reference,
instead of becoming an fma: the kernel and the reference give the same bits on the GPU and under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moecomm._device import device_guard
from moecomm.quant._kernels import _GPU_TILE, _GPU_WARPS, _INTERP_TILE, _SIGN, _nan
from moecomm.quant.common import INT8_GROUP

GROUP = INT8_GROUP  # the group of both combine formats (int8 and FP8 e4m3): 128 columns


@triton.jit
def _piece(d_ptr, s_ptr, offs, soffs, mask, gmask, FP8: tl.constexpr):
    """One piece's dequantized fp32 tile: codes at ``offs``, scales at ``soffs`` (per row and group)."""
    scale = tl.load(s_ptr + soffs, mask=gmask, other=0.0)
    if FP8:
        b = tl.load(d_ptr + offs, mask=mask, other=0).to(tl.int32)  # uint8, zero-extended
        # e4m3 value * 2**-120 has the bits code << 20 (subnormals included), the sign at bit 31
        v = (((b * (1 << 24)) & _SIGN) | ((b & 0x7F) * (1 << 20))).to(tl.float32, bitcast=True) * 2.0**120
        v = tl.where((b & 0x7F) == 0x7F, _nan(), v)  # 0x7F / 0xFF: NaN
    else:
        v = tl.load(d_ptr + offs, mask=mask, other=0).to(tl.float32)  # int8: exact
    return v * scale[:, :, None]


@triton.jit
def _dequant_sum_kernel(
    d_ptr, s_ptr, o_ptr, P, M, n_groups, stride_dp, stride_dm, stride_sp, stride_sm, stride_om,
    FP8: tl.constexpr, OUT_BF16: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    grps = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = (rows < M)[:, None] & (grps < n_groups)[None, :]
    rows = rows.to(tl.int64)
    cols = grps[None, :, None] * GROUP_SIZE + tl.arange(0, GROUP_SIZE)[None, None, :]
    mask = gmask[:, :, None]
    offs = rows[:, None, None] * stride_dm + cols
    soffs = rows[:, None] * stride_sm + grps[None, :]
    acc = _piece(d_ptr, s_ptr, offs, soffs, mask, gmask, FP8)
    for _ in range(1, P):  # fixed order: piece 0, 1, ..., P - 1 (pointers step by a piece: no int32 product)
        d_ptr += stride_dp
        s_ptr += stride_sp
        acc = acc + _piece(d_ptr, s_ptr, offs, soffs, mask, gmask, FP8)
    out = o_ptr + rows[:, None, None] * stride_om + cols
    if OUT_BF16:
        bits = acc.to(tl.int32, bitcast=True)
        half = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even on the bits
        tl.store(out, tl.where(acc != acc, 0x7FC0, half).to(tl.int16), mask=mask)
    else:
        tl.store(out, acc, mask=mask)


def dequantize_sum(data, scales, out) -> None:
    """``data`` ``[P, n, k]`` int8 or float8_e4m3fn and ``scales`` fp32 ``[P, n, k/128]`` (unit stride along
    the last dim, any piece and row strides) into ``out`` bf16 or fp32 ``[n, k]`` (unit stride along k)."""
    pieces, m, k = data.shape
    if m == 0 or pieces == 0:
        return
    fp8 = data.dtype == torch.float8_e4m3fn
    d = data.view(torch.uint8) if fp8 else data
    bf16 = out.dtype == torch.bfloat16
    o = out.view(torch.int16) if bf16 else out
    n_groups = k // GROUP
    cuda = data.is_cuda
    tile = _GPU_TILE if cuda else _INTERP_TILE
    bg = triton.next_power_of_2(max(1, min(n_groups, (1024 if cuda else tile) // GROUP)))
    bm = max(1, min(triton.next_power_of_2(m), tile // (bg * GROUP)))
    grid = (triton.cdiv(m, bm), triton.cdiv(n_groups, bg))
    with device_guard(data.device):
        _dequant_sum_kernel[grid](
            d, scales, o, pieces, m, n_groups, d.stride(0), d.stride(1), scales.stride(0), scales.stride(1),
            o.stride(0), FP8=fp8, OUT_BF16=bf16, GROUP_SIZE=GROUP, BLOCK_M=bm, BLOCK_G=bg,
            num_warps=_GPU_WARPS if cuda else 1, enable_fp_fusion=False,
        )  # fmt: skip
