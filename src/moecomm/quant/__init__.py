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

* **int8** with an fp32 scale per group of 128 (``int8``), the int8 combine's format::

      scale = max(amax(group), INT8_EPS) / 127
      q     = clamp(round_half_even(x / scale), -127, 127)

Partial sums travel to a quantized reducescatterv in int8 or FP8 groups (``reduce``: :class:`ReduceFormat`,
:func:`quantize_partials`, and :func:`dequantize_sum`, which dequantizes the pieces of every rank and sums
them in float32 in a fixed order).

Special values (see docs/formats.md): +-Inf saturates (largest code, e.g. NVFP4 scale 448 and
elements +-6). NaN propagates per block: a block (group) containing a NaN gets a NaN scale (e4m3
0x7F, e8m0 0xFF, fp32 NaN) and all-zero element codes, so it dequantizes to NaN and no other block is
affected. All-zero blocks give scale 0 (e8m0: 0x00) and zero codes. Blocks whose scale underflows
dequantize to (signed) zero, never NaN. NVFP4 treats fp32 subnormal inputs (``|x| < 2**-126``) as zero,
so its bytes do not depend on the hardware's flush-to-zero mode.

Each quantizer, and the NVFP4 and FP8 dequantizers, has a torch reference ``*_ref`` beside it (the oracle)
and a Triton kernel in the private ``_kernels_<format>`` module beside it; both produce the same bytes on CPU (Triton
interpreter) and GPU, because the kernels convert with integer operations and IEEE-rounded fp32 ops
only (docs/formats.md, "Kernels vs references").

``backend``: ``"auto"`` (Triton kernel for CUDA inputs, torch reference on CPU), ``"triton"`` (force
the kernel; on CPU needs ``TRITON_INTERPRET=1``) or ``"torch"`` (force the reference).

Modules: ``common`` (constants, :class:`QuantFormat`), ``nvfp4``, ``mxfp4``, ``fp8``, ``int8`` (one format each,
with its reference), ``reduce`` (the wire formats of partial sums and their dequantize-and-sum), ``swizzle``
(the 128x4 scale layout), ``tensor`` (:class:`QuantizedTensor`, :func:`quantize`,
:func:`row_bytes`). Everything public is re-exported here.
"""

from moecomm.quant.common import (
    E2M1_MAX,
    E4M3_MAX,
    FP8_EPS,
    FP8_GROUP,
    INT8_GROUP,
    MXFP4_BLOCK,
    NVFP4_BLOCK,
    QuantFormat,
)
from moecomm.quant.fp8 import (
    dequantize_fp8,
    dequantize_fp8_ref,
    quantize_fp8,
    quantize_fp8_ref,
)
from moecomm.quant.int8 import dequantize_int8, dequantize_int8_ref, quantize_int8, quantize_int8_ref
from moecomm.quant.mxfp4 import dequantize_mxfp4, quantize_mxfp4, quantize_mxfp4_ref
from moecomm.quant.reduce import (
    ReduceFormat,
    dequantize_sum,
    dequantize_sum_ref,
    quantize_partials,
    reduce_row_bytes,
)
from moecomm.quant.nvfp4 import (
    dequantize_nvfp4,
    dequantize_nvfp4_ref,
    nvfp4_global_scale,
    quantize_nvfp4,
    quantize_nvfp4_ref,
)
from moecomm.quant.swizzle import swizzle_block_scales, unswizzle_block_scales
from moecomm.quant.tensor import QuantizedTensor, quantize, row_bytes

__all__ = [
    "E2M1_MAX",
    "E4M3_MAX",
    "NVFP4_BLOCK",
    "MXFP4_BLOCK",
    "FP8_GROUP",
    "FP8_EPS",
    "INT8_GROUP",
    "QuantFormat",
    "ReduceFormat",
    "QuantizedTensor",
    "nvfp4_global_scale",
    "quantize_nvfp4",
    "dequantize_nvfp4",
    "quantize_mxfp4",
    "dequantize_mxfp4",
    "quantize_fp8",
    "dequantize_fp8",
    "quantize_int8",
    "dequantize_int8",
    "quantize_partials",
    "dequantize_sum",
    "reduce_row_bytes",
    "quantize",
    "row_bytes",
    "swizzle_block_scales",
    "unswizzle_block_scales",
    "quantize_nvfp4_ref",
    "dequantize_nvfp4_ref",
    "dequantize_fp8_ref",
    "quantize_mxfp4_ref",
    "quantize_fp8_ref",
    "quantize_int8_ref",
    "dequantize_int8_ref",
    "dequantize_sum_ref",
]
