"""Triton device helpers and launch helpers shared by the quantizer kernels (private).

The kernels themselves live beside their formats: ``_kernels_nvfp4``, ``_kernels_mxfp4``, ``_kernels_fp8``.
Each kernel matches its torch reference in ``moecomm.quant`` bit for bit, on the GPU and on the CPU
interpreter (``TRITON_INTERPRET=1``). The interpreter rounds fp32 -> fp8 / bf16 casts differently from
the GPU, so no cast to a narrow float type appears here: inputs are read as raw bits and every code
comes from IEEE-rounded fp32 operations (``mul``, ``add``, ``fma``, ``div_rn``: the same on every
device) and integer operations. No result depends on the denormal (FTZ) mode: the fp32 subnormals
below are exact results of IEEE operations, which the GPU keeps (Triton does not flush).

The kernels are bound by instructions per element, and on the H200 the integer / compare / select
pipe (half the fp32 rate) runs out first. So the per-element work is fp32 ``mul`` / ``fma`` / ``add``
and integer multiply-adds wherever possible:

* **Exact division without a divide** (Markstein): with ``r = RN(1/b)``, ``q = RN(a*r)`` followed by
  ``q += RN(a - b*q) * r`` (two fma; the remainder is exact) gives ``RN(a/b)``. One correction suffices
  when ``b`` is an e4m3 value (4 significant bits) or 6, and for ``v * s / gs`` with an e2m1 ``v`` and
  an e4m3 ``s``: checked for every fp32 mantissa of the other operand (scripts/check_exact_arith.py).
  For an arbitrary fp32 ``b`` (FP8 scales) two corrections make it a theorem (the first leaves ``q``
  within one ulp; Markstein's theorem does the rest).
* **Rounding by one fp32 add**: ``q + M`` rounds ``q`` to a multiple of ``ulp(M)``, ties to even when
  ``M / ulp(M)`` is even. ``M`` is one fma of ``P = 2**floor(log2 q)`` (the exponent bits of ``q``),
  which puts it in the binade whose ulp is the e2m1 (e4m3) step at ``q``.
* **The code is the bit pattern**: an e2m1 value ``v`` times ``2**-126`` is the fp32 number with bits
  ``code << 22`` (0.5 becomes the subnormal ``2**-127``); an e4m3 value times ``2**-120`` has the bits
  ``code << 20``. Both rounding chains are checked for every fp32 input in range
  (scripts/check_exact_arith.py).
* **Bytes by multiply-add**: codes, signs and nibbles are placed with integer ``mul`` / ``umulhi`` and
  packed into 32-bit words by multiply-adds; NaN blocks multiply their codes by 0.

Layout: a program owns a ``[Q, rows, blocks, J, 4]`` tile of 32-bit words, two bf16 / fp16 elements
per word (fp32: per 64-bit word), so elements ``2i`` and ``2i+1`` arrive in the same lane. Lane ``j`` of
a block loads its 16-byte quads ``j, J + j, ...``: each lane holds ``Q`` quads of one block and ``J``
lanes share it, so block maxima need ``log2 J`` shuffles and a warp's loads cover whole 32-byte
sectors when ``J >= 2`` (NVFP4 uses ``J = 1``: a lane owns a block). That is how Triton 3.9 lays the
tile out; Triton 3.6 orders the non-contiguous dimensions the other way and shares a block between
lanes (docs/formats.md). Row strides of inputs and outputs
are arguments, so outputs may be row-strided views into a send buffer; rows use int64 offsets;
payloads are stored as 32-bit words when the output allows it. No host syncs: the NVFP4 global scale
is read from device memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_NAN_BITS = tl.constexpr(0x7FC00000)  # the fp32 NaN the kernels write (torch's float("nan"))
_EXP_MASK = tl.constexpr(0x7F800000)  # exponent field of an fp32: its bits alone are 2**floor(log2 |x|)
_SIGN = tl.constexpr(-0x80000000)  # 0x80000000 as int32
_PAIR_SIGNS = tl.constexpr(-0x7FFF8000)  # 0x80008000: the signs of both halves of a 16-bit pair
_MIN_NORMAL = tl.constexpr(2.0**-126)
_FP32_MAX = tl.constexpr(3.4028234663852886e38)
_R6 = tl.constexpr(0.1666666716337204)  # RN(1/6) in fp32

# Tile (elements per program). GPU: 4096 elements over 4 warps is 32 per thread (64 bytes of bf16).
_GPU_TILE = 4096
_GPU_WARPS = 4
_INTERP_TILE = 1 << 16  # the interpreter pays per program, not per element
# Lanes per block (J): NVFP4 blocks are 2 quads (one lane holds both), MXFP4 blocks 4, FP8 groups of 128 16.
_NVFP4_J = 1
_MXFP4_J = 2
_FP8_J = 4


# ----------------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _nan():
    """The canonical fp32 NaN (0x7FC00000) as a scalar."""
    return tl.full([], _NAN_BITS, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _quad_cols(blks, Q: tl.constexpr, J: tl.constexpr):
    """Word columns ``[Q, 1, BLOCK_B, J, 4]`` of blocks ``blks`` of ``4 Q J`` words: lane ``j`` of a block
    holds its quads ``j, J + j, ...`` (see the module doc)."""
    quad = tl.arange(0, Q)[:, None, None, None, None] * J + tl.arange(0, J)[None, None, None, :, None]
    return (blks[None, None, :, None, None] * (Q * J) + quad) * 4 + tl.arange(0, 4)[None, None, None, None, :]


@triton.jit
def _out_cols(blks, Q: tl.constexpr, J: tl.constexpr, N: tl.constexpr):
    """Output word columns ``[Q, 1, BLOCK_B, J, N]`` when every input quad gives ``N`` output words."""
    quad = tl.arange(0, Q)[:, None, None, None, None] * J + tl.arange(0, J)[None, None, None, :, None]
    return (blks[None, None, :, None, None] * (Q * J) + quad) * N + tl.arange(0, N)[None, None, None, None, :]


@triton.jit
def _rows_and_blocks(pid_m, pid_b, M, n_blocks, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr):
    """Rows ``[BLOCK_M]`` (int64), blocks ``[BLOCK_B]`` and the ``[BLOCK_M, BLOCK_B]`` mask of a tile."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    blks = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    return rows.to(tl.int64), blks, (rows < M)[:, None] & (blks < n_blocks)[None, :]


