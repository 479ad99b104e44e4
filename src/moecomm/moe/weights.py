"""Expert weights under expert parallelism: which experts a rank owns (:func:`ep_partition`) and how their
weights are stored (:class:`WeightFormat`: bf16, FP8 per output channel, FP8 128 x 128 blocks as in
DeepSeek-V3, NVFP4 with a per-expert global scale as in ModelOpt checkpoints).

``w13`` is ``[gate; up]`` for gated SiLU experts (Mixtral, DeepSeek) and ``w1`` for GELU experts (BERT's FFN),
``w2`` the down projection: the layout of vLLM's / SGLang's ``fused_moe``. Biases are optional, per expert,
stored in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from moecomm import quant
from moecomm._enum import ChoiceEnum
from moecomm._modes import refuse_grad

__all__ = [
    "Activation",
    "WeightFormat",
    "FP8_BLOCK_SIZE",
    "SIZE_MULTIPLE",
    "ep_partition",
    "ExpertWeights",
    "make_expert_weights",
]

FP8_BLOCK_SIZE = 128  # DeepSeek-V3 FP8 weight blocks: one scale per 128 x 128 block


class Activation(ChoiceEnum):
    """The expert's activation (and so the height of ``w13``)."""

    SILU = "silu"  # gated: w13 = [gate; up] of shape [2I, H], act = silu(gate) * up
    GELU = "gelu"  # non-gated: w13 = w1 of shape [I, H], act = gelu(w1 x + b1) with the exact erf GELU


class WeightFormat(ChoiceEnum):
    """How :class:`ExpertWeights` stores ``w13`` and ``w2`` (each matrix ``[E_local, N, K]``, K reduced)."""

    BF16 = "bf16"  # bf16 [E, N, K]; no scales
    FP8_CHANNEL = "fp8-channel"  # e4m3 [E, N, K]; fp32 scale [E, N], one per output channel: w = q * s
    FP8_BLOCK = "fp8-block"  # e4m3 [E, N, K]; fp32 scale [E, ceil(N/128), ceil(K/128)] (DeepSeek-V3)
    NVFP4 = "nvfp4"  # e2m1 packed uint8 [E, N, K/2]; e4m3 scale [E, N, K/16]; fp32 global scale [E]


# H and I must be multiples of these per weight format, so that every kernel that may run the experts can.
# Every format may run the bf16 grouped GEMM (torch._grouped_mm, weights dequantized to bf16), which needs
# 16-byte aligned strides: bf16 rows of a multiple of 8 elements. FP8_CHANNEL weights also feed
# torch._scaled_grouped_mm (e4m3 rows: 16 elements); NVFP4 stores blocks of 16 values.
SIZE_MULTIPLE = {WeightFormat.BF16: 8, WeightFormat.FP8_BLOCK: 8, WeightFormat.FP8_CHANNEL: 16, WeightFormat.NVFP4: 16}


def ep_partition(num_experts: int, ep_size: int, ep_rank: int) -> tuple[int, int]:
    """This rank's contiguous expert range: ``(first_expert, num_local)``, ``num_local = E / ep_size``.

    Raises
    ------
    ValueError
        If ``num_experts`` is not a positive multiple of ``ep_size`` or ``ep_rank`` is outside
        ``[0, ep_size)``.
    """
    for name, v in (("num_experts", num_experts), ("ep_size", ep_size), ("ep_rank", ep_rank)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an int, got {v!r}")
    if ep_size < 1 or not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank={ep_rank} must be in [0, ep_size={ep_size})")
    if num_experts < 1 or num_experts % ep_size:
        raise ValueError(f"num_experts={num_experts} must be a positive multiple of ep_size={ep_size}")
    num_local = num_experts // ep_size
    return ep_rank * num_local, num_local


class _QMatrix(NamedTuple):
    data: torch.Tensor  # [E, N, K] bf16 / e4m3, or [E, N, K/2] uint8 (NVFP4)
    scale: torch.Tensor | None
    global_scale: torch.Tensor | None


def _fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``[E, N, K]`` -> ``[E * nb * kb, 128 * 128]`` (one row per 128 x 128 block, zero-padded)."""
    e, n, k = w.shape
    b = FP8_BLOCK_SIZE
    nb, kb = -(-n // b), -(-k // b)
    padded = F.pad(w, (0, kb * b - k, 0, nb * b - n))
    rows = padded.view(e, nb, b, kb, b).permute(0, 1, 3, 2, 4).reshape(e * nb * kb, b * b)
    return rows, (e, nb, kb, n, k)


def _fp8_unblocks(rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`_fp8_blocks`: ``[E * nb * kb, 128 * 128]`` -> ``[E, N, K]``."""
    e, nb, kb, n, k = shape
    b = FP8_BLOCK_SIZE
    full = rows.view(e, nb, kb, b, b).permute(0, 1, 3, 2, 4).reshape(e, nb * b, kb * b)
    return full[:, :n, :k].contiguous()


def _quantize_matrix(w: torch.Tensor, fmt: WeightFormat) -> _QMatrix:
    """Quantize ``w`` ``[E, N, K]`` (each expert separately) with the quantizers of :mod:`moecomm.quant`."""
    e, n, k = w.shape
    if fmt is WeightFormat.BF16:
        w = w.to(torch.bfloat16).contiguous()
        # the grouped GEMMs read 16-byte aligned operands; .contiguous() keeps a workspace slice's offset
        return _QMatrix(w if w.data_ptr() % 16 == 0 else w.clone(), None, None)
    if fmt is WeightFormat.FP8_CHANNEL:
        q, s = quant.quantize_fp8(w.reshape(e * n, k), group_size=None)
        return _QMatrix(q.view(e, n, k), s.view(e, n), None)
    if fmt is WeightFormat.FP8_BLOCK:
        rows, shape = _fp8_blocks(w)
        q, s = quant.quantize_fp8(rows, group_size=None)
        return _QMatrix(_fp8_unblocks(q, shape), s.view(e, shape[1], shape[2]), None)
    # NVFP4: one global scale per expert (ModelOpt checkpoints: per expert and matrix)
    gs = torch.stack([quant.nvfp4_global_scale(w[i].abs().amax().float()) for i in range(e)])
    parts = [quant.quantize_nvfp4(w[i], gs[i]) for i in range(e)]
    return _QMatrix(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]), gs)


