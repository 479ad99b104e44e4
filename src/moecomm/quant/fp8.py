"""FP8 e4m3 with fp32 scales per token or per group of 128 (DeepSeek-V3 / DeepEP / DeepGEMM)::

    scale = max(amax(group), FP8_EPS) / 448     (rounded up to a power of two when ue8m0=True)
    q     = e4m3_rne_satfinite(x / scale)       x ~= float(q) * scale

Each public function has its torch reference (``*_ref``, the oracle) beside it; the Triton kernels are in
``moecomm.quant._kernels_fp8``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moecomm._device import common_device
from moecomm._modes import refuse_grad
from moecomm.quant.common import (
    _FP32_MAX,
    E4M3_MAX,
    FP8_EPS,
    FP8_GROUP,
    _check_backend,
    _check_deq_dtype,
    _check_input,
    _check_out,
    _describe,
    _e4m3_bytes,
)

__all__ = ["quantize_fp8", "dequantize_fp8", "quantize_fp8_ref", "dequantize_fp8_ref"]


def _fp8_group(group_size: int | None, k: int, name: str) -> int:
    if group_size is None:
        return k
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"{name}: group_size must be a positive int or None, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"{name}: hidden = {k} must be a multiple of group_size {group_size}")
    return group_size


def _check_flags(name: str, **flags) -> None:
    """``TypeError`` unless each flag is a bool (``saturate_inf="no"`` would be truthy)."""
    for flag, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name}: {flag} must be a bool, got {value!r}")


def _ceil_pow2(s: Tensor) -> Tensor:
    """Smallest power of two >= s (for positive normal fp32 ``s``; NaN stays NaN)."""
    mant, exp = torch.frexp(s)  # s = mant * 2**exp, mant in [0.5, 1)
    return torch.ldexp(torch.ones_like(s), exp - (mant == 0.5).to(exp.dtype))


def quantize_fp8_ref(x: Tensor, *, group_size: int | None = FP8_GROUP, ue8m0: bool = False,
                     saturate_inf: bool = True) -> tuple[Tensor, Tensor]:
    """Torch reference of ``quantize_fp8`` (the oracle for the kernel); same arguments and results."""
    m, k = _check_input(x, 1, "quantize_fp8_ref")
    _check_flags("quantize_fp8_ref", ue8m0=ue8m0, saturate_inf=saturate_inf)
    g = _fp8_group(group_size, k, "quantize_fp8_ref")
    xf = x.float().reshape(m, k // g, g)
    amax = xf.abs().amax(dim=-1, keepdim=True)  # NaN propagates
    nan_group = torch.isnan(amax) if saturate_inf else ~torch.isfinite(amax)
    scale = amax.clamp(FP8_EPS, _FP32_MAX) / E4M3_MAX
    if ue8m0:
        scale = _ceil_pow2(scale)
    scale = torch.where(nan_group, torch.full_like(scale, float("nan")), scale)  # canonical NaN 0x7FC00000
    q = _e4m3_bytes(xf / scale).view(torch.uint8)
    q = torch.where(nan_group, torch.zeros_like(q), q).reshape(m, k).view(torch.float8_e4m3fn)
    scales = torch.empty((m, k // g), dtype=torch.float32, device=x.device)  # fresh strides, also for [m, 1]
    return q, scales.copy_(scale.reshape(m, k // g))


def quantize_fp8(
    x: Tensor,
    *,
    group_size: int | None = FP8_GROUP,
    ue8m0: bool = False,
    saturate_inf: bool = True,
    out: tuple[Tensor, Tensor] | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Quantize to FP8 e4m3 with fp32 scales per group (DeepSeek-V3 / DeepEP) or per token. Row-local.

    ``scale = max(amax(group), FP8_EPS) / 448`` (rounded up to a power of two when ``ue8m0``),
    ``q = e4m3_rne_satfinite(x / scale)``; dequantize with ``q * scale``.

    Parameters
    ----------
    x : Tensor
        ``[num_tokens, hidden]``, bfloat16 / float16 / float32, any strides and storage offset (the Triton
        kernels read element pairs as 32-bit words, fp32 pairs as 64-bit words: rows that are not so aligned,
        e.g. a slice of a flat workspace at an odd element, are copied to fresh memory first; the bytes are
        those of ``x.clone()``).
    group_size : int or None
        Elements per scale along ``hidden`` (default 128); ``None`` = one scale per token (row). The
        Triton backend needs a power of two >= 8 (or ``None``: any hidden).
    ue8m0 : bool
        Round each scale up to a power of two (DeepGEMM's UE8M0 scales; stored as fp32).
    saturate_inf : bool
        ``True`` (default): +-Inf saturates to +-448 times the group's scale (an Inf amax clamps the
        scale to ``FP32_MAX / 448``). ``False``: a group holding an Inf is treated as one holding a NaN
        (NaN scale, zero codes), the policy of the quantized reducescatterv (:mod:`moecomm.quant.reduce`).
    out : tuple of Tensor, optional
        ``(q, scales)`` to write into; row-strided views at any offset allowed (unit stride along dim 1).
    backend : {"auto", "triton", "torch"}

    Returns
    -------
    q : Tensor
        ``float8_e4m3fn [num_tokens, hidden]``.
    scales : Tensor
        ``float32 [num_tokens, hidden/group_size]``, or ``[num_tokens, 1]`` per token.

    Raises
    ------
    TypeError, ValueError
        As ``quantize_nvfp4``; ``group_size`` not positive or not dividing ``hidden``; ``ue8m0`` or
        ``saturate_inf`` not a bool.
    """
    name = "quantize_fp8"
    m, k = _check_input(x, 1, name)
    _check_flags(name, ue8m0=ue8m0, saturate_inf=saturate_inf)
    g = _fp8_group(group_size, k, name)
    use_triton = _check_backend(backend, x, name)
    out = _check_out(out, [((m, k), torch.float8_e4m3fn), ((m, k // g), torch.float32)], x, name)
    if not use_triton:
        q, scales = quantize_fp8_ref(x, group_size=g, ue8m0=ue8m0, saturate_inf=saturate_inf)
        if out is None:
            return q, scales
        out[0].copy_(q)
        out[1].copy_(scales)
        return out
    if group_size is not None and (g & (g - 1) or g < 8):
        raise ValueError(f"{name}: the Triton backend needs a power-of-two group_size >= 8, got {g}")
    if out is None:
        out = (
            torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device),
            torch.empty((m, k // g), dtype=torch.float32, device=x.device),
        )
    from moecomm.quant import _kernels_fp8

    _kernels_fp8.quantize_fp8(
        x, out[0].view(torch.uint8), out[1], group_size=group_size, ue8m0=ue8m0, eps=FP8_EPS,
        saturate_inf=saturate_inf,
    )
    return out


def _check_fp8_pair(q: Tensor, scales: Tensor, name: str) -> tuple[int, int, int]:
    """(rows, hidden, scale groups) of an FP8 pair; raises TypeError / ValueError for wrong dtypes or shapes."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.float8_e4m3fn or q.dim() != 2:
        raise TypeError(f"{name}: q must be a 2-D float8_e4m3fn tensor, got {_describe(q)}")
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 or scales.dim() != 2:
        raise TypeError(f"{name}: scales must be a 2-D float32 tensor, got {_describe(scales)}")
    refuse_grad(name, q=q, scales=scales)
    m, k = q.shape
    groups = scales.shape[1]
    if scales.shape[0] != m or groups == 0 or k % groups:
        raise ValueError(f"{name}: scales {list(scales.shape)} do not match q {list(q.shape)}")
    return m, k, groups


def dequantize_fp8_ref(q: Tensor, scales: Tensor, *, dtype=torch.float32) -> Tensor:
    """Torch reference of ``dequantize_fp8`` (the oracle for the kernel); same arguments and result."""
    m, k, groups = _check_fp8_pair(q, scales, "dequantize_fp8")
    _check_deq_dtype(dtype, "dequantize_fp8")
    out = q.float().reshape(m, groups, k // groups) * scales.unsqueeze(-1)
    return out.reshape(m, k).to(dtype)


def dequantize_fp8(q: Tensor, scales: Tensor, *, dtype: torch.dtype = torch.float32, backend: str = "auto") -> Tensor:
    """Dequantize FP8: ``x = float(q) * scale`` (fp32 math, then cast to ``dtype``).

    Parameters
    ----------
    q : Tensor
        ``float8_e4m3fn [num_tokens, hidden]`` (any strides and offset: the kernel reads byte pairs, from a
        copy where they are not 2-byte aligned).
    scales : Tensor
        ``float32 [num_tokens, hidden/group]``, ``[num_tokens, 1]`` per token.
    dtype : torch.dtype
        Result dtype: float32, float16, bfloat16 or float64 (``TypeError`` otherwise); the fp32 values are
        rounded to nearest even.
    backend : {"auto", "triton", "torch"}
        The Triton kernel handles an even ``hidden`` with one scale per token or a power-of-two group;
        ``"auto"`` uses the reference for other shapes, ``"triton"`` raises ``ValueError``.

    Returns
    -------
    Tensor
        ``[num_tokens, hidden]`` in ``dtype``; bytes 0x7F / 0xFF and NaN scales give NaN (the kernel and
        the reference agree bit for bit, NaN payloads aside).

    Raises
    ------
    TypeError, ValueError
        Wrong dtypes or shapes; tensors on different devices; a shape the Triton kernel does not handle;
        ``scales`` that require grad while grad mode is on.
    """
    name = "dequantize_fp8"
    m, k, groups = _check_fp8_pair(q, scales, name)
    _check_deq_dtype(dtype, name)
    common_device(name, q=q, scales=scales)
    group = k // groups
    fits = k % 2 == 0 and (groups == 1 or group & (group - 1) == 0)
    if not _check_backend(backend, q, name) or (backend == "auto" and not fits):
        return dequantize_fp8_ref(q, scales, dtype=dtype)
    if not fits:
        raise ValueError(f"{name}: the Triton backend needs an even hidden and one scale per token or a "
                         f"power-of-two group, got q {list(q.shape)} and scales {list(scales.shape)}")
    q = q.view(torch.uint8)
    if scales.shape[1] > 1 and scales.stride(1) != 1:  # the kernel indexes scales with stride(0) and unit stride(1)
        scales = scales.contiguous()
    from moecomm.quant import _kernels_fp8

    return _kernels_fp8.dequantize_fp8(q, scales, dtype)