@triton.jit
def _per_block(v):
    """A per-block ``[BLOCK_M, BLOCK_B]`` value broadcast against the ``[Q, BLOCK_M, BLOCK_B, J, 4]`` tile."""
    return v[None, :, :, None, None]


@triton.jit
def _load_pairs(x_ptr, offs, mask, IN_KIND: tl.constexpr):
    """``|x|`` (fp32) of elements 2j and 2j+1 of word j, and the word's sign bits ``t`` for ``_sign_terms``.

    fp32 pairs are int64 words (IN_KIND 0), bf16 (1) and fp16 (2) pairs int32 words; little-endian:
    element 2j is the low half. For 16-bit pairs ``t`` holds the two signs at bits 15 and 31.
    """
    w = tl.load(x_ptr + offs, mask=mask, other=0)
    if IN_KIND == 0:
        even = w.to(tl.int32)  # truncation keeps the low 32 bits
        odd = (w >> 32).to(tl.int32)
        t = w  # _sign_terms reads the signs from the two halves
    elif IN_KIND == 1:
        # w * 0x80010000 = w << 16 plus (w & 1) << 31, which the abs mask below drops: an integer
        # multiply (fma pipe) where a constant shift would take the ALU
        even = w * -0x7FFF0000
        odd = w & 0x7FFF0000
        t = w & _PAIR_SIGNS
    else:
        even = w.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32).to(tl.int32, bitcast=True)
        odd = (w >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32).to(tl.int32, bitcast=True)
        t = w & _PAIR_SIGNS
    even = (even & 0x7FFFFFFF).to(tl.float32, bitcast=True)
    odd = (odd & 0x7FFFFFFF).to(tl.float32, bitcast=True)
    return even, odd, t


