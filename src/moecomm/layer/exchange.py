"""The two halves of an EP MoE layer step with DP attention: :func:`dispatch` (every rank receives every
rank's tokens, ids and weights) and :func:`combine` (the experts' partial outputs summed over ranks, each
rank keeping its own rows).

Two layouts of the gathered rows. *Compact*: ``sum(sizes)`` rows, rank ``r``'s at ``sum(sizes[:r])``.
*Padded*: every rank sends ``max(sizes)`` rows, the rows past its own carry ``topk_ids = -1`` (masked
slots: the experts skip them, :mod:`moecomm.moe`), and the gather is the native equal-size all-gather
with no compaction copy; rank ``r``'s rows start at ``r * max(sizes)``. The padded layout is used where
the collectives' algorithm choice (:func:`moecomm.comm.choose_algorithm`) picks ``padded`` for the
message, or when asked (``algorithm="padded"``); :class:`DispatchHandle` records it for the combine.

No function here reads a device value on the host unless ``validate=True`` (or ``MOECOMM_VALIDATE=1``):
expert ids outside ``[-1, num_experts)`` are reported by :func:`moecomm.errors.check_errors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from moecomm._modes import kept_state, refuse_grad
from moecomm.comm import (
    Algorithm,
    all_gatherv,
    all_reduce,
    choose_algorithm,
    reduce_scatterv,
)
from moecomm.comm.checks import REDUCE_DTYPES, run_checks
from moecomm.comm.group import rank_and_world
from moecomm.layer.asynchronous import Pending, launch
from moecomm.layer.checks import check_combine_format, check_dispatch, dispatch_agreement
from moecomm.layer.message import message_layout
from moecomm.layer.strategy import Strategy, wire_format
from moecomm.moe import ids_int32
from moecomm.quant import QuantFormat, QuantizedTensor, ReduceFormat, quantize

__all__ = ["DispatchHandle", "dispatch", "combine"]


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
        with kept_state():
            gs = _SCALES[key] = torch.tensor(float(global_scale), dtype=torch.float32, device=device)
    return gs


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
    async_op: bool = False,
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
        :func:`moecomm.comm.gather_sizes` (or DP metadata all ranks share). Not checked across ranks
        unless validation is on (a host sync): ranks that disagree get each other's tokens wrong without an
        error (shifted, zero rows inserted) or hang.
    strategy : Strategy or str
        A concrete strategy (``"auto"`` is resolved by :func:`moe_forward`).
    global_scale : fp32 tensor (1 element) or float
        NVFP4 global encode scale of the layer (static, the same on every rank). Required where NVFP4 is on
        the wire or is ``expert_input_format``; refused (ValueError) everywhere else, as
        :func:`moecomm.quant.quantize` refuses it for other formats.
    expert_input_format : QuantFormat, optional
        The format the experts consume; picks the FP8 flavour on the wire (per-128 group by default).
    group : ProcessGroup, optional
    pack : bool
        One packed message (default) or the tensors separately in one NCCL group.
    algorithm : Algorithm or str
        The allgatherv algorithm (:mod:`moecomm.comm`); ``"auto"`` picks per call. Where it is (or
        resolves to) ``"padded"`` the gathered rows come in the padded layout (module docstring).
    validate : bool
        Exchange metadata (sizes, hidden, topk, strategy, wire format, pack, algorithm, NVFP4 global scale)
        and check the ids (none below -1) first, and raise on EVERY rank when ranks disagree or any rank's
        input is bad. Syncs with the host; not under graph capture. Also on with ``MOECOMM_VALIDATE=1`` or
        ``TORCH_DISTRIBUTED_DEBUG=DETAIL``.
    async_op : bool
        Return at once a :class:`~moecomm.layer.asynchronous.Pending` whose ``wait()`` gives the four
        results below, the dispatch running on moecomm's communication stream after the work the current
        stream has queued (inputs and results recorded for the caching allocator; no host sync). The checks
        (and ``validate``) still run, and raise, before it returns. On a CPU the dispatch runs at once and
        ``wait()`` returns its results. For micro-batch overlap (``examples/two_microbatches.py``).

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
    TypeError
        ``async_op`` (or ``pack``) not a bool; ``hidden``, ``topk_ids`` or ``topk_weights`` not a tensor.
    ValueError
        Before any communication: bad ``sizes``, row counts, dtypes, dims or devices; a hidden size not
        divisible by the format's block; a missing or non-finite global scale where NVFP4 is used, a global
        scale where it is not; a rank outside the group; ``hidden``, ``topk_weights`` or a global scale tensor
        that requires grad while grad mode is on (moecomm is inference-only: call it under ``torch.no_grad()``
        or ``torch.inference_mode()``); with validation, ranks that disagree (e.g. on the global scale) or ids
        below -1.
    """
    chosen: list = []  # the checked strategy, for the agreement (which runs after prepare)

    def prepare():
        rank = rank_and_world(group)[0]
        try:
            chosen.append(Strategy(strategy))
        except ValueError as e:
            raise ValueError(f"rank {rank}: {e}") from None
        if chosen[0] == Strategy.AUTO:
            raise ValueError(f"rank {rank}: dispatch needs a concrete strategy; moe_forward resolves 'auto'")
        if not isinstance(async_op, bool):
            raise TypeError(f"rank {rank}: async_op must be a bool, got {async_op!r}")
        return check_dispatch(hidden, topk_ids, topk_weights, sizes, chosen[0], global_scale, group,
                              expert_input_format, pack)

    sizes, rank, world = run_checks(
        "dispatch", prepare,
        lambda: dispatch_agreement(hidden, topk_ids, sizes, chosen[0], global_scale, expert_input_format, pack,
                                   algorithm),
        group, validate)
    strategy = chosen[0]
    if async_op:
        return launch(lambda: dispatch_checked(hidden, topk_ids, topk_weights, sizes, rank, world, strategy,
                                               global_scale, expert_input_format, group, pack, algorithm),
                      (hidden, topk_ids, topk_weights, global_scale), hidden.device)
    return dispatch_checked(hidden, topk_ids, topk_weights, sizes, rank, world, strategy, global_scale,
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


def dispatch_checked(hidden, topk_ids, topk_weights, sizes: list[int], rank: int, world: int, strategy: Strategy,
                     global_scale, expert_input_format, group, pack: bool, algorithm):
    """:func:`dispatch` after its checks (``sizes`` already a checked list)."""
    topk_ids = ids_int32(topk_ids)
    if strategy == Strategy.ALLREDUCE:
        handle = DispatchHandle(strategy, tuple(sizes), rank, group)
        return (*_gather_by_allreduce(hidden, topk_ids, topk_weights, sizes, rank, group), handle)
    fmt = wire_format(strategy, expert_input_format)
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
            algorithm: Algorithm | str = Algorithm.AUTO, combine_format: ReduceFormat | str = "bf16",
            async_op: bool = False) -> torch.Tensor | Pending:
    """Sum the experts' partial outputs over ranks and return this rank's rows.

    ``partial``: ``bf16 [handle.rows, hidden]`` from the local experts. Returns ``bf16 [sizes[rank], hidden]``:
    reducescatterv (``algorithm``, :mod:`moecomm.comm`) for ``agrs*`` strategies, all-reduce + slice
    for ``allreduce`` (which sums ``partial`` in place). In the padded layout the result is a view of the
    first ``sizes[rank]`` rows of a ``[max(sizes), hidden]`` buffer (or written to ``out``).
    ``combine_format``: the reducescatterv's ``wire_format`` (``"bf16"``, default; ``"int8"`` or ``"fp8"``:
    quantized per (token, 128 columns), summed in float32 at the token's owner, :mod:`moecomm.comm.quantized`;
    ``agrs*`` strategies, bf16 / fp32 partials, hidden a multiple of 128). Padding rows of the padded layout
    travel too (zeros: zero codes).
    Raises ``ValueError`` when ``partial`` or ``out`` requires grad in grad mode (as :func:`dispatch`),
    ``partial`` does not have ``handle.rows`` rows, ``out`` is not ``[sizes[rank], hidden]`` of ``partial``'s
    dtype or ``combine_format`` is unknown or does not fit (as listed); ``TypeError`` when ``handle`` is not a
    :class:`DispatchHandle`, ``out`` not a tensor or ``async_op`` not a bool.

    ``async_op=True``: return at once a :class:`~moecomm.layer.asynchronous.Pending` whose ``wait()`` gives
    the result, the combine running on moecomm's communication stream after the work the current stream
    has queued (``partial`` and ``out`` recorded there for the caching allocator; no host sync). Do not
    write ``partial`` or ``out`` before ``wait()`` (``allreduce`` sums ``partial`` in place). The checks
    raise before it returns. On a CPU the combine runs at once and ``wait()`` returns its result.
    """
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"combine needs the DispatchHandle that dispatch returned, got {type(handle).__name__}")
    if out is not None and not isinstance(out, torch.Tensor):
        raise TypeError(f"rank {handle.rank}: out must be a tensor, got {type(out).__name__}")
    if not isinstance(async_op, bool):
        raise TypeError(f"rank {handle.rank}: async_op must be a bool, got {async_op!r}")
    sizes, rank = list(handle.sizes), handle.rank
    if not isinstance(partial, torch.Tensor) or partial.dim() != 2 or partial.shape[0] != handle.rows:
        raise ValueError(f"rank {rank}: partial must be [{handle.rows}, hidden] (the dispatched rows), got "
                         f"{getattr(partial, 'shape', type(partial).__name__)}")
    if partial.dtype not in REDUCE_DTYPES:
        raise ValueError(f"rank {rank}: partial must be one of {REDUCE_DTYPES}, got {partial.dtype}")
    refuse_grad(f"rank {rank}: combine", partial=partial, out=out)
    n = sizes[rank]
    if out is not None and (out.dtype != partial.dtype or out.shape != (n, partial.shape[1])):
        raise ValueError(f"rank {rank}: out must be {partial.dtype} [{n}, {partial.shape[1]}], got "
                         f"{out.dtype} {tuple(out.shape)}")
    fmt = check_combine_format(combine_format, handle.strategy, partial.shape[1], rank)
    if async_op:
        return launch(lambda: _combine_checked(partial, handle, out, algorithm, fmt), (partial, out), partial.device)
    return _combine_checked(partial, handle, out, algorithm, fmt)


def _combine_checked(partial: torch.Tensor, handle: DispatchHandle, out: torch.Tensor | None, algorithm, fmt):
    """:func:`combine` after its checks (``fmt``: the checked combine format)."""
    sizes, rank, n = list(handle.sizes), handle.rank, handle.sizes[handle.rank]
    if handle.strategy == Strategy.ALLREDUCE:
        all_reduce(partial, handle.group)  # in place, as the classic DP path does
        start = sum(sizes[:rank])
        rows = partial[start : start + n]
        return rows if out is None else out.copy_(rows)
    if handle.padded_rows is None:
        return reduce_scatterv(partial, sizes, handle.group, out=out, algorithm=algorithm, wire_format=fmt)
    pad = handle.padded_rows
    mine = reduce_scatterv(partial, [pad] * len(sizes), handle.group,
                           out=out if out is not None and n == pad else None, algorithm=algorithm, wire_format=fmt)
    return mine[:n] if out is None else (mine if mine is out else out.copy_(mine[:n]))
