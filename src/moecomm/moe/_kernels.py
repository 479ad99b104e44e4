"""Triton kernels of the grouped MoE backend (private). Plain-torch versions live beside their callers in
:mod:`moecomm.moe.experts` (``_permute_torch``, ``_act_torch``, ``_unpermute_torch``) and tests compare the two.

* :func:`plan` -- a stable counting sort of the (token, slot) pairs by local expert.
* :func:`permute_dequant` -- gather token rows in expert order and dequantize NVFP4 / FP8 to bf16;
  :func:`gather_rows` -- the same without dequantizing (bf16 tokens, FP8 codes for the FP8 GEMMs).
* :func:`activation` -- (+ bias) SiLU-and-mul or erf GELU, float32 math, bf16 out.
* :func:`unpermute` -- each token's weighted sum of its expert rows (+ ``b2``), float32, slot order.

Buffers have ``R = T * k`` rows (one per (token, slot) pair, a static size, so that the whole step can be
captured in a CUDA graph); only rows below ``end = offs[-1]``, the pairs of local experts, are computed.
Codes are decoded from their bits (e4m3, e2m1), so the kernels need no fp8 support from the backend and
run under ``TRITON_INTERPRET=1`` on CPU tensors too. Every launch runs in ``device_guard`` of its tensors'
device (they may be on another GPU than the current one); the callers check that they share one.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from moecomm import errors, quant
from moecomm._device import device_guard
from moecomm.quant import QuantFormat, QuantizedTensor

__all__ = ["plan", "permute_supported", "permute_dequant", "gather_rows", "activation", "unpermute"]

_PERMUTE_FORMATS = (QuantFormat.NVFP4, QuantFormat.FP8_TOKEN, QuantFormat.FP8_GROUP)


@triton.jit
def _e4m3_to_f32(bits):
    """uint8 e4m3 (bias 7, no inf) -> exact float32. NaN codes are not expected."""
    b = bits.to(tl.uint32)
    sign = b >> 7
    exp = (b >> 3) & 0xF
    man = b & 0x7
    normal = ((sign << 31) | ((exp + 120) << 23) | (man << 20)).to(tl.float32, bitcast=True)
    sub = man.to(tl.float32) * 0.001953125  # man * 2^-9
    sub = tl.where(sign == 1, -sub, sub)
    return tl.where(exp == 0, sub, normal)


@triton.jit
def _e2m1_to_f32(nib):
    """4-bit e2m1 code (sign, 2 exponent bits, 1 mantissa bit) -> float32 in {0, 0.5, ..., 6}."""
    b = nib.to(tl.uint32)
    sign = (b >> 3) & 1
    exp = (b >> 1) & 0x3
    man = b & 1
    normal = ((sign << 31) | ((exp + 126) << 23) | (man << 22)).to(tl.float32, bitcast=True)
    sub = man.to(tl.float32) * 0.5
    sub = tl.where(sign == 1, -sub, sub)
    return tl.where(exp == 0, sub, normal)


@triton.jit
def _bf16_bits(x):
    """float32 -> bf16 bits (uint16), round to nearest even, NaN kept quiet. Spelled out because the
    interpreter's own conversion does not round to nearest even."""
    b = x.to(tl.uint32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, r).to(tl.uint16)


_COPY, _NVFP4, _FP8 = 0, 1, 2  # _permute_kernel modes
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


@triton.jit
def _pair_keys(ids_ptr, num_pairs, first, num_local, BLOCK: tl.constexpr):
    """Block ``pid`` of the flattened ``[T * k]`` ids: pair index, in-range mask, sort key (the local
    expert, or ``num_local`` for other ranks' experts) and whether the expert is local."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = i < num_pairs
    e = tl.load(ids_ptr + i, mask=valid, other=0) - first
    local = (e >= 0) & (e < num_local)
    return i, valid, tl.where(local, e, num_local), local


@triton.jit
def _count_kernel(
    ids_ptr, counts_ptr, err_ptr, num_pairs, first, num_local, num_experts, num_blocks,
    BLOCK: tl.constexpr, KEYS: tl.constexpr,
):
    """``counts[key, block]`` (key-major) of each block of pairs; lanes past the end count in the last
    bin, ``KEYS - 1 > num_local``, which no pair's key uses. Ids outside ``[-1, num_experts)`` set bit 0
    of ``err[0]`` and widen ``[err[1], err[2]]`` (moecomm.errors); they sort with other ranks' experts."""
    i, valid, key, _ = _pair_keys(ids_ptr, num_pairs, first, num_local, BLOCK)
    counts = tl.histogram(tl.where(valid, key, KEYS - 1), KEYS)
    tl.store(counts_ptr + tl.arange(0, KEYS) * num_blocks + tl.program_id(0), counts)
    ids = tl.load(ids_ptr + i, mask=valid, other=0)
    bad = valid & ((ids < -1) | (ids >= num_experts))
    if tl.max(bad.to(tl.int32), axis=0) > 0:
        tl.atomic_or(err_ptr, 1)
        tl.atomic_min(err_ptr + 1, tl.min(tl.where(bad, ids, 2147483647), axis=0))
        tl.atomic_max(err_ptr + 2, tl.max(tl.where(bad, ids, -2147483648), axis=0))