@triton.jit
def _block_amax(xe, xo):
    """Per block of magnitudes ``[Q, M, B, J, 4]`` -> ``[M, B]``: the max, NaN if any element is NaN.

    An integer max of the magnitude bits: the same order as the fp32 values, with NaN above Inf."""
    m = tl.maximum(xe.to(tl.int32, bitcast=True), xo.to(tl.int32, bitcast=True))
    return tl.max(tl.max(tl.max(m, axis=4), axis=3), axis=0).to(tl.float32, bitcast=True)


@triton.jit
def _div(a, nb, r, STEPS: tl.constexpr):
    """RN(a / b) for fp32 ``a`` and ``b``, given ``nb = -b`` and ``r = RN(1 / b)``: ``RN(a * r)`` and STEPS
    Markstein corrections ``q += RN(a - b * q) * r``, with no element negated (a unary minus is a
    subtraction from 0 in Triton 3.6: one more instruction, and +0 for -0).

    Called as ``_div(-a, |b|, -r)`` (that is, for ``-a / -b``), the final add ``q - rem * r`` keeps the
    sign of a zero quotient; the dequantizers, whose zeros are signed, use that form."""
    q = a * r
    for _ in tl.static_range(STEPS):
        q = tl.fma(tl.fma(q, nb, a), r, q)
    return q


@triton.jit
def _recip_e4m3(s):
    """RN(1 / s) for an e4m3 value ``s`` > 0: three Newton steps from the bit-trick estimate
    ``0x7EF311C3 - bits(s)`` (exact for all 126 values; scripts/check_exact_arith.py). Branch-free."""
    r = (0x7EF311C3 - s.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)
    ns = s * -1.0
    for _ in tl.static_range(3):
        r = tl.fma(r, tl.fma(ns, r, 1.0), r)
    return r


@triton.jit
def _e2m1_bits(q):
    """``code << 22`` for the e2m1 code (0..7) of fp32 ``q`` in [0, 6], rounded to nearest even.

    ``M = (1 + 0.75 P) 2**22`` with ``P = 2**floor(log2 q)`` has ``ulp(M)`` = the e2m1 step at ``q``
    (0.5 below 2, then 1, then 2) and an even ``M / ulp(M)``, so ``q + M`` rounds ``q`` onto the e2m1
    grid; scaled by ``2**-126`` (exactly), the rounded value is the fp32 with bits ``code << 22``.
    """
    p = (q.to(tl.int32, bitcast=True) & _EXP_MASK).to(tl.float32, bitcast=True)
    m = tl.fma(p, 0.75 * 2.0**-104, 2.0**-104)  # M * 2**-126
    return (tl.fma(q, 2.0**-126, m) - m).to(tl.int32, bitcast=True)


@triton.jit
def _e4m3_bits(v):
    """``code << 20`` for the float8_e4m3fn code (0..0x7E) of fp32 ``v`` in [0, 448], round to nearest even.

    As ``_e2m1_bits`` with ``M = (1 - 2**-14) 2**20 P + 2**14``: ``ulp(M)`` is the e4m3 step at ``v``
    (``2**-9`` up to ``2**-5``, 3 mantissa bits above), and ``v * 2**-120`` has the bits ``code << 20``.
    """
    p = (v.to(tl.int32, bitcast=True) & _EXP_MASK).to(tl.float32, bitcast=True)
    m = tl.fma(p, (1.0 - 2.0**-14) * 2.0**-100, 2.0**-106)  # M * 2**-120
    return (tl.fma(v, 2.0**-120, m) - m).to(tl.int32, bitcast=True)


