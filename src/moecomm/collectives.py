"""Variable-size collectives: allgatherv and reducescatterv over ``torch.distributed``.

Rank ``r`` contributes ``sizes[r]`` rows (dim 0); ``sizes`` is the same list on every rank and the
offset of rank ``r``'s rows is ``sum(sizes[:r])``.

NCCL: all tensors of one call travel in ONE NCCL group (``ncclGroupStart``/``End``, through
``torch.distributed``'s coalescing manager): one broadcast per root rank and tensor for allgatherv, one
reduce per root rank for reducescatterv -- the construction of vLLM's and SGLang's ``all_gatherv`` /
``reduce_scatterv`` on pynccl and of ProcessGroupNCCL's own uneven ``all_gather``. With equal sizes the
native ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` run instead. Synchronous collectives run on
the caller's current CUDA stream; with preallocated ``out=`` tensors nothing is allocated and nothing
waits on the host, so the calls can be captured in a CUDA graph.

Gloo has no uneven all_gather and no reduce_scatter: there, allgatherv packs every tensor's rows as bytes
into one row buffer padded to ``max(sizes)`` and runs one equal-size ``all_gather``; reducescatterv runs
``all_reduce`` (in float32 for 16-bit inputs) and keeps its own rows. These are emulations for CPU runs.

NCCL never checks counts: ranks that disagree on ``sizes`` corrupt memory or hang. ``validate=True``
(or :func:`check_consistency`) exchanges the metadata first and raises ``ValueError`` on every rank.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Sequence, Union

import torch
import torch.distributed as dist

from moecomm.launch import rank_device

__all__ = [
    "all_gatherv",
    "reduce_scatterv",
    "check_consistency",
    "check_agreement",
    "run_checks",
    "gather_sizes",
    "all_gatherv_ref",
    "reduce_scatterv_ref",
]

TensorOrList = Union[torch.Tensor, Sequence[Union[torch.Tensor, None]]]
REDUCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# torch >= 2.13 renames the equal-size collectives (the old names warn); torch 2.6-2.12 has only the old ones.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# ----------------------------------------------------------------------------------------------------
# Validation (local checks first, then the optional cross-rank check)
# ----------------------------------------------------------------------------------------------------


def _world(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _check_sizes(sizes: Sequence[int], world_size: int) -> list[int]:
    if isinstance(sizes, torch.Tensor):
        raise TypeError("sizes must be a list of Python ints (a tensor would need a host sync)")
    if not isinstance(sizes, (list, tuple)):
        raise TypeError(f"sizes must be a list or tuple of ints, got {type(sizes).__name__}")
    if len(sizes) != world_size:
        raise ValueError(f"len(sizes) = {len(sizes)} but the world size is {world_size}: {list(sizes)}")
    checked = []
    for r, s in enumerate(sizes):
        try:
            v = operator.index(s) if not isinstance(s, bool) else -1
        except TypeError:
            v = -1
        if v < 0:
            raise ValueError(f"sizes[{r}] = {s!r}: sizes must be non-negative integers ({list(sizes)})")
        checked.append(v)
    return checked


def _as_list(tensors: TensorOrList) -> tuple[list[torch.Tensor | None], bool]:
    if isinstance(tensors, torch.Tensor):
        return [tensors], True
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"expected a tensor or a list/tuple of tensors, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors[{i}] is a {type(t).__name__}, expected a tensor or None")
    return list(tensors), False


def _expected_device(group) -> str:
    return "cuda" if dist.get_backend(group) == "nccl" else "cpu"


def _check_rows(ts: list[torch.Tensor | None], rows: int, rank: int, what: str, group) -> None:
    device_type = _expected_device(group)
    for i, t in enumerate(ts):
        if t is None:
            continue
        if t.dim() < 1:
            raise ValueError(f"rank {rank}: {what}[{i}] is 0-dimensional; rows are dim 0")
        if t.shape[0] != rows:
            raise ValueError(
                f"rank {rank}: {what}[{i}] has {t.shape[0]} rows but sizes[{rank}] = {rows}"
                if what == "tensors"
                else f"rank {rank}: {what}[{i}] has {t.shape[0]} rows, expected {rows}"
            )
        if t.device.type != device_type:
            raise ValueError(f"rank {rank}: {what}[{i}] is on {t.device}, the {dist.get_backend(group)} "
                             f"backend needs {device_type} tensors")


def _check_out(out_list, ts, rows: int, rank: int, group) -> None:
    if len(out_list) != len(ts):
        raise ValueError(f"rank {rank}: {len(out_list)} outputs for {len(ts)} inputs")
    for i, (o, t) in enumerate(zip(out_list, ts)):
        if (o is None) != (t is None):
            raise ValueError(f"rank {rank}: out[{i}] and tensors[{i}] must both be None or both tensors")
        if o is None:
            continue
        if o.dtype != t.dtype or o.shape[1:] != t.shape[1:]:
            raise ValueError(f"rank {rank}: out[{i}] is {o.dtype} {tuple(o.shape)}, input is "
                             f"{t.dtype} {tuple(t.shape)}: dtype and trailing dims must match")
        if not o.is_contiguous():
            raise ValueError(f"rank {rank}: out[{i}] must be contiguous")
    _check_rows(out_list, rows, rank, "out", group)


def _meta(tensors) -> list:
    """(trailing shape, dtype) per tensor (None for a hole in the list)."""
    items = tensors if isinstance(tensors, (list, tuple)) else [tensors]
    return [None if t is None else (tuple(t.shape[1:]), str(t.dtype)) for t in items]


def run_checks(what: str, prepare, agreement, group, validate: bool):
    """Return ``prepare()``, the local checks of an operation (they raise on bad input).

    With ``validate``, a failure of ``prepare`` on any rank, or ranks whose ``agreement()`` dicts differ,
    raise ``ValueError`` on EVERY rank (:func:`check_agreement`), so that no rank is left waiting in the
    collective that follows. ``agreement`` runs only after ``prepare`` succeeded.
    """
    if not validate:
        return prepare()
    try:
        result = prepare()
        mine, error = agreement(), None
    except Exception as e:  # noqa: BLE001 - any local failure must reach every rank
        result, mine, error = None, {}, e
    check_agreement(what, mine, group, error)
    return result


def _agreement(tensors, sizes) -> dict:
    return {"sizes": list(sizes), "meta": _meta(tensors)}


def check_agreement(what: str, mine: dict, group=None, local_error: Exception | None = None) -> None:
    """Raise ``ValueError`` on EVERY rank if any rank had ``local_error`` or the ranks' ``mine`` differ.

    ``mine`` holds small picklable values (sizes, shapes, dtypes, a global scale) exchanged with
    ``all_gather_object``; this syncs with the host and is not for CUDA-graph capture. The message names
    each rank's value, so a user sees which rank is off.
    """
    rank, world = _world(group)
    payload = {"values": mine, "error": None if local_error is None else str(local_error)}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, payload, group=group)
    errors = [m["error"] if m["error"].startswith(f"rank {r}:") else f"rank {r}: {m['error']}"
              for r, m in enumerate(everyone) if m["error"]]
    if errors:
        raise ValueError(f"{what}: invalid input on {len(errors)} rank(s): " + "; ".join(errors))
    for key in mine:
        values = [m["values"][key] for m in everyone]
        if any(v != values[0] for v in values):
            desc = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(f"{what}: ranks disagree on {key}: {desc}")


def check_consistency(tensors: TensorOrList, sizes: Sequence[int], group=None, *, op: str = "all_gatherv",
                      out: TensorOrList | None = None) -> None:
    """Raise ``ValueError`` on EVERY rank unless all ranks agree on ``sizes``, trailing shapes and dtypes and
    every rank's input passes the checks of ``op``.

    Exchanges a small metadata object (``all_gather_object``; synchronises with the host, so not for
    use inside CUDA-graph capture). Local errors (wrong row count on one rank, bad sizes, a bad ``out``)
    are reported on every rank instead of leaving the other ranks waiting in a collective.
    ``validate=True`` of :func:`all_gatherv` / :func:`reduce_scatterv` runs this.

    Parameters
    ----------
    tensors : Tensor or list of (Tensor or None)
        This rank's inputs, as passed to :func:`all_gatherv` or :func:`reduce_scatterv`.
    sizes : list[int]
        Rows per rank, ``len(sizes) == world_size``.
    group : ProcessGroup, optional
    op : {"all_gatherv", "reduce_scatterv"}
        Which collective's checks to run.
    out : optional, as passed to the collective.

    Raises
    ------
    ValueError
        On every rank, naming each offending rank and value; also for an unknown ``op`` (locally).
    """
    if op not in _PREPARE:
        raise ValueError(f"op must be 'all_gatherv' or 'reduce_scatterv', got {op!r}")
    run_checks(op, lambda: _PREPARE[op](tensors, sizes, out, group), lambda: _agreement(tensors, sizes), group, True)


def gather_sizes(num_rows: int, group=None) -> list[int]:
    """Every rank's row count: ``sizes[r]`` is ``num_rows`` of rank ``r``. One small all_gather; syncs the host.

    Raises ``ValueError`` on EVERY rank when any rank passed something other than a non-negative int
    (the bad value travels as -1, so no rank is left waiting).
    """
    device = rank_device(group)
    _, world = _world(group)
    try:
        value = -1 if isinstance(num_rows, bool) else max(operator.index(num_rows), -1)
    except TypeError:  # a float, a string, ...: reported on every rank below
        value = -1
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    out = torch.empty(world, dtype=torch.int64, device=device)
    all_gather_single(out, mine, group=group)
    sizes = out.tolist()
    bad = [r for r, n in enumerate(sizes) if n < 0]
    if bad:
        raise ValueError(f"gather_sizes: rank(s) {bad} passed no non-negative integer row count "
                         f"(this rank passed {num_rows!r})")
    return sizes


# ----------------------------------------------------------------------------------------------------
# Byte views: every dtype travels as uint8 rows
# ----------------------------------------------------------------------------------------------------


def _row_bytes(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:]) * t.element_size()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor as a ``uint8 [rows, row_bytes]`` view (a copy only if ``t`` is not contiguous)."""
    t = t.contiguous()
    flat = t.reshape(-1) if t.dim() else t
    return flat.view(torch.uint8).reshape(t.shape[0], _row_bytes(t))


