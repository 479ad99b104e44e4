"""DP dispatch and combine for an EP MoE layer: quantize before the all-gather, reduce-scatter the result.

With attention data-parallel, rank ``r`` holds ``sizes[r]`` tokens. One MoE layer step is

    dispatch: every rank receives every rank's tokens (+ topk_ids, topk_weights)
    experts:  each rank runs its local experts on all tokens -> partial [sum(sizes), hidden]
    combine:  partials are summed over ranks and each rank keeps its own rows

Strategies (:class:`Strategy`), all kept runnable:

- ``allreduce``: the classic DP gather (SGLang/vLLM DP attention): pad to ``sum(sizes)``, each rank
  writes its rows at its offset into a zero buffer, all-reduce; all-reduce the experts' output, slice.
- ``agrs``: bf16 allgatherv of hidden states, ids and weights (one NCCL group); reducescatterv.
- ``agrs-nvfp4``: quantize to NVFP4 with the layer's static global scale BEFORE the gather, gather
  packed values and LINEAR block scales (swizzling, where a kernel wants it, happens after the gather:
  per-rank swizzled scales cannot be concatenated); reducescatterv in bf16.
- ``agrs-fp8``: the same with FP8 e4m3, per-128-group scales (DeepSeek-V3 / DeepEP) or per-token.

Quantized strategies send each rank's rows as ONE message: the quantizer writes straight into a
``uint8 [rows, row_bytes]`` buffer laid out ``payload | block scales | topk_ids | topk_weights``
(:func:`message_layout`), so a dispatch is one allgatherv of one tensor and no copies of the payload.
``pack=False`` sends the four tensors separately in one NCCL group instead (for measurement).

Quantization is row-local, so quantizing before the gather gives the same bytes as quantizing after
it: ``agrs-nvfp4`` is bit-identical to ``agrs`` with experts that quantize their input to NVFP4
(``expert_input_format``), and likewise for FP8. ``strategy="auto"`` therefore changes no numerics.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from typing import Sequence

import torch
import torch.distributed as dist

from moecomm._enum import ChoiceEnum
from moecomm.collectives import REDUCE_DTYPES, _check_sizes, all_gatherv, reduce_scatterv, run_checks
from moecomm.moe import ExpertWeights, experts_forward
from moecomm.routing import ids_int32
from moecomm.quant import QuantFormat, QuantizedTensor, quantize, row_bytes

__all__ = [
    "Strategy",
    "DispatchHandle",
    "MessageLayout",
    "message_layout",
    "wire_bytes_per_token",
    "choose_strategy",
    "dispatch",
    "combine",
    "moe_forward",
    "GraphedMoE",
    "DISABLE_ENV",
]

DISABLE_ENV = "MOECOMM_DISABLE_QUANTIZED_DISPATCH"  # "1": strategy="auto" never quantizes before the gather
MESSAGE_ALIGN = 16  # bytes: message rows start 16-byte aligned (vector loads, int32/fp32 views)


class Strategy(ChoiceEnum):
    ALLREDUCE = "allreduce"  # pad + all-reduce gather, all-reduce combine + slice (baseline)
    AGRS = "agrs"  # bf16 allgatherv + reducescatterv
    AGRS_NVFP4 = "agrs-nvfp4"  # NVFP4 quantize -> allgatherv -> experts -> bf16 reducescatterv
    AGRS_FP8 = "agrs-fp8"  # FP8 e4m3 (per-128 group or per token) quantize -> allgatherv -> ...
    AUTO = "auto"  # choose_strategy(): quantized where the experts consume it and it pays


_STRATEGY_FORMAT = {Strategy.AGRS_NVFP4: QuantFormat.NVFP4, Strategy.AGRS_FP8: QuantFormat.FP8_GROUP}
_FORMAT_STRATEGY = {QuantFormat.NVFP4: Strategy.AGRS_NVFP4, QuantFormat.FP8_GROUP: Strategy.AGRS_FP8,
                    QuantFormat.FP8_TOKEN: Strategy.AGRS_FP8}
# dtypes of (values, block scales) as stored by moecomm.quant
_FORMAT_DTYPES = {
    QuantFormat.NVFP4: (torch.uint8, torch.float8_e4m3fn),
    QuantFormat.MXFP4: (torch.uint8, torch.uint8),
    QuantFormat.FP8_GROUP: (torch.float8_e4m3fn, torch.float32),
    QuantFormat.FP8_TOKEN: (torch.float8_e4m3fn, torch.float32),
}


def _wire_format(strategy: Strategy, expert_input_format: QuantFormat | None) -> QuantFormat:
    """The format on the wire: the experts' own FP8 flavour where they have one, else the strategy's default."""
    if strategy == Strategy.AGRS_FP8 and expert_input_format in (QuantFormat.FP8_GROUP, QuantFormat.FP8_TOKEN):
        return expert_input_format
    return _STRATEGY_FORMAT[strategy]


# ----------------------------------------------------------------------------------------------------
# Message layout and bytes on the wire
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MessageLayout:
    """Byte columns of one token's message row: ``payload | scales | topk_ids | topk_weights | pad``."""

    fmt: QuantFormat
    hidden: int
    topk: int
    payload: slice  # quantized values
    scales: slice  # block scales, linear layout
    ids: slice  # int32 [topk]
    weights: slice  # float32 [topk]
    row_bytes: int  # padded to MESSAGE_ALIGN

    def views(self, buf: torch.Tensor) -> tuple[QuantizedTensor, torch.Tensor, torch.Tensor]:
        """Split a ``uint8 [rows, row_bytes]`` buffer into (quantized tokens, topk_ids, topk_weights) views."""
        data_dtype, scale_dtype = _FORMAT_DTYPES[self.fmt]
        data = buf[:, self.payload].view(data_dtype)
        scales = buf[:, self.scales].view(scale_dtype)
        ids = buf[:, self.ids].view(torch.int32)
        weights = buf[:, self.weights].view(torch.float32)
        return QuantizedTensor(self.fmt, data, scales, None), ids, weights


