"""Variable-size collectives: allgatherv and reducescatterv (the public API of :mod:`moecomm.comm`).

Rank ``r`` contributes ``sizes[r]`` rows (dim 0); ``sizes`` is the same list on every rank and the
offset of rank ``r``'s rows is ``sum(sizes[:r])``. Take ``sizes`` from :func:`gather_sizes` (or from
metadata every rank already shares, as DP attention has); ``validate=True`` checks that the ranks agree
(:mod:`moecomm.comm.checks`). The algorithm of each call is one of :class:`~moecomm.comm.algorithms.Algorithm`
(``"auto"``: the measured fastest). With preallocated ``out=`` tensors nothing waits on the host, so calls
can be captured in a CUDA graph (NCCL).

Each collective is also a ``torch.library`` custom op, registered at the end of this module beside the
function it wraps (``moecomm::all_gatherv``, ``moecomm::reduce_scatterv``); the public functions call the
op only while ``torch.compile`` traces them or when ``sizes`` is a CPU tensor (:func:`sizes_tensor`), so
eager calls with a list never pass through the dispatcher (about 10 us of host time per call).
"""

from __future__ import annotations

import operator
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from moecomm._modes import refuse_grad
from moecomm.comm._library import (
    as_sizes,
    enum_value,
    group_name,
    host_rows,
    resolve_group,
    sizes_tensor,
)
from moecomm.comm.algorithms import GATHER, REDUCE, Algorithm, resolve_algorithm
from moecomm.comm.checks import (
    REDUCE_DTYPES,
    TensorOrList,
    check_consistency,
    check_out,
    check_sizes,
    collective_agreement,
    prepare_gather,
    run_checks,
)
from moecomm.comm.group import is_nccl, rank_and_world, rank_device
from moecomm.comm.quantized import prepare_reduce_format, quantized_reduce_scatterv
from moecomm.comm.transport import (
    all_gather_single,
    as_bytes,
    bytes_per_row,
    communicator,
)
from moecomm.quant.reduce import ReduceFormat

__all__ = [
    "all_gatherv",
    "reduce_scatterv",
    "all_reduce",
    "gather_sizes",
    "check_consistency",
    "sizes_tensor",
    "all_gatherv_ref",
    "reduce_scatterv_ref",
    "all_gatherv_op",
    "reduce_scatterv_op",
]