@dataclass(frozen=True)
class _Offsets:
    sizes: list[int]

    def start(self, r: int) -> int:
        return sum(self.sizes[:r])

    def rows(self, t: torch.Tensor, r: int) -> torch.Tensor:
        s = self.start(r)
        return t[s : s + self.sizes[r]]


# ----------------------------------------------------------------------------------------------------
# all_gatherv
# ----------------------------------------------------------------------------------------------------


def all_gatherv(
    tensors: TensorOrList,
    sizes: Sequence[int],
    group: dist.ProcessGroup | None = None,
    *,
    out: TensorOrList | None = None,
    validate: bool = False,
):
    """Gather a different number of rows from every rank; all tensors in one grouped collective.

    Parameters
    ----------
    tensors : Tensor or list/tuple of (Tensor or None)
        This rank's rows: each tensor ``[sizes[rank], *trailing]``, any dtype (bf16, fp16, fp32, int32,
        int64, uint8, float8_e4m3fn, float4_e2m1fn_x2, ...: the data travel as bytes). Trailing shapes,
        dtypes and the positions of ``None`` must be the same on every rank. Non-contiguous inputs
        are copied first.
    sizes : list[int]
        Rows per rank, ``len(sizes) == world_size``, the same list on every rank; zeros allowed.
    group : ProcessGroup, optional
        Defaults to the world group.
    out : same structure as ``tensors``, optional
        Preallocated contiguous outputs ``[sum(sizes), *trailing]``. With ``out`` and contiguous inputs
        the call allocates nothing and never syncs with the host (CUDA-graph capturable on NCCL).
    validate : bool
        Exchange metadata first (:func:`check_consistency`) so that disagreeing ranks raise on every
        rank. Syncs with the host; not for graph capture.

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
        dtype or layout; with ``validate=True`` also ranks that disagree. Raised before any
        communication.
    TypeError
        ``tensors`` is not a tensor or a list/tuple of tensors and ``None``.
    """
    rank, world = _world(group)
    ts, single, sizes, outs = run_checks("all_gatherv", lambda: _prepare_gather(tensors, sizes, out, group),
                                         lambda: _agreement(tensors, sizes), group, validate)
    total = sum(sizes)
    if outs is None:
        outs = [None if t is None else t.new_empty((total, *t.shape[1:])) for t in ts]
    pairs = [(_bytes(t), _bytes(o)) for t, o in zip(ts, outs) if t is not None and _row_bytes(t) > 0]
    if pairs and total > 0:
        if world == 1:  # a gather over one rank is a copy: no collective launch
            for src, dst in pairs:
                dst.copy_(src)
        elif dist.get_backend(group) == "nccl":
            _all_gatherv_nccl(pairs, sizes, rank, group)
        else:
            _all_gatherv_padded(pairs, sizes, rank, group)
    return outs[0] if single else (tuple(outs) if isinstance(tensors, tuple) else outs)


