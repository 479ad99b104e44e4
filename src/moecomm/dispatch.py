"""DP dispatch and combine for an EP MoE layer: quantize before the all-gather, reduce-scatter the result.

With attention data-parallel, rank ``r`` holds ``sizes[r]`` tokens. One MoE layer step is

    dispatch: every rank receives every rank's tokens (+ topk_ids, topk_weights)
    experts:  each rank runs its local experts on all tokens -> partial [rows, hidden]
    combine:  partials are summed over ranks and each rank keeps its own rows

Strategies (:class:`Strategy`), all kept runnable:

- ``allreduce``: the classic DP gather (SGLang/vLLM DP attention): each rank writes its rows at its
  offset into a zero buffer of ``sum(sizes)`` rows, all-reduce; all-reduce the experts' output, slice.
- ``agrs``: bf16 allgatherv of hidden states, ids and weights (one message); reducescatterv.
- ``agrs-nvfp4``: quantize to NVFP4 with the layer's static global scale BEFORE the gather, gather
  packed values and LINEAR block scales (swizzling, where a kernel wants it, happens after the gather:
  per-rank swizzled scales cannot be concatenated); reducescatterv in bf16.
- ``agrs-fp8``: the same with FP8 e4m3, per-128-group scales (DeepSeek-V3 / DeepEP) or per-token.

Every ``agrs*`` strategy sends each rank's rows as ONE message: a ``uint8 [rows, row_bytes]`` buffer laid
out ``payload | block scales | topk_ids | topk_weights`` (:func:`message_layout`), which the quantizer
writes straight into, so a dispatch is one allgatherv of one tensor. ``pack=False`` sends the tensors
separately in one NCCL group instead (for measurement).

Two layouts of the gathered rows. *Compact*: ``sum(sizes)`` rows, rank ``r``'s at ``sum(sizes[:r])``.
*Padded*: every rank sends ``max(sizes)`` rows, the rows past its own carry ``topk_ids = -1`` (masked
slots: the experts skip them, :mod:`moecomm.moe`), and the gather is the native equal-size all-gather
with no compaction copy; rank ``r``'s rows start at ``r * max(sizes)``. The padded layout is used where
the collectives' algorithm choice (:func:`moecomm.collectives.choose_algorithm`) picks ``padded`` for
the message, or when asked (``algorithm="padded"``); :class:`DispatchHandle` records it for the combine.

Quantization is row-local, so quantizing before the gather gives the same bytes as quantizing after
it: ``agrs-nvfp4`` is bit-identical to ``agrs`` with experts that quantize their input to NVFP4
(``expert_input_format``), and likewise for FP8. ``strategy="auto"`` therefore changes no numerics.

No function here reads a device value on the host unless ``validate=True`` (or ``MOECOMM_VALIDATE=1``):
expert ids outside ``[-1, num_experts)`` are reported by :func:`moecomm.errors.check_errors`.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from typing import Sequence

import torch
import torch.distributed as dist

from moecomm import errors
from moecomm._enum import ChoiceEnum
from moecomm.collectives import (
    REDUCE_DTYPES,
    Algorithm,
    _check_sizes,
    _world,
    all_gatherv,
    all_reduce,
    choose_algorithm,
    reduce_scatterv,
    run_checks,
)
from moecomm.moe import ExpertWeights, experts_forward
from moecomm.quant import QuantFormat, QuantizedTensor, _round_up, quantize, row_bytes
from moecomm.routing import ids_int32

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


def _wire_format(strategy: Strategy, expert_input_format: QuantFormat | None) -> QuantFormat | None:
    """The format on the wire (None: bf16): the experts' own FP8 flavour where they have one, else the
    strategy's default."""
    if strategy not in _STRATEGY_FORMAT:
        return None
    if strategy == Strategy.AGRS_FP8 and expert_input_format in (QuantFormat.FP8_GROUP, QuantFormat.FP8_TOKEN):
        return QuantFormat(expert_input_format)  # the enum, also where the caller passed its string
    return _STRATEGY_FORMAT[strategy]


# ----------------------------------------------------------------------------------------------------
# Message layout and bytes on the wire
# ----------------------------------------------------------------------------------------------------


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
    a = _round_up(payload, 4)
    b = _round_up(a + scales, 4)
    c, d = b + 4 * topk, b + 8 * topk
    return MessageLayout(fmt, hidden, topk, slice(0, payload), slice(a, a + scales), slice(b, c), slice(c, d),
                         _round_up(d, MESSAGE_ALIGN))


