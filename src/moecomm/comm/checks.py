"""Checks at the door of the collectives: local argument checks, and agreement across ranks.

**sizes must agree.** NCCL never checks counts: ranks whose ``sizes`` differ corrupt each other's rows
or hang. The local checks here (:func:`prepare_gather`, :func:`prepare_reduce`) always run and raise
before any communication; with ``validate=True``, the environment variable ``MOECOMM_VALIDATE=1`` or
torch's ``TORCH_DISTRIBUTED_DEBUG=DETAIL``, :func:`run_checks` also exchanges the metadata of the call
(:func:`check_agreement`, one ``all_gather_object``: a host sync) and raises ``ValueError`` on EVERY rank
when any rank's input is bad or the ranks disagree, so that no rank is left waiting in a collective.
"""

from __future__ import annotations

import operator
import os
from typing import Sequence, Union

import torch
import torch.distributed as dist

from moecomm._modes import refuse_grad
from moecomm.comm.algorithms import Algorithm
from moecomm.comm.group import is_nccl, rank_and_world

__all__ = [
    "VALIDATE_ENV",
    "REDUCE_DTYPES",
    "validation_enabled",
    "check_sizes",
    "run_checks",
    "check_agreement",
    "check_consistency",
    "prepare_gather",
    "prepare_reduce",
]

TensorOrList = Union[torch.Tensor, Sequence[Union[torch.Tensor, None]]]
REDUCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
VALIDATE_ENV = "MOECOMM_VALIDATE"  # "1": every collective validates as with validate=True


def validation_enabled(validate: bool) -> bool:
    """``validate``, or the environment asking every call to validate: ``MOECOMM_VALIDATE=1`` or torch's
    ``TORCH_DISTRIBUTED_DEBUG=DETAIL``. ``TypeError`` unless ``validate`` is a bool (``"no"`` is not False)."""
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {validate!r}")
    return (validate or os.environ.get(VALIDATE_ENV, "0") not in ("0", "")
            or os.environ.get("TORCH_DISTRIBUTED_DEBUG", "").upper() == "DETAIL")


def check_sizes(sizes: Sequence[int], world_size: int) -> list[int]:
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


def as_list(tensors: TensorOrList, name: str = "tensors") -> tuple[list[torch.Tensor | None], bool]:
    if isinstance(tensors, torch.Tensor):
        return [tensors], True
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name}: expected a tensor or a list/tuple of tensors, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] is a {type(t).__name__}, expected a tensor or None")
    return list(tensors), False


def check_rows(ts: list[torch.Tensor | None], rows: int, rank: int, what: str, group) -> None:
    """Each tensor of ``ts`` (None: a hole) has ``rows`` rows, lives on the backend's kind of device and
    does not require grad in grad mode (``moecomm._modes``)."""
    cuda = is_nccl(group)
    refuse_grad(f"rank {rank}", **{f"{what}[{i}]": t for i, t in enumerate(ts)})
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
        if t.is_cuda != cuda:
            raise ValueError(f"rank {rank}: {what}[{i}] is on {t.device}, the {dist.get_backend(group)} "
                             f"backend needs {'cuda' if cuda else 'cpu'} tensors")


def check_out(out_list, ts, rows: int | None, rank: int, group) -> None:
    """``out`` buffers for ``ts`` gathered (or scattered) to ``rows`` rows; ``rows`` None (while tracing
    under torch.compile, where the count is data-dependent) skips the row count and device-kind check."""
    if len(out_list) != len(ts):
        raise ValueError(f"rank {rank}: {len(out_list)} outputs for {len(ts)} inputs")
    for i, (o, t) in enumerate(zip(out_list, ts)):
        if (o is None) != (t is None):
            raise ValueError(f"rank {rank}: out[{i}] and tensors[{i}] must both be None or both tensors")
        if o is None:
            continue
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"rank {rank}: out[{i}] is a {type(o).__name__}, expected a tensor")
        if o.dtype != t.dtype or o.shape[1:] != t.shape[1:]:
            raise ValueError(f"rank {rank}: out[{i}] is {o.dtype} {tuple(o.shape)}, input is "
                             f"{t.dtype} {tuple(t.shape)}: dtype and trailing dims must match")
        if not o.is_contiguous():
            raise ValueError(f"rank {rank}: out[{i}] must be contiguous")
        if o.device != t.device:
            raise ValueError(f"rank {rank}: out[{i}] is on {o.device}, the input on {t.device}")
    if rows is not None:
        check_rows(out_list, rows, rank, "out", group)


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes ``[first, end)`` a tensor's elements occupy (torch strides are non-negative)."""
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def check_alias(rows: torch.Tensor, whole: torch.Tensor, start: int, rank: int, names: str) -> None:
    """``rows`` (this rank's ``[sizes[rank], ...]``) may share memory with ``whole`` (``[sum(sizes), ...]``) only
    in place: as ``whole[start : start + sizes[rank]]``. Any other overlap makes an algorithm read rows it has
    already written (``ValueError``)."""
    if rows.numel() == 0 or whole.numel() == 0:
        return
    (a, b), (c, d) = _byte_span(rows), _byte_span(whole)
    if b <= c or d <= a:
        return
    in_place = whole.is_contiguous() and rows.is_contiguous() and a == c + start * whole[0].numel() * whole.element_size()
    if not in_place:
        raise ValueError(f"rank {rank}: {names} overlap in memory other than in place (this rank's rows at row "
                         f"{start} of the whole): pass separate tensors")