def all_gatherv(
    tensors: TensorOrList,
    sizes: Sequence[int],
    group: dist.ProcessGroup | None = None,
    *,
    out: TensorOrList | None = None,
    validate: bool = False,
    algorithm: Algorithm | str = Algorithm.AUTO,
):
    """Gather a different number of rows from every rank; all tensors in one call.

    Parameters
    ----------
    tensors : Tensor or list/tuple of (Tensor or None)
        This rank's rows: each tensor ``[sizes[rank], *trailing]``, any dtype (bf16, fp16, fp32, int32,
        int64, uint8, float8_e4m3fn, float4_e2m1fn_x2, ...: the data travel as bytes). Trailing shapes,
        dtypes and the positions of ``None`` must be the same on every rank. Non-contiguous inputs
        are copied first.
    sizes : list[int]
        Rows per rank, ``len(sizes) == world_size``, the SAME list on every rank: take it from
        :func:`gather_sizes` (or metadata all ranks share); zeros allowed. Not checked across ranks unless
        validation is on (a host sync): ranks that disagree get wrong rows without an error (other ranks'
        rows shifted, zero rows inserted) or hang.
    group : ProcessGroup, optional
        Defaults to the world group. This process must be a member.
    out : same structure as ``tensors``, optional
        Preallocated contiguous outputs ``[sum(sizes), *trailing]``. With ``out`` and contiguous inputs
        nothing waits on the host (CUDA-graph capturable on NCCL).
    validate : bool
        Exchange metadata first (:func:`check_consistency`) so that disagreeing ranks raise on every
        rank. Syncs with the host; not for graph capture. Also on with ``MOECOMM_VALIDATE=1`` or
        ``TORCH_DISTRIBUTED_DEBUG=DETAIL``.
    algorithm : Algorithm or str
        ``"auto"`` (default), ``"broadcast"``, ``"padded"`` or ``"symm"`` (module docstring). Every
        rank must pass the same value.

    Returns
    -------
    Tensor or list
        The same structure as ``tensors``: each ``[sum(sizes), *trailing]`` with rank ``r``'s rows at
        offset ``sum(sizes[:r])``; ``None`` stays ``None``.

    Raises
    ------
    ValueError
        ``len(sizes) != world_size``, negative or non-integer sizes, a tensor whose row count is not
        ``sizes[rank]``, a tensor on the wrong device for the backend, an ``out`` of the wrong shape,
        dtype or layout or that overlaps its tensor other than in place (the tensor as ``out``'s rows of this
        rank), an unknown algorithm or ``"symm"`` without CUDA symmetric memory, a rank outside
        the group, a tensor or ``out`` that requires grad while grad mode is on (moecomm is inference-only:
        call it under ``torch.no_grad()`` or ``torch.inference_mode()``); with validation also ranks that
        disagree. Raised before any communication.
    TypeError
        ``tensors`` is not a tensor or a list/tuple of tensors and ``None``.

    Notes
    -----
    Under ``torch.compile`` (or with ``sizes`` a CPU int tensor) this calls the custom op
    ``moecomm::all_gatherv`` (:func:`all_gatherv_op`); eager calls with a list do not pass through it.
    """
    if torch.compiler.is_compiling() or isinstance(sizes, torch.Tensor):
        return all_gatherv_op(tensors, sizes, group, out=out, validate=validate, algorithm=algorithm)
    ts, single, sizes, outs, rank, world = run_checks(
        "all_gatherv", lambda: prepare_gather(tensors, sizes, out, group),
        lambda: collective_agreement(tensors, sizes, algorithm), group, validate)
    total = sum(sizes)
    if outs is None:
        outs = [None if t is None else t.new_empty((total, *t.shape[1:])) for t in ts]
    pairs = [(as_bytes(t), as_bytes(o)) for t, o in zip(ts, outs) if t is not None and bytes_per_row(t) > 0]
    if pairs and total > 0:
        if world == 1:  # a gather over one rank is a copy: no collective launch
            for src, dst in pairs:
                dst.copy_(src)
        else:
            device = pairs[0][0].device
            row_bytes = sum(src.shape[1] for src, _ in pairs)
            algo = resolve_algorithm(algorithm, "all_gatherv", sizes, row_bytes, device, is_nccl(group))
            GATHER[algo](pairs, sizes, rank, world, group, device)
    return outs[0] if single else (tuple(outs) if isinstance(tensors, tuple) else outs)