def wire_bytes_per_token(strategy: Strategy | str, hidden: int, topk: int,
                         expert_input_format: QuantFormat | None = None) -> int:
    """Bytes one token occupies in the dispatch message plus in the combine message.

    Dispatch: the packed :func:`message_layout` row (bf16 ``2*hidden`` + int32 ids + fp32 weights for
    ``allreduce`` / ``agrs``). Combine: ``2*hidden`` (bf16). ``allreduce`` moves these bytes for every
    token of the global batch on every rank (and an all-reduce moves about twice the bytes of an
    all-gather on the bus); ``agrs`` strategies gather each token once (padded layouts add the padding
    rows). Hidden 7168: bf16 14336 B, NVFP4 4032 B, FP8 per-128 7392 B of payload and scales per token.
    """
    strategy = Strategy(strategy)
    if strategy == Strategy.AUTO:
        raise ValueError("wire_bytes_per_token needs a concrete strategy, not 'auto'")
    dispatch_bytes = message_layout(_wire_format(strategy, expert_input_format), hidden, topk).row_bytes
    return dispatch_bytes + 2 * hidden


# ----------------------------------------------------------------------------------------------------
# Choosing a strategy
# ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
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
    elif not isinstance(allow_quantized, bool):
        raise TypeError(f"allow_quantized must be a bool or None, got {allow_quantized!r}")
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
    """What combine needs from dispatch.

    ``padded_rows``: rows per rank of the padded layout (rank ``r``'s rows start at ``r * padded_rows``),
    or None for the compact layout (rank ``r``'s rows start at ``sum(sizes[:r])``).
    """

    strategy: Strategy
    sizes: tuple[int, ...]
    rank: int
    group: dist.ProcessGroup | None
    padded_rows: int | None = None

    @property
    def rows(self) -> int:
        """Rows of the gathered tokens and of the experts' partial output."""
        return len(self.sizes) * self.padded_rows if self.padded_rows is not None else sum(self.sizes)


_SCALES: dict = {}


def _global_scale(global_scale, device: torch.device) -> torch.Tensor:
    """The NVFP4 global scale as an fp32 0-dim tensor on ``device``; Python numbers are cached per value, so
    no host-to-device copy (which waits for the stream) happens per call."""
    if isinstance(global_scale, torch.Tensor):
        if global_scale.device == device and global_scale.dtype == torch.float32:
            return global_scale.reshape(())
        return global_scale.detach().to(device=device, dtype=torch.float32).reshape(())
    key = (float(global_scale), device)
    gs = _SCALES.get(key)
    if gs is None:
        gs = _SCALES[key] = torch.tensor(float(global_scale), dtype=torch.float32, device=device)
    return gs


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


def _validate(hidden, topk_ids, topk_weights, sizes, strategy, global_scale, group, expert_input_format, pack):
    """Local checks of a dispatch; returns ``(sizes as a list, rank, world)``. Raises ValueError/TypeError."""
    rank, world = _world(group)
    if not isinstance(pack, bool):
        raise TypeError(f"rank {rank}: pack must be a bool, got {pack!r}")
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
    if topk_ids.device != hidden.device or topk_weights.device != hidden.device:
        raise ValueError(f"rank {rank}: hidden, topk_ids and topk_weights must be on one device, got "
                         f"{hidden.device}, {topk_ids.device}, {topk_weights.device}")
    fmt = _wire_format(strategy, expert_input_format)
    if fmt is not None:
        if expert_input_format is not None and QuantFormat(expert_input_format) != fmt:
            raise ValueError(f"rank {rank}: {strategy.value} sends {fmt.value} tokens but the experts consume "
                             f"{QuantFormat(expert_input_format).value}: the experts would see other values than "
                             f"their own quantizer's; use strategy 'auto' or the matching one")
        if fmt == QuantFormat.NVFP4:
            _check_global_scale(global_scale, rank)
    message_layout(fmt, hidden.shape[1], topk_ids.shape[1])  # raises on a bad hidden size
    return sizes, rank, world