def message_layout(fmt: QuantFormat, hidden: int, topk: int) -> MessageLayout:
    """The packed message row of one token for ``fmt`` (see :class:`MessageLayout`).

    Hidden 7168, top-8: NVFP4 3584 + 448 + 32 + 32 = 4096 B; FP8 per-128 7168 + 224 + 64 = 7456 B.
    Raises ``ValueError`` when ``hidden`` is not divisible by the format's block.
    """
    payload, scales = row_bytes(fmt, hidden)
    a, b = payload, payload + scales
    c, d = b + 4 * topk, b + 8 * topk
    rb = -(-d // MESSAGE_ALIGN) * MESSAGE_ALIGN
    return MessageLayout(fmt, hidden, topk, slice(0, a), slice(a, b), slice(b, c), slice(c, d), rb)


def wire_bytes_per_token(strategy: Strategy | str, hidden: int, topk: int,
                         expert_input_format: QuantFormat | None = None) -> int:
    """Bytes one token occupies in the dispatch message plus in the combine message.

    Dispatch: bf16 ``2*hidden`` + int32 ids + fp32 weights (``8*topk``) for ``allreduce`` / ``agrs``;
    the packed :func:`message_layout` row for quantized strategies. Combine: ``2*hidden`` (bf16).
    ``allreduce`` moves these bytes for every token of the global batch on every rank (and an
    all-reduce moves about twice the bytes of an all-gather on the bus); ``agrs`` strategies
    gather each token once. Hidden 7168: bf16 14336 B, NVFP4 4032 B, FP8 per-128 7392 B of payload
    and scales per token.
    """
    strategy = Strategy(strategy)
    if strategy in (Strategy.ALLREDUCE, Strategy.AGRS):
        dispatch_bytes = 2 * hidden + 8 * topk
    elif strategy == Strategy.AUTO:
        raise ValueError("wire_bytes_per_token needs a concrete strategy, not 'auto'")
    else:
        dispatch_bytes = message_layout(_wire_format(strategy, expert_input_format), hidden, topk).row_bytes
    return dispatch_bytes + 2 * hidden


# ----------------------------------------------------------------------------------------------------
# Choosing a strategy
# ----------------------------------------------------------------------------------------------------


def _crossover(world_size: int) -> dict[str, int | None]:
    """Per quantized strategy, the smallest ``sum(sizes)`` from which it pays at this world size (None: never).

    From ``data/crossover.json``: the entry of the measured world size, else ``"default"``.
    """
    with resources.files("moecomm").joinpath("data/crossover.json").open() as f:
        table = json.load(f)["min_total_tokens"]
    return table.get(str(world_size), table["default"])


def choose_strategy(
    expert_input_format: QuantFormat | None,
    total_tokens: int,
    *,
    world_size: int,
    ep_size: int,
    allow_quantized: bool | None = None,
) -> Strategy:
    """The strategy ``"auto"`` runs: quantized dispatch where the experts consume that format and it pays.

    Quantized (``agrs-nvfp4`` / ``agrs-fp8``) only when all hold: the experts quantize their input to that
    format anyway (``expert_input_format``; layers with unquantized experts, e.g. a draft model's,
    never take it), experts are spread over the same ranks as the data (``ep_size == world_size``),
    it is not switched off (``allow_quantized=False``, or the environment variable
    ``MOECOMM_DISABLE_QUANTIZED_DISPATCH=1`` when ``allow_quantized`` is None), and ``total_tokens``
    (``sum(sizes)``, the same on every rank) reaches the crossover measured at this world size by
    ``moecomm bench moe --write-crossover`` and kept in ``data/crossover.json``. Otherwise ``agrs``
    (bf16), which gives bit-identical results.
    """
    if allow_quantized is None:
        allow_quantized = os.environ.get(DISABLE_ENV, "0") not in ("1", "true", "yes")
    if expert_input_format not in _FORMAT_STRATEGY or not allow_quantized or ep_size != world_size:
        return Strategy.AGRS
    strategy = _FORMAT_STRATEGY[expert_input_format]
    min_tokens = _crossover(world_size).get(strategy.value)
    return strategy if min_tokens is not None and total_tokens >= min_tokens else Strategy.AGRS


# ----------------------------------------------------------------------------------------------------
# dispatch / combine
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DispatchHandle:
    """What combine needs from dispatch: the strategy that ran, the per-rank sizes and the group."""

    strategy: Strategy
    sizes: tuple[int, ...]
    rank: int
    group: dist.ProcessGroup | None


def _check_global_scale(global_scale, rank: int) -> None:
    """An NVFP4 global scale: a finite positive number or one-element tensor (a CUDA tensor's value is
    checked by the quantizer on the device: an invalid one makes every block scale NaN)."""
    if global_scale is None:
        raise ValueError(f"rank {rank}: NVFP4 on the wire needs the layer's static global_scale")
    if isinstance(global_scale, bool) or not isinstance(global_scale, (int, float, torch.Tensor)):
        raise TypeError(f"rank {rank}: global_scale must be a number or a one-element tensor, got {global_scale!r}")
    if isinstance(global_scale, torch.Tensor):
        if global_scale.numel() != 1:
            raise ValueError(f"rank {rank}: global_scale must have one element, got shape {tuple(global_scale.shape)}")
        if global_scale.is_cuda:
            return
    value = float(global_scale)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"rank {rank}: global_scale must be finite and > 0, got {value}")