def reduce_scatterv(
    tensor: torch.Tensor,
    sizes: Sequence[int],
    group: dist.ProcessGroup | None = None,
    *,
    out: torch.Tensor | None = None,
    validate: bool = False,
    algorithm: Algorithm | str = Algorithm.AUTO,
    wire_format: str = "bf16",
) -> torch.Tensor:
    """Sum ``tensor`` over ranks and return only this rank's rows: ``sum_over_ranks(tensor)[offset:offset+sizes[rank]]``.

    Replaces ``all_reduce`` + slice: each rank receives ``sizes[rank]`` rows instead of ``sum(sizes)``.

    Parameters
    ----------
    tensor : Tensor
        ``[sum(sizes), *trailing]``, bf16, fp16 or fp32, the same shape on every rank.
    sizes : list[int]
        Rows per rank, ``len(sizes) == world_size``, the SAME list on every rank: take it from
        :func:`gather_sizes` (or metadata all ranks share); zeros allowed. Not checked across ranks unless
        validation is on (a host sync): ranks that disagree get wrong sums without an error (rows lost or
        summed into another rank's) or hang.
    group : ProcessGroup, optional
    out : Tensor, optional
        Preallocated contiguous ``[sizes[rank], *trailing]`` of ``tensor``'s dtype; with it (and a
        contiguous input) the host never waits (CUDA-graph capturable on NCCL).
    validate : bool
        Exchange metadata first so that disagreeing ranks raise on every rank (syncs with the host);
        also on with ``MOECOMM_VALIDATE=1`` or ``TORCH_DISTRIBUTED_DEBUG=DETAIL``.
    algorithm : Algorithm or str
        ``"auto"`` (default), ``"broadcast"`` (a reduce per root), ``"padded"``, ``"symm"`` or
        ``"allreduce"`` (module docstring); the same on every rank. With a quantized ``wire_format``:
        ``"symm"`` pulls from symmetric memory, ``"allreduce"`` is refused, the others run one grouped
        send/recv (:mod:`moecomm.comm.quantized`).
    wire_format : {"bf16", "int8", "fp8"}
        ``"bf16"`` (default): the rows travel in ``tensor``'s dtype and are summed as above. ``"int8"`` /
        ``"fp8"`` (e4m3): each rank quantizes its rows with an fp32 scale per (row, 128 columns), each row's
        owner dequantizes the ``world_size`` pieces and sums them in float32 in rank order, rounding once:
        about half the bytes (0.516x at 7168 columns), deterministic (the same bits on CPU and GPU, for every
        algorithm), at the accuracy of the format (docs/accuracy.md). A group holding an Inf or a NaN on any
        rank makes that row's 128 columns NaN. Needs bf16 / fp32 and rows of a multiple of 128 elements.
        Never chosen automatically; the same on every rank.

    Returns
    -------
    Tensor
        ``[sizes[rank], *trailing]``, same dtype. NCCL sums in the input dtype (``symm`` in float32 beyond
        two ranks); gloo sums 16-bit inputs in float32 and rounds once; quantized wire formats sum in
        float32 and round once.

    Raises
    ------
    ValueError
        Bad ``sizes`` (length, sign, type), ``tensor.shape[0] != sum(sizes)``, a dtype other than
        bf16/fp16/fp32 (bf16/fp32 for a quantized wire format), a tensor on the wrong device, a bad ``out``
        (also one that overlaps ``tensor`` other than as its rows of this rank, in place), an unknown or unavailable algorithm, an unknown wire format, a row that is not a multiple of 128
        elements for a quantized one, a rank outside the group, a ``tensor`` or ``out`` that requires grad in
        grad mode (as :func:`all_gatherv`); with validation also ranks that disagree (also on the wire
        format). Raised before any communication.

    Notes
    -----
    Under ``torch.compile`` (or with ``sizes`` a CPU int tensor) this calls the custom op
    ``moecomm::reduce_scatterv`` (:func:`reduce_scatterv_op`); eager calls with a list do not pass through it.
    """
    if torch.compiler.is_compiling() or isinstance(sizes, torch.Tensor):
        return reduce_scatterv_op(tensor, sizes, group, out=out, validate=validate, algorithm=algorithm,
                                  wire_format=wire_format)
    sizes, rank, world, fmt = run_checks(
        "reduce_scatterv",
        lambda: prepare_reduce_format(tensor, sizes, out, group, wire_format, algorithm, is_nccl(group)),
        lambda: collective_agreement(tensor, sizes, algorithm, wire_format), group, validate)
    if fmt != ReduceFormat.BF16:
        return quantized_reduce_scatterv(tensor, sizes, out, rank, world, group, fmt, algorithm)
    if out is None:
        out = tensor.new_empty((sizes[rank], *tensor.shape[1:]))
    if tensor.numel() == 0:
        return out
    tensor = tensor.contiguous()
    if world == 1:  # a sum over one rank is a copy
        return out.copy_(tensor)
    algo = resolve_algorithm(algorithm, "reduce_scatterv", sizes, bytes_per_row(tensor), tensor.device, is_nccl(group))
    flat = tensor.view(tensor.shape[0], -1)
    REDUCE[algo](flat, sizes, out.view(out.shape[0], flat.shape[1]), rank, world, group)
    return out