def _agreement(hidden, topk_ids, sizes, strategy, global_scale, expert_input_format, pack, algorithm,
               num_experts=None) -> dict:
    """What every rank must agree on for one dispatch (exchanged by validation, which may sync: it reads a
    CUDA global scale and checks the ids on the host)."""
    fmt = _wire_format(strategy, expert_input_format)
    if topk_ids.numel() and num_experts is None:  # dispatch alone: at least no id below -1
        errors.check_ids(topk_ids, 2**31 - 1, dist.get_rank())
    elif num_experts is not None:
        errors.check_ids(topk_ids, num_experts, dist.get_rank())
    return {
        "sizes": list(sizes), "hidden": tuple(hidden.shape[1:]), "topk": tuple(topk_ids.shape[1:]),
        "strategy": strategy.value, "wire format": None if fmt is None else fmt.value,
        "pack": pack if strategy != Strategy.ALLREDUCE else None, "algorithm": Algorithm(algorithm).value,
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
    algorithm: Algorithm | str = Algorithm.AUTO,
    validate: bool = False,
):
    """Move every rank's tokens to every rank: the first half of an EP MoE layer step.

    Parameters
    ----------
    hidden : Tensor
        ``bf16 [sizes[rank], hidden]``: this rank's tokens.
    topk_ids, topk_weights : Tensor
        ``int32 (or int64) [sizes[rank], topk]`` global expert ids (-1: a masked slot) and
        ``float32 [sizes[rank], topk]``. int64 ids outside the int32 range travel as -2**31, which the
        experts report (:func:`moecomm.errors.check_errors`).
    sizes : list[int]
        Tokens per rank, the SAME list on every rank: take it from
        :func:`moecomm.collectives.gather_sizes` (or DP metadata all ranks share). Not checked across ranks
        unless validation is on (a host sync): ranks that disagree get each other's tokens wrong without an
        error (shifted, zero rows inserted) or hang.
    strategy : Strategy or str
        A concrete strategy (``"auto"`` is resolved by :func:`moe_forward`).
    global_scale : fp32 tensor (1 element) or float
        NVFP4 global encode scale of the layer (static, the same on every rank); required for NVFP4.
    expert_input_format : QuantFormat, optional
        The format the experts consume; picks the FP8 flavour on the wire (per-128 group by default).
    group : ProcessGroup, optional
    pack : bool
        One packed message (default) or the tensors separately in one NCCL group.
    algorithm : Algorithm or str
        The allgatherv algorithm (:mod:`moecomm.collectives`); ``"auto"`` picks per call. Where it is (or
        resolves to) ``"padded"`` the gathered rows come in the padded layout (module docstring).
    validate : bool
        Exchange metadata (sizes, hidden, topk, strategy, wire format, pack, algorithm, NVFP4 global scale)
        and check the ids (none below -1) first, and raise on EVERY rank when ranks disagree or any rank's
        input is bad. Syncs with the host; not under graph capture. Also on with ``MOECOMM_VALIDATE=1`` or
        ``TORCH_DISTRIBUTED_DEBUG=DETAIL``.

    Returns
    -------
    tokens : Tensor or QuantizedTensor
        ``[handle.rows, hidden]`` bf16, or quantized (values and LINEAR block scales): row-strided views
        of the gathered message.
    topk_ids, topk_weights : Tensor
        ``int32 [handle.rows, topk]``, ``float32 [handle.rows, topk]``; padding rows carry ids -1.
    handle : DispatchHandle
        For :func:`combine`; ``handle.rows`` is ``sum(sizes)`` (compact) or
        ``world_size * max(sizes)`` (padded layout).

    Raises
    ------
    ValueError
        Before any communication: bad ``sizes``, row counts, dtypes, dims or devices; a hidden size not
        divisible by the format's block; a missing or non-finite global scale; a rank outside the group;
        with validation, ranks that disagree (e.g. on the global scale) or ids below -1.
    """
    strategy = Strategy(strategy)
    if strategy == Strategy.AUTO:
        raise ValueError("dispatch needs a concrete strategy; moe_forward resolves 'auto'")
    sizes, rank, world = run_checks(
        "dispatch",
        lambda: _validate(hidden, topk_ids, topk_weights, sizes, strategy, global_scale, group, expert_input_format,
                          pack),
        lambda: _agreement(hidden, topk_ids, sizes, strategy, global_scale, expert_input_format, pack, algorithm),
        group, validate)
    return _dispatch(hidden, topk_ids, topk_weights, sizes, rank, world, strategy, global_scale,
                     expert_input_format, group, pack, algorithm)


