"""Triton kernels behind ``moecomm.quant`` (private; call the public functions there).

Each kernel matches its torch reference in ``moecomm.quant`` bit for bit, on the GPU and on the CPU
interpreter (``TRITON_INTERPRET=1``). The interpreter rounds fp32 -> fp8 / bf16 casts differently from
the GPU, so no cast to a narrow float type appears here: inputs are read as raw bits, block maxima are
integer maxima of magnitude bits, and e4m3 / e8m0 / e2m1 codes come from integer arithmetic, exact
comparisons, or fp32 operations whose IEEE rounding is the same everywhere (``mul``, ``div_rn``, and
one ``add`` whose result has a fixed ulp). No operation depends on the denormal (FTZ) mode.

Per-element work is kept small because the kernels should run at memory bandwidth:

* FP4 kernels read two elements per word (bf16/fp16 pairs as int32, fp32 pairs as int64), so element
  ``2i`` and ``2i+1`` arrive in the same lane and pack into one byte without a shuffle; the tile is
  ``[rows, blocks, words per block]``, so block maxima need no reshape.
* e2m1 codes are 7 comparisons against per-block thresholds. NVFP4: ``round(a / s) > t`` is equivalent
  to ``a > t * s`` for fp32 ``a = x * gs``, e4m3 ``s`` and an e2m1 threshold ``t`` (``t * s`` is exact
  and the fp32 neighbours of ``t * s``, divided by ``s``, lie further from ``t`` than half an ulp of
  ``t``), and likewise for ``>=``; so no per-element division. MXFP4: thresholds ``t * 2**k`` are built
  as fp32 bit patterns and compared with the magnitude bits as integers.
* e4m3 codes: normal range by an integer round-half-even on the bits; the subnormal range by
  ``|v| + 2**14`` in fp32 (ulp 2**-9, so the hardware add rounds to the e4m3 subnormal grid).

Launch: a 2-D grid (row blocks x column blocks) for the block formats, one program per row block for
FP8 per-token (two passes over the row). Row strides of input and outputs are arguments, so outputs
may be row-strided views into a send buffer; rows use int64 offsets. No host syncs: the NVFP4 global
scale is read from device memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_NAN_BITS = tl.constexpr(0x7FC00000)  # the fp32 NaN the kernels write (torch's float("nan"))
_INF_BITS = tl.constexpr(0x7F800000)
_MIN_NORMAL_BITS = tl.constexpr(0x00800000)  # 2**-126
_E4M3_MIN_NORMAL_BITS = tl.constexpr(0x3C800000)  # 2**-6
_TWO_POW_14_BITS = tl.constexpr(0x46800000)  # 2**14: its fp32 ulp is 2**-9, the e4m3 subnormal step

# Tile sizes (elements per program). GPU: ~8K elements keeps 16 KB of bf16 in flight per program.
_GPU_TILE = 8192
_GPU_MAX_COLS = 1024
_GPU_WARPS = 8
_INTERP_TILE = 1 << 16  # the interpreter pays per program, not per element


# ----------------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _nan():
    """The canonical fp32 NaN (0x7FC00000) as a scalar."""
    return tl.full([], _NAN_BITS, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _load_pairs(x_ptr, offs, mask, IN_KIND: tl.constexpr):
    """fp32 bits (int32) of elements 2j and 2j+1 of word j: fp32 pairs as int64 (IN_KIND 0), bf16 (1) or
    fp16 (2) pairs as int32. Little-endian: element 2j is the low half."""
    w = tl.load(x_ptr + offs, mask=mask, other=0)
    if IN_KIND == 0:
        even = w.to(tl.int32)  # truncation keeps the low 32 bits
        odd = (w >> 32).to(tl.int32)
    elif IN_KIND == 1:
        even = w << 16
        odd = w & -65536  # 0xFFFF0000
    else:
        even = w.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32).to(tl.int32, bitcast=True)
        odd = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32).to(tl.int32, bitcast=True)
    return even, odd


@triton.jit
def _load_bits(x_ptr, offs, mask, IN_KIND: tl.constexpr):
    """fp32 bits (int32) of single elements: fp32 as int32 (IN_KIND 0), bf16 as int16 (1), fp16 (2)."""
    if IN_KIND == 0:
        bits = tl.load(x_ptr + offs, mask=mask, other=0)
    elif IN_KIND == 1:
        bits = tl.load(x_ptr + offs, mask=mask, other=0).to(tl.int32) << 16
    else:
        bits = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32).to(tl.int32, bitcast=True)
    return bits


@triton.jit
def _e4m3_code(mag_bits):
    """float8_e4m3fn code (int32, 0..0x7E) of a non-NaN fp32 magnitude: RNE, saturating to 448."""
    # Normal range: drop 20 mantissa bits with round-half-even; a carry moves into the exponent.
    normal = ((mag_bits + 0x7FFFF + ((mag_bits >> 20) & 1)) >> 20) - (120 << 3)
    # Below 2**-6: 2**14 + |v| rounds (RNE) to a multiple of 2**-9 = the e4m3 subnormal step.
    sub = (mag_bits.to(tl.float32, bitcast=True) + 16384.0).to(tl.int32, bitcast=True) - _TWO_POW_14_BITS
    return tl.minimum(tl.where(mag_bits < _E4M3_MIN_NORMAL_BITS, sub, normal), 0x7E)


@triton.jit
def _e4m3_value(code):
    """fp32 value of a finite non-negative e4m3 code (int32 0..0x7E), exactly."""
    e = code >> 3
    m = code & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    subnormal = m.to(tl.float32) * 0.001953125  # m * 2**-9, exact
    return tl.where(e > 0, normal, subnormal)


@triton.jit
def _e2m1_code_scaled(a, s):
    """e2m1 code (0..7) of fp32 ``a / s`` (RNE, saturating) without dividing: thresholds ``t * s``.

    The code counts the thresholds passed: ``> 0.25, >= 0.75, > 1.25, >= 1.75, > 2.5, >= 3.5, > 5`` (times
    ``s``; ``>`` where a tie rounds down to the even code, ``>=`` where it rounds up). They are increasing,
    so a binary search finds the count with three comparisons. ``s`` broadcasts (one per block); a NaN
    ``s`` makes every comparison false (code 0).
    """
    hi = a >= 1.75 * s
    mid = a >= tl.where(hi, 3.5 * s, 0.75 * s)
    lo = a > tl.where(hi, tl.where(mid, 5.0 * s, 2.5 * s), tl.where(mid, 1.25 * s, 0.25 * s))
    return hi.to(tl.int32) * 4 + mid.to(tl.int32) * 2 + lo.to(tl.int32)


@triton.jit
def _pow2_threshold_bits(k, UT: tl.constexpr, MT: tl.constexpr):
    """fp32 bits of ``(1 + MT / 2**23) * 2**(UT + k)`` (exact, subnormal if needed; >= 0x7F800000 if it overflows)."""
    e = tl.minimum(k + UT, 128)
    normal = ((e + 127) << 23) | MT
    subnormal = (0x800000 | MT) >> tl.minimum(tl.maximum(-126 - e, 0), 24)  # shift <= 3 here: exact
    return tl.where(e >= -126, normal, subnormal)


@triton.jit
def _e2m1_code_pow2(mag, k):
    """e2m1 code (0..7) of ``|x| / 2**k`` for magnitude bits ``mag`` (RNE, saturating; Inf -> 7)."""
    c = (mag > _pow2_threshold_bits(k, -2, 0x000000)).to(tl.int32)  # 0.25
    c += (mag >= _pow2_threshold_bits(k, -1, 0x400000)).to(tl.int32)  # 0.75
    c += (mag > _pow2_threshold_bits(k, 0, 0x200000)).to(tl.int32)  # 1.25
    c += (mag >= _pow2_threshold_bits(k, 0, 0x600000)).to(tl.int32)  # 1.75
    c += (mag > _pow2_threshold_bits(k, 1, 0x200000)).to(tl.int32)  # 2.5
    c += (mag >= _pow2_threshold_bits(k, 1, 0x600000)).to(tl.int32)  # 3.5
    c += (mag > _pow2_threshold_bits(k, 2, 0x200000)).to(tl.int32)  # 5.0
    return tl.where(mag == _INF_BITS, 7, c)


@triton.jit
def _tile_offsets(pid_m, pid_b, M, n_blocks, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, W: tl.constexpr):
    """Rows [BLOCK_M], and word offsets / mask [BLOCK_M, BLOCK_B, W] of a tile of W-word blocks."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    blks = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    words = tl.arange(0, W)
    bmask = (rows < M)[:, None] & (blks < n_blocks)[None, :]
    col = blks[None, :, None] * W + words[None, None, :]
    return rows.to(tl.int64), blks, col, bmask


