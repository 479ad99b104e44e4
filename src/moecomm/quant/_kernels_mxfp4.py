"""Triton kernels of MXFP4 (private; the public functions and their torch references are in ``moecomm.quant.mxfp4``).

Bit-identical to the references on the GPU and under ``TRITON_INTERPRET=1``: ``moecomm.quant._kernels``
explains the arithmetic (Markstein division, rounding by one add, codes as bit patterns).
"""

from __future__ import annotations

import triton
import triton.language as tl

from moecomm._device import device_guard
from moecomm.quant._kernels import (
    _MXFP4_J,
    _as_pairs,
    _as_words,
    _block_amax,
    _fp4_bytes,
    _load_pairs,
    _out_cols,
    _pack_words,
    _per_block,
    _quad_cols,
    _rows_and_blocks,
    _store_words,
    _tile_shape,
)


@triton.jit
def _mxfp4_kernel(
    x_ptr, q_ptr, s_ptr,
    M, n_blocks, stride_xw, stride_qm, stride_sm,
    IN_KIND: tl.constexpr, ROUND_UP: tl.constexpr, J: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    # A block of 32 elements is 16 words: 4 quads, in J lanes.
    rows, blks, bmask = _rows_and_blocks(tl.program_id(0), tl.program_id(1), M, n_blocks, BLOCK_M, BLOCK_B)
    offs = rows[None, :, None, None, None] * stride_xw + _quad_cols(blks, 4 // J, J)
    xe, xo, t = _load_pairs(x_ptr, offs, _per_block(bmask), IN_KIND)
    amax = _block_amax(xe, xo)
    is_nan = amax != amax

    # Exact floor(log2(amax)): exponent field, or for subnormals the exponent of the mantissa as an
    # integer converted to fp32 (exact, no denormal arithmetic). amax = 0 gives -276; Inf gives 128.
    abits = amax.to(tl.int32, bitcast=True)
    e = abits >> 23
    mant = abits & 0x7FFFFF
    norm = mant.to(tl.float32).to(tl.int32, bitcast=True)
    floor_log2 = tl.where(e > 0, e - 127, (norm >> 23) - 276)
    k = floor_log2 - 2  # OCP: floor(log2(amax)) - emax(e2m1)
    if ROUND_UP:  # amax / 2**k is in [4, 8): a mantissa above 1.5 (amax/2**k > 6) needs one more power of two
        k += (tl.where(e > 0, mant, norm & 0x7FFFFF) > 0x400000).to(tl.int32)
    biased = tl.minimum(tl.maximum(k + 127, 0), 254)
    # 2**-k = 2**(127 - biased): an fp32 exponent field, or the subnormal 2**-127 for biased = 254
    inv = tl.where(biased < 254, (254 - biased) << 23, 0x400000).to(tl.float32, bitcast=True)
    # |x| 2**-k is exact wherever it can reach 0.25; min(., 6) saturates (also Inf)
    inv5 = _per_block(inv)
    qe = tl.minimum(xe * inv5, 6.0)
    qo = tl.minimum(xo * inv5, 6.0)
    k = _per_block((~is_nan).to(tl.int32))
    _store_words(q_ptr, rows[None, :, None, None, None] * stride_qm, _out_cols(blks, 4 // J, J, 1),
                 _pack_words(_fp4_bytes(qe, qo, t, k, IN_KIND), k, 1), _per_block(bmask))
    sbytes = tl.where(is_nan, 0xFF, biased).to(tl.uint8)
    tl.store(s_ptr + rows[:, None] * stride_sm + blks[None, :], sbytes, mask=bmask)


def quantize_mxfp4(x, packed, scales, *, round_up: bool) -> None:
    m, k = x.shape
    if m == 0:
        return
    xw, kind = _as_pairs(x)
    qw = _as_words(packed)
    n_blocks = k // 32
    bm, bb, warps = _tile_shape(m, n_blocks, 32, x.is_cuda)
    grid = (triton.cdiv(m, bm), triton.cdiv(n_blocks, bb))
    with device_guard(x.device):
        _mxfp4_kernel[grid](
            xw, qw, scales, m, n_blocks, xw.stride(0), qw.stride(0), scales.stride(0),
            IN_KIND=kind, ROUND_UP=round_up, J=_MXFP4_J, BLOCK_M=bm, BLOCK_B=bb,
            num_warps=warps,
        )  # fmt: skip
