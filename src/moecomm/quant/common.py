"""What every format of :mod:`moecomm.quant` shares: constants, :class:`QuantFormat`, argument checks and the
element codecs of the torch references (private helpers have a leading underscore).

Sources of the constants: e2m1 and e4m3 from the OCP 8-bit floating point specification (OFP8) and
the OCP Microscaling Formats (MX) v1.0 specification; the NVFP4 block of 16 from NVIDIA ModelOpt /
TensorRT-LLM; the FP8 group of 128 from DeepSeek-V3 (DeepEP, DeepGEMM); symmetric int8 with an absmax / 127
scale per group as in the quantized all-reduces (vLLM's QuickReduce), here with the FP8 group of 128.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from moecomm._device import common_device
from moecomm._enum import ChoiceEnum
from moecomm._modes import refuse_grad

__all__ = [
    "E2M1_MAX",
    "E4M3_MAX",
    "NVFP4_BLOCK",
    "MXFP4_BLOCK",
    "FP8_GROUP",
    "FP8_EPS",
    "INT8_MAX",
    "INT8_GROUP",
    "INT8_EPS",
    "QuantFormat",
    "round_up",
]

E2M1_MAX = 6.0  # largest e2m1 (FP4) magnitude
E4M3_MAX = 448.0  # largest finite float8_e4m3fn magnitude
NVFP4_BLOCK = 16  # elements per NVFP4 e4m3 block scale
MXFP4_BLOCK = 32  # elements per MXFP4 e8m0 block scale (OCP MX v1.0)
FP8_GROUP = 128  # elements per FP8 group scale (DeepSeek-V3 / DeepEP)
FP8_EPS = 1e-10  # floor on an FP8 group's amax, so all-zero groups get a finite, non-zero scale
INT8_MAX = 127.0  # largest int8 code magnitude used (symmetric: -128 is never written)
INT8_GROUP = 128  # elements per int8 group scale (the FP8 group size of DeepSeek-V3, so both combine formats match)
INT8_EPS = 1e-10  # floor on an int8 group's amax, as FP8_EPS

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude of e2m1 codes 0..7 (bit 3 = sign)
# Rounding thresholds between consecutive e2m1 magnitudes, and whether a tie rounds up: ties go to the
# code with an even mantissa bit (0, 2, 4, 6), e.g. 0.25 -> 0.0, 0.75 -> 1.0, 5.0 -> 4.0.
E2M1_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
E4M3_NAN = 0x7F  # float8_e4m3fn NaN byte (positive sign)
E8M0_NAN = 0xFF  # e8m0 NaN byte
E8M0_BIAS = 127
_FP32_MIN_NORMAL = 2.0**-126
_FP32_MAX = torch.finfo(torch.float32).max
_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Result dtypes of the dequantizers (float64 too: exact for every format, used by the oracles in the tests).
_DEQ_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_BACKENDS = ("auto", "triton", "torch")


class QuantFormat(ChoiceEnum):
    """A wire format for tokens. ``row_bytes(fmt, hidden)`` gives its bytes per row."""

    NVFP4 = "nvfp4"  # e2m1 + e4m3 scale per 16 + fp32 global scale per tensor (ModelOpt / TensorRT-LLM)
    MXFP4 = "mxfp4"  # e2m1 + e8m0 scale per 32 (OCP MX v1.0), OCP "floor" scale rounding
    FP8_TOKEN = "fp8-token"  # e4m3 + one fp32 scale per row
    FP8_GROUP = "fp8-group"  # e4m3 + one fp32 scale per 128 elements (DeepSeek-V3 / DeepEP)


def round_up(a: int, b: int) -> int:
    """``a`` rounded up to a multiple of ``b`` (both positive ints)."""
    return (a + b - 1) // b * b


# ----------------------------------------------------------------------------------------------------
# Argument checks shared by the public functions


def _check_input(x: Tensor, block: int, name: str) -> tuple[int, int]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{name}: x.dtype must be bfloat16, float16 or float32, got {x.dtype}")
    refuse_grad(name, x=x)
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be 2-D [num_tokens, hidden], got shape {tuple(x.shape)}")
    m, k = x.shape
    if k == 0 or k % block:
        raise ValueError(f"{name}: hidden = {k} must be a positive multiple of the block size {block}")
    return m, k


def _check_deq_dtype(dtype, name: str) -> None:
    """A dequantizer's result dtype must be floating point (no silent truncation to integers or bool)."""
    if dtype not in _DEQ_DTYPES:
        raise TypeError(f"{name}: dtype must be float32, float16, bfloat16 or float64, got {dtype!r}")