def _meta(tensors) -> list:
    """(trailing shape, dtype) per tensor (None for a hole in the list)."""
    items = tensors if isinstance(tensors, (list, tuple)) else [tensors]
    return [None if t is None else (tuple(t.shape[1:]), str(t.dtype)) for t in items]


def run_checks(what: str, prepare, agreement, group, validate: bool):
    """Return ``prepare()``, the local checks of an operation (they raise on bad input).

    With ``validate`` (or the environment, :func:`validation_enabled`), a failure of ``prepare`` on any
    rank, or ranks whose ``agreement()`` dicts differ, raise ``ValueError`` on EVERY rank
    (:func:`check_agreement`), so that no rank is left waiting in the collective that follows.
    ``agreement`` runs only after ``prepare`` succeeded.
    """
    if not validation_enabled(validate):
        return prepare()
    try:
        result = prepare()
        mine, error = agreement(), None
    except Exception as e:  # noqa: BLE001 - any local failure must reach every rank
        result, mine, error = None, {}, e
    check_agreement(what, mine, group, error)
    return result


def collective_agreement(tensors, sizes, algorithm, wire_format=None) -> dict:
    """What the ranks of one collective must agree on; ``wire_format`` (reducescatterv) by value when given."""
    algorithm = None if algorithm is None else Algorithm(algorithm).value  # by value: enum or string alike
    agreed = {"sizes": list(sizes), "meta": _meta(tensors), "algorithm": algorithm}
    if wire_format is not None:
        agreed["wire_format"] = getattr(wire_format, "value", wire_format)
    return agreed


def check_agreement(what: str, mine: dict, group=None, local_error: Exception | None = None) -> None:
    """Raise ``ValueError`` on EVERY rank if any rank had ``local_error`` or the ranks' ``mine`` differ.

    ``mine`` holds small picklable values (sizes, shapes, dtypes, a global scale) exchanged with
    ``all_gather_object``; this syncs with the host and is not for CUDA-graph capture. The message names
    each rank's value, so a user sees which rank is off.
    """
    rank, world = rank_and_world(group)
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
    run_checks(op, lambda: _PREPARE[op](tensors, sizes, out, group),
               lambda: collective_agreement(tensors, sizes, None), group, True)


def prepare_gather(tensors, sizes, out, group):
    """The local checks of all_gatherv: (tensors as a list, single?, sizes, outs or None, rank, world)."""
    rank, world = rank_and_world(group)
    ts, single = as_list(tensors)
    sizes = check_sizes(sizes, world)
    check_rows(ts, sizes[rank], rank, "tensors", group)
    outs = None
    if out is not None:
        outs, _ = as_list(out, "out")
        check_out(outs, ts, sum(sizes), rank, group)
        for i, (o, t) in enumerate(zip(outs, ts)):
            if o is not None:
                check_alias(t, o, sum(sizes[:rank]), rank, f"tensors[{i}] and out[{i}]")
    return ts, single, sizes, outs, rank, world


def prepare_reduce(tensor, sizes, out, group):
    """The local checks of reduce_scatterv: (sizes, rank, world)."""
    rank, world = rank_and_world(group)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"rank {rank}: reduce_scatterv takes one tensor, got {type(tensor).__name__}")
    if tensor.dtype not in REDUCE_DTYPES:
        raise ValueError(f"rank {rank}: reduce_scatterv supports {REDUCE_DTYPES}, got {tensor.dtype}")
    sizes = check_sizes(sizes, world)
    check_rows([tensor], sum(sizes), rank, "input", group)
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"rank {rank}: out must be a tensor, got {type(out).__name__}")
        check_out([out], [tensor], sizes[rank], rank, group)
        check_alias(out, tensor, sum(sizes[:rank]), rank, "out and the input")
    return sizes, rank, world


_PREPARE = {"all_gatherv": prepare_gather, "reduce_scatterv": prepare_reduce}