# ----------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _nvfp4_kernel(
    x_ptr, gs_ptr, q_ptr, s_ptr,
    M, n_blocks, stride_xw, stride_qm, stride_sm, n_kt,
    IN_KIND: tl.constexpr, SWIZZLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    pid_m, pid_b = tl.program_id(0), tl.program_id(1)
    rows, blks, col, bmask = _tile_offsets(pid_m, pid_b, M, n_blocks, BLOCK_M, BLOCK_B, 8)
    mask = bmask[:, :, None]
    even, odd = _load_pairs(x_ptr, rows[:, None, None] * stride_xw + col, mask, IN_KIND)
    mag_e = even & 0x7FFFFFFF
    mag_o = odd & 0x7FFFFFFF
    mag_e = tl.where(mag_e < _MIN_NORMAL_BITS, 0, mag_e)  # fp32 subnormals count as zero
    mag_o = tl.where(mag_o < _MIN_NORMAL_BITS, 0, mag_o)
    amax = tl.max(tl.maximum(mag_e, mag_o), axis=2).to(tl.float32, bitcast=True)  # int max == float max

    gs_bits = tl.load(gs_ptr).to(tl.int32, bitcast=True)
    gs_bits = tl.where((gs_bits > 0) & (gs_bits < _INF_BITS), gs_bits, _NAN_BITS)  # not finite and > 0: NaN
    gs = gs_bits.to(tl.float32, bitcast=True)
    scale_bits = tl.math.div_rn(gs * amax, 6.0).to(tl.int32, bitcast=True)
    is_nan = (scale_bits & 0x7FFFFFFF) > _INF_BITS
    code = _e4m3_code(tl.where(is_nan, 0, scale_bits & 0x7FFFFFFF))
    scale = _e4m3_value(code)
    # NaN threshold scale for NaN and zero blocks: every comparison is false, codes 0.
    s = tl.where((scale > 0.0) & ~is_nan, scale, _nan())[:, :, None]
    sign_mask = tl.where(is_nan, 0, 8)[:, :, None]  # NaN blocks: all nibbles 0
    lo = _e2m1_code_scaled(mag_e.to(tl.float32, bitcast=True) * gs, s) | ((even >> 28) & sign_mask)
    hi = _e2m1_code_scaled(mag_o.to(tl.float32, bitcast=True) * gs, s) | ((odd >> 28) & sign_mask)
    tl.store(q_ptr + rows[:, None, None] * stride_qm + col, (lo | (hi << 4)).to(tl.uint8), mask=mask)

    sbytes = tl.where(is_nan, 0x7F, code).to(tl.uint8)
    if SWIZZLE:
        r = rows[:, None]
        c = blks[None, :]
        soffs = (r // 128) * (n_kt * 512) + (c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + (c % 4)
    else:
        soffs = rows[:, None] * stride_sm + blks[None, :]
    tl.store(s_ptr + soffs, sbytes, mask=bmask)


@triton.jit
def _mxfp4_kernel(
    x_ptr, q_ptr, s_ptr,
    M, n_blocks, stride_xw, stride_qm, stride_sm,
    IN_KIND: tl.constexpr, ROUND_UP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    pid_m, pid_b = tl.program_id(0), tl.program_id(1)
    rows, blks, col, bmask = _tile_offsets(pid_m, pid_b, M, n_blocks, BLOCK_M, BLOCK_B, 16)
    mask = bmask[:, :, None]
    even, odd = _load_pairs(x_ptr, rows[:, None, None] * stride_xw + col, mask, IN_KIND)
    mag_e = even & 0x7FFFFFFF
    mag_o = odd & 0x7FFFFFFF
    amax = tl.max(tl.maximum(mag_e, mag_o), axis=2)
    is_nan = amax > _INF_BITS

    # Exact floor(log2(amax)): exponent field, or for subnormals the exponent of the mantissa as an
    # integer converted to fp32 (exact, no denormal arithmetic). amax = 0 gives -276.
    e = amax >> 23
    mant = amax & 0x7FFFFF
    norm = mant.to(tl.float32).to(tl.int32, bitcast=True)
    floor_log2 = tl.where(e > 0, e - 127, (norm >> 23) - 276)
    k = floor_log2 - 2  # OCP: floor(log2(amax)) - emax(e2m1)
    if ROUND_UP:  # amax / 2**k is in [4, 8): a mantissa above 1.5 (amax/2**k > 6) needs one more power of two
        k += (tl.where(e > 0, mant, norm & 0x7FFFFF) > 0x400000).to(tl.int32)
    biased = tl.minimum(tl.maximum(k + 127, 0), 254)
    k = (biased - 127)[:, :, None]

    sign_mask = tl.where(is_nan, 0, 8)[:, :, None]
    lo = tl.where(is_nan[:, :, None], 0, _e2m1_code_pow2(mag_e, k)) | ((even >> 28) & sign_mask)
    hi = tl.where(is_nan[:, :, None], 0, _e2m1_code_pow2(mag_o, k)) | ((odd >> 28) & sign_mask)
    tl.store(q_ptr + rows[:, None, None] * stride_qm + col, (lo | (hi << 4)).to(tl.uint8), mask=mask)
    sbytes = tl.where(is_nan, 0xFF, biased).to(tl.uint8)
    tl.store(s_ptr + rows[:, None] * stride_sm + blks[None, :], sbytes, mask=bmask)


@triton.jit
def _fp8_scale(amax_bits, EPS: tl.constexpr, UE8M0: tl.constexpr):
    """fp32 FP8 scale ``max(amax, EPS) / 448`` (rounded up to a power of two when UE8M0); non-NaN amax."""
    amax = amax_bits.to(tl.float32, bitcast=True)
    amax = tl.minimum(tl.maximum(amax, EPS), 3.4028234663852886e38)
    scale = tl.math.div_rn(amax, 448.0)
    if UE8M0:
        scale = ((scale.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def _fp8_codes(bits, scale, UE8M0: tl.constexpr):
    """e4m3 bytes (int32, sign in bit 7) of ``x / scale`` for fp32 bits ``bits`` and positive ``scale``."""
    x = bits.to(tl.float32, bitcast=True)
    if UE8M0:  # a power of two: multiplying by its (exact) reciprocal is the same as dividing
        q = x * (((254 << 23) - scale.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True))
    else:
        q = tl.math.div_rn(x, scale)
    qb = q.to(tl.int32, bitcast=True)
    return _e4m3_code(qb & 0x7FFFFFFF) | ((qb >> 24) & 0x80)


@triton.jit
def _fp8_group_kernel(
    x_ptr, q_ptr, s_ptr,
    M, n_groups, stride_xm, stride_qm, stride_sm,
    IN_KIND: tl.constexpr, GROUP: tl.constexpr, UE8M0: tl.constexpr, EPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    pid_m, pid_b = tl.program_id(0), tl.program_id(1)
    rows, grps, col, bmask = _tile_offsets(pid_m, pid_b, M, n_groups, BLOCK_M, BLOCK_B, GROUP)
    mask = bmask[:, :, None]
    bits = _load_bits(x_ptr, rows[:, None, None] * stride_xm + col, mask, IN_KIND)
    amax = tl.max(bits & 0x7FFFFFFF, axis=2)
    is_nan = amax > _INF_BITS
    scale = _fp8_scale(tl.where(is_nan, 0, amax), EPS, UE8M0)
    codes = tl.where(is_nan[:, :, None], 0, _fp8_codes(bits, scale[:, :, None], UE8M0))
    tl.store(q_ptr + rows[:, None, None] * stride_qm + col, codes.to(tl.uint8), mask=mask)
    scale = tl.where(is_nan, _nan(), scale)
    tl.store(s_ptr + rows[:, None] * stride_sm + grps[None, :], scale, mask=bmask)


@triton.jit
def _fp8_token_kernel(
    x_ptr, q_ptr, s_ptr,
    M, K: tl.constexpr, stride_xm, stride_qm, stride_sm,
    IN_KIND: tl.constexpr, UE8M0: tl.constexpr, EPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    row_ok = rows < M
    amax = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):  # pass 1: row amax (integer max of |x| bits)
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols[None, :] < K)
        bits = _load_bits(x_ptr, rows64[:, None] * stride_xm + cols[None, :], mask, IN_KIND)
        amax = tl.maximum(amax, tl.max(bits & 0x7FFFFFFF, axis=1))
    is_nan = amax > _INF_BITS
    scale = _fp8_scale(tl.where(is_nan, 0, amax), EPS, UE8M0)
    for k0 in range(0, K, BLOCK_K):  # pass 2: quantize (the row block is in L2 by now)
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (cols[None, :] < K)
        bits = _load_bits(x_ptr, rows64[:, None] * stride_xm + cols[None, :], mask, IN_KIND)
        codes = tl.where(is_nan[:, None], 0, _fp8_codes(bits, scale[:, None], UE8M0))
        tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], codes.to(tl.uint8), mask=mask)
    scale = tl.where(is_nan, _nan(), scale)
    tl.store(s_ptr + rows64 * stride_sm, scale, mask=row_ok)


# ----------------------------------------------------------------------------------------------------
# Launchers (arguments already validated by moecomm.quant)


def _as_pairs(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` viewed as words of two elements (int32 for 16-bit dtypes, int64 for fp32) and its IN_KIND."""
    word = torch.int64 if x.dtype == torch.float32 else torch.int32
    kind = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[x.dtype]
    aligned = x.stride(1) == 1 and x.stride(0) % 2 == 0 and x.storage_offset() % 2 == 0
    if not aligned:
        x = x.contiguous()
    return x.view(word), kind


def _as_elements(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` with unit inner stride, as the dtype the kernel loads (bf16 as int16, fp32 as int32), and IN_KIND."""
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()
    if x.dtype == torch.float32:
        return x.view(torch.int32), 0
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16), 1
    return x, 2


def _tile(m: int, n_blocks: int, block: int, cuda: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_B blocks per program, num_warps) for ``n_blocks`` blocks of ``block`` elements a row."""
    tile = _GPU_TILE if cuda else _INTERP_TILE
    max_cols = _GPU_MAX_COLS if cuda else _INTERP_TILE
    block_b = triton.next_power_of_2(max(1, min(n_blocks, max(1, max_cols // block))))
    block_m = max(1, min(triton.next_power_of_2(m), tile // (block_b * block)))
    return block_m, block_b, _GPU_WARPS if cuda else 1


def quantize_nvfp4(x, gs, packed, scales_u8, *, swizzled: bool) -> None:
    m, k = x.shape
    if m == 0:
        return
    xw, kind = _as_pairs(x)
    n_blocks = k // 16
    bm, bb, warps = _tile(m, n_blocks, 16, x.is_cuda)
    grid = (triton.cdiv(m, bm), triton.cdiv(n_blocks, bb))
    _nvfp4_kernel[grid](
        xw, gs, packed, scales_u8, m, n_blocks, xw.stride(0), packed.stride(0), scales_u8.stride(0),
        triton.cdiv(n_blocks, 4), IN_KIND=kind, SWIZZLE=swizzled, BLOCK_M=bm, BLOCK_B=bb, num_warps=warps,
    )  # fmt: skip


def quantize_mxfp4(x, packed, scales, *, round_up: bool) -> None:
    m, k = x.shape
    if m == 0:
        return
    xw, kind = _as_pairs(x)
    n_blocks = k // 32
    bm, bb, warps = _tile(m, n_blocks, 32, x.is_cuda)
    grid = (triton.cdiv(m, bm), triton.cdiv(n_blocks, bb))
    _mxfp4_kernel[grid](
        xw, packed, scales, m, n_blocks, xw.stride(0), packed.stride(0), scales.stride(0),
        IN_KIND=kind, ROUND_UP=round_up, BLOCK_M=bm, BLOCK_B=bb, num_warps=warps,
    )  # fmt: skip


def quantize_fp8(x, q_u8, scales, *, group_size: int | None, ue8m0: bool, eps: float) -> None:
    m, k = x.shape
    if m == 0:
        return
    xe, kind = _as_elements(x)
    if group_size is None:
        block_k = min(triton.next_power_of_2(k), _GPU_MAX_COLS if x.is_cuda else _INTERP_TILE)
        bm = 1 if x.is_cuda else max(1, min(triton.next_power_of_2(m), _INTERP_TILE // block_k))
        _fp8_token_kernel[(triton.cdiv(m, bm),)](
            xe, q_u8, scales, m, k, xe.stride(0), q_u8.stride(0), scales.stride(0),
            IN_KIND=kind, UE8M0=ue8m0, EPS=eps, BLOCK_M=bm, BLOCK_K=block_k,
            num_warps=4 if x.is_cuda else 1,
        )  # fmt: skip
        return
    n_groups = k // group_size
    bm, bg, warps = _tile(m, n_groups, group_size, x.is_cuda)
    grid = (triton.cdiv(m, bm), triton.cdiv(n_groups, bg))
    _fp8_group_kernel[grid](
        xe, q_u8, scales, m, n_groups, xe.stride(0), q_u8.stride(0), scales.stride(0),
        IN_KIND=kind, GROUP=group_size, UE8M0=ue8m0, EPS=eps, BLOCK_M=bm, BLOCK_B=bg, num_warps=warps,
    )  # fmt: skip
