"""Triton kernels of FP8 e4m3 (per token and per group) (private; the public functions and their torch references are in ``moecomm.quant.fp8``).

Bit-identical to the references on the GPU and under ``TRITON_INTERPRET=1``: ``moecomm.quant._kernels``
explains the arithmetic (Markstein division, rounding by one add, codes as bit patterns).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moecomm._device import device_guard
from moecomm.quant._kernels import (
    _EXP_MASK,
    _FP8_J,
    _FP32_MAX,
    _GPU_TILE,
    _GPU_WARPS,
    _INTERP_TILE,
    _SIGN,
    _as_pairs,
    _as_words,
    _view_as,
    _block_amax,
    _dequant_out,
    _div,
    _fp8_bytes,
    _interleave,
    _load_pairs,
    _nan,
    _out_cols,
    _pack_words,
    _per_block,
    _quad_cols,
    _rows_and_blocks,
    _store_values,
    _store_words,
    _tile_shape,
)


@triton.jit
def _fp8_scale(amax, EPS: tl.constexpr, UE8M0: tl.constexpr):
    """fp32 FP8 scale ``max(amax, EPS) / 448`` (rounded up to a power of two when UE8M0) and ``RN(1 / scale)``,
    for a NaN-free ``amax``."""
    scale = tl.math.div_rn(tl.minimum(tl.maximum(amax, EPS), _FP32_MAX), 448.0)
    if UE8M0:
        scale = ((scale.to(tl.int32, bitcast=True) + 0x7FFFFF) & _EXP_MASK).to(tl.float32, bitcast=True)
        r = ((254 << 23) - scale.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)  # exact
    else:
        r = tl.math.div_rn(1.0, scale)
    return scale, r


@triton.jit
def _is_nan_group(amax, SATURATE_INF: tl.constexpr):
    """Whether a group of magnitude maximum ``amax`` is a NaN group: NaN, or also +Inf unless SATURATE_INF."""
    if SATURATE_INF:
        return amax != amax
    return amax.to(tl.int32, bitcast=True) >= _EXP_MASK  # Inf or NaN (magnitude bits)


@triton.jit
def _fp8_quotient(x, nscale, r, UE8M0: tl.constexpr):
    """``min(RN(|x| / scale), 448)`` for ``nscale = -scale``: the division exactly (a power of two: one
    multiply), clamped so that Inf inputs (whose remainder is NaN; ``minimum`` drops NaN) saturate."""
    if UE8M0:
        q = x * r
    else:
        q = _div(x, nscale, r, 2)
    return tl.minimum(q, 448.0)


@triton.jit
def _fp8_group_kernel(
    x_ptr, q_ptr, s_ptr,
    M, n_groups, stride_xw, stride_qm, stride_sm,
    IN_KIND: tl.constexpr, Q: tl.constexpr, J: tl.constexpr, UE8M0: tl.constexpr, EPS: tl.constexpr,
    SATURATE_INF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    # A group of 8 Q J elements: 4 Q J words, J lanes with Q quads each.
    rows, grps, bmask = _rows_and_blocks(tl.program_id(0), tl.program_id(1), M, n_groups, BLOCK_M, BLOCK_B)
    offs = rows[None, :, None, None, None] * stride_xw + _quad_cols(grps, Q, J)
    xe, xo, t = _load_pairs(x_ptr, offs, _per_block(bmask), IN_KIND)
    amax = _block_amax(xe, xo)
    is_nan = _is_nan_group(amax, SATURATE_INF)
    scale, r = _fp8_scale(amax, EPS, UE8M0)
    s5, r5, k = _per_block(scale * -1.0), _per_block(r), _per_block((~is_nan).to(tl.int32))
    be, bo = _fp8_bytes(_fp8_quotient(xe, s5, r5, UE8M0), _fp8_quotient(xo, s5, r5, UE8M0), t, k, IN_KIND)
    # word w of a quad holds elements 2w, 2w+1: bytes 2w, 2w+1 of the quad's 8 output bytes (2 words)
    words = _pack_words(_interleave(be, bo), k, 2)
    _store_words(q_ptr, rows[None, :, None, None, None] * stride_qm, _out_cols(grps, Q, J, 2), words, _per_block(bmask))
    tl.store(s_ptr + rows[:, None] * stride_sm + grps[None, :], tl.where(is_nan, _nan(), scale), mask=bmask)


@triton.jit
def _fp8_token_kernel(
    x_ptr, q_ptr, s_ptr,
    M, n_words, stride_xw, stride_qm, stride_sm,
    IN_KIND: tl.constexpr, UE8M0: tl.constexpr, EPS: tl.constexpr, SATURATE_INF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    # One scale per row: pass 1 takes the row's amax over chunks of BLOCK_B blocks of 64 words, pass 2
    # quantizes (the rows are in L2 by then). Blocks as in the group kernel (Q = J = 4); words masked.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows = rows.to(tl.int64)
    n_blocks = tl.cdiv(n_words, 64)
    amax = tl.zeros((BLOCK_M, BLOCK_B), tl.int32)  # magnitude bits, as in _block_amax
    for b0 in range(0, n_blocks, BLOCK_B):
        col = _quad_cols(b0 + tl.arange(0, BLOCK_B), 4, 4)
        mask = row_ok[None, :, None, None, None] & (col < n_words)
        xe, xo, _ = _load_pairs(x_ptr, rows[None, :, None, None, None] * stride_xw + col, mask, IN_KIND)
        amax = tl.maximum(amax, _block_amax(xe, xo).to(tl.int32, bitcast=True))
    amax = tl.max(amax, axis=1).to(tl.float32, bitcast=True)
    is_nan = _is_nan_group(amax, SATURATE_INF)
    scale, r = _fp8_scale(amax, EPS, UE8M0)
    s5, r5 = (scale * -1.0)[None, :, None, None, None], r[None, :, None, None, None]
    k = (~is_nan).to(tl.int32)[None, :, None, None, None]
    for b0 in range(0, n_blocks, BLOCK_B):
        blks = b0 + tl.arange(0, BLOCK_B)
        col = _quad_cols(blks, 4, 4)
        mask = row_ok[None, :, None, None, None] & (col < n_words)
        xe, xo, t = _load_pairs(x_ptr, rows[None, :, None, None, None] * stride_xw + col, mask, IN_KIND)
        be, bo = _fp8_bytes(_fp8_quotient(xe, s5, r5, UE8M0), _fp8_quotient(xo, s5, r5, UE8M0), t, k, IN_KIND)
        wcol = _out_cols(blks, 4, 4, 2)
        _store_words(q_ptr, rows[None, :, None, None, None] * stride_qm, wcol, _pack_words(_interleave(be, bo), k, 2),
                     row_ok[None, :, None, None, None] & (wcol < n_words // 2))
    tl.store(s_ptr + rows * stride_sm, tl.where(is_nan, _nan(), scale), mask=row_ok)


@triton.jit
def _dequant_fp8_kernel(
    q_ptr, s_ptr, out_ptr,
    M, n_pairs, group, stride_qm, stride_sm, stride_om,
    OUT_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    # x = RN(e4m3 * scale). A program covers BLOCK_P pairs of columns inside one scale group (BLOCK_P pairs
    # divide the group, or the group is the whole row); q is read as 16-bit pairs.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows = rows.to(tl.int64)
    p0 = tl.program_id(1) * BLOCK_P
    pairs = p0 + tl.arange(0, BLOCK_P)
    mask = row_ok[:, None] & (pairs < n_pairs)[None, :]
    b = tl.load(q_ptr + rows[:, None] * stride_qm + pairs[None, :], mask=mask, other=0).to(tl.int32)
    scale = tl.load(s_ptr + rows * stride_sm + (2 * p0) // group, mask=row_ok, other=0.0)
    nan_row = (scale != scale)[:, None]
    scale = scale[:, None]
    # e4m3 value * 2**-120 has the bits code << 20 (subnormals included), the sign at bit 31; 0x7F is NaN
    xe = (((b * (1 << 24)) & _SIGN) | ((b & 0x7F) * (1 << 20))).to(tl.float32, bitcast=True)
    xo = (((b * (1 << 16)) & _SIGN) | ((b & 0x7F00) * (1 << 12))).to(tl.float32, bitcast=True)
    xe = xe * 2.0**120 * scale
    xo = xo * 2.0**120 * scale
    nan_e = ((b & 0x7F) == 0x7F) | nan_row
    nan_o = ((b & 0x7F00) == 0x7F00) | nan_row
    _store_values(out_ptr, rows[:, None] * stride_om, pairs[None, :], xe, xo, nan_e, nan_o, mask, OUT_BF16)


def quantize_fp8(x, q, scales, *, group_size: int | None, ue8m0: bool, eps: float, saturate_inf: bool = True) -> None:
    """``group_size``: a power of two >= 8, or None (per token; any hidden)."""
    m, k = x.shape
    if m == 0:
        return
    if group_size is None and k % 8:  # the kernel works on 16-byte quads of 8 elements: pad with zeros
        x8 = torch.zeros((m, k + 8 - k % 8), dtype=x.dtype, device=x.device)
        x8[:, :k] = x
        q8 = torch.empty(x8.shape, dtype=torch.uint8, device=x.device)
        quantize_fp8(x8, q8, scales, group_size=None, ue8m0=ue8m0, eps=eps, saturate_inf=saturate_inf)
        q.view(torch.uint8).copy_(q8[:, :k])
        return
    xw, kind = _as_pairs(x)
    qw = _as_words(q)
    with device_guard(x.device):
        if group_size is None:
            n_blocks = triton.cdiv(k, 128)
            bm, bb, warps = _tile_shape(m, n_blocks, 128, x.is_cuda)
            _fp8_token_kernel[(triton.cdiv(m, bm),)](
                xw, qw, scales, m, k // 2, xw.stride(0), qw.stride(0), scales.stride(0),
                IN_KIND=kind, UE8M0=ue8m0, EPS=eps, SATURATE_INF=saturate_inf, BLOCK_M=bm, BLOCK_B=bb,
                num_warps=warps,
            )  # fmt: skip
            return
        n_groups = k // group_size
        quads = group_size // 8  # 16-byte quads per group, spread over J lanes
        j = min(_FP8_J, quads)
        bm, bb, warps = _tile_shape(m, n_groups, group_size, x.is_cuda)
        grid = (triton.cdiv(m, bm), triton.cdiv(n_groups, bb))
        _fp8_group_kernel[grid](
            xw, qw, scales, m, n_groups, xw.stride(0), qw.stride(0), scales.stride(0),
            IN_KIND=kind, Q=quads // j, J=j, UE8M0=ue8m0, EPS=eps, SATURATE_INF=saturate_inf, BLOCK_M=bm,
            BLOCK_B=bb, num_warps=warps,
        )  # fmt: skip


def _dequant_tile(m: int, group: int, cuda: bool) -> tuple[int, int]:
    """(BLOCK_M rows, columns) of a program of the FP8 dequantize kernel for ``m`` rows of groups of ``group``."""
    block = min(group, 1024 if cuda else _INTERP_TILE) if group & (group - 1) == 0 else 1024
    return max(1, min(triton.next_power_of_2(m), (_GPU_TILE if cuda else _INTERP_TILE) // block)), block


def dequantize_fp8(q_u8, scales, dtype: torch.dtype) -> torch.Tensor:
    """``q_u8 [m, k]`` bytes with an even ``k`` (any strides and offset: read as byte pairs, from a copy where
    they are not 2-byte aligned); ``k / scales.shape[1]`` a power of two or ``scales.shape[1] == 1``."""
    m, k = q_u8.shape
    group = k // scales.shape[1]
    out, dst, bf16 = _dequant_out(m, k, dtype, q_u8.device)
    if m:
        pairs = _view_as(q_u8, torch.int16)
        bm, block = _dequant_tile(m, group, q_u8.is_cuda)
        grid = (triton.cdiv(m, bm), triton.cdiv(k, block))
        with device_guard(q_u8.device):
            _dequant_fp8_kernel[grid](
                pairs, scales, dst, m, k // 2, group, pairs.stride(0), scales.stride(0), dst.stride(0),
                OUT_BF16=bf16, BLOCK_M=bm, BLOCK_P=block // 2, num_warps=_GPU_WARPS if q_u8.is_cuda else 1,
            )  # fmt: skip
    return out.to(dtype)