@triton.jit
def _fp4_bytes(qe, qo, t, k, IN_KIND: tl.constexpr):
    """e2m1 byte of each word (int32 < 256): the codes of ``qe``, ``qo`` in [0, 6] and the signs in ``t``,
    times ``k`` (per block: 0 in NaN blocks, else 1).

    ``X = (code_e << 24) + (s_e << 27) + (code_o << 28) + (s_o << 31)`` is the byte ``<< 24`` (plus stray
    bits below 24): the top word of ``X * 256``. Every shift is a multiply; ``k`` multiplies in registers
    and ``t * 4097`` is no power of two, so they stay on the fma pipe instead of becoming ALU shifts.
    """
    if IN_KIND == 0:
        signs = tl.umulhi(t.to(tl.int32) & _SIGN, 1 << 28) + ((t >> 32).to(tl.int32) & _SIGN)
    else:  # t = s_e 2**15 + s_o 2**31: t 2**12 wraps to s_e 2**27; + t adds s_o 2**31 (and s_e 2**15)
        signs = t * 4097
    x = _e2m1_bits(qe) * (4 * k) + _e2m1_bits(qo) * (64 * k) + signs
    return tl.umulhi(x, 256 * k)


@triton.jit
def _fp8_bytes(qe, qo, t, k, IN_KIND: tl.constexpr):
    """e4m3 bytes (int32 < 256) of the two elements of each word: codes of ``qe``, ``qo`` in [0, 448] and the
    signs in ``t``, times ``k``. ``(code << 24) + (sign << 31)`` is the byte ``<< 24`` (as ``_fp4_bytes``)."""
    if IN_KIND == 0:
        se = t.to(tl.int32) & _SIGN
        so = (t >> 32).to(tl.int32) & _SIGN
    else:  # t = s_e 2**15 + s_o 2**31: t (2**16 + 2**17) wraps to s_e 2**31; t is s_o 2**31 + s_e 2**15
        se = t * 0x30000
        so = t
    return tl.umulhi(_e4m3_bits(qe) * (16 * k) + se, 256 * k), tl.umulhi(_e4m3_bits(qo) * (16 * k) + so, 256 * k)


@triton.jit
def _pack_words(b, k, N: tl.constexpr):
    """``[Q, M, B, J, 4 N]`` bytes (int32 < 256) -> ``[Q, M, B, J, N]`` little-endian int32 words.

    ``k`` is the per-block 0 / 1 of the byte helpers (a block with ``k = 0`` has only zero bytes): as a
    register multiplier it keeps the multiply-adds on the fma pipe (a constant would become shifts)."""
    lo, hi = tl.split(b.reshape([b.shape[0], b.shape[1], b.shape[2], b.shape[3], N, 2, 2]))
    p0, p1 = tl.split(lo + hi * (256 * k[:, :, :, :, :, None]))
    return p0 + p1 * (65536 * k)


@triton.jit
def _interleave(be, bo):
    """Bytes of the even and odd elements ``[..., 4]`` -> ``[..., 8]`` in element order."""
    j = tl.join(be, bo)
    return j.reshape([j.shape[0], j.shape[1], j.shape[2], j.shape[3], 8])


@triton.jit
def _store_words(ptr, row_offs, word_cols, words, mask):
    """Store int32 ``words`` at row offsets ``row_offs`` (in units of ``ptr``'s type) and word columns
    ``word_cols``: directly when ``ptr`` is an int32 pointer (4-byte aligned output), else byte by byte."""
    if ptr.dtype.element_ty == tl.int32:
        tl.store(ptr + row_offs + word_cols, words, mask=mask)
    else:
        for i in tl.static_range(4):
            tl.store(ptr + row_offs + word_cols * 4 + i, (words >> (8 * i)).to(tl.uint8), mask=mask)