def _check_backend(backend: str, x: Tensor, name: str) -> bool:
    """True when the Triton kernel should run."""
    if backend not in _BACKENDS:
        raise ValueError(f"{name}: backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "auto":
        return x.is_cuda
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{name}: backend='triton' on a {x.device} tensor needs TRITON_INTERPRET=1")
    return True


def _check_out(out, expected: list[tuple[tuple[int, ...], torch.dtype]], x: Tensor, name: str):
    """Validate caller-provided outputs: exact shape and dtype, ``x``'s device (``ValueError`` naming each
    device otherwise), none that requires grad in grad mode; unit stride along the last dim, no overlapping
    rows."""
    if out is None:
        return None
    if not isinstance(out, (tuple, list)) or len(out) != len(expected):
        raise TypeError(f"{name}: out must be a tuple of {len(expected)} tensors, got {type(out).__name__}")
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: out[{i}] must be a torch.Tensor, got {type(t).__name__}")
    common_device(name, x=x, **{f"out[{i}]": t for i, t in enumerate(out)})
    refuse_grad(name, **{f"out[{i}]": t for i, t in enumerate(out)})
    for i, (t, (shape, dtype)) in enumerate(zip(out, expected)):
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise ValueError(f"{name}: out[{i}] must be {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
        if t.dim() == 2 and t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"{name}: out[{i}] must have unit stride along dim 1, got strides {t.stride()}")
        if t.dim() == 2 and t.shape[0] > 1 and t.stride(0) < t.shape[1]:
            raise ValueError(f"{name}: out[{i}] has overlapping rows (strides {t.stride()}, shape {list(t.shape)})")
    for i in range(len(out)):
        for j in range(i + 1, len(out)):
            if _rows_overlap(out[i], out[j]):
                raise ValueError(
                    f"{name}: out[{i}] and out[{j}] overlap in memory (data_ptr {out[i].data_ptr():#x} strides "
                    f"{out[i].stride()} and data_ptr {out[j].data_ptr():#x} strides {out[j].stride()})"
                )
    return tuple(out)


def _row_span(t: Tensor) -> tuple[int, int, int, int]:
    """(first byte address, row stride in bytes, row length in bytes, rows) of a 2-D tensor with unit stride
    along dim 1 and non-overlapping rows (as ``_check_out`` ensures)."""
    es = t.element_size()
    rows, row_len = t.shape[0], t.shape[1] * es
    stride = t.stride(0) * es if rows > 1 else row_len
    return t.data_ptr(), stride, row_len, rows


def _rows_overlap(a: Tensor, b: Tensor) -> bool:
    """Whether two 2-D row-strided tensors (unit stride along dim 1) share a byte. Exact, host-side only
    (addresses and strides, no device access): O(1) when the row strides are equal (views into one send
    buffer), else O(rows) integer math on the CPU."""
    if a.dim() != 2 or b.dim() != 2 or a.numel() == 0 or b.numel() == 0:
        return False
    pa, sa, la, ma = _row_span(a)
    pb, sb, lb, mb = _row_span(b)
    if pa + (ma - 1) * sa + la <= pb or pb + (mb - 1) * sb + lb <= pa:
        return False  # disjoint address ranges
    if sa == sb:
        # Row i of a is [pa + i*s, +la), row j of b is [pb + j*s, +lb): they meet iff -lb < d + k*s < la for
        # some k = j - i in [-(ma-1), mb-1], d = pb - pa. d + k*s grows with k: try the largest k below la.
        d = pb - pa
        k = min((la - 1 - d) // sa, mb - 1)
        return k >= -(ma - 1) and d + k * sa > -lb
    # Different row strides: for every row of a, the first row of b that ends after it starts.
    starts = pa + torch.arange(ma, dtype=torch.int64) * sa
    first = torch.div(starts - lb - pb, sb, rounding_mode="floor") + 1
    first = first.clamp(min=0)
    return bool(((first < mb) & (pb + first * sb < starts + la)).any())


def _global_scale_tensor(global_scale, name: str, **anchor: Tensor) -> Tensor:
    """The global scale as a one-element fp32 tensor on the device of the one ``anchor`` tensor (``x=x``).

    Python numbers and CPU tensors are checked here (finite, > 0) without a device sync, and moved to
    that device. A CUDA tensor must already be there (``ValueError`` from ``common_device``) and is not
    inspected on the host; the kernels poison every scale to NaN on the device instead when it is not finite and positive,
    so a bad value is never silently used (and CUDA graphs stay capturable).
    """
    if isinstance(global_scale, bool):
        raise TypeError(f"{name}: global_scale must be a number or tensor, got bool")
    if isinstance(global_scale, (int, float)):
        gs = torch.tensor([float(global_scale)], dtype=torch.float32)
    elif isinstance(global_scale, torch.Tensor):
        if global_scale.numel() != 1:
            raise ValueError(f"{name}: global_scale must have one element, got shape {tuple(global_scale.shape)}")
        if not (global_scale.dtype.is_floating_point or global_scale.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name}: global_scale.dtype must be floating point, got {global_scale.dtype}")
        refuse_grad(name, global_scale=global_scale)
        if global_scale.is_cuda:
            common_device(name, global_scale=global_scale, **anchor)
        gs = global_scale.detach().reshape(1).to(torch.float32)
    else:
        raise TypeError(f"{name}: global_scale must be a float or a tensor, got {type(global_scale).__name__}")
    if gs.device.type == "cpu":
        v = gs.item()
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name}: global_scale must be a finite positive fp32 value, got {v} (as fp32)")
    return gs.to(next(iter(anchor.values())).device)


def _poison_invalid(gs: Tensor) -> Tensor:
    """``gs`` where it is finite and > 0, else NaN (device-side check, no sync)."""
    return torch.where((gs > 0) & (gs < float("inf")), gs, torch.full_like(gs, float("nan")))


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} {list(t.shape)}"
    return type(t).__name__


# ----------------------------------------------------------------------------------------------------
# Element codecs used by the references (plain torch, float math; the kernels use integer bit ops)


def _e2m1_codes(mag: Tensor) -> Tensor:
    """e2m1 magnitude codes (0..7, uint8) of ``mag >= 0``: round to nearest, ties to even, saturate at 6."""
    codes = torch.zeros(mag.shape, dtype=torch.uint8, device=mag.device)
    for threshold, tie_up in E2M1_THRESHOLDS:
        codes += (mag >= threshold if tie_up else mag > threshold).to(torch.uint8)
    return codes


def _pack_nibbles(codes: Tensor) -> Tensor:
    """``uint8 [M, K]`` codes (0..15) -> ``uint8 [M, K/2]``, element 2i in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def _unpack_e2m1(packed: Tensor) -> Tensor:
    """``uint8 [M, K/2]`` -> float32 ``[M, K]`` e2m1 values (sign from bit 3)."""
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)
    lut = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=packed.device)
    return lut[codes.long()]


def _e4m3_bytes(v: Tensor) -> Tensor:
    """fp32 -> float8_e4m3fn with round-to-nearest-even and saturation to +-448 (NaN stays NaN)."""
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
