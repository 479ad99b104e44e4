"""Quantized wire formats for MoE tokens: NVFP4, MXFP4 and FP8 (per token / per 128-element group).

Tokens are quantized *before* they cross the wire (allgatherv), so every format here is **row-local**:
the bytes of row ``m`` depend only on row ``m`` of the input (and, for NVFP4, on the per-tensor global
scale). Quantizing a concatenation of row blocks therefore gives exactly the concatenation of the
quantized blocks, which is what makes quantize-before-gather bit-identical to quantize-after-gather.

Formats (all blocks/groups run along the last dimension, ``hidden``):

* **NVFP4** (NVIDIA ModelOpt / TensorRT-LLM / FlashInfer convention). e2m1 elements, two per byte
  (element ``2i`` in the low nibble, ``2i+1`` in the high nibble: ``[0.5, 6.0] -> 0x71``), one e4m3
  scale per 16 elements, one fp32 global *encode* scale ``gs`` per tensor::

      gs    = 448 * 6 / amax(tensor)                      (nvfp4_global_scale; 1.0 when amax == 0)
      scale = e4m3_rne_satfinite(gs * amax(block) / 6)
      q     = e2m1_rne_sat(x * gs / float(scale))         x ~= q * float(scale) / gs

* **MXFP4** (OCP Microscaling Formats (MX) v1.0). e2m1 elements packed as above, one e8m0 scale
  (a power of two ``2**(byte - 127)``; 0xFF is NaN) per 32 elements::

      "floor" (OCP):  scale = 2**(floor(log2(amax(block))) - 2)     elements above 6 saturate
      "up"  (triton_kernels ROUND_UP, FlashInfer):  scale = 2**ceil(log2(amax(block) / 6))   no clipping
      q = e2m1_rne_sat(x / scale)

* **FP8** e4m3 (DeepSeek-V3 / DeepEP / DeepGEMM style), fp32 scales per token or per group of 128::

      scale = max(amax(group), FP8_EPS) / 448     (rounded up to a power of two when ue8m0=True)
      q     = e4m3_rne_satfinite(x / scale)       x ~= float(q) * scale

Special values (see docs/formats.md): +-Inf saturates (largest code, e.g. NVFP4 scale 448 and
elements +-6). NaN propagates per block: a block (group) containing a NaN gets a NaN scale (e4m3
0x7F, e8m0 0xFF, fp32 NaN) and all-zero element codes, so it dequantizes to NaN and no other block is
affected. All-zero blocks give scale 0 (e8m0: 0x00) and zero codes. Blocks whose scale underflows
dequantize to (signed) zero, never NaN. NVFP4 treats fp32 subnormal inputs (``|x| < 2**-126``) as zero,
so its bytes do not depend on the hardware's flush-to-zero mode.

Each quantizer, and the NVFP4 and FP8 dequantizers, has a torch reference ``*_ref`` here (the oracle)
and a Triton kernel in ``moecomm._quant_triton``; both produce the same bytes on CPU (Triton
interpreter) and GPU, because the kernels convert with integer operations and IEEE-rounded fp32 ops
only (docs/formats.md, "Kernels vs references").

``backend``: ``"auto"`` (Triton kernel for CUDA inputs, torch reference on CPU), ``"triton"`` (force
the kernel; on CPU needs ``TRITON_INTERPRET=1``) or ``"torch"`` (force the reference).
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from moecomm._device import common_device
from moecomm._enum import ChoiceEnum

__all__ = [
    "E2M1_MAX",
    "E4M3_MAX",
    "NVFP4_BLOCK",
    "MXFP4_BLOCK",
    "FP8_GROUP",
    "FP8_EPS",
    "QuantFormat",
    "QuantizedTensor",
    "nvfp4_global_scale",
    "quantize_nvfp4",
    "dequantize_nvfp4",
    "quantize_mxfp4",
    "dequantize_mxfp4",
    "quantize_fp8",
    "dequantize_fp8",
    "quantize",
    "row_bytes",
    "swizzle_block_scales",
    "unswizzle_block_scales",
    "quantize_nvfp4_ref",
    "dequantize_nvfp4_ref",
    "dequantize_fp8_ref",
    "quantize_mxfp4_ref",
    "quantize_fp8_ref",
]

E2M1_MAX = 6.0  # largest e2m1 (FP4) magnitude
E4M3_MAX = 448.0  # largest finite float8_e4m3fn magnitude
NVFP4_BLOCK = 16  # elements per NVFP4 e4m3 block scale
MXFP4_BLOCK = 32  # elements per MXFP4 e8m0 block scale (OCP MX v1.0)
FP8_GROUP = 128  # elements per FP8 group scale (DeepSeek-V3 / DeepEP)
FP8_EPS = 1e-10  # floor on an FP8 group's amax, so all-zero groups get a finite, non-zero scale

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
_MXFP4_ROUNDINGS = ("floor", "up")


class QuantFormat(ChoiceEnum):
    """A wire format for tokens. ``row_bytes(fmt, hidden)`` gives its bytes per row."""

    NVFP4 = "nvfp4"  # e2m1 + e4m3 scale per 16 + fp32 global scale per tensor (ModelOpt / TensorRT-LLM)
    MXFP4 = "mxfp4"  # e2m1 + e8m0 scale per 32 (OCP MX v1.0), OCP "floor" scale rounding
    FP8_TOKEN = "fp8-token"  # e4m3 + one fp32 scale per row
    FP8_GROUP = "fp8-group"  # e4m3 + one fp32 scale per 128 elements (DeepSeek-V3 / DeepEP)


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized ``[rows, hidden]`` tensor: what ``quantize`` returns and the dispatcher ships.

    Attributes
    ----------
    format : QuantFormat
    data : Tensor
        NVFP4 / MXFP4: ``uint8 [rows, hidden/2]`` packed e2m1 (low nibble first).
        FP8: ``float8_e4m3fn [rows, hidden]``.
    scales : Tensor
        NVFP4: ``float8_e4m3fn [rows, hidden/16]`` (or the swizzled 128x4 layout when ``swizzled``);
        MXFP4: ``uint8 [rows, hidden/32]`` e8m0; FP8_TOKEN: ``float32 [rows, 1]``;
        FP8_GROUP: ``float32 [rows, hidden/128]``.
    global_scale : Tensor or None
        NVFP4 only: fp32 one-element encode scale (``x ~= q * scale / global_scale``).
    swizzled : bool
        NVFP4 only: ``scales`` are in the swizzled 128x4 layout of ``swizzle_block_scales``.
    """

    format: QuantFormat
    data: Tensor
    scales: Tensor
    global_scale: Tensor | None
    swizzled: bool = False

    def __post_init__(self):
        """Check that data and scales have the dtypes and shapes of ``format`` (raises ``ValueError``)."""
        fmt = QuantFormat(self.format)
        object.__setattr__(self, "format", fmt)
        d, s = self.data, self.scales
        if not (isinstance(d, Tensor) and isinstance(s, Tensor) and d.dim() == 2 and s.dim() == 2):
            raise ValueError(f"QuantizedTensor: data and scales must be 2-D tensors, got {_describe(d)}, {_describe(s)}")
        packed = fmt in (QuantFormat.NVFP4, QuantFormat.MXFP4)
        hidden = d.shape[1] * (2 if packed else 1)
        data_dtype, scale_dtype, block = {
            QuantFormat.NVFP4: (torch.uint8, torch.float8_e4m3fn, NVFP4_BLOCK),
            QuantFormat.MXFP4: (torch.uint8, torch.uint8, MXFP4_BLOCK),
            QuantFormat.FP8_TOKEN: (torch.float8_e4m3fn, torch.float32, hidden),
            QuantFormat.FP8_GROUP: (torch.float8_e4m3fn, torch.float32, None),
        }[fmt]
        rows, cols = d.shape[0], (hidden // block if block else s.shape[1])
        if self.swizzled:
            if fmt is not QuantFormat.NVFP4:
                raise ValueError(f"QuantizedTensor: only NVFP4 scales come swizzled, not {fmt.value}")
            rows, cols = _round_up(rows, 128), _round_up(cols, 4)
        ok_cols = s.shape[1] == cols and (block or (cols > 0 and hidden % cols == 0))
        if d.dtype != data_dtype or s.dtype != scale_dtype or s.shape[0] != rows or not ok_cols:
            raise ValueError(
                f"QuantizedTensor({fmt.value}): data must be {data_dtype} [rows, {'hidden/2' if packed else 'hidden'}]"
                f" and scales {scale_dtype} [{rows}, {cols if block else 'hidden/group'}]; got {_describe(d)} and "
                f"{_describe(s)}"
            )

    @classmethod
    def _trusted(cls, format: QuantFormat, data: Tensor, scales: Tensor, global_scale: Tensor | None) -> "QuantizedTensor":
        """An instance without the checks of ``__post_init__``, for views of buffers moecomm laid out itself
        (the dispatch message): the checks cost more host time than the rest of a decode-sized dispatch."""
        obj = object.__new__(cls)
        for name, value in (("format", format), ("data", data), ("scales", scales), ("global_scale", global_scale),
                            ("swizzled", False)):
            object.__setattr__(obj, name, value)
        return obj

    @property
    def rows(self) -> int:
        """Number of rows (tokens)."""
        return self.data.shape[0]

    def dequantize(self, dtype: torch.dtype = torch.float32, backend: str = "auto") -> Tensor:
        """The ``[rows, hidden]`` tensor these bytes represent, in ``dtype`` (``backend`` for NVFP4 / FP8)."""
        fmt = QuantFormat(self.format)
        if fmt is QuantFormat.NVFP4:
            return dequantize_nvfp4(
                self.data, self.scales, self.global_scale, swizzled=self.swizzled, dtype=dtype, backend=backend
            )
        if fmt is QuantFormat.MXFP4:
            return dequantize_mxfp4(self.data, self.scales, dtype=dtype)
        return dequantize_fp8(self.data, self.scales, dtype=dtype, backend=backend)


# ----------------------------------------------------------------------------------------------------
# Argument checks shared by the public functions.


def _check_input(x: Tensor, block: int, name: str) -> tuple[int, int]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{name}: x.dtype must be bfloat16, float16 or float32, got {x.dtype}")
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
    device otherwise); unit stride along the last dim, no overlapping rows."""
    if out is None:
        return None
    if not isinstance(out, (tuple, list)) or len(out) != len(expected):
        raise TypeError(f"{name}: out must be a tuple of {len(expected)} tensors, got {type(out).__name__}")
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: out[{i}] must be a torch.Tensor, got {type(t).__name__}")
    common_device(name, x=x, **{f"out[{i}]": t for i, t in enumerate(out)})
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


def _round_up(a: int, b: int) -> int:
    return (a + b - 1) // b * b


# ----------------------------------------------------------------------------------------------------
# Element codecs used by the references (plain torch, float math; the kernels use integer bit ops).


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


# ----------------------------------------------------------------------------------------------------
# NVFP4


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
        A Python number or CPU tensor that is negative, NaN or infinite; more than one element.
    TypeError
        Neither a real number (bool and str are not) nor a real tensor.
    """
    if isinstance(amax, torch.Tensor):
        if amax.numel() != 1:
            raise ValueError(f"nvfp4_global_scale: amax must have one element, got shape {tuple(amax.shape)}")
        if amax.dtype == torch.bool or amax.is_complex():
            raise TypeError(f"nvfp4_global_scale: amax must be a real number, got a {amax.dtype} tensor")
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
    m, k = packed.shape[0], packed.shape[1] * 2
    if k % NVFP4_BLOCK:
        raise ValueError(f"{name}: hidden = {k} must be a multiple of {NVFP4_BLOCK}")
    kb = k // NVFP4_BLOCK
    shape = (_round_up(m, 128), _round_up(kb, 4)) if swizzled else (m, kb)
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
        ``[num_tokens, hidden]``, bfloat16 / float16 / float32, any strides; ``hidden % 16 == 0``.
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
        ``x`` not 2-D, ``hidden`` not a multiple of 16, bad global scale, bad ``out`` shape/dtype/strides.
    """
    name = "quantize_nvfp4"
    m, k = _check_input(x, NVFP4_BLOCK, name)
    use_triton = _check_backend(backend, x, name)
    kb = k // NVFP4_BLOCK
    sshape = (_round_up(m, 128), _round_up(kb, 4)) if swizzled else (m, kb)
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
    from moecomm import _quant_triton

    _quant_triton.quantize_nvfp4(x, gs, packed, scales.view(torch.uint8), swizzled=swizzled)
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
        ``uint8 [num_tokens, hidden/2]`` from ``quantize_nvfp4`` (row-strided views allowed).
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
        Wrong dtypes or shapes; tensors on different devices; invalid global scale (as in ``quantize_nvfp4``).
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
    from moecomm import _quant_triton

    return _quant_triton.dequantize_nvfp4(packed, scales, gs, dtype, swizzled=swizzled)


# ----------------------------------------------------------------------------------------------------
# Swizzled 128x4 scale layout (CUTLASS / FlashInfer block-scaled GEMMs)


def swizzle_block_scales(scales: Tensor) -> Tensor:
    """Linear block scales ``[M, Kb]`` -> swizzled 128x4 layout ``[round_up(M,128), round_up(Kb,4)]``.

    Linear entry ``(m, k)`` lands at flat offset
    ``(m//128)*(nKT*512) + (k//4)*512 + (m%32)*16 + ((m%128)//32)*4 + (k%4)`` with
    ``nKT = round_up(Kb,4)/4``; padding bytes are 0. Any 1-byte dtype (e4m3, e8m0 as uint8), any M.
    """
    if not isinstance(scales, torch.Tensor) or scales.dim() != 2 or scales.element_size() != 1:
        raise ValueError(f"swizzle_block_scales: scales must be a 2-D 1-byte tensor, got {_describe(scales)}")
    m, kb = scales.shape
    mp, kp = _round_up(m, 128), _round_up(kb, 4)
    padded = torch.zeros((mp, kp), dtype=torch.uint8, device=scales.device)
    padded[:m, :kb] = scales.view(torch.uint8)
    # (m//128, (m%128)//32, m%32, k//4, k%4) -> (m//128, k//4, m%32, (m%128)//32, k%4)
    tiles = padded.reshape(mp // 128, 4, 32, kp // 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(mp, kp).view(scales.dtype)


def unswizzle_block_scales(swizzled: Tensor, rows: int, cols: int) -> Tensor:
    """Inverse of ``swizzle_block_scales``: swizzled ``[round_up(rows,128), round_up(cols,4)]`` -> ``[rows, cols]``."""
    for name, v in (("rows", rows), ("cols", cols)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"unswizzle_block_scales: {name} must be an int >= 0, got {v!r}")
    mp, kp = _round_up(rows, 128), _round_up(cols, 4)
    if not isinstance(swizzled, torch.Tensor) or swizzled.element_size() != 1 or swizzled.numel() != mp * kp:
        raise ValueError(
            f"unswizzle_block_scales: expected a 1-byte tensor of {mp}x{kp} elements for rows={rows}, "
            f"cols={cols}, got {_describe(swizzled)}"
        )
    tiles = swizzled.contiguous().view(torch.uint8).reshape(mp // 128, kp // 4, 32, 4, 4).permute(0, 3, 2, 1, 4)
    return tiles.reshape(mp, kp)[:rows, :cols].contiguous().view(swizzled.dtype)


# ----------------------------------------------------------------------------------------------------
# MXFP4


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
        ``[num_tokens, hidden]``, bfloat16 / float16 / float32, any strides; ``hidden % 32 == 0``.
    scale_rounding : {"floor", "up"}
        ``"floor"``: the OCP rule ``scale = 2**(floor(log2(amax)) - 2)``; elements up to 8*scale occur and
        saturate to 6*scale. ``"up"``: ``scale = 2**ceil(log2(amax / 6))`` (triton_kernels'
        ``DequantScaleRoundingMode.ROUND_UP`` and FlashInfer), never clips but may waste a binade.
    out : tuple of Tensor, optional
        ``(packed, scales)`` to write into; row-strided views allowed (unit stride along dim 1).
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
    from moecomm import _quant_triton

    _quant_triton.quantize_mxfp4(x, out[0], out[1], round_up=scale_rounding == "up")
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


# ----------------------------------------------------------------------------------------------------
# FP8 e4m3, per token or per group


def _fp8_group(group_size: int | None, k: int, name: str) -> int:
    if group_size is None:
        return k
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"{name}: group_size must be a positive int or None, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"{name}: hidden = {k} must be a multiple of group_size {group_size}")
    return group_size


def _ceil_pow2(s: Tensor) -> Tensor:
    """Smallest power of two >= s (for positive normal fp32 ``s``; NaN stays NaN)."""
    mant, exp = torch.frexp(s)  # s = mant * 2**exp, mant in [0.5, 1)
    return torch.ldexp(torch.ones_like(s), exp - (mant == 0.5).to(exp.dtype))


def quantize_fp8_ref(x: Tensor, *, group_size: int | None = FP8_GROUP, ue8m0: bool = False) -> tuple[Tensor, Tensor]:
    """Torch reference of ``quantize_fp8`` (the oracle for the kernel); same arguments and results."""
    m, k = _check_input(x, 1, "quantize_fp8_ref")
    g = _fp8_group(group_size, k, "quantize_fp8_ref")
    xf = x.float().reshape(m, k // g, g)
    amax = xf.abs().amax(dim=-1, keepdim=True)  # NaN propagates
    nan_group = torch.isnan(amax)
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
    out: tuple[Tensor, Tensor] | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Quantize to FP8 e4m3 with fp32 scales per group (DeepSeek-V3 / DeepEP) or per token. Row-local.

    ``scale = max(amax(group), FP8_EPS) / 448`` (rounded up to a power of two when ``ue8m0``),
    ``q = e4m3_rne_satfinite(x / scale)``; dequantize with ``q * scale``.

    Parameters
    ----------
    x : Tensor
        ``[num_tokens, hidden]``, bfloat16 / float16 / float32, any strides.
    group_size : int or None
        Elements per scale along ``hidden`` (default 128); ``None`` = one scale per token (row). The
        Triton backend needs a power of two >= 8 (or ``None``: any hidden).
    ue8m0 : bool
        Round each scale up to a power of two (DeepGEMM's UE8M0 scales; stored as fp32).
    out : tuple of Tensor, optional
        ``(q, scales)`` to write into; row-strided views allowed (unit stride along dim 1).
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
        As ``quantize_nvfp4``; ``group_size`` not positive or not dividing ``hidden``.
    """
    name = "quantize_fp8"
    m, k = _check_input(x, 1, name)
    g = _fp8_group(group_size, k, name)
    use_triton = _check_backend(backend, x, name)
    out = _check_out(out, [((m, k), torch.float8_e4m3fn), ((m, k // g), torch.float32)], x, name)
    if not use_triton:
        q, scales = quantize_fp8_ref(x, group_size=g, ue8m0=ue8m0)
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
    from moecomm import _quant_triton

    _quant_triton.quantize_fp8(
        x, out[0].view(torch.uint8), out[1], group_size=group_size, ue8m0=ue8m0, eps=FP8_EPS
    )
    return out


def _check_fp8_pair(q: Tensor, scales: Tensor, name: str) -> tuple[int, int, int]:
    """(rows, hidden, scale groups) of an FP8 pair; raises TypeError / ValueError for wrong dtypes or shapes."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.float8_e4m3fn or q.dim() != 2:
        raise TypeError(f"{name}: q must be a 2-D float8_e4m3fn tensor, got {_describe(q)}")
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 or scales.dim() != 2:
        raise TypeError(f"{name}: scales must be a 2-D float32 tensor, got {_describe(scales)}")
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
        ``float8_e4m3fn [num_tokens, hidden]`` (row-strided views allowed).
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
        Wrong dtypes or shapes; tensors on different devices; a shape the Triton kernel does not handle.
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
    if q.stride(1) != 1 or (q.shape[0] > 1 and q.stride(0) % 2) or q.storage_offset() % 2:
        q = q.contiguous()
    if scales.shape[1] > 1 and scales.stride(1) != 1:  # the kernel indexes scales with stride(0) and unit stride(1)
        scales = scales.contiguous()
    from moecomm import _quant_triton

    return _quant_triton.dequantize_fp8(q, scales, dtype)


# ----------------------------------------------------------------------------------------------------
# One entry point and wire sizes


def quantize(
    x: Tensor,
    fmt: QuantFormat | str,
    *,
    global_scale: Tensor | float | None = None,
    out: tuple[Tensor, Tensor] | None = None,
    backend: str = "auto",
) -> QuantizedTensor:
    """Quantize ``x [num_tokens, hidden]`` (bf16/fp16/fp32) to ``fmt``; row-local, linear scale layout.

    NVFP4 needs the per-tensor ``global_scale``; when it is None it is computed from this ``x``
    (``nvfp4_global_scale(x.abs().amax())``, on the device, no sync) - which is then *not* row-local:
    pass a scale shared by all ranks when quantizing before a gather. MXFP4 uses OCP "floor" scale
    rounding, FP8_GROUP groups of 128, FP8_TOKEN one scale per row. ``out`` is ``(data, scales)`` as in
    the format's quantizer. Raises as the format's quantizer; ``global_scale`` given for a non-NVFP4
    format raises ValueError. Under ``torch.compile`` this calls the custom op ``moecomm::quantize``
    (:mod:`moecomm.ops`); eager calls do not pass through it.
    """
    if torch.compiler.is_compiling():
        from moecomm import ops

        return ops.quantize(x, fmt, global_scale=global_scale, out=out, backend=backend)
    fmt = QuantFormat(fmt)
    if fmt is not QuantFormat.NVFP4 and global_scale is not None:
        raise ValueError(f"quantize: global_scale applies to NVFP4 only, not {fmt.value}")
    if fmt is QuantFormat.NVFP4:
        if global_scale is None:
            _check_input(x, NVFP4_BLOCK, "quantize")
            amax = x.abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
            gs = nvfp4_global_scale(amax)
        else:
            gs = _global_scale_tensor(global_scale, "quantize", x=x)
        data, scales = quantize_nvfp4(x, gs, out=out, backend=backend)
        return QuantizedTensor(fmt, data, scales, gs.reshape(()))
    if fmt is QuantFormat.MXFP4:
        data, scales = quantize_mxfp4(x, out=out, backend=backend)
    else:
        group = FP8_GROUP if fmt is QuantFormat.FP8_GROUP else None
        data, scales = quantize_fp8(x, group_size=group, out=out, backend=backend)
    return QuantizedTensor(fmt, data, scales, None)


def row_bytes(fmt: QuantFormat | str, hidden: int) -> tuple[int, int]:
    """``(payload bytes, scale bytes)`` of one row of ``hidden`` elements in ``fmt`` (linear scales).

    NVFP4 7168 -> (3584, 448); MXFP4 7168 -> (3584, 224); FP8_GROUP 7168 -> (7168, 224);
    FP8_TOKEN -> (hidden, 4). The NVFP4 global scale (4 bytes per tensor) is not counted.
    Raises ValueError when ``hidden`` is not a positive multiple of the format's block.
    """
    fmt = QuantFormat(fmt)
    block = {
        QuantFormat.NVFP4: NVFP4_BLOCK,
        QuantFormat.MXFP4: MXFP4_BLOCK,
        QuantFormat.FP8_GROUP: FP8_GROUP,
        QuantFormat.FP8_TOKEN: 1,
    }[fmt]
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0 or hidden % block:
        raise ValueError(f"row_bytes: hidden = {hidden!r} must be a positive multiple of {block} for {fmt.value}")
    if fmt is QuantFormat.NVFP4:
        return hidden // 2, hidden // NVFP4_BLOCK
    if fmt is QuantFormat.MXFP4:
        return hidden // 2, hidden // MXFP4_BLOCK
    if fmt is QuantFormat.FP8_GROUP:
        return hidden, 4 * (hidden // FP8_GROUP)
    return hidden, 4


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} {list(t.shape)}"
    return type(t).__name__