@triton.jit
def _store_values(out_ptr, row_offs, cols, xe, xo, nan_e, nan_o, mask, OUT_BF16: tl.constexpr):
    """Store fp32 ``xe``, ``xo`` (elements 2c and 2c + 1 of pair columns ``cols``, rows at ``row_offs`` in
    units of ``out_ptr``'s type) as fp32, or as one int32 word of two bf16 rounded to nearest even on the
    bits. ``nan_e`` / ``nan_o`` mark the values that are NaN: their rounded bits would be garbage, so the
    bf16 halves get 0x7FC0 OR-ed in (and the fp32 values are replaced by NaN)."""
    if OUT_BF16:
        be = xe.to(tl.int32, bitcast=True)
        bo = xo.to(tl.int32, bitcast=True)
        lo = ((be + 0x7FFF + ((be >> 16) & 1)) >> 16) & 0xFFFF
        hi = (bo + 0x7FFF + ((bo >> 16) & 1)) & -65536
        nan = tl.where(nan_e, 0x7FC0, 0) | tl.where(nan_o, 0x7FC00000, 0)
        tl.store(out_ptr + row_offs + cols, lo | hi | nan, mask=mask)
    else:
        xe = tl.where(nan_e, _nan(), xe)
        xo = tl.where(nan_o, _nan(), xo)
        offs = tl.broadcast_to(row_offs + cols * 2, xe.shape)
        mask = tl.broadcast_to(mask, xe.shape)
        tl.store(out_ptr + tl.join(offs, offs + 1), tl.join(xe, xo), mask=tl.join(mask, mask))


# ----------------------------------------------------------------------------------------------------
# Launch helpers (arguments already validated by moecomm.quant; every launch runs on its tensors' device)


def _as_pairs(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` viewed as words of two elements (int32 for 16-bit dtypes, int64 for fp32) and its IN_KIND."""
    word = torch.int64 if x.dtype == torch.float32 else torch.int32
    kind = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[x.dtype]
    return _view_as(x, word), kind


def _view_as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x [rows, n]`` viewed as the wider ``dtype``; where torch cannot view it so (a column stride other
    than 1, or a storage offset or row stride that is not a whole number of ``dtype`` elements: a slice of a
    flat workspace at an odd element), a view of a copy in fresh memory, whose bytes are ``x``'s.
    (``x.contiguous()`` would not do: it returns ``x`` itself when ``x`` is contiguous at an odd offset.)"""
    try:
        return x.view(dtype)
    except RuntimeError:
        return x.clone(memory_format=torch.contiguous_format).view(dtype)


def _as_words(out: torch.Tensor) -> torch.Tensor:
    """A byte output ``[rows, n]`` as int32 words ``[rows, n/4]`` when its layout allows (offset, row
    stride and width multiples of 4 bytes), else as uint8 (the kernels then store byte by byte)."""
    out = out.view(torch.uint8)
    try:
        return out.view(torch.int32)
    except RuntimeError:
        return out


def _tile_shape(m: int, n_blocks: int, block: int, cuda: bool) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_B blocks, num_warps) of a program for ``n_blocks`` blocks of ``block``
    elements a row: up to 1024 columns and 4096 elements on the GPU."""
    tile = _GPU_TILE if cuda else _INTERP_TILE
    block_b = triton.next_power_of_2(max(1, min(n_blocks, max(1, (1024 if cuda else tile) // block))))
    block_m = max(1, min(triton.next_power_of_2(m), tile // (block_b * block)))
    return block_m, block_b, _GPU_WARPS if cuda else 1


def _dequant_out(m: int, k: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(result tensor, what the kernel writes, OUT_BF16): bf16 as int32 pairs, fp32 as is; other dtypes are
    cast from an fp32 result by the caller."""
    if dtype == torch.bfloat16:
        out = torch.empty((m, k), dtype=dtype, device=device)
        return out, out.view(torch.int32), True
    out = torch.empty((m, k), dtype=torch.float32, device=device)
    return out, out, False