def _validate(hidden, topk_ids, topk_weights, sizes, strategy, global_scale, group, expert_input_format) -> list[int]:
    """Local checks of a dispatch; returns the sizes as a list. Raises ValueError/TypeError."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    for name, t in (("hidden", hidden), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rank {rank}: {name} must be a tensor, got {type(t).__name__}")
    sizes = _check_sizes(sizes, world)
    if hidden.dim() != 2 or hidden.dtype != torch.bfloat16:
        raise ValueError(f"rank {rank}: hidden must be bf16 [tokens, hidden], got {hidden.dtype} {tuple(hidden.shape)}")
    n = hidden.shape[0]
    if n != sizes[rank]:
        raise ValueError(f"rank {rank}: hidden has {n} rows but sizes[{rank}] = {sizes[rank]}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"rank {rank}: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [{n}, topk]")
    if topk_ids.dtype not in (torch.int32, torch.int64) or topk_weights.dtype != torch.float32:
        raise ValueError(f"rank {rank}: topk_ids must be int32/int64 and topk_weights float32, got "
                         f"{topk_ids.dtype} and {topk_weights.dtype}")
    if strategy in _STRATEGY_FORMAT:
        fmt = _wire_format(strategy, expert_input_format)
        if expert_input_format is not None and QuantFormat(expert_input_format) != fmt:
            raise ValueError(f"rank {rank}: {strategy.value} sends {fmt.value} tokens but the experts consume "
                             f"{QuantFormat(expert_input_format).value}: the experts would see other values than "
                             f"their own quantizer's; use strategy 'auto' or the matching one")
        message_layout(fmt, hidden.shape[1], topk_ids.shape[1])  # raises on a bad hidden size
        if fmt == QuantFormat.NVFP4:
            _check_global_scale(global_scale, rank)
    return sizes


def _agreement(hidden, topk_ids, sizes, strategy, global_scale, expert_input_format, pack) -> dict:
    """What every rank must agree on for one dispatch (exchanged by ``validate=True``; reads a CUDA global
    scale on the host)."""
    fmt = _wire_format(strategy, expert_input_format) if strategy in _STRATEGY_FORMAT else None
    return {
        "sizes": list(sizes), "hidden": tuple(hidden.shape[1:]), "topk": tuple(topk_ids.shape[1:]),
        "strategy": strategy.value, "wire format": None if fmt is None else fmt.value,
        "pack": pack if fmt is not None else None,
        "global_scale": float(global_scale) if fmt == QuantFormat.NVFP4 else None,
    }


def dispatch(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    sizes: Sequence[int],
    strategy: Strategy | str,
    global_scale: torch.Tensor | float | None = None,
    expert_input_format: QuantFormat | None = None,
    group: dist.ProcessGroup | None = None,
    pack: bool = True,
    validate: bool = False,
):
    """Move every rank's tokens to every rank: the first half of an EP MoE layer step.

    Parameters
    ----------
    hidden : Tensor
        ``bf16 [sizes[rank], hidden]``: this rank's tokens.
    topk_ids, topk_weights : Tensor
        ``int32 (or int64) [sizes[rank], topk]`` global expert ids and ``float32 [sizes[rank], topk]``.
        int64 ids outside the int32 range travel as -1, which the experts' range check reports.
    sizes : list[int]
        Tokens per rank, the same list on every rank (see :func:`moecomm.collectives.gather_sizes`).
    strategy : Strategy or str
        A concrete strategy (``"auto"`` is resolved by :func:`moe_forward`).
    global_scale : fp32 tensor (1 element) or float
        NVFP4 global encode scale of the layer (static, the same on every rank); required for NVFP4.
    expert_input_format : QuantFormat, optional
        The format the experts consume; picks the FP8 flavour on the wire (per-128 group by default).
    group : ProcessGroup, optional
    pack : bool
        Quantized strategies: one packed message (default) or four tensors in one NCCL group.
    validate : bool
        Exchange metadata (sizes, hidden, topk, strategy, wire format, pack, NVFP4 global scale) first and
        raise on EVERY rank when ranks disagree or any rank's input is bad. Syncs with the host; not
        under graph capture.

    Returns
    -------
    tokens : Tensor or QuantizedTensor
        ``[sum(sizes), hidden]`` bf16, or quantized (values and LINEAR block scales, possibly
        row-strided views of the gathered message).
    topk_ids, topk_weights : Tensor
        ``int32 [sum(sizes), topk]``, ``float32 [sum(sizes), topk]``.
    handle : DispatchHandle
        For :func:`combine`.

    Raises
    ------
    ValueError
        Before any communication: bad ``sizes``, row counts, dtypes or dims; a hidden size not
        divisible by the format's block; a missing or non-finite global scale; with ``validate``,
        ranks that disagree (e.g. on the global scale).
    """
    strategy = Strategy(strategy)
    if strategy == Strategy.AUTO:
        raise ValueError("dispatch needs a concrete strategy; moe_forward resolves 'auto'")
    sizes = run_checks(
        "dispatch",
        lambda: _validate(hidden, topk_ids, topk_weights, sizes, strategy, global_scale, group, expert_input_format),
        lambda: _agreement(hidden, topk_ids, sizes, strategy, global_scale, expert_input_format, pack),
        group, validate)
    return _dispatch(hidden, topk_ids, topk_weights, sizes, strategy, global_scale, expert_input_format, group, pack)


def _dispatch(hidden, topk_ids, topk_weights, sizes: list[int], strategy: Strategy, global_scale,
              expert_input_format, group, pack: bool):
    """:func:`dispatch` after its checks (``sizes`` already a checked list)."""
    topk_ids = ids_int32(topk_ids)  # out-of-range int64 ids become -1: the experts' range check reports them
    rank = dist.get_rank(group)
    handle = DispatchHandle(strategy, tuple(sizes), rank, group)
    if strategy == Strategy.ALLREDUCE:
        return (*_gather_by_allreduce(hidden, topk_ids, topk_weights, sizes, rank, group), handle)
    if strategy == Strategy.AGRS:
        return (*all_gatherv([hidden, topk_ids, topk_weights], sizes, group), handle)
    fmt = _wire_format(strategy, expert_input_format)
    gs = None
    if fmt == QuantFormat.NVFP4:
        gs = torch.as_tensor(global_scale, dtype=torch.float32, device=hidden.device).reshape(())
    if not pack:
        q = quantize(hidden, fmt, global_scale=gs)
        data, scales, ids, weights = all_gatherv([q.data, q.scales, topk_ids, topk_weights], sizes, group)
        return QuantizedTensor(fmt, data, scales, gs), ids, weights, handle
    layout = message_layout(fmt, hidden.shape[1], topk_ids.shape[1])
    send = torch.empty((hidden.shape[0], layout.row_bytes), dtype=torch.uint8, device=hidden.device)
    q_view, ids_view, weights_view = layout.views(send)
    quantize(hidden, fmt, global_scale=gs, out=(q_view.data, q_view.scales))
    ids_view.copy_(topk_ids)
    weights_view.copy_(topk_weights)
    if layout.row_bytes > layout.weights.stop:
        send[:, layout.weights.stop :].zero_()  # no uninitialised bytes on the wire
    recv = all_gatherv(send, sizes, group)
    q, ids, weights = layout.views(recv)
    return QuantizedTensor(fmt, q.data, q.scales, gs), ids, weights, handle


def _gather_by_allreduce(hidden, topk_ids, topk_weights, sizes, rank, group):
    """Classic DP gather: own rows at their offset in zero buffers, summed by all-reduce (x + 0 = x exactly).

    ids and weights travel as one int32 buffer (weights as their bit patterns: a sum with zeros keeps them).
    """
    start, total = sum(sizes[:rank]), sum(sizes)
    k = topk_ids.shape[1]
    buf = hidden.new_zeros((total, hidden.shape[1]))
    meta = torch.zeros((total, 2 * k), dtype=torch.int32, device=hidden.device)
    buf[start : start + hidden.shape[0]] = hidden
    meta[start : start + hidden.shape[0], :k] = topk_ids
    meta[start : start + hidden.shape[0], k:] = topk_weights.view(torch.int32)
    dist.all_reduce(buf, group=group)
    dist.all_reduce(meta, group=group)
    return buf, meta[:, :k], meta[:, k:].view(torch.float32)


def combine(partial: torch.Tensor, handle: DispatchHandle, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum the experts' partial outputs over ranks and return this rank's rows.

    ``partial``: ``bf16 [sum(sizes), hidden]`` from the local experts. Returns ``bf16 [sizes[rank], hidden]``:
    reducescatterv for ``agrs*`` strategies, all-reduce + slice for ``allreduce`` (which sums ``partial`` in
    place).
    Raises ``ValueError`` when ``partial`` does not have ``sum(sizes)`` rows.
    """
    sizes, rank = list(handle.sizes), handle.rank
    if not isinstance(partial, torch.Tensor) or partial.dim() != 2 or partial.shape[0] != sum(sizes):
        raise ValueError(f"rank {rank}: partial must be [sum(sizes) = {sum(sizes)}, hidden], got "
                         f"{getattr(partial, 'shape', type(partial).__name__)}")
    if handle.strategy != Strategy.ALLREDUCE:
        return reduce_scatterv(partial, sizes, handle.group, out=out)
    if partial.dtype not in REDUCE_DTYPES:
        raise ValueError(f"rank {rank}: partial must be one of {REDUCE_DTYPES}, got {partial.dtype}")
    if out is not None and (out.dtype != partial.dtype or out.shape != (sizes[rank], partial.shape[1])):
        raise ValueError(f"rank {rank}: out must be {partial.dtype} [{sizes[rank]}, {partial.shape[1]}], got "
                         f"{out.dtype} {tuple(out.shape)}")
    dist.all_reduce(partial, group=handle.group)  # in place, as the classic DP path does
    start = sum(sizes[: handle.rank])
    rows = partial[start : start + sizes[handle.rank]]
    return rows if out is None else out.copy_(rows)