def _prepare_gather(tensors, sizes, out, group):
    """The local checks of all_gatherv: returns (tensors as a list, single?, sizes, outs or None)."""
    rank, world = _world(group)
    ts, single = _as_list(tensors)
    sizes = _check_sizes(sizes, world)
    _check_rows(ts, sizes[rank], rank, "tensors", group)
    outs = None
    if out is not None:
        outs, _ = _as_list(out)
        _check_out(outs, ts, sum(sizes), rank, group)
    return ts, single, sizes, outs


def _all_gatherv_nccl(pairs, sizes: list[int], rank: int, group) -> None:
    device = pairs[0][0].device
    off = _Offsets(sizes)
    equal = all(s == sizes[0] for s in sizes)
    if equal and len(pairs) == 1:  # one native collective needs no group around it
        all_gather_single(pairs[0][1], pairs[0][0], group=group)
        return
    with dist._coalescing_manager(group, device):
        for src, dst in pairs:
            if equal:
                all_gather_single(dst, src, group=group)
                continue
            off.rows(dst, rank).copy_(src)  # the root's rows are broadcast in place
            for r, n in enumerate(sizes):
                if n:
                    dist.broadcast(off.rows(dst, r), group=group, group_src=r)


def _all_gatherv_padded(pairs, sizes: list[int], rank: int, group) -> None:
    """Gloo: pack all tensors' rows into one uint8 buffer padded to max(sizes); one all_gather."""
    widths = [src.shape[1] for src, _ in pairs]
    cols = sum(widths)
    pad = max(sizes)
    send = pairs[0][0].new_zeros((pad, cols))
    c = 0
    for (src, _), w in zip(pairs, widths):
        send[: sizes[rank], c : c + w] = src
        c += w
    recv = [torch.empty_like(send) for _ in sizes]
    dist.all_gather(recv, send, group=group)
    off = _Offsets(sizes)
    c = 0
    for (_, dst), w in zip(pairs, widths):
        for r, n in enumerate(sizes):
            off.rows(dst, r).copy_(recv[r][:n, c : c + w])
        c += w


