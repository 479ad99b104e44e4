"""Triton kernels of NVFP4 (private; the public functions and their torch references are in ``moecomm.quant.nvfp4``).

Bit-identical to the references on the GPU and under ``TRITON_INTERPRET=1``: ``moecomm.quant._kernels``
explains the arithmetic (Markstein division, rounding by one add, codes as bit patterns).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moecomm._device import device_guard
from moecomm.quant._kernels import (
    _MIN_NORMAL,
    _NVFP4_J,
    _R6,
    _as_pairs,
    _as_words,
    _block_amax,
    _dequant_out,
    _div,
    _e4m3_bits,
    _fp4_bytes,
    _load_pairs,
    _nan,
    _out_cols,
    _pack_words,
    _per_block,
    _quad_cols,
    _recip_e4m3,
    _rows_and_blocks,
    _store_values,
    _store_words,
    _tile_shape,
)


@triton.jit
def _nvfp4_body(x_ptr, gs, q_ptr, s_ptr, M, n_blocks, stride_xw, stride_qm, stride_sm, n_kt,
                IN_KIND: tl.constexpr, SWIZZLE: tl.constexpr, FLUSH: tl.constexpr, J: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):  # fmt: skip
    # A block of 16 elements is 8 words: 2 quads, in J lanes.
    rows, blks, bmask = _rows_and_blocks(tl.program_id(0), tl.program_id(1), M, n_blocks, BLOCK_M, BLOCK_B)
    offs = rows[None, :, None, None, None] * stride_xw + _quad_cols(blks, 2 // J, J)
    xe, xo, t = _load_pairs(x_ptr, offs, _per_block(bmask), IN_KIND)
    amax = _block_amax(xe, xo)
    p = gs * tl.where(amax < _MIN_NORMAL, 0.0, amax)  # fp32 subnormals count as zero
    is_nan = p != p
    # scale = e4m3_satfinite((gs * amax) / 6); gs * amax >= 2688 saturates to 448 (also Inf)
    sbits = _e4m3_bits(_div(tl.minimum(p, 2688.0), -6.0, _R6, 1))
    s = sbits.to(tl.float32, bitcast=True) * 2.0**120  # the e4m3 value, exactly
    r = tl.where(s > 0.0, _recip_e4m3(s), 0.0)  # zero scale: every quotient 0
    # q = RN(RN(|x| gs) / s); a >= 6 s gives code 7, so clamping there keeps q in [0, 6] (Inf included)
    lim = _per_block(6.0 * s)
    ae = tl.minimum(xe * gs, lim)
    ao = tl.minimum(xo * gs, lim)
    if FLUSH:
        ae = tl.where(xe < _MIN_NORMAL, 0.0, ae)
        ao = tl.where(xo < _MIN_NORMAL, 0.0, ao)
    ns5, r5, k = _per_block(s * -1.0), _per_block(r), _per_block((~is_nan).to(tl.int32))
    qbytes = _fp4_bytes(_div(ae, ns5, r5, 1), _div(ao, ns5, r5, 1), t, k, IN_KIND)
    _store_words(q_ptr, rows[None, :, None, None, None] * stride_qm, _out_cols(blks, 2 // J, J, 1),
                 _pack_words(qbytes, k, 1), _per_block(bmask))

    sbytes = tl.where(is_nan, 0x7F, sbits >> 20).to(tl.uint8)
    if SWIZZLE:
        r2 = rows[:, None]
        c = blks[None, :]
        soffs = (r2 // 128) * (n_kt * 512) + (c // 4) * 512 + (r2 % 32) * 16 + ((r2 % 128) // 32) * 4 + (c % 4)
    else:
        soffs = rows[:, None] * stride_sm + blks[None, :]
    tl.store(s_ptr + soffs, sbytes, mask=bmask)


@triton.jit
def _nvfp4_kernel(
    x_ptr, gs_ptr, q_ptr, s_ptr,
    M, n_blocks, stride_xw, stride_qm, stride_sm, n_kt,
    IN_KIND: tl.constexpr, SWIZZLE: tl.constexpr, J: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    gs = tl.load(gs_ptr)
    gs = tl.where((gs > 0.0) & (gs < float("inf")), gs, _nan())  # not finite and > 0: every scale NaN
    # fp32 subnormal inputs count as zero. They reach code 1 only when gs 2**-126 > 0.25 * 2**-9 (the
    # smallest nonzero scale), so only then do the elements need the flush: one uniform branch.
    if gs > 2.0**115:
        _nvfp4_body(x_ptr, gs, q_ptr, s_ptr, M, n_blocks, stride_xw, stride_qm, stride_sm, n_kt,
                    IN_KIND, SWIZZLE, True, J, BLOCK_M, BLOCK_B)  # fmt: skip
    else:
        _nvfp4_body(x_ptr, gs, q_ptr, s_ptr, M, n_blocks, stride_xw, stride_qm, stride_sm, n_kt,
                    IN_KIND, SWIZZLE, False, J, BLOCK_M, BLOCK_B)  # fmt: skip


@triton.jit
def _e2m1_value_bits(nib):
    """fp32 bits of the e2m1 value of nibbles ``nib`` (int32 < 16) times ``2**-126``: ``code << 22`` with the
    sign at bit 31. ``nib * 2**28`` holds only the nibble (bits 28..31), ``nib * 2**22`` only bits 22..25."""
    return ((nib * (1 << 28)) | (nib * (1 << 22))) & -0x7E400000  # 0x81C00000


@triton.jit
def _dequant_nvfp4_body(q_ptr, s_ptr, gs, out_ptr, M, n_blocks, stride_qm, stride_sm, stride_om, n_kt,
                        SWIZZLE: tl.constexpr, OUT_BF16: tl.constexpr, DIV_RN: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):  # fmt: skip
    rows, blks, bmask = _rows_and_blocks(tl.program_id(0), tl.program_id(1), M, n_blocks, BLOCK_M, BLOCK_B)
    # [rows, blocks, 8 bytes]: byte i of a block holds elements 2i (low nibble) and 2i + 1
    cols = blks[:, None] * 8 + tl.arange(0, 8)[None, :]
    b = tl.load(q_ptr + rows[:, None, None] * stride_qm + cols[None, :, :], mask=bmask[:, :, None], other=0)
    b = b.to(tl.int32)
    if SWIZZLE:
        r2 = rows[:, None]
        c = blks[None, :]
        soffs = (r2 // 128) * (n_kt * 512) + (c // 4) * 512 + (r2 % 32) * 16 + ((r2 % 128) // 32) * 4 + (c % 4)
    else:
        soffs = rows[:, None] * stride_sm + blks[None, :]
    sb = tl.load(s_ptr + soffs, mask=bmask, other=0).to(tl.int32)
    gs2 = tl.full(sb.shape, 0.0, tl.float32) + gs  # per block, so that its NaN test is a tensor
    nan_block = ((sb & 0x7F) == 0x7F) | (gs2 != gs2)
    s = (((sb & 0x7F) << 20) | ((sb & 0x80) << 24)).to(tl.float32, bitcast=True) * 2.0**120  # e4m3, exactly
    ns = tl.where(nan_block, _nan(), s * -1.0)[:, :, None]  # -scale: see _div
    # e2m1 value * 2**-126 has the bits code << 22 (0.5 is the subnormal 2**-127); the sign is bit 3
    ve = _e2m1_value_bits(b & 15).to(tl.float32, bitcast=True) * 2.0**126
    vo = _e2m1_value_bits(b >> 4).to(tl.float32, bitcast=True) * 2.0**126
    # -e2m1 * scale (exact), then RN(that / -gs) in the sign-keeping form of _div
    if DIV_RN:
        xe = tl.math.div_rn(ve * ns, gs * -1.0)
        xo = tl.math.div_rn(vo * ns, gs * -1.0)
    else:
        nrg = tl.math.div_rn(-1.0, gs)
        xe = _div(ve * ns, gs, nrg, 1)
        xo = _div(vo * ns, gs, nrg, 1)
    nan = nan_block[:, :, None]
    _store_values(out_ptr, rows[:, None, None] * stride_om, cols[None, :, :], xe, xo, nan, nan, bmask[:, :, None],
                  OUT_BF16)  # fmt: skip


@triton.jit
def _dequant_nvfp4_kernel(
    q_ptr, s_ptr, gs_ptr, out_ptr,
    M, n_blocks, stride_qm, stride_sm, stride_om, n_kt,
    SWIZZLE: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    # x = RN(RN(e2m1 * scale) / gs): e2m1 * scale is exact; one Markstein step divides exactly while no
    # quotient or remainder leaves the normal range, which |e2m1 * scale| in [2**-10, 2688] ensures for
    # gs in [2**-100, 2**100]. Other global scales divide with div_rn (one uniform branch).
    gs = tl.load(gs_ptr)
    gs = tl.where((gs > 0.0) & (gs < float("inf")), gs, _nan())
    if (gs >= 2.0**-100) & (gs <= 2.0**100):
        _dequant_nvfp4_body(q_ptr, s_ptr, gs, out_ptr, M, n_blocks, stride_qm, stride_sm, stride_om, n_kt,
                            SWIZZLE, OUT_BF16, False, BLOCK_M, BLOCK_B)  # fmt: skip
    else:
        _dequant_nvfp4_body(q_ptr, s_ptr, gs, out_ptr, M, n_blocks, stride_qm, stride_sm, stride_om, n_kt,
                            SWIZZLE, OUT_BF16, True, BLOCK_M, BLOCK_B)  # fmt: skip


def quantize_nvfp4(x, gs, packed, scales_u8, *, swizzled: bool) -> None:
    m, k = x.shape
    if m == 0:
        return
    xw, kind = _as_pairs(x)
    qw = _as_words(packed)
    n_blocks = k // 16
    bm, bb, warps = _tile_shape(m, n_blocks, 16, x.is_cuda)
    grid = (triton.cdiv(m, bm), triton.cdiv(n_blocks, bb))
    with device_guard(x.device):
        _nvfp4_kernel[grid](
            xw, gs, qw, scales_u8, m, n_blocks, xw.stride(0), qw.stride(0), scales_u8.stride(0),
            triton.cdiv(n_blocks, 4), IN_KIND=kind, SWIZZLE=swizzled, J=_NVFP4_J,
            BLOCK_M=bm, BLOCK_B=bb, num_warps=warps,
        )  # fmt: skip


def dequantize_nvfp4(packed, scales_u8, gs, dtype: torch.dtype, *, swizzled: bool) -> torch.Tensor:
    m, k = packed.shape[0], packed.shape[1] * 2
    out, dst, bf16 = _dequant_out(m, k, dtype, packed.device)
    if m:
        n_blocks = k // 16
        bm, bb, warps = _tile_shape(m, n_blocks, 16, packed.is_cuda)
        grid = (triton.cdiv(m, bm), triton.cdiv(n_blocks, bb))
        with device_guard(packed.device):
            _dequant_nvfp4_kernel[grid](
                packed, scales_u8, gs, dst, m, n_blocks, packed.stride(0), scales_u8.stride(0),
                dst.stride(0), triton.cdiv(n_blocks, 4), SWIZZLE=swizzled, OUT_BF16=bf16,
                BLOCK_M=bm, BLOCK_B=bb, num_warps=warps,
            )  # fmt: skip
    return out.to(dtype)
