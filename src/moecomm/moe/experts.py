"""MoE experts under expert parallelism: expert compute on all dispatched tokens, and its float32 reference.

After the dispatch every rank holds the tokens of all DP ranks ``[T, H]`` (bf16, or NVFP4 / FP8
quantized by :mod:`moecomm.quant`) and runs only its own experts on them. For token ``t``::

    out[t] = sum over j with e = topk_ids[t, j] local to this rank of
             topk_weights[t, j] * (w2[e] @ act(w13[e] @ x[t] + b13[e]) + b2[e])

    act = silu(gate) * up   with w13[e] = [gate; up]  ([2I, H])   Activation.SILU (Mixtral, DeepSeek)
    act = gelu_erf(h)       with w13[e] = w1          ([I, H])    Activation.GELU (BERT FFN)

Experts of other ranks contribute nothing; the combine (reducescatterv) sums the partial outputs. The
semantics are vLLM's / SGLang's ``fused_moe`` (w13 = [w1 (gate); w3 (up)], weights applied to the expert
outputs). Biases are optional and per expert; ``b2`` is scaled by the routing weight like the rest of the
expert's output (HF's expert modules and vLLM's biased fused_moe do the same). To split a dense FFN
``W2 gelu(W1 x + b1) + b2`` into E experts of I/E neurons each and reproduce it exactly with all experts
at weight 1: slice ``b1`` into ``b13``, pass ``b2=None`` and add the dense ``b2`` once to the combined
output -- or give the dense ``b2`` to expert 0 alone (``make_expert_weights`` says more).

Backends of :func:`experts_forward`:

* ``"grouped"``: sort the (token, expert) pairs by local expert, dequantize and permute the token rows
  (a Triton kernel on CUDA), ``torch._grouped_mm`` in bf16 for both GEMMs (weights stored in FP8 / NVFP4
  are dequantized to bf16 first), SiLU-and-mul / GELU (Triton on CUDA), and a weighted un-permute that
  sums each token's k rows in float32 (Triton on CUDA; no atomics, so deterministic).
* ``"fp8"``: FP8_TOKEN tokens with FP8_CHANNEL weights through ``torch._scaled_grouped_mm`` (rowwise
  scales), the intermediate activation re-quantized per token to FP8 (vLLM's w8a8 fused_moe does the
  same). Native on Hopper; on a CPU the scaled GEMM is emulated in float32 (for tests).
* ``"reference"``: :func:`experts_forward_ref` cast to bf16.
* ``"auto"``: ``"fp8"`` on CUDA (sm90+) for FP8_TOKEN tokens with FP8_CHANNEL weights, else ``"grouped"``
  (also on a CPU, where ``torch._grouped_mm`` runs too).

Each step is its own function (routing sort, permute, GEMM, activation, un-permute), so that a fused
Triton MoE kernel can replace any of them later. docs/experts.md says which formats run natively on
Hopper.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from moecomm import errors, quant
from moecomm._device import common_device
from moecomm._modes import refuse_grad
from moecomm.moe import _kernels
from moecomm.moe.routing import normalize_topk
from moecomm.moe.weights import Activation, ExpertWeights, WeightFormat
from moecomm.quant import QuantFormat, QuantizedTensor

__all__ = ["experts_forward", "experts_forward_ref"]

BACKENDS = ("auto", "grouped", "fp8", "reference")


def _device(tokens: torch.Tensor | QuantizedTensor) -> torch.device:
    return tokens.data.device if isinstance(tokens, QuantizedTensor) else tokens.device


def _check_devices(name: str, tokens, topk_ids, topk_weights, weights: ExpertWeights) -> None:
    """Raise ``ValueError`` naming each tensor's device unless the tokens (data, scales and global scale of
    a QuantizedTensor), the routing and the expert weights share one: the kernels run there. The
    ``global_scale`` argument may be a CPU tensor or a number; ``quant.quantize`` moves it. Also
    ``ValueError`` for one of them that requires grad in grad mode (``moecomm._modes``)."""
    if isinstance(tokens, QuantizedTensor):
        parts = {"tokens.data": tokens.data, "tokens.scales": tokens.scales, "tokens.global_scale": tokens.global_scale}
    else:
        parts = {"tokens": tokens}
    parts.update(topk_ids=topk_ids, topk_weights=topk_weights)
    parts.update({f"weights.{f.name}": getattr(weights, f.name) for f in fields(weights)})
    refuse_grad(name, **parts)
    device = _device(tokens)
    if any(isinstance(t, torch.Tensor) and t.device != device for t in parts.values()):
        common_device(name, **parts)  # raises, naming each tensor's device


def _token_hidden(tokens: torch.Tensor | QuantizedTensor) -> int:
    if isinstance(tokens, QuantizedTensor):
        packed = tokens.format in (QuantFormat.NVFP4, QuantFormat.MXFP4)
        return tokens.data.shape[1] * (2 if packed else 1)
    return tokens.shape[1]


def _prepare(
    tokens: torch.Tensor | QuantizedTensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    weights: ExpertWeights,
    input_format: QuantFormat | str | None,
    global_scale: torch.Tensor | None,
    *,
    validate: bool,
) -> tuple[torch.Tensor | QuantizedTensor, torch.Tensor, torch.Tensor]:
    """Validate (the id range too, with a sync, if ``validate``), quantize bf16 tokens when
    ``input_format`` asks, normalise the routing."""
    if isinstance(tokens, QuantizedTensor):
        if global_scale is not None:
            raise ValueError("global_scale is for quantizing bf16 tokens; a QuantizedTensor carries its own")
        if input_format is not None and QuantFormat(input_format) != tokens.format:
            raise ValueError(f"input_format={input_format} but the tokens are {tokens.format.value}")
    elif not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or not tokens.is_floating_point():
        raise TypeError("tokens must be a floating [T, H] tensor or a moecomm.quant.QuantizedTensor")
    elif input_format is not None:
        tokens = quant.quantize(tokens, QuantFormat(input_format), global_scale=global_scale)
    elif global_scale is not None:
        raise ValueError("global_scale given without input_format")
    ids, w = normalize_topk(topk_ids, topk_weights, num_experts=weights.num_experts if validate else None)
    rows = tokens.rows if isinstance(tokens, QuantizedTensor) else tokens.shape[0]
    if rows != ids.shape[0] or _token_hidden(tokens) != weights.hidden_size:
        raise ValueError(
            f"tokens have {rows} rows of {_token_hidden(tokens)} values; expected {ids.shape[0]} rows "
            f"(topk_ids) of H={weights.hidden_size}"
        )
    return tokens, ids, w


def _dequantize_tokens(tokens: torch.Tensor | QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """Token values ``[T, H]``: quantized tokens in float32 (rounded to ``dtype``), others cast."""
    if isinstance(tokens, QuantizedTensor):
        return tokens.dequantize(torch.float32).to(dtype)
    return tokens.to(dtype)


def _activation_torch(h: torch.Tensor, activation: Activation) -> torch.Tensor:
    """``[M, N13]`` float32 -> ``[M, I]`` float32."""
    if activation is Activation.SILU:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


def experts_forward_ref(
    tokens: torch.Tensor | QuantizedTensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    weights: ExpertWeights,
    *,
    input_format: QuantFormat | str | None = None,
    global_scale: torch.Tensor | None = None,
    validate: bool = False,
) -> torch.Tensor:
    """The oracle: float32 math on dequantized tokens and weights, one loop step per local expert.

    Same inputs, checks and semantics as :func:`experts_forward` (see there and the module docstring),
    masked slots (-1) and the deferred id check included; returns float32 ``[T, H]``. Quantized tokens
    are used at their float32 dequantized values.
    """
    _check_devices("experts_forward_ref", tokens, topk_ids, topk_weights, weights)
    tokens, ids, w = _prepare(tokens, topk_ids, topk_weights, weights, input_format, global_scale,
                              validate=validate)
    out = torch.zeros(ids.shape[0], weights.hidden_size, dtype=torch.float32, device=_device(tokens))
    if ids.shape[0] == 0:
        return out
    errors.record_bad_ids(ids, weights.num_experts)
    x = _dequantize_tokens(tokens, torch.float32)
    w13, w2 = weights.dequantize(torch.float32)
    for e in range(weights.num_local):
        rows, slots = (ids == weights.first_expert + e).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        h = x[rows] @ w13[e].T
        if weights.b13 is not None:
            h = h + weights.b13[e]
        y = _activation_torch(h, weights.activation) @ w2[e].T
        if weights.b2 is not None:
            y = y + weights.b2[e]
        out.index_add_(0, rows, y * w[rows, slots, None])
    return out


@dataclass(frozen=True)
class _Plan:
    """All ``R = T * k`` (token, slot) pairs sorted by local expert (stable); pairs of other ranks' experts
    sort last. Rows ``[offs[e-1], offs[e])`` belong to local expert ``e``; rows from ``offs[-1]`` on are
    padding that no step reads. Static sizes, no host sync: the step can be captured in a CUDA graph."""

    src_rows: torch.Tensor  # [R] int32: the token of each row
    row_expert: torch.Tensor  # [R] int32: the local expert of each row (num_local on padding rows)
    offs: torch.Tensor  # [E_local] int32: end of each local expert's rows (grouped GEMM offsets)
    inv: torch.Tensor  # [T, k] int32: the row of each pair, -1 when its expert is not local
    local_ids: torch.Tensor  # [T, k] int32: topk_ids - first_expert (meaningful where inv >= 0)

    @property
    def end(self) -> torch.Tensor:
        """int32 ``[1]``: the number of local pairs (rows below it are computed)."""
        return self.offs[-1:]


def _plan_torch(ids: torch.Tensor, first: int, num_local: int) -> tuple[torch.Tensor, ...]:
    num_pairs, k = ids.numel(), ids.shape[1]
    local_ids = ids - first
    local = ((local_ids >= 0) & (local_ids < num_local)).flatten()
    key = torch.where(local, local_ids.flatten(), num_local)
    sorted_key, order = torch.sort(key, stable=True)
    experts = torch.arange(1, num_local + 1, dtype=key.dtype, device=key.device)
    offs = torch.searchsorted(sorted_key, experts, out_int32=True)
    row = torch.empty_like(key)
    row[order] = torch.arange(num_pairs, dtype=key.dtype, device=key.device)
    inv = torch.where(local, row, -1).view(ids.shape)
    return (order // k).to(torch.int32), sorted_key, offs, inv


def _plan(ids: torch.Tensor, first: int, num_local: int, num_experts: int) -> _Plan:
    """Sort the pairs by local expert: a Triton counting sort on CUDA, ``torch.sort`` elsewhere (same result).
    Masked slots (-1) and ids outside ``[-1, num_experts)`` sort with other ranks' experts; the latter
    are flagged for :func:`moecomm.errors.check_errors` (no sync)."""
    if ids.is_cuda:
        src_rows, row_expert, offs, inv = _kernels.plan(ids, first, num_local, num_experts)
    else:
        errors.record_bad_ids(ids, num_experts)
        src_rows, row_expert, offs, inv = _plan_torch(ids, first, num_local)
    return _Plan(src_rows=src_rows, row_expert=row_expert, offs=offs, inv=inv, local_ids=ids - first)


def _permute_torch(tokens: torch.Tensor | QuantizedTensor, plan: _Plan) -> torch.Tensor:
    return _dequantize_tokens(tokens, torch.bfloat16)[plan.src_rows.long()]


def _permute(tokens: torch.Tensor | QuantizedTensor, plan: _Plan) -> torch.Tensor:
    """bf16 ``[R, H]``: row ``i`` = token ``src_rows[i]``, quantized tokens dequantized in float32 then
    rounded to bf16 (so they equal ``tokens.dequantize(torch.float32).to(torch.bfloat16)``)."""
    if _device(tokens).type != "cuda":
        return _permute_torch(tokens, plan)
    if _kernels.permute_supported(tokens):
        return _kernels.permute_dequant(tokens, plan.src_rows, plan.end)
    if isinstance(tokens, QuantizedTensor):  # MXFP4, swizzled NVFP4 scales: dequantize all rows first
        tokens = tokens.dequantize(torch.float32)
    return _kernels.gather_rows(tokens.to(torch.bfloat16), plan.src_rows, plan.end)


def _act_torch(h: torch.Tensor, plan: _Plan, weights: ExpertWeights) -> torch.Tensor:
    # float64: torch's CPU silu / gelu round an element differently in the vectorised body and the scalar tail
    # of a loop, so in float32 a row's bits would depend on how many rows there are (as for the GEMMs)
    h = h.double()
    if weights.b13 is not None:
        h = h + weights.b13[plan.row_expert.clamp(max=weights.num_local - 1).long()]
    return _activation_torch(h, weights.activation).to(torch.bfloat16)


def _act(h: torch.Tensor, plan: _Plan, weights: ExpertWeights) -> torch.Tensor:
    """bf16 ``[R, N13]`` (+ ``b13``) -> activation in float32 -> bf16 ``[R, I]``."""
    if h.is_cuda:
        gated = weights.activation is Activation.SILU
        return _kernels.activation(h, weights.b13, plan.row_expert, plan.end, gated=gated)
    return _act_torch(h, plan, weights)


def _unpermute_torch(y: torch.Tensor, plan: _Plan, w: torch.Tensor, b2: torch.Tensor | None, out: torch.Tensor):
    valid = plan.inv >= 0
    rows = torch.where(valid, plan.inv, y.shape[0]).long()  # non-local pairs read an appended zero row
    wv = torch.where(valid, w, 0.0)
    ypad = torch.cat([y, y.new_zeros(1, y.shape[1])])
    experts = plan.local_ids.clamp(0, None if b2 is None else b2.shape[0] - 1).long()
    acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    for j in range(w.shape[1]):
        v = ypad[rows[:, j]].float()
        if b2 is not None:
            v = v + b2[experts[:, j]]
        acc += wv[:, j, None] * v
    return out.copy_(acc)


def _unpermute(y: torch.Tensor, plan: _Plan, w: torch.Tensor, b2: torch.Tensor | None, out: torch.Tensor):
    """``out[t] = sum_j w[t, j] * (y[inv[t, j]] + b2[e])`` over local pairs, in float32, in slot order."""
    if y.is_cuda:
        return _kernels.unpermute(y, plan.inv, w, b2, plan.local_ids, out)
    return _unpermute_torch(y, plan, w, b2, out)


def _grouped_mm_cpu(a64: torch.Tensor, w64: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """float64 ``a [R, K]`` x ``w [E, N, K]`` expert by expert -> bf16 ``[R, N]``: the CPU path of the grouped
    GEMMs. float32 (or bf16) CPU GEMMs give a row other bits when the number of rows changes (another
    blocking of the sum), which the chunking and masked-slot tests would see about once in ten runs; in
    float64 that difference never reaches the bf16 result."""
    out = torch.zeros(a64.shape[0], w64.shape[1], dtype=torch.float64)
    # each row's expert from the offsets (rows past offs[-1]: none), without reading offs on the host
    row_expert = torch.searchsorted(offs, torch.arange(a64.shape[0], dtype=offs.dtype), right=True)
    for e in range(w64.shape[0]):
        rows = (row_expert == e).nonzero().squeeze(1)
        out.index_copy_(0, rows, a64.index_select(0, rows) @ w64[e].T)
    return out.to(torch.bfloat16)


def _grouped_mm(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """bf16 ``a [R, K]`` x ``w [E, N, K]``, rows of expert ``e`` in ``[offs[e-1], offs[e])`` -> bf16 ``[R, N]``:
    ``torch._grouped_mm`` on CUDA, :func:`_grouped_mm_cpu` elsewhere."""
    if a.is_cuda:
        return torch._grouped_mm(a, w.transpose(1, 2), offs=offs)
    return _grouped_mm_cpu(a.double(), w.double(), offs)


def _fp8_grouped_mm(
    a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, offs: torch.Tensor
) -> torch.Tensor:
    """e4m3 ``a [R, K]`` (fp32 scale ``[R]``) x e4m3 ``w [E, N, K]`` (fp32 scale ``[E, N]``) -> bf16 ``[R, N]``.

    ``torch._scaled_grouped_mm`` with rowwise scales on CUDA; on a CPU, :func:`_grouped_mm_cpu` on the
    dequantized operands (an emulation, for tests).
    """
    if a.is_cuda:
        return torch._scaled_grouped_mm(a, w.transpose(1, 2), a_scale, w_scale, offs=offs, out_dtype=torch.bfloat16)
    return _grouped_mm_cpu(a.double() * a_scale[:, None], w.double() * w_scale[:, :, None], offs)


def _gemms_bf16(tokens: torch.Tensor | QuantizedTensor, plan: _Plan, weights: ExpertWeights) -> torch.Tensor:
    w13, w2 = weights.dequantize(torch.bfloat16)
    h = _grouped_mm(_permute(tokens, plan), w13, plan.offs)
    return _grouped_mm(_act(h, plan, weights), w2, plan.offs)


def _gemms_fp8(tokens: QuantizedTensor, plan: _Plan, weights: ExpertWeights) -> torch.Tensor:
    if tokens.data.is_cuda:
        a = _kernels.gather_rows(tokens.data, plan.src_rows, plan.end)
    else:
        a = tokens.data.view(torch.uint8)[plan.src_rows.long()].view(tokens.data.dtype)
    a_scale = tokens.scales[:, 0][plan.src_rows.long()]
    h = _fp8_grouped_mm(a, a_scale, weights.w13, weights.w13_scale, plan.offs)
    act = _act(h, plan, weights)
    # All T * k rows: M = plan.end lives on the device (no host read); rows past it are never read
    aq, aq_scale = quant.quantize_fp8(act, group_size=None)
    return _fp8_grouped_mm(aq, aq_scale.view(-1), weights.w2, weights.w2_scale, plan.offs)


def _fp8_ok(tokens: torch.Tensor | QuantizedTensor, weights: ExpertWeights) -> bool:
    return (
        isinstance(tokens, QuantizedTensor)
        and tokens.format == QuantFormat.FP8_TOKEN
        and weights.format is WeightFormat.FP8_CHANNEL
    )


def _native_fp8(tokens: torch.Tensor | QuantizedTensor, weights: ExpertWeights) -> bool:
    """True where ``torch._scaled_grouped_mm`` runs these operands: CUDA sm90+, 16-aligned dims."""
    return (
        _fp8_ok(tokens, weights)
        and tokens.data.is_cuda
        and hasattr(torch, "_scaled_grouped_mm")
        and torch.cuda.get_device_capability(tokens.data.device) >= (9, 0)
        and weights.hidden_size % 16 == 0
        and weights.intermediate_size % 16 == 0
    )


def _pick_backend(backend: str, tokens: torch.Tensor | QuantizedTensor, weights: ExpertWeights) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
    if backend == "fp8" and not _fp8_ok(tokens, weights):
        raise ValueError("backend='fp8' needs FP8_TOKEN tokens and FP8_CHANNEL weights")
    if backend == "auto":
        return "fp8" if _native_fp8(tokens, weights) else "grouped"
    return backend


def _check_out(out: torch.Tensor | None, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=torch.bfloat16, device=device)
    if tuple(out.shape) != shape or out.dtype != torch.bfloat16 or out.device != device or out.stride(1) != 1:
        raise ValueError(
            f"out must be bf16 {shape} on {device} with unit column stride, got {out.dtype} "
            f"{tuple(out.shape)} strides {out.stride()} on {out.device}"
        )
    return out


def experts_forward(
    tokens: torch.Tensor | QuantizedTensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    weights: ExpertWeights,
    *,
    input_format: QuantFormat | str | None = None,
    global_scale: torch.Tensor | None = None,
    backend: str = "auto",
    out: torch.Tensor | None = None,
    validate: bool = False,
) -> torch.Tensor:
    """This rank's experts on all tokens: the partial MoE output (formula in the module docstring).

    Parameters
    ----------
    tokens : Tensor ``[T, H]`` (bf16; other floating dtypes are cast to bf16), or a
        :class:`moecomm.quant.QuantizedTensor` of T rows (NVFP4, MXFP4, FP8_TOKEN or FP8_GROUP; its data
        and scales may be row-strided views of a gathered byte buffer).
    topk_ids : Tensor ``[T, k]`` integer (int64 is normalised to int32), global expert ids in
        ``[0, weights.num_experts)``, or -1 for a masked slot (no expert: no GEMM row, no weight read,
        adds exactly 0 whatever its weight; vLLM's and SGLang's convention for padding and EP maps).
        Ids of other ranks' experts are skipped.
    topk_weights : Tensor ``[T, k]`` floating, used in float32.
    weights : ExpertWeights of this rank.
    input_format : QuantFormat or None. With bf16 ``tokens``: quantize them first with
        ``moecomm.quant.quantize(tokens, input_format, global_scale=global_scale)`` and run exactly the path
        of pre-quantized tokens, so ``experts_forward(quantize(x, f, gs), ...)`` is bit-identical to
        ``experts_forward(x, ..., input_format=f, global_scale=gs)``. With quantized tokens it must equal
        their format.
    global_scale : one-element fp32 Tensor, Python number or None, NVFP4 global scale for ``input_format``
        (as :func:`moecomm.quant.quantize` takes it; not allowed with a QuantizedTensor, which carries its own).
    backend : ``"auto"``, ``"grouped"``, ``"fp8"`` or ``"reference"`` (module docstring).
    out : bf16 Tensor ``[T, H]`` or None, written and returned.
    validate : bool. Check the id range on the host now (one sync) and raise ``ValueError``. By default
        ids outside ``[-1, num_experts)`` are skipped like other ranks' experts and reported later by
        :func:`moecomm.errors.check_errors` (no sync).

    Returns
    -------
    Tensor ``[T, H]`` bf16: the sum over each token's local experts; zeros for tokens without one.
    Every step is row-local, so running on a concatenation of token batches gives the concatenation
    of the results -- bit-identical where the grouped GEMM's result for a row does not depend on the
    other rows (true on the CPU and observed on an H200; docs/experts.md).

    Notes
    -----
    Intermediate buffers have ``T * k`` rows (as vLLM's fused_moe), of which the GEMMs and kernels
    compute only the ``M`` rows of local pairs, so the step has static shapes, never reads a device
    value on the host and can be captured in a CUDA graph.

    Raises
    ------
    ValueError
        On shape / dtype mismatches, tensors (tokens and their scales, routing, expert weights) on
        different devices, an unknown backend, or ``backend="fp8"`` with other formats; one of them that
        requires grad while grad mode is on (moecomm is inference-only: call it under ``torch.no_grad()``
        or ``torch.inference_mode()``); with ``validate``, ids outside ``[-1, num_experts)``.
    TypeError
        If ``tokens`` is neither a tensor nor a QuantizedTensor.
    """
    _check_devices("experts_forward", tokens, topk_ids, topk_weights, weights)
    tokens, ids, w = _prepare(tokens, topk_ids, topk_weights, weights, input_format, global_scale,
                              validate=validate)
    out = _check_out(out, (ids.shape[0], weights.hidden_size), _device(tokens))
    backend = _pick_backend(backend, tokens, weights)
    if backend == "reference":
        return out.copy_(experts_forward_ref(tokens, ids, w, weights))
    if ids.shape[0] == 0:
        return out
    plan = _plan(ids, weights.first_expert, weights.num_local, weights.num_experts)
    y = (_gemms_fp8 if backend == "fp8" else _gemms_bf16)(tokens, plan, weights)
    _unpermute(y, plan, w, weights.b2, out)
    return out