# ----------------------------------------------------------------------------------------------------
# reduce_scatterv
# ----------------------------------------------------------------------------------------------------


def reduce_scatterv(
    tensor: torch.Tensor,
    sizes: Sequence[int],
    group: dist.ProcessGroup | None = None,
    *,
    out: torch.Tensor | None = None,
    validate: bool = False,
) -> torch.Tensor:
    """Sum ``tensor`` over ranks and return only this rank's rows: ``sum_over_ranks(tensor)[offset:offset+sizes[rank]]``.

    Replaces ``all_reduce`` + slice: each rank receives ``sizes[rank]`` rows instead of ``sum(sizes)``.

    Parameters
    ----------
    tensor : Tensor
        ``[sum(sizes), *trailing]``, bf16, fp16 or fp32, the same shape on every rank.
    sizes : list[int]
        Rows per rank, ``len(sizes) == world_size``; zeros allowed.
    group : ProcessGroup, optional
    out : Tensor, optional
        Preallocated contiguous ``[sizes[rank], *trailing]`` of ``tensor``'s dtype; with it (and a
        contiguous input) nothing is allocated and the host never waits (CUDA-graph capturable on NCCL).
    validate : bool
        Exchange metadata first so that disagreeing ranks raise on every rank (syncs with the host).

    Returns
    -------
    Tensor
        ``[sizes[rank], *trailing]``, same dtype. NCCL sums in the input dtype; gloo sums 16-bit
        inputs in float32 and rounds once.

    Raises
    ------
    ValueError
        Bad ``sizes`` (length, sign, type), ``tensor.shape[0] != sum(sizes)``, a dtype other than
        bf16/fp16/fp32, a tensor on the wrong device, a bad ``out``; with ``validate=True`` also ranks
        that disagree. Raised before any communication.
    """
    rank, world = _world(group)
    sizes = run_checks("reduce_scatterv", lambda: _prepare_reduce(tensor, sizes, out, group),
                       lambda: _agreement(tensor, sizes), group, validate)
    if out is None:
        out = tensor.new_empty((sizes[rank], *tensor.shape[1:]))
    if tensor.numel() == 0:
        return out
    tensor = tensor.contiguous()
    off = _Offsets(sizes)
    if world == 1:  # a sum over one rank is a copy
        return out.copy_(tensor)
    if dist.get_backend(group) != "nccl":
        acc = tensor.float() if tensor.dtype != torch.float32 else tensor.clone()
        dist.all_reduce(acc, group=group)
        out.copy_(off.rows(acc, rank))
        return out
    if all(s == sizes[0] for s in sizes):
        reduce_scatter_single(out, tensor, group=group)
        return out
    out.copy_(off.rows(tensor, rank))  # the root reduces in place into its output
    with dist._coalescing_manager(group, tensor.device):
        for r, n in enumerate(sizes):
            if n:
                dist.reduce(out if r == rank else off.rows(tensor, r), group=group, group_dst=r)
    return out