def _padded_rows(sizes: list[int], row_bytes: int, algorithm, device: torch.device) -> int | None:
    """``max(sizes)`` where the message travels in the padded layout, else None (module docstring)."""
    pad = max(sizes)
    if all(s == pad for s in sizes):
        return None  # equal sizes: compact and padded are the same rows
    algorithm = Algorithm(algorithm)
    if algorithm == Algorithm.AUTO:
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        algorithm = choose_algorithm("all_gatherv", sizes, row_bytes, capturing=capturing)
    return pad if algorithm == Algorithm.PADDED else None


def _dispatch(hidden, topk_ids, topk_weights, sizes: list[int], rank: int, world: int, strategy: Strategy,
              global_scale, expert_input_format, group, pack: bool, algorithm):
    """:func:`dispatch` after its checks (``sizes`` already a checked list)."""
    topk_ids = ids_int32(topk_ids)
    if strategy == Strategy.ALLREDUCE:
        handle = DispatchHandle(strategy, tuple(sizes), rank, group)
        return (*_gather_by_allreduce(hidden, topk_ids, topk_weights, sizes, rank, group), handle)
    fmt = _wire_format(strategy, expert_input_format)
    gs = _global_scale(global_scale, hidden.device) if fmt == QuantFormat.NVFP4 else None
    n = hidden.shape[0]
    if not pack:
        if fmt is None:
            tensors = [hidden, topk_ids, topk_weights]
        else:
            q = quantize(hidden, fmt, global_scale=gs)
            tensors = [q.data, q.scales, topk_ids, topk_weights]
        gathered = all_gatherv(tensors, sizes, group, algorithm=algorithm)
        tokens = gathered[0] if fmt is None else QuantizedTensor(fmt, gathered[0], gathered[1], gs)
        return tokens, gathered[-2], gathered[-1], DispatchHandle(strategy, tuple(sizes), rank, group)
    layout = message_layout(fmt, hidden.shape[1], topk_ids.shape[1])
    padded = _padded_rows(sizes, layout.row_bytes, algorithm, hidden.device) if world > 1 else None
    rows = n if padded is None else padded
    send = torch.empty((rows, layout.row_bytes), dtype=torch.uint8, device=hidden.device)
    tokens_view, ids_view, weights_view = layout.views(send[:n])
    if fmt is None:
        tokens_view.copy_(hidden)
    else:
        quantize(hidden, fmt, global_scale=gs, out=(tokens_view.data, tokens_view.scales))
    ids_view.copy_(topk_ids)
    weights_view.copy_(topk_weights)
    if layout.row_bytes > layout.weights.stop:
        send[:n, layout.weights.stop :].zero_()  # no uninitialised bytes on the wire
    if rows > n:  # padding rows: zero bytes, masked slots
        send[n:].zero_()
        send[n:, layout.ids].view(torch.int32).fill_(-1)
    recv = all_gatherv(send, sizes if padded is None else [padded] * world, group, algorithm=algorithm)
    tokens, ids, weights = layout.views(recv)
    if fmt is not None:
        tokens = QuantizedTensor._trusted(fmt, tokens.data, tokens.scales, gs)
    return tokens, ids, weights, DispatchHandle(strategy, tuple(sizes), rank, group, padded)


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
    all_reduce(buf, group)
    all_reduce(meta, group)
    return buf, meta[:, :k], meta[:, k:].view(torch.float32)


