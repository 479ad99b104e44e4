"""NVFP4: e2m1 elements, an e4m3 scale per 16 and an fp32 global scale per tensor (NVIDIA ModelOpt /
TensorRT-LLM / FlashInfer convention).

Element ``2i`` in the low nibble, ``2i+1`` in the high nibble (``[0.5, 6.0] -> 0x71``); ``gs`` is the
global *encode* scale::

    gs    = 448 * 6 / amax(tensor)                      (nvfp4_global_scale; 1.0 when amax == 0)
    scale = e4m3_rne_satfinite(gs * amax(block) / 6)
    q     = e2m1_rne_sat(x * gs / float(scale))         x ~= q * float(scale) / gs

fp32 subnormal inputs (``|x| < 2**-126``) count as zero, so the bytes do not depend on the hardware's
flush-to-zero mode. Each public function has its torch reference (``*_ref``, the oracle) beside it; the
Triton kernels are in ``moecomm.quant._kernels_nvfp4``.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from moecomm._device import common_device
from moecomm._modes import refuse_grad
from moecomm.quant.common import (
    _FP32_MAX,
    _FP32_MIN_NORMAL,
    E2M1_MAX,
    E4M3_MAX,
    E4M3_NAN,
    NVFP4_BLOCK,
    _check_backend,
    _check_deq_dtype,
    _check_input,
    _check_out,
    _describe,
    _e2m1_codes,
    _e4m3_bytes,
    _global_scale_tensor,
    _pack_nibbles,
    _poison_invalid,
    _unpack_e2m1,
    round_up,
)
from moecomm.quant.swizzle import swizzle_block_scales, unswizzle_block_scales

__all__ = [
    "nvfp4_global_scale",
    "quantize_nvfp4",
    "dequantize_nvfp4",
    "quantize_nvfp4_ref",
    "dequantize_nvfp4_ref",
]


def nvfp4_global_scale(amax: Tensor | float) -> Tensor:
    """The NVFP4 per-tensor encode scale ``448 * 6 / amax`` (fp32), and 1.0 where ``amax == 0``.

    Parameters
    ----------
    amax : Tensor or float
        Absolute maximum of the tensor (or of a calibration set), one element, >= 0. Tensors keep their
        device; a CUDA tensor is not checked on the host (no sync).

    Returns
    -------
    Tensor
        float32 0-dim tensor. Clamped to the largest finite fp32 value for tiny ``amax``.

    Raises
    ------
    ValueError
        A Python number or CPU tensor that is negative, NaN or infinite; more than one element; a tensor
        that requires grad while grad mode is on (a calibration constant: no gradient flows through it).
    TypeError
        Neither a real number (bool and str are not) nor a real tensor.
    """
    if isinstance(amax, torch.Tensor):
        if amax.numel() != 1:
            raise ValueError(f"nvfp4_global_scale: amax must have one element, got shape {tuple(amax.shape)}")
        if amax.dtype == torch.bool or amax.is_complex():
            raise TypeError(f"nvfp4_global_scale: amax must be a real number, got a {amax.dtype} tensor")
        refuse_grad("nvfp4_global_scale", amax=amax)
        a = amax.detach().reshape(()).to(torch.float32)
    elif isinstance(amax, numbers.Real) and not isinstance(amax, bool):
        a = torch.tensor(float(amax), dtype=torch.float32)
    else:
        raise TypeError(f"nvfp4_global_scale: amax must be a float or a tensor, got {type(amax).__name__} {amax!r}")
    if a.device.type == "cpu":
        v = a.item()
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"nvfp4_global_scale: amax must be finite and >= 0, got {v}")
    gs = (E4M3_MAX * E2M1_MAX) / a
    return torch.where(a == 0, torch.ones_like(a), gs.clamp(max=_FP32_MAX))


def quantize_nvfp4_ref(x: Tensor, global_scale: Tensor | float, *, swizzled: bool = False) -> tuple[Tensor, Tensor]:
    """Torch reference of ``quantize_nvfp4`` (the oracle for the kernel); same arguments and results."""
    m, k = _check_input(x, NVFP4_BLOCK, "quantize_nvfp4_ref")
    gs = _poison_invalid(_global_scale_tensor(global_scale, "quantize_nvfp4_ref", x=x))
    xf = x.float().reshape(m, k // NVFP4_BLOCK, NVFP4_BLOCK)
    sign = torch.signbit(xf).to(torch.uint8) << 3
    mag = xf.abs()
    mag = torch.where(mag < _FP32_MIN_NORMAL, torch.zeros_like(mag), mag)  # fp32 subnormals count as zero
    amax = mag.amax(dim=-1, keepdim=True)  # NaN propagates
    scale_f = (gs * amax) / E2M1_MAX
    nan_block = torch.isnan(scale_f)
    scales = _e4m3_bytes(scale_f)
    scale_dec = scales.float()
    q = (mag * gs) / scale_dec
    codes = torch.where(scale_dec == 0, torch.zeros_like(sign), _e2m1_codes(q)) | sign
    codes = torch.where(nan_block, torch.zeros_like(codes), codes)
    scale_bytes = torch.where(nan_block.squeeze(-1), E4M3_NAN, scales.squeeze(-1).view(torch.uint8))
    scales = scale_bytes.view(torch.float8_e4m3fn)
    packed = _pack_nibbles(codes.reshape(m, k))
    if swizzled:
        scales = swizzle_block_scales(scales)
    return packed, scales


def _check_nvfp4_scales(packed: Tensor, scales: Tensor, swizzled: bool, name: str) -> tuple[int, int]:
    """(rows, hidden) of an NVFP4 pair; raises TypeError / ValueError for wrong dtypes or shapes."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"{name}: packed must be a 2-D uint8 tensor, got {_describe(packed)}")
    if not isinstance(scales, torch.Tensor) or scales.dtype not in (torch.float8_e4m3fn, torch.uint8):
        raise TypeError(f"{name}: scales must be float8_e4m3fn, got {_describe(scales)}")
    refuse_grad(name, scales=scales)
    m, k = packed.shape[0], packed.shape[1] * 2
    if k % NVFP4_BLOCK:
        raise ValueError(f"{name}: hidden = {k} must be a multiple of {NVFP4_BLOCK}")
    kb = k // NVFP4_BLOCK
    shape = (round_up(m, 128), round_up(kb, 4)) if swizzled else (m, kb)
    if tuple(scales.shape) != shape:
        layout = " (swizzled)" if swizzled else ""
        raise ValueError(f"{name}: scales must be {list(shape)}{layout}, got {list(scales.shape)}")
    return m, k


