"""A quantized tensor as one object (:class:`QuantizedTensor`), the one entry point :func:`quantize` for every
format, and the bytes a format puts in a row (:func:`row_bytes`).

:func:`quantize` is also the custom op ``moecomm::quantize`` (registered here, beside it), which it calls
under ``torch.compile``: ``moecomm::quantize(Tensor x, str fmt, Tensor? global_scale, str backend) ->
Tensor[]`` returns ``[data, scales]`` (and the computed NVFP4 global scale when none was given).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from moecomm._modes import refuse_grad
from moecomm.quant.common import (
    FP8_GROUP,
    MXFP4_BLOCK,
    NVFP4_BLOCK,
    QuantFormat,
    _check_input,
    _describe,
    _global_scale_tensor,
    round_up,
)
from moecomm.quant.fp8 import dequantize_fp8, quantize_fp8
from moecomm.quant.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from moecomm.quant.nvfp4 import dequantize_nvfp4, nvfp4_global_scale, quantize_nvfp4

__all__ = ["QuantizedTensor", "quantize", "row_bytes"]


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
            rows, cols = round_up(rows, 128), round_up(cols, 4)
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
    (:func:`quantize_op`); eager calls do not pass through it.
    """
    if torch.compiler.is_compiling():
        return quantize_op(x, fmt, global_scale=global_scale, out=out, backend=backend)
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


# ----------------------------------------------------------------------------------------------------
# The custom op moecomm::quantize (what quantize calls under torch.compile)


# (data dtype, scale dtype, elements per data element, elements per scale; None: one scale per row)
_OP_LAYOUT = {
    QuantFormat.NVFP4: (torch.uint8, torch.float8_e4m3fn, 2, NVFP4_BLOCK),
    QuantFormat.MXFP4: (torch.uint8, torch.uint8, 2, MXFP4_BLOCK),
    QuantFormat.FP8_GROUP: (torch.float8_e4m3fn, torch.float32, 1, FP8_GROUP),
    QuantFormat.FP8_TOKEN: (torch.float8_e4m3fn, torch.float32, 1, None),
}


@torch.library.custom_op("moecomm::quantize", mutates_args=())
def _quantize_op(x: Tensor, fmt: str, global_scale: Optional[Tensor], backend: str) -> list[Tensor]:
    q = quantize(x, fmt, global_scale=global_scale, backend=backend)
    return [q.data, q.scales] + ([q.global_scale] if global_scale is None and q.global_scale is not None else [])


@_quantize_op.register_fake
def _(x, fmt, global_scale, backend):
    fmt = QuantFormat(fmt)  # raises ValueError naming the formats
    if global_scale is not None and fmt is not QuantFormat.NVFP4:
        raise ValueError(f"quantize: global_scale applies to NVFP4 only, not {fmt.value}")
    if x.dim() != 2:
        raise ValueError(f"quantize: x must be 2-D [num_tokens, hidden], got shape {tuple(x.shape)}")
    data_dtype, scale_dtype, per_element, block = _OP_LAYOUT[fmt]
    m, k = x.shape
    if block is not None and k % block:
        raise ValueError(f"quantize: hidden = {k} must be a multiple of the block size {block} for {fmt.value}")
    outs = [x.new_empty((m, k // per_element), dtype=data_dtype),
            x.new_empty((m, 1 if block is None else k // block), dtype=scale_dtype)]
    if fmt is QuantFormat.NVFP4 and global_scale is None:
        outs.append(x.new_empty((), dtype=torch.float32))
    return outs


def quantize_op(x, fmt, *, global_scale=None, out=None, backend="auto") -> QuantizedTensor:
    """:func:`quantize` through the custom op ``moecomm::quantize`` (what it calls under ``torch.compile``).

    Parameters
    ----------
    x : Tensor
        ``[num_tokens, hidden]`` bf16 / fp16 / fp32.
    fmt : QuantFormat or str
    global_scale : Tensor, float or None
        NVFP4 only; a Python number becomes a constant fp32 tensor of the graph. None for NVFP4: the op
        computes ``nvfp4_global_scale(amax(|x|))`` on the device and returns it.
    out : tuple of Tensor, optional
        ``(data, scales)``: the op's results are copied into them (one copy more than eager).
    backend : {"auto", "triton", "torch"}

    Returns
    -------
    QuantizedTensor
        ``data`` and ``scales`` in the linear layout of ``fmt``; ``global_scale`` fp32 0-dim for NVFP4,
        else None.

    Raises
    ------
    ValueError
        While tracing (the fake): an unknown format, ``x`` not 2-D, ``hidden`` not a multiple of the block,
        ``global_scale`` for a format other than NVFP4; ``x`` or ``global_scale`` requiring grad while grad
        mode is on. When the op runs: as :func:`quantize`.
    """
    fmt = QuantFormat(fmt)
    refuse_grad("quantize", x=x, global_scale=global_scale)
    gs = None
    if global_scale is not None:
        gs = (global_scale.detach().reshape(()).to(device=x.device, dtype=torch.float32)
              if isinstance(global_scale, Tensor)
              else torch.tensor(float(global_scale), dtype=torch.float32, device=x.device))
    outs = torch.ops.moecomm.quantize(x, fmt.value, gs, getattr(backend, "value", backend))
    data, scales = outs[0], outs[1]
    if len(outs) == 3:
        gs = outs[2]
    if out is not None:
        out[0].copy_(data)
        out[1].copy_(scales)
        data, scales = out[0], out[1]
    return QuantizedTensor(fmt, data, scales, gs)
