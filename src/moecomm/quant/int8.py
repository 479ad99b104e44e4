"""int8 with an fp32 scale per group of 128 along ``hidden`` (symmetric absmax, as the quantized all-reduces
such as vLLM's QuickReduce quantize their int8 groups), the format of the int8 combine::

    scale = max(amax(group), INT8_EPS) / 127
    q     = clamp(round_half_even(x / scale), -127, 127)      x ~= q * scale

Special values: a group holding a NaN or an Inf gets a NaN scale and zero codes (int8 has no Inf to
saturate to), so it dequantizes to NaN and no other group is affected; an all-zero group gets the scale
``INT8_EPS / 127`` and zero codes. Each element's error is at most half a step, ``scale / 2``.

Each public function has its torch reference (``*_ref``, the oracle) beside it. The quantizer's Triton
kernel is in ``moecomm.quant._kernels_int8``; the dequantizer runs the dequantize-and-sum kernel of
``moecomm.quant._kernels_reduce`` with one piece. Kernels and references give the same bytes on the GPU
and under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moecomm._device import common_device
from moecomm._modes import refuse_grad
from moecomm.quant.common import (
    INT8_EPS,
    INT8_GROUP,
    INT8_MAX,
    _check_backend,
    _check_deq_dtype,
    _check_input,
    _check_out,
    _describe,
)

__all__ = ["quantize_int8", "dequantize_int8", "quantize_int8_ref", "dequantize_int8_ref"]


def quantize_int8_ref(x: Tensor) -> tuple[Tensor, Tensor]:
    """Torch reference of :func:`quantize_int8` (the oracle for the kernel); same argument and results.

    Every division is an elementwise IEEE division by a tensor (never by a Python number, which CUDA
    turns into a multiplication by the reciprocal), so the reference gives the same bytes on every device.
    """
    m, k = _check_input(x, INT8_GROUP, "quantize_int8_ref")
    xf = x.float().reshape(m, k // INT8_GROUP, INT8_GROUP)
    amax = xf.abs().amax(dim=-1, keepdim=True)  # NaN propagates; Inf stays Inf
    bad = ~torch.isfinite(amax)
    scale = torch.where(bad, 0.0, amax).clamp(min=INT8_EPS) / torch.full_like(amax, INT8_MAX)
    codes = torch.round(xf / scale).clamp(-INT8_MAX, INT8_MAX)  # round half to even
    q = torch.where(bad, 0.0, codes).to(torch.int8).reshape(m, k)
    scale = torch.where(bad, float("nan"), scale)
    scales = torch.empty((m, k // INT8_GROUP), dtype=torch.float32, device=x.device)
    return q, scales.copy_(scale.reshape(m, k // INT8_GROUP))


def quantize_int8(x: Tensor, *, out: tuple[Tensor, Tensor] | None = None,
                  backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Quantize to int8 with an fp32 scale per group of 128 (module docstring). Row-local.

    Parameters
    ----------
    x : Tensor
        ``[num_tokens, hidden]``, bfloat16 / float16 / float32, any strides; ``hidden`` a positive
        multiple of 128.
    out : tuple of Tensor, optional
        ``(q, scales)`` to write into: ``int8 [num_tokens, hidden]`` and ``float32 [num_tokens, hidden/128]``;
        row-strided views allowed (unit stride along dim 1), e.g. into a send buffer.
    backend : {"auto", "triton", "torch"}
        ``"auto"``: the Triton kernel for CUDA tensors, the reference on the CPU.

    Returns
    -------
    q : Tensor
        ``int8 [num_tokens, hidden]``, codes in ``[-127, 127]``.
    scales : Tensor
        ``float32 [num_tokens, hidden/128]``; NaN for a group holding a NaN or an Inf.

    Raises
    ------
    TypeError, ValueError
        ``x`` not a 2-D bf16 / fp16 / fp32 tensor, ``hidden`` not a positive multiple of 128, a bad ``out``
        (shape, dtype, device, layout), an unknown backend.
    """
    name = "quantize_int8"
    m, k = _check_input(x, INT8_GROUP, name)
    use_triton = _check_backend(backend, x, name)
    out = _check_out(out, [((m, k), torch.int8), ((m, k // INT8_GROUP), torch.float32)], x, name)
    if not use_triton:
        q, scales = quantize_int8_ref(x)
        if out is None:
            return q, scales
        out[0].copy_(q)
        out[1].copy_(scales)
        return out
    if out is None:
        out = (torch.empty((m, k), dtype=torch.int8, device=x.device),
               torch.empty((m, k // INT8_GROUP), dtype=torch.float32, device=x.device))
    from moecomm.quant import _kernels_int8

    _kernels_int8.quantize_int8(x, out[0], out[1])
    return out


def _check_int8_pair(q: Tensor, scales: Tensor, name: str) -> tuple[int, int]:
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"{name}: q must be a 2-D int8 tensor, got {_describe(q)}")
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 or scales.dim() != 2:
        raise TypeError(f"{name}: scales must be a 2-D float32 tensor, got {_describe(scales)}")
    refuse_grad(name, q=q, scales=scales)
    m, k = q.shape
    if k == 0 or k % INT8_GROUP or tuple(scales.shape) != (m, k // INT8_GROUP):
        raise ValueError(f"{name}: q {list(q.shape)} needs a hidden size that is a positive multiple of "
                         f"{INT8_GROUP} and scales [{m}, hidden/{INT8_GROUP}], got scales {list(scales.shape)}")
    return m, k


def dequantize_int8_ref(q: Tensor, scales: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Torch reference of :func:`dequantize_int8`; same arguments and result."""
    m, k = _check_int8_pair(q, scales, "dequantize_int8")
    _check_deq_dtype(dtype, "dequantize_int8")
    x = q.float().reshape(m, k // INT8_GROUP, INT8_GROUP) * scales.unsqueeze(-1)
    return x.reshape(m, k).to(dtype)


def dequantize_int8(q: Tensor, scales: Tensor, *, dtype: torch.dtype = torch.float32,
                    backend: str = "auto") -> Tensor:
    """Dequantize int8 groups: ``x = float(q) * scale`` in fp32, rounded once to ``dtype``.

    Parameters
    ----------
    q : Tensor
        ``int8 [num_tokens, hidden]``, ``hidden`` a positive multiple of 128, any strides (the kernel copies
        a tensor without unit stride along hidden first).
    scales : Tensor
        ``float32 [num_tokens, hidden/128]``, any strides.
    dtype : torch.dtype
        float32, bfloat16 (both by the kernel), float16 or float64 (the reference).
    backend : {"auto", "triton", "torch"}

    Returns
    -------
    Tensor
        ``[num_tokens, hidden]`` in ``dtype``; NaN where the scale is NaN (kernel and reference agree bit
        for bit, NaN payloads aside).

    Raises
    ------
    TypeError, ValueError
        Wrong dtypes or shapes; tensors on different devices; ``q`` or ``scales`` that require grad while
        grad mode is on (inference only).
    """
    name = "dequantize_int8"
    m, k = _check_int8_pair(q, scales, name)
    _check_deq_dtype(dtype, name)
    common_device(name, q=q, scales=scales)
    if not _check_backend(backend, q, name) or dtype not in (torch.float32, torch.bfloat16):
        return dequantize_int8_ref(q, scales, dtype=dtype)
    from moecomm.quant import _kernels_reduce

    out = torch.empty((m, k), dtype=dtype, device=q.device)
    # the kernel takes any row stride but unit stride along hidden (and along the scale groups)
    q, scales = (t if t.stride(1) == 1 else t.contiguous() for t in (q, scales))
    _kernels_reduce.dequantize_sum(q.unsqueeze(0), scales.unsqueeze(0), out)
    return out