def dequantize_nvfp4_ref(
    packed: Tensor, scales: Tensor, global_scale: Tensor | float, *, swizzled: bool = False, dtype=torch.float32
) -> Tensor:
    """Torch reference of ``dequantize_nvfp4`` (the oracle for the kernel); same arguments and result."""
    m, k = _check_nvfp4_scales(packed, scales, swizzled, "dequantize_nvfp4")
    _check_deq_dtype(dtype, "dequantize_nvfp4")
    kb = k // NVFP4_BLOCK
    scales = scales.view(torch.float8_e4m3fn)
    if swizzled:
        scales = unswizzle_block_scales(scales, m, kb)
    gs = _poison_invalid(_global_scale_tensor(global_scale, "dequantize_nvfp4", packed=packed))
    values = _unpack_e2m1(packed).reshape(m, kb, NVFP4_BLOCK)
    out = (values * scales.float().unsqueeze(-1)) / gs
    return out.reshape(m, k).to(dtype)


def quantize_nvfp4(
    x: Tensor,
    global_scale: Tensor | float,
    *,
    swizzled: bool = False,
    out: tuple[Tensor, Tensor] | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Quantize to NVFP4 (NVIDIA ModelOpt / TensorRT-LLM / FlashInfer convention). Row-local.

    ``scale = e4m3_rne_satfinite(gs * amax(block of 16) / 6)``, ``q = e2m1_rne_sat(x * gs / scale)``.

    Parameters
    ----------
    x : Tensor
        ``[num_tokens, hidden]``, bfloat16 / float16 / float32, any strides and storage offset (the Triton
        kernels read element pairs as 32-bit words, fp32 pairs as 64-bit words: rows that are not so aligned,
        e.g. a slice of a flat workspace at an odd element, are copied to fresh memory first; the bytes are
        those of ``x.clone()``); ``hidden % 16 == 0``.
        ``num_tokens`` may be 0.
    global_scale : Tensor or float
        fp32 per-tensor encode scale ``gs`` (``nvfp4_global_scale(amax)``), one element. A tensor is read
        by the kernel from device memory (no host sync, CUDA-graph capturable); other float dtypes are
        cast to fp32. Must be finite and > 0: checked on the host for numbers and CPU tensors (ValueError);
        for CUDA tensors an invalid value makes every scale NaN instead (no sync).
    swizzled : bool
        Return the block scales in the swizzled 128x4 layout (``swizzle_block_scales``) consumed by
        CUTLASS / FlashInfer FP4 MoE GEMMs, instead of the linear ``[num_tokens, hidden/16]`` layout.
    out : tuple of Tensor, optional
        ``(packed, scales)`` to write into; may be row-strided views (unit stride along dim 1, any row
        stride) into one send buffer. With ``swizzled=True``, ``scales`` must be a contiguous tensor of the
        swizzled shape (its padding is zeroed).
    backend : {"auto", "triton", "torch"}

    Returns
    -------
    packed : Tensor
        ``uint8 [num_tokens, hidden/2]``, element ``2i`` in the low nibble, bit 3 of a nibble = sign.
    scales : Tensor
        ``float8_e4m3fn [num_tokens, hidden/16]``, or ``[round_up(num_tokens,128), round_up(hidden/16,4)]``
        when ``swizzled``.

    Raises
    ------
    TypeError
        ``x`` not bf16/fp16/fp32; ``out`` not a tuple of tensors.
    ValueError
        ``x`` not 2-D, ``hidden`` not a multiple of 16, bad global scale, bad ``out`` shape/dtype/strides;
        ``x`` or the global scale requires grad while grad mode is on (the quantizers have no backward:
        call them under ``torch.no_grad()`` or ``torch.inference_mode()``).
    """
    name = "quantize_nvfp4"
    m, k = _check_input(x, NVFP4_BLOCK, name)
    use_triton = _check_backend(backend, x, name)
    kb = k // NVFP4_BLOCK
    sshape = (round_up(m, 128), round_up(kb, 4)) if swizzled else (m, kb)
    out = _check_out(out, [((m, k // 2), torch.uint8), (sshape, torch.float8_e4m3fn)], x, name)
    if out is not None and swizzled and not out[1].is_contiguous():
        raise ValueError(f"{name}: with swizzled=True, out[1] must be contiguous")
    gs = _global_scale_tensor(global_scale, name, x=x)
    if not use_triton:
        packed, scales = quantize_nvfp4_ref(x, gs, swizzled=swizzled)
        if out is None:
            return packed, scales
        out[0].copy_(packed)
        out[1].copy_(scales)
        return out
    if out is None:
        packed = torch.empty((m, k // 2), dtype=torch.uint8, device=x.device)
        alloc = torch.zeros if swizzled else torch.empty
        scales = alloc(sshape, dtype=torch.uint8, device=x.device).view(torch.float8_e4m3fn)
    else:
        packed, scales = out
        if swizzled:
            scales.view(torch.uint8).zero_()
    from moecomm.quant import _kernels_nvfp4

    _kernels_nvfp4.quantize_nvfp4(x, gs, packed, scales.view(torch.uint8), swizzled=swizzled)
    return packed, scales


def dequantize_nvfp4(
    packed: Tensor,
    scales: Tensor,
    global_scale: Tensor | float,
    *,
    swizzled: bool = False,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
) -> Tensor:
    """Dequantize NVFP4: ``x = e2m1 * float(scale) / global_scale`` (fp32 math, then cast to ``dtype``).

    Parameters
    ----------
    packed : Tensor
        ``uint8 [num_tokens, hidden/2]`` from ``quantize_nvfp4`` (row-strided views at any offset allowed).
    scales : Tensor
        ``float8_e4m3fn [num_tokens, hidden/16]`` (or uint8 bytes), or the swizzled
        ``[round_up(num_tokens,128), round_up(hidden/16,4)]`` layout when ``swizzled``.
    global_scale : Tensor or float
        The encode scale used to quantize (as in ``quantize_nvfp4``).
    dtype : torch.dtype
        Result dtype: float32, float16, bfloat16 or float64 (``TypeError`` otherwise); the fp32 values are
        rounded to nearest even.
    backend : {"auto", "triton", "torch"}
        As the quantizers: the Triton kernel for CUDA tensors under ``"auto"``.

    Returns
    -------
    Tensor
        ``[num_tokens, hidden]`` in ``dtype``, on ``packed``'s device. NaN scales (and an invalid CUDA
        global scale) give NaN blocks; the kernel and the reference agree bit for bit, NaN payloads aside.

    Raises
    ------
    TypeError, ValueError
        Wrong dtypes or shapes; tensors on different devices; invalid global scale (as in ``quantize_nvfp4``);
        ``scales`` or the global scale requires grad while grad mode is on.
    """
    name = "dequantize_nvfp4"
    m, k = _check_nvfp4_scales(packed, scales, swizzled, name)
    _check_deq_dtype(dtype, name)
    common_device(name, packed=packed, scales=scales)
    if not _check_backend(backend, packed, name):
        return dequantize_nvfp4_ref(packed, scales, global_scale, swizzled=swizzled, dtype=dtype)
    gs = _global_scale_tensor(global_scale, name, packed=packed)
    if packed.shape[1] > 1 and packed.stride(1) != 1:
        packed = packed.contiguous()
    scales = scales.view(torch.uint8)
    if (swizzled and not scales.is_contiguous()) or (scales.shape[1] > 1 and scales.stride(1) != 1):
        scales = scales.contiguous()
    from moecomm.quant import _kernels_nvfp4

    return _kernels_nvfp4.dequantize_nvfp4(packed, scales, gs, dtype, swizzled=swizzled)
