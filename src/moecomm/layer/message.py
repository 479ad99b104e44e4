"""The packed message row of one token on the dispatch wire: ``payload | block scales | topk_ids |
topk_weights | pad`` (:func:`message_layout`).

Every ``agrs*`` strategy sends each rank's rows as ONE message, a ``uint8 [rows, row_bytes]`` buffer that
the quantizer writes straight into, so a dispatch is one allgatherv of one tensor. Scales travel in the
LINEAR layout: per-rank swizzled scales cannot be concatenated (a kernel that wants them swizzles after
the gather).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from moecomm.quant import QuantFormat, QuantizedTensor, row_bytes
from moecomm.quant.common import round_up

__all__ = ["MESSAGE_ALIGN", "MessageLayout", "message_layout"]

MESSAGE_ALIGN = 16  # bytes: message rows start 16-byte aligned (vector loads, int32/fp32 views)
# dtypes of (values, block scales) as stored by moecomm.quant
_FORMAT_DTYPES = {
    QuantFormat.NVFP4: (torch.uint8, torch.float8_e4m3fn),
    QuantFormat.MXFP4: (torch.uint8, torch.uint8),
    QuantFormat.FP8_GROUP: (torch.float8_e4m3fn, torch.float32),
    QuantFormat.FP8_TOKEN: (torch.float8_e4m3fn, torch.float32),
}


@dataclass(frozen=True)
class MessageLayout:
    """Byte columns of one token's message row: ``payload | scales | topk_ids | topk_weights | pad``; the
    scales, ids and weights start at multiples of 4 bytes (gaps only where the hidden size is odd)."""

    fmt: QuantFormat | None  # None: bf16 payload, no scales
    hidden: int
    topk: int
    payload: slice  # quantized values (bf16 values for fmt None)
    scales: slice  # block scales, linear layout (empty for fmt None)
    ids: slice  # int32 [topk]
    weights: slice  # float32 [topk]
    row_bytes: int  # padded to MESSAGE_ALIGN

    def views(self, buf: torch.Tensor) -> tuple[torch.Tensor | QuantizedTensor, torch.Tensor, torch.Tensor]:
        """Split a ``uint8 [rows, row_bytes]`` buffer into (tokens, topk_ids, topk_weights) row-strided views:
        tokens bf16 ``[rows, hidden]`` for fmt None, else a QuantizedTensor without global scale."""
        ids = buf[:, self.ids].view(torch.int32)
        weights = buf[:, self.weights].view(torch.float32)
        if self.fmt is None:
            return buf[:, self.payload].view(torch.bfloat16), ids, weights
        data_dtype, scale_dtype = _FORMAT_DTYPES[self.fmt]
        data = buf[:, self.payload].view(data_dtype)
        scales = buf[:, self.scales].view(scale_dtype)
        return QuantizedTensor._trusted(self.fmt, data, scales, None), ids, weights


@functools.lru_cache(maxsize=256)
def message_layout(fmt: QuantFormat | None, hidden: int, topk: int) -> MessageLayout:
    """The packed message row of one token for ``fmt`` (None: bf16 tokens), see :class:`MessageLayout`.

    Hidden 7168, top-8: bf16 14336 + 32 + 32 = 14400 B; NVFP4 3584 + 448 + 32 + 32 = 4096 B; FP8 per-128
    7168 + 224 + 64 = 7456 B. Raises ``ValueError`` when ``hidden`` is not divisible by the format's block.
    """
    if fmt is None:
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0:
            raise ValueError(f"hidden = {hidden!r} must be a positive int")
        payload, scales = 2 * hidden, 0
    else:
        payload, scales = row_bytes(fmt, hidden)
    # fp32 scales, int32 ids and fp32 weights start on 4-byte columns (gaps only for odd hidden sizes)
    a = round_up(payload, 4)
    b = round_up(a + scales, 4)
    c, d = b + 4 * topk, b + 8 * topk
    return MessageLayout(fmt, hidden, topk, slice(0, payload), slice(a, a + scales), slice(b, c), slice(c, d),
                         round_up(d, MESSAGE_ALIGN))
