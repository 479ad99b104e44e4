"""Triton kernel of the int8 group quantizer (private; the public function and its torch reference are in
``moecomm.quant.int8``).

Bit-identical to the reference on the GPU and under ``TRITON_INTERPRET=1``, by the rules of
``moecomm.quant._kernels``: the input is widened to fp32 (exact), the scale is an IEEE division, the
quotient ``x / scale`` is computed exactly with two Markstein corrections (``_div``), and it is rounded
half to even by one fp32 add of ``1.5 * 2**23`` (exact for ``|q| < 2**22``), whose low mantissa bits are
then the integer. No fp32 -> narrow-float cast appears.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moecomm._device import device_guard
from moecomm.quant._kernels import _EXP_MASK, _GPU_TILE, _GPU_WARPS, _INTERP_TILE, _div, _nan
from moecomm.quant.common import INT8_EPS, INT8_GROUP

_ROUND = tl.constexpr(12582912.0)  # 1.5 * 2**23: q + _ROUND rounds q to an integer, half to even
_ROUND_BITS = tl.constexpr(0x4B400000)  # the bits of _ROUND: bits(q + _ROUND) - _ROUND_BITS = round(q)


@triton.jit
def _int8_group_kernel(
    x_ptr, q_ptr, s_ptr, M, n_groups, stride_xm, stride_qm, stride_sm,
    EPS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    grps = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = (rows < M)[:, None] & (grps < n_groups)[None, :]
    rows = rows.to(tl.int64)
    cols = grps[None, :, None] * GROUP + tl.arange(0, GROUP)[None, None, :]
    mask = gmask[:, :, None]
    x = tl.load(x_ptr + rows[:, None, None] * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    mag = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF  # |x| as bits: integer order = value order, NaN above Inf
    amax_bits = tl.max(mag, axis=2)
    bad = amax_bits >= _EXP_MASK  # the group holds an Inf or a NaN
    amax = tl.where(bad, 0, amax_bits).to(tl.float32, bitcast=True)
    scale = tl.math.div_rn(tl.maximum(amax, EPS), 127.0)
    r = tl.math.div_rn(1.0, scale)
    q = _div(mag.to(tl.float32, bitcast=True), (scale * -1.0)[:, :, None], r[:, :, None], 2)  # RN(|x| / scale)
    code = (tl.minimum(q, 127.0) + _ROUND).to(tl.int32, bitcast=True) - _ROUND_BITS
    code = tl.where(bad[:, :, None], 0, tl.where(x < 0, -code, code))
    tl.store(q_ptr + rows[:, None, None] * stride_qm + cols, code.to(tl.int8), mask=mask)
    tl.store(s_ptr + rows[:, None] * stride_sm + grps[None, :], tl.where(bad, _nan(), scale), mask=gmask)


def _tile(m: int, n_groups: int, cuda: bool) -> tuple[int, int]:
    """(BLOCK_M rows, BLOCK_G groups) of a program: up to 8 groups (1024 columns) and 4096 elements on the GPU."""
    tile = _GPU_TILE if cuda else _INTERP_TILE
    block_g = triton.next_power_of_2(max(1, min(n_groups, (1024 if cuda else tile) // INT8_GROUP)))
    block_m = max(1, min(triton.next_power_of_2(m), tile // (block_g * INT8_GROUP)))
    return block_m, block_g


def quantize_int8(x, q, scales) -> None:
    """``x [m, k]`` (unit stride along k, ``k`` a multiple of 128) into ``q`` int8 ``[m, k]`` and ``scales``
    fp32 ``[m, k/128]`` (row-strided views allowed)."""
    m, k = x.shape
    if m == 0:
        return
    n_groups = k // INT8_GROUP
    if x.stride(1) != 1:
        x = x.contiguous()
    bm, bg = _tile(m, n_groups, x.is_cuda)
    grid = (triton.cdiv(m, bm), triton.cdiv(n_groups, bg))
    with device_guard(x.device):
        _int8_group_kernel[grid](
            x, q, scales, m, n_groups, x.stride(0), q.stride(0), scales.stride(0),
            EPS=INT8_EPS, GROUP=INT8_GROUP, BLOCK_M=bm, BLOCK_G=bg, num_warps=_GPU_WARPS if x.is_cuda else 1,
        )  # fmt: skip