def _prepare_reduce(tensor, sizes, out, group) -> list[int]:
    """The local checks of reduce_scatterv: returns the sizes."""
    rank, world = _world(group)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"rank {rank}: reduce_scatterv takes one tensor, got {type(tensor).__name__}")
    if tensor.dtype not in REDUCE_DTYPES:
        raise ValueError(f"rank {rank}: reduce_scatterv supports {REDUCE_DTYPES}, got {tensor.dtype}")
    sizes = _check_sizes(sizes, world)
    _check_rows([tensor], sum(sizes), rank, "input", group)
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"rank {rank}: out must be a tensor, got {type(out).__name__}")
        _check_out([out], [tensor], sizes[rank], rank, group)
    return sizes


_PREPARE = {"all_gatherv": _prepare_gather, "reduce_scatterv": _prepare_reduce}


# ----------------------------------------------------------------------------------------------------
# References: the classic padded / all-reduce constructions, used as oracles and baselines
# ----------------------------------------------------------------------------------------------------


def all_gatherv_ref(tensor: torch.Tensor, sizes: Sequence[int], group=None) -> torch.Tensor:
    """Reference allgatherv: pad to ``max(sizes)`` rows, equal-size list ``all_gather`` of bytes, drop the padding.

    ``tensor``: ``[sizes[rank], *trailing]``, any dtype; returns ``[sum(sizes), *trailing]``.
    """
    rank, world = _world(group)
    sizes = _check_sizes(sizes, world)
    src = _bytes(tensor)
    padded = src.new_zeros((max(sizes), src.shape[1]))
    padded[: sizes[rank]] = src
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    gathered = torch.cat([p[:n] for p, n in zip(parts, sizes)])
    return gathered.view(tensor.dtype).reshape(sum(sizes), *tensor.shape[1:])


def reduce_scatterv_ref(tensor: torch.Tensor, sizes: Sequence[int], group=None) -> torch.Tensor:
    """Reference reducescatterv: ``all_reduce`` of the whole ``[sum(sizes), ...]`` tensor, then slice own rows."""
    rank, world = _world(group)
    sizes = _check_sizes(sizes, world)
    acc = tensor.float().clone()
    dist.all_reduce(acc, group=group)
    return _Offsets(sizes).rows(acc, rank).to(tensor.dtype)