def combine(partial: torch.Tensor, handle: DispatchHandle, *, out: torch.Tensor | None = None,
            algorithm: Algorithm | str = Algorithm.AUTO) -> torch.Tensor:
    """Sum the experts' partial outputs over ranks and return this rank's rows.

    ``partial``: ``bf16 [handle.rows, hidden]`` from the local experts. Returns ``bf16 [sizes[rank], hidden]``:
    reducescatterv (``algorithm``, :mod:`moecomm.collectives`) for ``agrs*`` strategies, all-reduce + slice
    for ``allreduce`` (which sums ``partial`` in place). In the padded layout the result is a view of the
    first ``sizes[rank]`` rows of a ``[max(sizes), hidden]`` buffer (or written to ``out``).
    Raises ``ValueError`` when ``partial`` does not have ``handle.rows`` rows or ``out`` is not
    ``[sizes[rank], hidden]`` of ``partial``'s dtype; ``TypeError`` when ``handle`` is not a
    :class:`DispatchHandle` or ``out`` not a tensor.
    """
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"combine needs the DispatchHandle that dispatch returned, got {type(handle).__name__}")
    if out is not None and not isinstance(out, torch.Tensor):
        raise TypeError(f"rank {handle.rank}: out must be a tensor, got {type(out).__name__}")
    sizes, rank = list(handle.sizes), handle.rank
    if not isinstance(partial, torch.Tensor) or partial.dim() != 2 or partial.shape[0] != handle.rows:
        raise ValueError(f"rank {rank}: partial must be [{handle.rows}, hidden] (the dispatched rows), got "
                         f"{getattr(partial, 'shape', type(partial).__name__)}")
    if partial.dtype not in REDUCE_DTYPES:
        raise ValueError(f"rank {rank}: partial must be one of {REDUCE_DTYPES}, got {partial.dtype}")
    n = sizes[rank]
    if out is not None and (out.dtype != partial.dtype or out.shape != (n, partial.shape[1])):
        raise ValueError(f"rank {rank}: out must be {partial.dtype} [{n}, {partial.shape[1]}], got "
                         f"{out.dtype} {tuple(out.shape)}")
    if handle.strategy == Strategy.ALLREDUCE:
        all_reduce(partial, handle.group)  # in place, as the classic DP path does
        start = sum(sizes[:rank])
        rows = partial[start : start + n]
        return rows if out is None else out.copy_(rows)
    if handle.padded_rows is None:
        return reduce_scatterv(partial, sizes, handle.group, out=out, algorithm=algorithm)
    pad = handle.padded_rows
    mine = reduce_scatterv(partial, [pad] * len(sizes), handle.group,
                           out=out if out is not None and n == pad else None, algorithm=algorithm)
    return mine[:n] if out is None else (mine if mine is out else out.copy_(mine[:n]))


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
    algorithm: Algorithm | str = Algorithm.AUTO,
    validate: bool = False,
    allow_quantized: bool | None = None,
    chunks: int | None = None,
) -> torch.Tensor:
    """One EP MoE layer step for DP attention: dispatch, local experts, combine.

    ``hidden`` ``bf16 [sizes[rank], hidden]``, ``topk_ids`` / ``topk_weights`` ``[sizes[rank], topk]``
    (``topk_ids == -1``: a masked slot, no expert); ``weights`` are this rank's experts
    (:func:`moecomm.moe.make_expert_weights` with ``ep_size = world_size``). ``sizes`` must be the same
    list on every rank: take it from :func:`moecomm.collectives.gather_sizes` (or DP metadata all ranks
    share). It is not checked across ranks unless validating (a host sync): ranks that disagree get wrong
    rows without an error (tokens shifted or zero in the dispatch, rows lost in the combine) or hang.
    ``validate=True``, ``MOECOMM_VALIDATE=1`` or ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` exchange the metadata
    first and raise on every rank instead. ``expert_input_format``: the format
    the experts quantize their input to (None: bf16 experts); with ``agrs`` it is applied after the
    gather, with a quantized strategy before it -- the same bytes either way. ``strategy="auto"`` resolves
    through :func:`choose_strategy` (``allow_quantized`` or ``MOECOMM_DISABLE_QUANTIZED_DISPATCH=1``
    switch the quantized path off); ``algorithm`` is the collectives' algorithm of the dispatch and the
    combine (``"auto"``: per call). Returns ``bf16 [sizes[rank], hidden]``: this rank's rows of the sum
    over all ranks' experts. Never reads a device value on the host unless validating.

    ``chunks``: split every rank's rows into ``chunks`` consecutive pieces (rank ``r``'s chunk ``c`` is its
    rows ``[n_r * c // chunks, n_r * (c + 1) // chunks)``, so every rank derives all chunk sizes from
    ``sizes``; a rank may have none in a chunk) and pipeline them on CUDA: the dispatch of chunk ``c + 1``
    and the combine of chunk ``c - 1`` run on a communication stream while the experts run on chunk ``c``
    (TensorRT-LLM's chunked MoE; CUDA events, no host sync). The result is bit-identical to ``chunks=1``
    where the sums over ranks are (two ranks; gloo always): the experts are row-local. ``None`` picks the
    count measured to pay at this world size and token count (``data/crossover.json``, ``"chunks"``), 1
    where nothing was measured or overlap does not pay (decode).

    Raises as :func:`dispatch` does, and ``ValueError`` when ``weights`` are not this rank's share of an EP
    split over the group or their hidden size differs; ``validate=True`` also compares ``num_experts``
    across ranks and checks the ids against it on the host, on every rank.

    Under ``torch.compile`` (or with ``sizes`` a CPU int tensor) this calls the custom op
    ``moecomm::moe_forward`` (:mod:`moecomm.ops`): no graph break, and sizes passed as a tensor never
    recompile. Eager calls with a list do not pass through the op.
    """
    if torch.compiler.is_compiling() or isinstance(sizes, torch.Tensor):
        from moecomm import ops

        return ops.moe_forward(hidden, topk_ids, topk_weights, weights, sizes=sizes, strategy=strategy,
                               global_scale=global_scale, expert_input_format=expert_input_format, group=group,
                               pack=pack, algorithm=algorithm, validate=validate, allow_quantized=allow_quantized,
                               chunks=chunks)
    strategy = Strategy(strategy)

    def prepare():
        rank, world = _world(group)
        _check_experts(weights, hidden, rank, world)
        resolved = strategy
        if strategy == Strategy.AUTO:
            resolved = choose_strategy(expert_input_format, sum(_check_sizes(sizes, world)), world_size=world,
                                       ep_size=world, allow_quantized=allow_quantized)
        checked = _validate(hidden, topk_ids, topk_weights, sizes, resolved, global_scale, group, expert_input_format,
                            pack)
        chosen.append((resolved, _check_chunks(chunks, checked[0], world)))
        return resolved, checked

    chosen: list = []  # the resolved strategy and chunk count, for the agreement (which runs after prepare)
    strategy, (checked_sizes, rank, world) = run_checks(
        "moe_forward", prepare,
        lambda: {**_agreement(hidden, topk_ids, sizes, chosen[0][0], global_scale, expert_input_format, pack,
                              algorithm, weights.num_experts),
                 "num_experts": weights.num_experts, "chunks": chosen[0][1]},
        group, validate)
    chunks = chosen[0][1]
    send = functools.partial(_dispatch, rank=rank, world=world, strategy=strategy, global_scale=global_scale,
                             expert_input_format=expert_input_format, group=group, pack=pack, algorithm=algorithm)

    def compute(tokens, ids, tw):
        after = expert_input_format if isinstance(tokens, torch.Tensor) else None
        return experts_forward(tokens, ids, tw, weights, input_format=after,
                               global_scale=global_scale if after == QuantFormat.NVFP4 else None)

    if chunks == 1 or world == 1:
        tokens, ids, tw, handle = send(hidden, topk_ids, topk_weights, checked_sizes)
        return combine(compute(tokens, ids, tw), handle, algorithm=algorithm)
    return _pipelined(send, compute, hidden, topk_ids, topk_weights, checked_sizes, rank, chunks, algorithm)