@triton.jit
def _place_kernel(
    ids_ptr, counts_ptr, ends_ptr, src_ptr, row_expert_ptr, inv_ptr, offs_ptr,
    num_pairs, first, num_local, num_blocks, k, BLOCK: tl.constexpr, KEYS: tl.constexpr,
):
    """Stable counting sort: a pair's row = rows of smaller keys and of earlier blocks with its key
    (``ends - counts`` at ``[key, block]``, from one flat cumsum) + earlier pairs of its block with its key."""
    pid = tl.program_id(0)
    i, valid, key, local = _pair_keys(ids_ptr, num_pairs, first, num_local, BLOCK)
    j = tl.arange(0, BLOCK)
    earlier = (key[:, None] == key[None, :]) & (j[None, :] < j[:, None])
    slot = key * num_blocks + pid
    row = tl.load(ends_ptr + slot, mask=valid, other=0) - tl.load(counts_ptr + slot, mask=valid, other=0)
    row += tl.sum(earlier.to(tl.int32), axis=1)
    tl.store(src_ptr + row, i // k, mask=valid)
    tl.store(row_expert_ptr + row, key, mask=valid)
    tl.store(inv_ptr + i, tl.where(local, row, -1), mask=valid)
    if pid == 0:
        experts = tl.arange(0, KEYS)
        last = tl.load(ends_ptr + experts * num_blocks + num_blocks - 1, mask=experts < num_local)
        tl.store(offs_ptr + experts, last, mask=experts < num_local)


_PLAN_BLOCK = 128


def plan(ids: torch.Tensor, first: int, num_local: int, num_experts: int):
    """Sort the ``T * k`` pairs of ``ids`` (int32 ``[T, k]``, contiguous) by local expert, stably.

    Returns ``(src_rows [R], row_expert [R], offs [E_local], inv [T, k])`` int32, as ``moecomm.moe._plan``.
    Two launches and one cumsum (``torch.sort`` costs more host time than all of them). Ids outside
    ``[-1, num_experts)`` are flagged in ``moecomm.errors.error_buffer`` (no sync).
    """
    num_pairs, k = ids.numel(), ids.shape[1]
    blocks = triton.cdiv(num_pairs, _PLAN_BLOCK)
    keys = triton.next_power_of_2(num_local + 2)  # keys 0..num_local, and a spare last bin
    counts = torch.empty(keys, blocks, dtype=torch.int32, device=ids.device)
    src_rows = torch.empty(num_pairs, dtype=torch.int32, device=ids.device)
    row_expert, inv = torch.empty_like(src_rows), torch.empty_like(src_rows)
    offs = torch.empty(num_local, dtype=torch.int32, device=ids.device)
    err = errors.error_buffer(ids.device)
    with device_guard(ids.device):
        _count_kernel[(blocks,)](ids, counts, err, num_pairs, first, num_local, num_experts, blocks,
                                 BLOCK=_PLAN_BLOCK, KEYS=keys)
        ends = torch.cumsum(counts.view(-1), 0, dtype=torch.int32)
        _place_kernel[(blocks,)](
            ids, counts, ends, src_rows, row_expert, inv, offs, num_pairs, first, num_local, blocks, k,
            BLOCK=_PLAN_BLOCK, KEYS=keys,
        )
    return src_rows, row_expert, offs, inv.view(ids.shape)


@triton.jit
def _permute_kernel(
    data_ptr, data_stride, scale_ptr, scale_stride, gs_ptr, src_ptr, end_ptr, out_ptr, W, group,
    MODE: tl.constexpr, BLOCK: tl.constexpr, CHUNKS: tl.constexpr,
):
    """Rows ``r < *end_ptr`` of ``out [R, W]`` = source row ``src[r]``, copied (_COPY) or dequantized to bf16
    bits; a grid-stride loop over rows (so padding rows cost nothing), ``CHUNKS`` blocks per row."""
    end = tl.load(end_ptr)
    row = tl.program_id(0)
    while row < end:
        src = tl.load(src_ptr + row).to(tl.int64)
        src_data = data_ptr + src * data_stride
        src_scale = scale_ptr + src * scale_stride
        dst = out_ptr + row.to(tl.int64) * W
        for c in tl.static_range(CHUNKS):  # unrolled: all chunks' loads in flight
            cols = c * BLOCK + tl.arange(0, BLOCK)
            mask = cols < W
            if MODE == 0:
                val = tl.load(src_data + cols, mask=mask)
            elif MODE == 1:  # W is even: a byte holds elements 2i (low nibble) and 2i + 1
                pairs = c * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
                byte = tl.load(src_data + pairs, mask=pairs < W // 2, other=0)
                q = tl.join(_e2m1_to_f32(byte & 0xF), _e2m1_to_f32(byte >> 4)).reshape([BLOCK])
                scale = _e4m3_to_f32(tl.load(src_scale + cols // 16, mask=mask, other=0))
                val = _bf16_bits(tl.math.div_rn(q * scale, tl.load(gs_ptr)))  # as quant: (q * scale) / gs
            else:
                q = _e4m3_to_f32(tl.load(src_data + cols, mask=mask, other=0))
                val = _bf16_bits(q * tl.load(src_scale + cols // group, mask=mask, other=0.0))
            tl.store(dst + cols, val, mask=mask)
        row += tl.num_programs(0)


def _block(n: int, cap: int = 1024) -> int:
    return min(cap, triton.next_power_of_2(max(n, 1)))


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _row_grid(rows: int, device: torch.device) -> tuple[int]:
    """Programs for a grid-stride loop over ``rows``: 8 per SM on a GPU, few under the interpreter."""
    per_device = 8 * _num_sms(device) if device.type == "cuda" else 4
    return (max(1, min(rows, per_device)),)


def _launch_permute(data, scales, gs, src_rows, end, out, width: int, group: int, mode: int) -> None:
    if src_rows.shape[0] == 0:
        return
    block = _block(width)
    with device_guard(out.device):
        _permute_kernel[_row_grid(src_rows.shape[0], out.device)](
            data, data.stride(0), scales, scales.stride(0), gs, src_rows, end, out, width, group,
            MODE=mode, BLOCK=block, CHUNKS=triton.cdiv(width, block), num_warps=8 if mode == _NVFP4 else 4,
        )


def permute_supported(tokens: torch.Tensor | QuantizedTensor) -> bool:
    """Whether :func:`permute_dequant` handles these tokens (linear-layout NVFP4 / FP8 with unit column stride)."""
    return (
        isinstance(tokens, QuantizedTensor)
        and tokens.format in _PERMUTE_FORMATS
        and not tokens.swizzled
        and tokens.data.stride(1) == 1
        and tokens.scales.stride(1) == 1
    )


def permute_dequant(tokens: QuantizedTensor, src_rows: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """bf16 ``[R, H]``: row ``i < end`` = token row ``src_rows[i]`` dequantized in float32, rounded to bf16.

    ``src_rows`` int32 ``[R]``; ``end`` int32 one-element tensor (rows from ``end`` on are left unwritten).
    Rows below ``end`` equal ``tokens.dequantize(torch.float32).to(torch.bfloat16)[src_rows]``.
    """
    nvfp4 = tokens.format == QuantFormat.NVFP4
    hidden = tokens.data.shape[1] * (2 if nvfp4 else 1)
    out = torch.empty(src_rows.shape[0], hidden, dtype=torch.bfloat16, device=tokens.data.device)
    scales = tokens.scales.view(torch.uint8) if nvfp4 else tokens.scales
    gs = tokens.global_scale if nvfp4 else scales  # an unused pointer for FP8
    group = quant.FP8_GROUP if tokens.format == QuantFormat.FP8_GROUP else hidden
    _launch_permute(
        tokens.data.view(torch.uint8), scales, gs, src_rows, end, out.view(torch.uint16), hidden, group,
        _NVFP4 if nvfp4 else _FP8,
    )
    return out


def gather_rows(x: torch.Tensor, src_rows: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """``[R, W]`` in ``x``'s dtype: row ``i < end`` = ``x[src_rows[i]]`` (``x [T, W]`` with unit column stride)."""
    out = torch.empty(src_rows.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    as_int = _INT_OF_SIZE[x.element_size()]
    xi = x.view(as_int)
    _launch_permute(xi, xi, xi, src_rows, end, out.view(as_int), x.shape[1], 1, _COPY)
    return out


@triton.jit
def _activation_kernel(
    h_ptr, bias_ptr, expert_ptr, end_ptr, out_ptr, inter, N13,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, CHUNKS: tl.constexpr,
):
    end = tl.load(end_ptr)
    row = tl.program_id(0)
    while row < end:
        h_row = h_ptr + row.to(tl.int64) * N13
        out_row = out_ptr + row.to(tl.int64) * inter
        bias_row = bias_ptr + tl.load(expert_ptr + row).to(tl.int64) * N13
        for c in tl.static_range(CHUNKS):  # unrolled: all chunks' loads in flight
            cols = c * BLOCK + tl.arange(0, BLOCK)
            mask = cols < inter
            a = tl.load(h_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                a += tl.load(bias_row + cols, mask=mask, other=0.0)
            if GATED:
                up = tl.load(h_row + inter + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    up += tl.load(bias_row + inter + cols, mask=mask, other=0.0)
                r = a / (1.0 + tl.exp(-a)) * up
            else:
                r = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
            tl.store(out_row + cols, _bf16_bits(r), mask=mask)
        row += tl.num_programs(0)


def activation(
    h: torch.Tensor, bias: torch.Tensor | None, row_expert: torch.Tensor, end: torch.Tensor, *, gated: bool
) -> torch.Tensor:
    """bf16 ``h [R, N13]`` (+ fp32 ``bias[row_expert]``) -> bf16 ``[R, I]``: ``silu(gate) * up`` or erf GELU.

    Rows from ``end`` (int32 one-element tensor) on are left unwritten.
    """
    rows, n13 = h.shape
    inter = n13 // 2 if gated else n13
    out = torch.empty(rows, inter, dtype=torch.bfloat16, device=h.device)
    if rows == 0:
        return out
    h = h.contiguous()
    block = _block(inter)
    with device_guard(h.device):
        _activation_kernel[_row_grid(rows, h.device)](
            h, h if bias is None else bias.contiguous(), row_expert, end, out.view(torch.uint16), inter, n13,
            GATED=gated, HAS_BIAS=bias is not None, BLOCK=block, CHUNKS=triton.cdiv(inter, block),
        )
    return out


@triton.jit
def _unpermute_kernel(
    y_ptr, inv_ptr, w_ptr, bias_ptr, expert_ptr, out_ptr, out_stride, H,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(K):  # unrolled: the k rows' loads in flight
        p = tl.load(inv_ptr + t * K + j)
        valid = p >= 0
        # the mask as a block comparison: a block & scalar bool is int32 in Triton 3.9's interpreter
        load_mask = mask & ((tl.zeros([BLOCK], dtype=tl.int32) + p) >= 0)
        v = tl.load(y_ptr + p.to(tl.int64) * H + cols, mask=load_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            e = tl.load(expert_ptr + t * K + j).to(tl.int64)
            v += tl.load(bias_ptr + e * H + cols, mask=load_mask, other=0.0)
        acc += tl.where(valid, tl.load(w_ptr + t * K + j), 0.0) * v
    tl.store(out_ptr + t * out_stride + cols, _bf16_bits(acc), mask=mask)


def unpermute(
    y: torch.Tensor,
    inv: torch.Tensor,
    weights: torch.Tensor,
    bias: torch.Tensor | None,
    local_ids: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * (y[inv[t, j]] + bias[local_ids[t, j]])`` over ``inv >= 0``.

    ``y`` bf16 ``[M, H]``; ``inv``, ``local_ids`` int32 ``[T, k]``; ``weights`` fp32 ``[T, k]``; ``bias``
    fp32 ``[E_local, H]`` or None; ``out`` bf16 ``[T, H]`` with unit column stride. Float32 sums in slot order.
    """
    t, k = inv.shape
    hidden = out.shape[1]
    if t == 0:
        return out
    y = y.contiguous()
    block = _block(hidden)
    with device_guard(out.device):
        _unpermute_kernel[(t, triton.cdiv(hidden, block))](
            y, inv, weights, y if bias is None else bias.contiguous(), local_ids, out.view(torch.uint16),
            out.stride(0), hidden, K=k, HAS_BIAS=bias is not None, BLOCK=block,
        )
    return out