def _check_experts(weights: ExpertWeights, hidden, rank: int, world: int) -> None:
    """The experts must be this rank's share of an EP split over exactly the ranks of the group (each expert
    on one rank, or the combine's sum counts it twice) and match the hidden size."""
    if not isinstance(weights, ExpertWeights):
        raise TypeError(f"rank {rank}: weights must be moecomm.moe.ExpertWeights, got {type(weights).__name__}")
    first, n, total = weights.first_expert, weights.num_local, weights.num_experts
    if n * world != total or first != rank * n:
        raise ValueError(f"rank {rank}: these are experts [{first}, {first + n}) of {total}; over {world} ranks "
                         f"rank {rank} needs make_expert_weights(..., ep_size={world}, ep_rank={rank})")
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 2 and hidden.shape[1] != weights.hidden_size:
        raise ValueError(f"rank {rank}: hidden has {hidden.shape[1]} columns, the experts' hidden size is "
                         f"{weights.hidden_size}")


def moe_forward(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    weights: ExpertWeights,
    *,
    sizes: Sequence[int],
    strategy: Strategy | str = Strategy.AUTO,
    global_scale: torch.Tensor | float | None = None,
    expert_input_format: QuantFormat | None = None,
    group: dist.ProcessGroup | None = None,
    pack: bool = True,
    validate: bool = False,
    allow_quantized: bool | None = None,
) -> torch.Tensor:
    """One EP MoE layer step for DP attention: dispatch, local experts, combine.

    ``hidden`` ``bf16 [sizes[rank], hidden]``, ``topk_ids`` / ``topk_weights`` ``[sizes[rank], topk]``;
    ``weights`` are this rank's experts (:func:`moecomm.moe.make_expert_weights` with
    ``ep_size = world_size``). ``expert_input_format``: the format the experts quantize their input to
    (None: bf16 experts); with ``agrs`` it is applied after the gather, with a quantized strategy
    before it -- the same bytes either way. ``strategy="auto"`` resolves through
    :func:`choose_strategy` (``allow_quantized`` or ``MOECOMM_DISABLE_QUANTIZED_DISPATCH=1`` switch the
    quantized path off). Returns ``bf16 [sizes[rank], hidden]``: this rank's rows of the sum over all
    ranks' experts. Raises as :func:`dispatch` does, and ``ValueError`` when ``weights`` are not this rank's
    share of an EP split over the group or their hidden size differs; ``validate=True`` also compares
    ``num_experts`` across ranks.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    strategy = Strategy(strategy)

    def prepare() -> tuple[Strategy, list[int]]:
        _check_experts(weights, hidden, rank, world)
        resolved = strategy
        if strategy == Strategy.AUTO:
            resolved = choose_strategy(expert_input_format, sum(_check_sizes(sizes, world)), world_size=world,
                                       ep_size=world, allow_quantized=allow_quantized)
        checked = _validate(hidden, topk_ids, topk_weights, sizes, resolved, global_scale, group, expert_input_format)
        chosen.append(resolved)
        return resolved, checked

    chosen: list[Strategy] = []  # the resolved strategy, for the agreement (which runs after prepare)
    strategy, checked_sizes = run_checks(
        "moe_forward", prepare,
        lambda: {**_agreement(hidden, topk_ids, sizes, chosen[0], global_scale, expert_input_format, pack),
                 "num_experts": weights.num_experts},
        group, validate)
    tokens, ids, tw, handle = _dispatch(hidden, topk_ids, topk_weights, checked_sizes, strategy, global_scale,
                                        expert_input_format, group, pack)
    after_gather_format = expert_input_format if isinstance(tokens, torch.Tensor) else None
    partial = experts_forward(tokens, ids, tw, weights, input_format=after_gather_format,
                              global_scale=global_scale if after_gather_format == QuantFormat.NVFP4 else None)
    return combine(partial, handle)


# ----------------------------------------------------------------------------------------------------
# CUDA graphs: every rank replays the same padded bucket
# ----------------------------------------------------------------------------------------------------


class GraphedMoE:
    """:func:`moe_forward` captured in one CUDA graph per token bucket; all ranks replay the same bucket.

    A graph fixes every tensor size and every collective's counts, so all ranks must replay a graph of
    the same bucket: :meth:`__call__` takes the maximum live token count over the ranks (one small
    all-reduce, a host sync), picks the smallest bucket that holds it, pads every rank's rows to that
    bucket (zero hidden rows, routing weight 0 and ``topk_ids = (arange(bucket * topk) % num_experts)``
    for the padding rows, which add exactly 0) and replays. With equal
    sizes the dispatch runs the native ``all_gather_into_tensor`` / ``reduce_scatter_tensor``.

    Parameters
    ----------
    weights : ExpertWeights of this rank.
    hidden_size, topk : int
    buckets : list[int], tokens per rank to capture (e.g. ``[1, 2, 4, ..., 256]`` for decode).
    strategy, global_scale, expert_input_format, group : as for :func:`moe_forward`; ``"auto"`` is
        resolved per bucket at capture time (from ``bucket * world_size`` tokens).

    Raises
    ------
    ValueError
        At call time, on every rank alike, when the largest live token count exceeds the largest
        captured bucket (instead of a hang or an overrun); on shape/dtype mismatches.
    """

    def __init__(self, weights: ExpertWeights, *, hidden_size: int, topk: int, buckets: Sequence[int],
                 strategy: Strategy | str = Strategy.AUTO, global_scale: torch.Tensor | None = None,
                 expert_input_format: QuantFormat | None = None, group: dist.ProcessGroup | None = None):
        if not buckets or any(int(b) != b or b < 1 for b in buckets):
            raise ValueError(f"buckets must be positive integers, got {buckets}")
        self.buckets = sorted(set(int(b) for b in buckets))
        self.group = group
        self.topk = topk
        device = torch.device("cuda", torch.cuda.current_device())
        world = dist.get_world_size(group)
        self._graphs = {}
        for bucket in self.buckets:
            hidden = torch.zeros(bucket, hidden_size, dtype=torch.bfloat16, device=device)
            ids = (torch.arange(bucket * topk, device=device, dtype=torch.int32) % weights.num_experts).view(bucket, topk)
            tw = torch.zeros(bucket, topk, dtype=torch.float32, device=device)
            pad_ids = ids.clone()

            def step(hidden=hidden, ids=ids, tw=tw, bucket=bucket):
                return moe_forward(hidden, ids, tw, weights, sizes=[bucket] * world, strategy=strategy,
                                   global_scale=global_scale, expert_input_format=expert_input_format,
                                   group=group)

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: kernels compiled, communicators created
                step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step()
            self._graphs[bucket] = (graph, hidden, ids, tw, pad_ids, out)

    def bucket_for(self, num_tokens: int) -> int:
        """The bucket all ranks replay for this rank's ``num_tokens`` (collective: call on every rank)."""
        device = torch.device("cuda", torch.cuda.current_device())
        n = torch.tensor([num_tokens], device=device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX, group=self.group)
        most = int(n.item())
        for b in self.buckets:
            if b >= most:
                return b
        raise ValueError(f"a rank has {most} tokens, more than the largest captured bucket "
                         f"{self.buckets[-1]}: capture a larger bucket or run eagerly")

    def __call__(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Replay on this rank's ``bf16 [n, hidden]`` tokens; returns ``bf16 [n, hidden]``.

        The result is a view of the graph's static output, overwritten by the next call.
        """
        n = hidden.shape[0]
        if topk_ids.shape != (n, self.topk) or topk_weights.shape != (n, self.topk):
            raise ValueError(f"topk_ids {tuple(topk_ids.shape)} / topk_weights {tuple(topk_weights.shape)} "
                             f"must be [{n}, {self.topk}]")
        graph, s_hidden, s_ids, s_tw, pad_ids, out = self._graphs[self.bucket_for(n)]
        s_hidden[:n].copy_(hidden)
        s_hidden[n:].zero_()
        s_ids[:n].copy_(topk_ids)
        s_ids[n:].copy_(pad_ids[n:])
        s_tw[:n].copy_(topk_weights)
        s_tw[n:].zero_()
        graph.replay()
        return out[:n]