def _check_chunks(chunks, sizes: list[int], world: int) -> int:
    """The chunk count: ``chunks`` checked (a positive int), or for None the measured choice."""
    if chunks is None:
        table = _crossover(world).get("chunks") or []
        total = sum(sizes)
        return max([c for min_tokens, c in table if total >= min_tokens], default=1)
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be a positive int or None, got {chunks!r}")
    return chunks


_COMM_STREAMS: dict = {}
CARVEOUT_ENV = "MOECOMM_OVERLAP_SM_CARVEOUT"  # SMs the expert GEMMs leave free while chunks overlap (default 0)


def _gathered_tensors(tokens, ids, tw) -> list[torch.Tensor]:
    return ([tokens.data, tokens.scales] if isinstance(tokens, QuantizedTensor) else [tokens]) + [ids, tw]


def _pipelined(send, compute, hidden, topk_ids, topk_weights, sizes: list[int], rank: int, chunks: int,
               algorithm) -> torch.Tensor:
    """:func:`moe_forward` in ``chunks`` pieces, the communication overlapping the experts on CUDA.

    Streams (``main`` = the caller's stream, ``comm`` = one side stream per device): every dispatch runs on
    ``comm`` in chunk order; the experts of chunk ``c`` run on ``main`` after the dispatch of ``c``; the
    combine of ``c`` runs on ``comm`` after those experts and writes this rank's rows of ``c`` into the
    output; ``main`` waits for ``comm`` before returning. Tensors made on one stream and used on the other
    are recorded there (``Tensor.record_stream``), so the caching allocator never reuses their memory while
    the other stream may still read it. While overlapping, the expert GEMMs may leave SMs to the
    communication kernels (``MOECOMM_OVERLAP_SM_CARVEOUT``, torch's experimental SM carveout, which its
    grouped GEMMs honour). On a CPU the chunks run one after another.
    """
    n = hidden.shape[0]
    bounds = [[s * c // chunks for c in range(chunks + 1)] for s in sizes]
    pieces = [([b[c + 1] - b[c] for b in bounds], slice(bounds[rank][c], bounds[rank][c + 1])) for c in range(chunks)]
    out = hidden.new_empty((n, hidden.shape[1]))
    if not hidden.is_cuda:
        for chunk_sizes, rows in pieces:
            tokens, ids, tw, handle = send(hidden[rows], topk_ids[rows], topk_weights[rows], chunk_sizes)
            combine(compute(tokens, ids, tw), handle, out=out[rows], algorithm=algorithm)
        return out
    main = torch.cuda.current_stream(hidden.device)
    comm = _COMM_STREAMS.get(hidden.device)
    if comm is None:
        comm = _COMM_STREAMS[hidden.device] = torch.cuda.Stream(hidden.device)
    comm.wait_stream(main)
    for t in (hidden, topk_ids, topk_weights, out):
        t.record_stream(comm)
    sent = []
    with torch.cuda.stream(comm):
        for chunk_sizes, rows in pieces:
            gathered = send(hidden[rows], topk_ids[rows], topk_weights[rows], chunk_sizes)
            done = torch.cuda.Event()
            done.record(comm)
            sent.append((gathered, done))
    carveout = int(os.environ.get(CARVEOUT_ENV, "0"))
    previous = torch._C._get_sm_carveout_experimental()
    for (_, rows), ((tokens, ids, tw, handle), done) in zip(pieces, sent):
        main.wait_event(done)
        for t in _gathered_tensors(tokens, ids, tw):
            t.record_stream(main)
        torch._C._set_sm_carveout_experimental(carveout or previous)
        try:
            partial = compute(tokens, ids, tw)
        finally:
            torch._C._set_sm_carveout_experimental(previous)
        partial.record_stream(comm)
        comm.wait_stream(main)
        with torch.cuda.stream(comm):
            combine(partial, handle, out=out[rows], algorithm=algorithm)
    main.wait_stream(comm)
    return out


# ----------------------------------------------------------------------------------------------------
# CUDA graphs: every rank replays the same padded bucket
# ----------------------------------------------------------------------------------------------------


class GraphedMoE:
    """:func:`moe_forward` captured in one CUDA graph per token bucket; all ranks replay the same bucket.

    A graph fixes every tensor size and every collective's counts, so all ranks replay a graph of the
    same bucket: the smallest captured bucket that holds the largest live token count of any rank. Each
    rank's rows are padded to the bucket with masked slots (``topk_ids = -1``), which the experts skip:
    the padding costs its bytes on the wire and its rows in the permute, no expert work. With equal
    sizes the dispatch and the combine are the native equal-size collectives.

    Parameters
    ----------
    weights : ExpertWeights of this rank.
    hidden_size, topk : int
    buckets : list[int], tokens per rank to capture (e.g. ``[1, 2, 4, ..., 256]`` for decode).
    strategy, global_scale, expert_input_format, group, chunks : as for :func:`moe_forward`; ``"auto"`` and
        ``chunks=None`` are resolved per bucket at capture time (from ``bucket * world_size`` tokens).

    Raises
    ------
    ValueError
        At construction without CUDA (a CPU machine, CPU weights). At call time, on every rank alike, when
        the largest live token count exceeds the largest
        captured bucket (instead of a hang or an overrun); on shape/dtype mismatches.
    """

    def __init__(self, weights: ExpertWeights, *, hidden_size: int, topk: int, buckets: Sequence[int],
                 strategy: Strategy | str = Strategy.AUTO, global_scale: torch.Tensor | None = None,
                 expert_input_format: QuantFormat | None = None, group: dist.ProcessGroup | None = None,
                 chunks: int | None = None):
        if not buckets or any(isinstance(b, bool) or int(b) != b or b < 1 for b in buckets):
            raise ValueError(f"buckets must be positive integers, got {buckets}")
        if not torch.cuda.is_available() or weights.w13.device.type != "cuda":
            raise ValueError("GraphedMoE captures CUDA graphs: it needs a CUDA device, CUDA expert weights and an "
                             "NCCL group (on a CPU, call moe_forward)")
        self.buckets = sorted(set(int(b) for b in buckets))
        self.group = group
        self.topk = topk
        self.rank, self.world_size = _world(group)
        device = torch.device("cuda", torch.cuda.current_device())
        self._graphs = {}
        for bucket in self.buckets:
            hidden = torch.zeros(bucket, hidden_size, dtype=torch.bfloat16, device=device)
            ids = torch.full((bucket, topk), -1, device=device, dtype=torch.int32)
            tw = torch.zeros(bucket, topk, dtype=torch.float32, device=device)

            def step(hidden=hidden, ids=ids, tw=tw, bucket=bucket):
                return moe_forward(hidden, ids, tw, weights, sizes=[bucket] * self.world_size, strategy=strategy,
                                   global_scale=global_scale, expert_input_format=expert_input_format,
                                   group=group, chunks=chunks)

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: kernels compiled, communicators and buffers created
                step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step()
            self._graphs[bucket] = (graph, hidden, ids, tw, out)
        self._live = dict.fromkeys(self.buckets, 0)  # rows of each bucket's static ids that are not -1

    def bucket_for(self, num_tokens: int, sizes: Sequence[int] | None = None) -> int:
        """The bucket all ranks replay: the smallest that holds ``max(sizes)``.

        With ``sizes`` (the same list on every rank, e.g. the engine's DP metadata or :func:`gather_sizes`)
        nothing is communicated and the host never waits. Without it, the maximum of ``num_tokens`` over the
        ranks is taken with one small all-reduce, read on the host (a sync; collective: call on every rank).
        """
        if sizes is not None:
            sizes = _check_sizes(sizes, self.world_size)
            if sizes[self.rank] != num_tokens:
                raise ValueError(f"rank {self.rank}: {num_tokens} tokens but sizes[{self.rank}] = "
                                 f"{sizes[self.rank]}")
            most = max(sizes)
        else:
            n = torch.tensor([num_tokens], device=torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(n, op=dist.ReduceOp.MAX, group=self.group)
            most = int(n.item())
        for b in self.buckets:
            if b >= most:
                return b
        raise ValueError(f"a rank has {most} tokens, more than the largest captured bucket "
                         f"{self.buckets[-1]}: capture a larger bucket or run eagerly")

    def __call__(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                 sizes: Sequence[int] | None = None) -> torch.Tensor:
        """Replay on this rank's ``bf16 [n, hidden]`` tokens; returns ``bf16 [n, hidden]``.

        ``sizes``: every rank's token count, the same list on every rank; with it the replay never waits for
        the GPU (:meth:`bucket_for`). The result is a view of the graph's static output, overwritten by the
        next call.
        """
        n = hidden.shape[0]
        if topk_ids.shape != (n, self.topk) or topk_weights.shape != (n, self.topk):
            raise ValueError(f"topk_ids {tuple(topk_ids.shape)} / topk_weights {tuple(topk_weights.shape)} "
                             f"must be [{n}, {self.topk}]")
        bucket = self.bucket_for(n, sizes)
        graph, s_hidden, s_ids, s_tw, out = self._graphs[bucket]
        s_hidden[:n].copy_(hidden)
        s_ids[:n].copy_(ids_int32(topk_ids))
        s_tw[:n].copy_(topk_weights)
        if self._live[bucket] > n:  # rows a larger call wrote: masked again (their hidden / weights are unread)
            s_ids[n : self._live[bucket]].fill_(-1)
        self._live[bucket] = n
        graph.replay()
        return out[:n]
