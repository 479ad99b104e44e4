"""Wire formats of partial sums (:class:`ReduceFormat`): what the quantized reducescatterv
(:mod:`moecomm.comm.quantized`) sends, and the dequantize-and-sum its owner runs.

Each rank quantizes its partial rows per (row, 128-column group); the owner of a row receives that row from
every rank (``P`` pieces), dequantizes each piece and sums them in float32 in piece (rank) order, rounding
once to the result dtype::

    out[i] = round( (...((deq(piece_0[i]) + deq(piece_1[i])) + deq(piece_2[i])) ... + deq(piece_{P-1}[i])) )
    deq(piece[i])[c] = float(code[i, c]) * scale[i, c // 128]                  (fp32 multiply, then fp32 add)

The order is fixed, so the result does not depend on the device, the transport or the chunking: the Triton
kernel (``moecomm.quant._kernels_reduce``) and the torch reference :func:`dequantize_sum_ref` give the same
bits (NaN payloads aside).

Formats (one row of ``hidden`` columns on the wire, payload then scales):

- ``bf16``: no quantization, the rows travel in their own dtype and are summed as before (the default).
- ``int8``: ``moecomm.quant.int8``, codes in [-127, 127], scale ``amax / 127``: ``hidden + 4 * hidden / 128`` bytes.
- ``fp8``: FP8 e4m3 with an fp32 scale ``amax / 448`` per group (``moecomm.quant.fp8``, group 128): the same bytes.

Non-finite partials: a (row, group) holding an Inf or a NaN on any rank is a NaN group on the wire (NaN scale,
zero codes), so the owner's sum is NaN in all 128 columns of that group of that row and finite everywhere
else. (A bf16 reducescatterv would give Inf or NaN in the one element.) Finite partials never become Inf on
the wire; the fp32 sum overflows to Inf exactly where the sum of the dequantized values exceeds the fp32
range, and rounding to bf16 overflows where the bf16 sum would.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moecomm._device import common_device
from moecomm._modes import refuse_grad
from moecomm._enum import ChoiceEnum
from moecomm.quant.common import INT8_GROUP, _check_backend, _describe
from moecomm.quant.fp8 import quantize_fp8
from moecomm.quant.int8 import quantize_int8

__all__ = ["ReduceFormat", "REDUCE_GROUP", "reduce_row_bytes", "check_reduce_hidden", "partial_views",
           "quantize_partials", "dequantize_sum", "dequantize_sum_ref"]

REDUCE_GROUP = INT8_GROUP  # columns per scale in both quantized formats: 128


class ReduceFormat(ChoiceEnum):
    """The wire format of a reducescatterv's partial sums (module docstring)."""

    BF16 = "bf16"  # no quantization: the tensor's own dtype (bf16 for the layer's partials), summed as before
    INT8 = "int8"  # int8 codes + an fp32 scale per (row, 128 columns); fp32 sum at the owner
    FP8 = "fp8"  # FP8 e4m3 codes + an fp32 scale per (row, 128 columns); fp32 sum at the owner


_CODE_DTYPES = {ReduceFormat.INT8: torch.int8, ReduceFormat.FP8: torch.float8_e4m3fn}
_SUM_DTYPES = (torch.bfloat16, torch.float32)


def check_reduce_hidden(fmt: ReduceFormat, hidden: int, name: str) -> None:
    """``ValueError`` unless a quantized ``fmt``'s rows of ``hidden`` columns split into groups of 128."""
    if fmt != ReduceFormat.BF16 and (hidden <= 0 or hidden % REDUCE_GROUP):
        raise ValueError(f"{name}: the {fmt.value} wire format quantizes per {REDUCE_GROUP} columns, so a row needs a "
                         f"positive multiple of {REDUCE_GROUP} elements, got {hidden}")