def _dequantize_matrix(m: _QMatrix, fmt: WeightFormat, dtype: torch.dtype) -> torch.Tensor:
    """``[E, N, K]`` in ``dtype`` (``m.data`` itself for bf16 weights asked in bf16)."""
    if fmt is WeightFormat.BF16:
        return m.data.to(dtype)
    if fmt is WeightFormat.FP8_CHANNEL:
        e, n, k = m.data.shape
        return quant.dequantize_fp8(m.data.view(e * n, k), m.scale.view(e * n, 1), dtype=dtype).view(e, n, k)
    if fmt is WeightFormat.FP8_BLOCK:
        rows, shape = _fp8_blocks(m.data.view(torch.uint8))  # pad as bytes: e4m3 has no F.pad
        w = quant.dequantize_fp8(rows.view(m.data.dtype), m.scale.reshape(-1, 1), dtype=dtype)
        return _fp8_unblocks(w, shape)
    return torch.stack(
        [quant.dequantize_nvfp4(m.data[i], m.scale[i], m.global_scale[i], dtype=dtype) for i in range(len(m.data))]
    )


@dataclass(frozen=True)
class ExpertWeights:
    """The experts one EP rank owns: experts ``[first_expert, first_expert + num_local)`` of ``num_experts``.

    Made by :func:`make_expert_weights`. ``N13 = 2I`` for :attr:`Activation.SILU`, ``I`` for GELU.
    Shapes below are for :attr:`WeightFormat.BF16`; :class:`WeightFormat` gives the data and scale
    shapes of the quantized formats (NVFP4 packs two values per byte along K).
    """

    w13: torch.Tensor  # [E_local, N13, H]: gate and up projections (SILU) or w1 (GELU)
    w2: torch.Tensor  # [E_local, H, I]: down projection
    w13_scale: torch.Tensor | None  # per format, see WeightFormat; None for BF16
    w2_scale: torch.Tensor | None
    w13_global_scale: torch.Tensor | None  # NVFP4 only: fp32 [E_local]
    w2_global_scale: torch.Tensor | None
    b13: torch.Tensor | None  # fp32 [E_local, N13], added before the activation
    b2: torch.Tensor | None  # fp32 [E_local, H], added to each expert's output (scaled by its weight)
    activation: Activation
    format: WeightFormat
    first_expert: int  # global id of local expert 0
    num_experts: int  # experts of the whole layer, over all EP ranks

    @property
    def num_local(self) -> int:
        return self.w13.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w2.shape[1]

    @property
    def intermediate_size(self) -> int:
        return self.w13.shape[1] // (2 if self.activation is Activation.SILU else 1)

    def _matrices(self) -> tuple[_QMatrix, _QMatrix]:
        return (
            _QMatrix(self.w13, self.w13_scale, self.w13_global_scale),
            _QMatrix(self.w2, self.w2_scale, self.w2_global_scale),
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w13 [E_local, N13, H], w2 [E_local, H, I])`` in ``dtype`` (no copy for bf16 in bf16)."""
        return tuple(_dequantize_matrix(m, self.format, dtype) for m in self._matrices())


def _check_bias(b: torch.Tensor | None, shape: tuple[int, int], name: str) -> None:
    if b is not None and not isinstance(b, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape} or None, got {type(b).__name__}")
    if b is not None and tuple(b.shape) != shape:
        raise ValueError(
            f"{name} must be per expert, shape {shape}, got {tuple(b.shape)} (a dense FFN's down-projection "
            "bias: pass b2=None and add it once after the combine, or put it in row 0 of a zero [E, H])"
        )


def make_expert_weights(
    w13: torch.Tensor,
    w2: torch.Tensor,
    *,
    ep_size: int = 1,
    ep_rank: int = 0,
    format: WeightFormat | str = WeightFormat.BF16,
    activation: Activation | str = Activation.SILU,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
) -> ExpertWeights:
    """Slice this EP rank's experts out of all experts' weights and store them in ``format``.

    Parameters
    ----------
    w13 : Tensor ``[E, N13, H]`` floating, all experts: ``[gate; up]`` (``N13 = 2I``) for SILU, ``w1``
        (``N13 = I``) for GELU.
    w2 : Tensor ``[E, H, I]`` floating, all experts' down projections.
    ep_size, ep_rank : int, the expert-parallel group; this rank keeps experts
        ``[ep_rank * E / ep_size, (ep_rank + 1) * E / ep_size)`` (:func:`ep_partition`).
    format : WeightFormat, quantized per expert with :mod:`moecomm.quant` (FP8 per output channel or per
        128 x 128 block with scale ``amax / 448``; NVFP4 with a per-expert global scale).
    activation : Activation.
    b13 : Tensor ``[E, N13]`` or None, added to ``w13 @ x`` (stored in fp32, never quantized).
    b2 : Tensor ``[E, H]`` or None, added to each expert's output and scaled with it by the routing
        weight (stored in fp32). A dense FFN ``W2 gelu(W1 x + b1) + b2`` split into E experts along I
        is reproduced exactly by all E experts at weight 1 when either ``b2=None`` and the caller adds the
        dense bias once to the combined output (exact for any routing), or ``b2 = zeros(E, H)`` with
        ``b2[0] = dense_b2`` (exact only while expert 0 is picked at weight 1, e.g. all-experts routing).

    Returns
    -------
    ExpertWeights on the weights' device.

    Raises
    ------
    ValueError
        On inconsistent shapes, ``H`` or ``I`` zero, ``E % ep_size != 0``, or ``H`` or ``I`` not a multiple of
        ``SIZE_MULTIPLE[format]`` (8 for BF16 and FP8_BLOCK, 16 for FP8_CHANNEL and NVFP4: the grouped GEMMs
        need 16-byte aligned rows); zero neurons pad ``I`` exactly (``moecomm.demo.minilm.moefy`` does);
        a weight or bias that requires grad while grad mode is on (build inference weights from
        ``nn.Parameter`` under ``torch.no_grad()``).
    TypeError
        ``w13``, ``w2`` or a bias that is not a tensor (a bias may be None).
    """
    fmt, act = WeightFormat(format), Activation(activation)
    for name, w in (("w13", w13), ("w2", w2)):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[0] != w2.shape[0] or w13.shape[2] != w2.shape[1]:
        raise ValueError(f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} must be [E, N13, H] and [E, H, I]")
    for name, w in (("w13", w13), ("w2", w2)):
        if not w.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {w.dtype}")
    refuse_grad("make_expert_weights", w13=w13, w2=w2, b13=b13, b2=b2)
    num_experts, n13, hidden = w13.shape
    inter = w2.shape[2]
    if n13 != (2 * inter if act is Activation.SILU else inter):
        raise ValueError(f"w13 has {n13} rows; {act.value} with I={inter} needs {2 * inter if act is Activation.SILU else inter}")
    if hidden == 0 or inter == 0:
        raise ValueError(f"the hidden size H and the intermediate size I must be positive, got H={hidden}, I={inter}")
    multiple = SIZE_MULTIPLE[fmt]
    if hidden % multiple or inter % multiple:
        supported = ", ".join(f"{f.value} {m}" for f, m in SIZE_MULTIPLE.items())
        raise ValueError(f"{fmt.value} experts need the hidden size H and the intermediate size I to be multiples "
                         f"of {multiple} (the grouped GEMMs need 16-byte aligned rows), got H={hidden}, I={inter}; "
                         f"multiples per weight format: {supported}")
    _check_bias(b13, (num_experts, n13), "b13")
    _check_bias(b2, (num_experts, hidden), "b2")
    first, num_local = ep_partition(num_experts, ep_size, ep_rank)
    mine = slice(first, first + num_local)
    q13, q2 = _quantize_matrix(w13[mine], fmt), _quantize_matrix(w2[mine], fmt)
    return ExpertWeights(
        w13=q13.data,
        w2=q2.data,
        w13_scale=q13.scale,
        w2_scale=q2.scale,
        w13_global_scale=q13.global_scale,
        w2_global_scale=q2.global_scale,
        b13=None if b13 is None else b13[mine].float().contiguous(),
        b2=None if b2 is None else b2[mine].float().contiguous(),
        activation=act,
        format=fmt,
        first_expert=first,
        num_experts=num_experts,
    )
