"""MXFP4 (OCP Microscaling Formats (MX) v1.0): e2m1 elements packed two per byte as NVFP4 packs them, one e8m0
scale (a power of two ``2**(byte - 127)``; 0xFF is NaN) per 32 elements::

    "floor" (OCP):  scale = 2**(floor(log2(amax(block))) - 2)     elements above 6 saturate
    "up"  (triton_kernels ROUND_UP, FlashInfer):  scale = 2**ceil(log2(amax / 6))   no clipping
    q = e2m1_rne_sat(x / scale)

The reference works in float64 (exact); the Triton kernel is in ``moecomm.quant._kernels_mxfp4``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moecomm.quant.common import (
    E8M0_BIAS,
    E8M0_NAN,
    MXFP4_BLOCK,
    _check_backend,
    _check_deq_dtype,
    _check_input,
    _check_out,
    _describe,
    _e2m1_codes,
    _pack_nibbles,
    _unpack_e2m1,
)

__all__ = ["quantize_mxfp4", "dequantize_mxfp4", "quantize_mxfp4_ref"]

_MXFP4_ROUNDINGS = ("floor", "up")


def _mx_scale_exponent(amax: Tensor, scale_rounding: str) -> Tensor:
    """Biased e8m0 exponents (int32, 0..254) of MXFP4 block scales, from float64 frexp (exact).

    floor: ``floor(log2(amax)) - 2`` (OCP MX v1.0: emax of e2m1 is 2). up: ``ceil(log2(amax / 6))``.
    amax = 0 gives 0 (scale 2**-127); +Inf counts as 2**128.
    """
    a = torch.where(torch.isinf(amax), torch.full_like(amax, 2.0**128), amax)
    mant, exp = torch.frexp(a)  # a = mant * 2**exp, mant in [0.5, 1)
    floor_log2 = exp.long() - 1
    k = floor_log2 - 2
    if scale_rounding == "up":  # amax / 2**(floor_log2 - 2) is in [4, 8); > 6 needs one more power of two
        k = k + (mant > 0.75).long()
    biased = (k + E8M0_BIAS).clamp(0, 2 * E8M0_BIAS)
    return torch.where(a == 0, torch.zeros_like(biased), biased)


def quantize_mxfp4_ref(x: Tensor, *, scale_rounding: str = "floor") -> tuple[Tensor, Tensor]:
    """Torch reference of ``quantize_mxfp4`` (the oracle for the kernel); float64 math, exact."""
    m, k = _check_input(x, MXFP4_BLOCK, "quantize_mxfp4_ref")
    if scale_rounding not in _MXFP4_ROUNDINGS:
        raise ValueError(f"quantize_mxfp4: scale_rounding must be one of {_MXFP4_ROUNDINGS}, got {scale_rounding!r}")
    xd = x.double().reshape(m, k // MXFP4_BLOCK, MXFP4_BLOCK)
    sign = torch.signbit(xd).to(torch.uint8) << 3
    mag = xd.abs()
    amax = mag.amax(dim=-1, keepdim=True)
    nan_block = torch.isnan(amax)
    biased = _mx_scale_exponent(torch.where(nan_block, torch.zeros_like(amax), amax), scale_rounding)
    q = mag * torch.pow(2.0, (E8M0_BIAS - biased).double())  # exact: a power-of-two scaling in float64
    codes = torch.where(nan_block, torch.zeros_like(sign), _e2m1_codes(q) | sign)
    scales = torch.where(nan_block, E8M0_NAN, biased).squeeze(-1).to(torch.uint8)
    return _pack_nibbles(codes.reshape(m, k)), scales


def quantize_mxfp4(
    x: Tensor,
    *,
    scale_rounding: str = "floor",
    out: tuple[Tensor, Tensor] | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Quantize to MXFP4 (OCP Microscaling Formats v1.0): e2m1 elements, e8m0 scale per 32. Row-local.

    Parameters
    ----------
    x : Tensor
        ``[num_tokens, hidden]``, bfloat16 / float16 / float32, any strides and storage offset (the Triton
        kernels read element pairs as 32-bit words, fp32 pairs as 64-bit words: rows that are not so aligned,
        e.g. a slice of a flat workspace at an odd element, are copied to fresh memory first; the bytes are
        those of ``x.clone()``); ``hidden % 32 == 0``.
    scale_rounding : {"floor", "up"}
        ``"floor"``: the OCP rule ``scale = 2**(floor(log2(amax)) - 2)``; elements up to 8*scale occur and
        saturate to 6*scale. ``"up"``: ``scale = 2**ceil(log2(amax / 6))`` (triton_kernels'
        ``DequantScaleRoundingMode.ROUND_UP`` and FlashInfer), never clips but may waste a binade.
    out : tuple of Tensor, optional
        ``(packed, scales)`` to write into; row-strided views at any offset allowed (unit stride along dim 1).
    backend : {"auto", "triton", "torch"}

    Returns
    -------
    packed : Tensor
        ``uint8 [num_tokens, hidden/2]``, element ``2i`` in the low nibble.
    scales : Tensor
        ``uint8 [num_tokens, hidden/32]`` e8m0: scale ``2**(byte - 127)``, 0xFF = NaN block.

    Raises
    ------
    TypeError, ValueError
        As ``quantize_nvfp4``; unknown ``scale_rounding``.
    """
    name = "quantize_mxfp4"
    m, k = _check_input(x, MXFP4_BLOCK, name)
    if scale_rounding not in _MXFP4_ROUNDINGS:
        raise ValueError(f"{name}: scale_rounding must be one of {_MXFP4_ROUNDINGS}, got {scale_rounding!r}")
    use_triton = _check_backend(backend, x, name)
    out = _check_out(out, [((m, k // 2), torch.uint8), ((m, k // MXFP4_BLOCK), torch.uint8)], x, name)
    if not use_triton:
        packed, scales = quantize_mxfp4_ref(x, scale_rounding=scale_rounding)
        if out is None:
            return packed, scales
        out[0].copy_(packed)
        out[1].copy_(scales)
        return out
    if out is None:
        out = (
            torch.empty((m, k // 2), dtype=torch.uint8, device=x.device),
            torch.empty((m, k // MXFP4_BLOCK), dtype=torch.uint8, device=x.device),
        )
    from moecomm.quant import _kernels_mxfp4

    _kernels_mxfp4.quantize_mxfp4(x, out[0], out[1], round_up=scale_rounding == "up")
    return out


def dequantize_mxfp4(packed: Tensor, scales: Tensor, *, dtype=torch.float32) -> Tensor:
    """Dequantize MXFP4: ``x = e2m1 * 2**(scale_byte - 127)`` (exact in fp32 unless it overflows).

    ``packed``: ``uint8 [num_tokens, hidden/2]``; ``scales``: ``uint8 [num_tokens, hidden/32]`` e8m0.
    Returns ``[num_tokens, hidden]`` in ``dtype`` (float32, float16, bfloat16 or float64, ``TypeError``
    otherwise); 0xFF scales give NaN blocks.
    """
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"dequantize_mxfp4: packed must be a 2-D uint8 tensor, got {_describe(packed)}")
    m, k = packed.shape[0], packed.shape[1] * 2
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.uint8:
        raise TypeError(f"dequantize_mxfp4: scales must be uint8 (e8m0), got {_describe(scales)}")
    if k % MXFP4_BLOCK:
        raise ValueError(f"dequantize_mxfp4: hidden = 2 * packed.shape[1] = {k} must be a multiple of "
                         f"{MXFP4_BLOCK} (one e8m0 scale per {MXFP4_BLOCK} values)")
    if tuple(scales.shape) != (m, k // MXFP4_BLOCK):
        raise ValueError(f"dequantize_mxfp4: scales must be [{m}, {k // MXFP4_BLOCK}], got {list(scales.shape)}")
    _check_deq_dtype(dtype, "dequantize_mxfp4")
    values = _unpack_e2m1(packed).double().reshape(m, k // MXFP4_BLOCK, MXFP4_BLOCK)
    e = scales.to(torch.int32)
    mult = torch.where(e == E8M0_NAN, float("nan"), torch.pow(2.0, (e - E8M0_BIAS).double()))
    return (values * mult.unsqueeze(-1)).reshape(m, k).to(dtype)