def reduce_row_bytes(fmt: ReduceFormat | str, hidden: int, element_size: int = 2) -> int:
    """Bytes one row of ``hidden`` columns puts on the wire: ``element_size * hidden`` unquantized (bf16: 2),
    ``hidden + 4 * hidden / 128`` for ``int8`` and ``fp8`` (7392 B at hidden 7168, 0.516x of bf16).
    ``ValueError`` for an unknown format or a hidden size a quantized format cannot group."""
    fmt = ReduceFormat(fmt)
    if fmt == ReduceFormat.BF16:
        return element_size * hidden
    check_reduce_hidden(fmt, hidden, "reduce_row_bytes")
    return hidden + 4 * (hidden // REDUCE_GROUP)


def partial_views(buf: Tensor, fmt: ReduceFormat, hidden: int) -> tuple[Tensor, Tensor]:
    """The codes ``[..., rows, hidden]`` and fp32 scales ``[..., rows, hidden/128]`` of a ``uint8 [..., rows,
    reduce_row_bytes(fmt, hidden)]`` buffer: each row holds its codes, then its scales (views, no copy)."""
    data = buf[..., :hidden].view(_CODE_DTYPES[fmt])
    return data, buf[..., hidden:].view(torch.float32)


def quantize_partials(x: Tensor, fmt: ReduceFormat | str, *, out: tuple[Tensor, Tensor] | None = None,
                      backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Quantize partial sums ``x`` (``[rows, hidden]`` bf16 / fp16 / fp32) to the quantized wire format ``fmt``.

    ``int8``: :func:`moecomm.quant.quantize_int8`; ``fp8``: :func:`moecomm.quant.quantize_fp8` with groups
    of 128 and ``saturate_inf=False``. Both make a group holding an Inf or a NaN a NaN group (module
    docstring). ``out``: ``(codes, scales)`` views to write into (e.g. :func:`partial_views` of a send
    buffer). Returns ``(codes [rows, hidden], scales float32 [rows, hidden/128])``; codes are int8 or
    float8_e4m3fn. Raises ``ValueError`` for ``bf16`` (nothing to quantize) and as the quantizers do.
    """
    fmt = ReduceFormat(fmt)
    if fmt == ReduceFormat.INT8:
        return quantize_int8(x, out=out, backend=backend)
    if fmt == ReduceFormat.FP8:
        return quantize_fp8(x, group_size=REDUCE_GROUP, saturate_inf=False, out=out, backend=backend)
    raise ValueError("quantize_partials: the bf16 wire format is not quantized")


def _check_pieces(data: Tensor, scales: Tensor, dtype, name: str) -> tuple[int, int, int]:
    if not isinstance(data, Tensor) or data.dtype not in _CODE_DTYPES.values() or data.dim() != 3:
        raise TypeError(f"{name}: data must be int8 or float8_e4m3fn [pieces, rows, hidden], got {_describe(data)}")
    if not isinstance(scales, Tensor) or scales.dtype != torch.float32 or scales.dim() != 3:
        raise TypeError(f"{name}: scales must be float32 [pieces, rows, hidden/{REDUCE_GROUP}], got "
                        f"{_describe(scales)}")
    refuse_grad(name, data=data, scales=scales)
    p, m, k = data.shape
    if k == 0 or k % REDUCE_GROUP or tuple(scales.shape) != (p, m, k // REDUCE_GROUP):
        raise ValueError(f"{name}: data {list(data.shape)} needs hidden a positive multiple of {REDUCE_GROUP} and "
                         f"scales [{p}, {m}, hidden/{REDUCE_GROUP}], got scales {list(scales.shape)}")
    if dtype not in _SUM_DTYPES:
        raise TypeError(f"{name}: dtype must be bfloat16 or float32, got {dtype!r}")
    return p, m, k


def dequantize_sum_ref(data: Tensor, scales: Tensor, *, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Torch reference of :func:`dequantize_sum` (the oracle for the kernel, and the CPU path); same arguments
    (no ``out``) and result."""
    p, m, k = _check_pieces(data, scales, dtype, "dequantize_sum_ref")
    if p == 0:
        return torch.zeros((m, k), dtype=dtype, device=data.device)

    def piece(i: int) -> Tensor:
        return (data[i].float().reshape(m, k // REDUCE_GROUP, REDUCE_GROUP) * scales[i].unsqueeze(-1)).reshape(m, k)

    acc = piece(0)
    for i in range(1, p):  # fixed order, one fp32 add per piece
        acc = acc + piece(i)
    return acc.to(dtype)


def dequantize_sum(data: Tensor, scales: Tensor, *, dtype: torch.dtype = torch.bfloat16, out: Tensor | None = None,
                   backend: str = "auto") -> Tensor:
    """Dequantize ``P`` pieces of quantized partial sums and sum them in float32 in piece order, rounding once.

    ``out[i, c] = round(sum_p float(data[p, i, c]) * scales[p, i, c // 128])``, the sum taken as
    ``((piece_0 + piece_1) + piece_2) + ...`` in fp32 (module docstring): deterministic, the same bits from
    the kernel and the reference (NaN payloads aside; bf16 NaN from the kernel is 0x7FC0).

    Parameters
    ----------
    data : Tensor
        ``int8`` or ``float8_e4m3fn [P, rows, hidden]``, ``hidden`` a positive multiple of 128: piece ``p``
        is rank ``p``'s quantized partial of these rows. Any piece and row strides, unit stride along hidden
        (e.g. :func:`partial_views` of a receive buffer).
    scales : Tensor
        ``float32 [P, rows, hidden/128]``, the group scales of each piece (unit stride along the last dim).
    dtype : torch.dtype
        ``torch.bfloat16`` (default) or ``torch.float32``.
    out : Tensor, optional
        ``[rows, hidden]`` of ``dtype`` with unit stride along hidden (row-strided views allowed).
    backend : {"auto", "triton", "torch"}
        ``"auto"``: the Triton kernel for CUDA tensors, the reference on the CPU.

    Returns
    -------
    Tensor
        ``out``, or a new ``[rows, hidden]`` tensor of ``dtype``; zeros when ``P == 0``.

    Raises
    ------
    TypeError, ValueError
        Wrong dtypes, shapes or strides; tensors on different devices; an unknown backend; ``data``,
        ``scales`` or ``out`` that require grad while grad mode is on (inference only).
    """
    name = "dequantize_sum"
    p, m, k = _check_pieces(data, scales, dtype, name)
    common_device(name, data=data, scales=scales, out=out)
    refuse_grad(name, out=out)
    if out is not None:
        if not isinstance(out, Tensor) or out.dtype != dtype or tuple(out.shape) != (m, k) or out.stride(1) != 1:
            raise ValueError(f"{name}: out must be {dtype} [{m}, {k}] with unit stride along dim 1, got "
                             f"{_describe(out)}")
    if data.stride(2) != 1 or scales.stride(2) != 1:
        raise ValueError(f"{name}: data and scales need unit stride along their last dim, got strides "
                         f"{data.stride()} and {scales.stride()}")
    if not _check_backend(backend, data, name) or p == 0:
        result = dequantize_sum_ref(data, scales, dtype=dtype)
        return result if out is None else out.copy_(result)
    if out is None:
        out = torch.empty((m, k), dtype=dtype, device=data.device)
    from moecomm.quant import _kernels_reduce

    _kernels_reduce.dequantize_sum(data, scales, out)
    return out