def all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum the contiguous ``tensor`` (bf16, fp16, fp32 or int32) over the ranks of ``group``, in place, through
    the same communication layer as :func:`all_gatherv` (the classic DP baseline's all-reduce). Returns
    ``tensor``. Raises ``ValueError`` for another dtype, a non-contiguous tensor, a rank outside the group or
    a tensor that requires grad in grad mode (as :func:`all_gatherv`),
    ``TypeError`` for a non-tensor."""
    rank, world = rank_and_world(group)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"rank {rank}: all_reduce takes one tensor, got {type(tensor).__name__}")
    if tensor.dtype not in (*REDUCE_DTYPES, torch.int32) or not tensor.is_contiguous():
        raise ValueError(f"rank {rank}: all_reduce needs a contiguous bf16/fp16/fp32/int32 tensor, got "
                         f"{tensor.dtype} {tuple(tensor.shape)} strides {tensor.stride()}")
    refuse_grad(f"rank {rank}: all_reduce", tensor=tensor)
    if world > 1 and tensor.numel():
        communicator(group, rank, world, tensor.device).all_reduce(tensor)
    return tensor


def gather_sizes(num_rows: int, group=None) -> list[int]:
    """Every rank's row count: ``sizes[r]`` is ``num_rows`` of rank ``r``. One small all_gather; syncs the host.

    Raises ``ValueError`` on EVERY rank when any rank passed something other than a non-negative int
    (the bad value travels as -1, so no rank is left waiting), and on a rank outside ``group``.
    """
    _, world = rank_and_world(group)
    device = rank_device(group)
    try:
        value = -1 if isinstance(num_rows, bool) else max(operator.index(num_rows), -1)
        value = value if value < 2**63 else -1  # past int64: bad, and it must still travel
    except TypeError:  # a float, a string, ...: reported on every rank below
        value = -1
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    out = torch.empty(world, dtype=torch.int64, device=device)
    all_gather_single(out, mine, group=group)
    sizes = out.tolist()
    bad = [r for r, n in enumerate(sizes) if n < 0]
    if bad:
        raise ValueError(f"gather_sizes: rank(s) {bad} passed no valid row count (a non-negative integer below 2**63) "
                         f"(this rank passed {num_rows!r})")
    return sizes


# ----------------------------------------------------------------------------------------------------
# References: the classic padded / all-reduce constructions, used as oracles and baselines


def all_gatherv_ref(tensor: torch.Tensor, sizes: Sequence[int], group=None) -> torch.Tensor:
    """Reference allgatherv: pad to ``max(sizes)`` rows, equal-size list ``all_gather`` of bytes, drop the padding.

    ``tensor``: ``[sizes[rank], *trailing]``, any dtype; returns ``[sum(sizes), *trailing]``.
    """
    rank, world = rank_and_world(group)
    sizes = check_sizes(sizes, world)
    src = as_bytes(tensor)
    padded = src.new_zeros((max(sizes), src.shape[1]))
    padded[: sizes[rank]] = src
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    gathered = torch.cat([p[:n] for p, n in zip(parts, sizes)])
    return gathered.view(tensor.dtype).reshape(sum(sizes), *tensor.shape[1:])


def reduce_scatterv_ref(tensor: torch.Tensor, sizes: Sequence[int], group=None) -> torch.Tensor:
    """Reference reducescatterv: ``all_reduce`` of the whole ``[sum(sizes), ...]`` tensor, then slice own rows."""
    rank, world = rank_and_world(group)
    sizes = check_sizes(sizes, world)
    acc = tensor.float().clone()
    dist.all_reduce(acc, group=group)
    start = sum(sizes[:rank])
    return acc[start : start + sizes[rank]].to(tensor.dtype)


# ----------------------------------------------------------------------------------------------------
# The custom ops moecomm::all_gatherv and moecomm::reduce_scatterv (what the functions call under torch.compile)


@torch.library.custom_op("moecomm::all_gatherv", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def _all_gatherv_op(tensors: Sequence[Tensor], sizes: Tensor, group_name: str, algorithm: str,
                    validate: bool) -> list[Tensor]:
    return all_gatherv(list(tensors), sizes.tolist(), resolve_group(group_name), algorithm=algorithm,
                                   validate=validate)


@_all_gatherv_op.register_fake
def _(tensors, sizes, group_name, algorithm, validate):
    if not tensors:  # no output: a dynamic size that no output carries would fail the trace
        return []
    rows = torch.library.get_ctx().new_dynamic_size()  # sum(sizes): known only when the op runs
    return [t.new_empty((rows, *t.shape[1:])) for t in tensors]


def all_gatherv_op(tensors, sizes, group=None, *, out=None, validate=False, algorithm="auto"):
    """:func:`all_gatherv` as the op ``moecomm::all_gatherv``.

    What :func:`all_gatherv` calls under ``torch.compile`` or for a tensor ``sizes``.

    Parameters
    ----------
    tensors : Tensor or list/tuple of (Tensor or None)
        Each ``[sizes[rank], *trailing]``, any dtype; the ``None`` holes are kept out of the op.
    sizes : Tensor or list[int]
        A CPU ``int64 [world_size]`` tensor (:func:`sizes_tensor`) or a list (a constant of the graph).
    group, out, validate, algorithm :
        As for :func:`all_gatherv`; with ``out`` the op's results are copied into it.

    Returns
    -------
    Tensor or list
        The structure of ``tensors``, each ``[sum(sizes), *trailing]``. While tracing, ``sum(sizes)`` is a
        new data-dependent size (``torch._check`` it against a known size where a model needs one).

    Raises
    ------
    TypeError
        ``sizes`` is a tensor that is not a 1-D CPU int32/int64 tensor. When the op runs: as
        :func:`all_gatherv`.
    ValueError
        A tensor or ``out`` that requires grad while grad mode is on (the op has no backward).
    """
    single = isinstance(tensors, Tensor)
    items = [tensors] if single else list(tensors)
    present = [t for t in items if t is not None]
    refuse_grad("all_gatherv", **{f"tensors[{i}]": t for i, t in enumerate(items)})
    if out is not None:  # checked before the collective, as the eager path does
        outs = [out] if single else list(out)
        refuse_grad("all_gatherv", **{f"out[{i}]": o for i, o in enumerate(outs)})
        check_out(outs, items, host_rows(sizes, sum), dist.get_rank(group), group)
    gathered = iter(torch.ops.moecomm.all_gatherv(present, as_sizes(sizes), group_name(group), enum_value(algorithm),
                                                  validate))
    results = [None if t is None else next(gathered) for t in items]
    if out is not None:
        for o, r in zip(outs, results):
            if o is not None:
                o.copy_(r)
        results = outs
    if single:
        return results[0]
    return tuple(results) if isinstance(tensors, tuple) else results


@torch.library.custom_op("moecomm::reduce_scatterv", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def _reduce_scatterv_op(tensor: Tensor, sizes: Tensor, group_name: str, algorithm: str, validate: bool,
                        wire_format: str) -> Tensor:
    return reduce_scatterv(tensor, sizes.tolist(), resolve_group(group_name), algorithm=algorithm,
                                       validate=validate, wire_format=wire_format)


@_reduce_scatterv_op.register_fake
def _(tensor, sizes, group_name, algorithm, validate, wire_format):
    rows = torch.library.get_ctx().new_dynamic_size()  # sizes[rank]: known only when the op runs
    return tensor.new_empty((rows, *tensor.shape[1:]))


def reduce_scatterv_op(tensor, sizes, group=None, *, out=None, validate=False, algorithm="auto", wire_format="bf16"):
    """:func:`reduce_scatterv` as the op ``moecomm::reduce_scatterv``.

    What :func:`reduce_scatterv` calls under ``torch.compile`` or for a tensor ``sizes``.

    Parameters
    ----------
    tensor : Tensor
        ``[sum(sizes), *trailing]`` bf16 / fp16 / fp32.
    sizes : Tensor or list[int]
        A CPU ``int64 [world_size]`` tensor (:func:`sizes_tensor`) or a list (a constant of the graph).
    group, out, validate, algorithm, wire_format :
        As for :func:`reduce_scatterv`; with ``out`` the result is copied into it.

    Returns
    -------
    Tensor
        ``[sizes[rank], *trailing]``, the dtype of ``tensor``. While tracing, ``sizes[rank]`` is a new
        data-dependent size.

    Raises
    ------
    TypeError
        ``sizes`` is a tensor that is not a 1-D CPU int32/int64 tensor. When the op runs: as
        :func:`reduce_scatterv`.
    ValueError
        ``tensor`` or ``out`` requires grad while grad mode is on (the op has no backward).
    """
    refuse_grad("reduce_scatterv", tensor=tensor, out=out)
    if out is not None:  # checked before the collective, as the eager path does
        rank = dist.get_rank(group)  # -1 outside the group: the op raises that
        rows = host_rows(sizes, lambda s: s[rank] if 0 <= rank < len(s) else None)
        check_out([out], [tensor], rows, rank, group)
    result = torch.ops.moecomm.reduce_scatterv(tensor, as_sizes(sizes), group_name(group), enum_value(algorithm),
                                               validate, enum_value(wire_format))
    return result if out is None else out.copy_(result)
