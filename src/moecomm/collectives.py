"""Variable-size collectives: allgatherv and reducescatterv, with a choice of algorithm per call.

Rank ``r`` contributes ``sizes[r]`` rows (dim 0); ``sizes`` is the same list on every rank and the
offset of rank ``r``'s rows is ``sum(sizes[:r])``.

**sizes must agree.** NCCL never checks counts: ranks whose ``sizes`` differ corrupt each other's rows
or hang. Take ``sizes`` from :func:`gather_sizes` (or from metadata every rank already shares, as DP
attention has) so that all ranks hold the same list. ``validate=True``, the environment variable
``MOECOMM_VALIDATE=1`` or torch's ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` make every call exchange its
metadata first and raise ``ValueError`` on every rank when they disagree (a host sync per call).

Algorithms (:class:`Algorithm`), all giving the same bytes:

- ``"broadcast"``: one NCCL group per call holding one out-of-place broadcast per root rank (allgatherv)
  or one reduce per root rank (reducescatterv): the construction of vLLM's and SGLang's ``all_gatherv``
  / ``reduce_scatterv`` and of ProcessGroupNCCL's uneven list collectives. Moves exactly the rows.
- ``"padded"``: pad every rank to ``max(sizes)`` rows and run the native equal-size ``all_gather`` /
  ``reduce_scatter`` (NCCL's ring algorithms), then compact (no copies when the sizes are equal).
- ``"symm"``: through torch symmetric memory (``torch.distributed._symmetric_memory``, CUDA with peer
  access): each rank stages its rows in a buffer every peer can map, and the copy engines pull the
  peers' rows over NVLink (reducescatterv: pull this rank's rows of every peer, then sum).
- ``"allreduce"`` (reducescatterv only): all-reduce the whole tensor, keep this rank's rows (the
  classic baseline).
- ``"auto"`` (default): per call, the algorithm measured fastest for this world size, size pattern
  (balanced, skewed, an idle rank) and byte count, eagerly or under CUDA-graph capture, from the table
  ``data/collectives.json`` written by ``moecomm bench collectives --write-table``. Without a measured
  table: ``"padded"`` for equal sizes, ``"broadcast"`` otherwise. At world size 1 every algorithm is a copy.

NCCL calls go through a thin ctypes binding of the NCCL library torch loaded (:mod:`moecomm._nccl`),
a few microseconds of host time per call instead of ProcessGroupNCCL's ~46; ``MOECOMM_TORCH_NCCL=1``
uses ``torch.distributed`` instead. Calls run on the caller's current CUDA stream; with preallocated
``out=`` tensors nothing waits on the host, so they can be captured in a CUDA graph.

Gloo (CPU) runs ``broadcast``, ``padded`` and ``allreduce`` with ``torch.distributed`` ops; its sums
gather every rank's rows and add them in rank order in float32, so they give the same bits whatever the
algorithm (a CPU oracle). ``symm`` needs CUDA.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import operator
import os
from importlib import resources
from typing import Sequence, Union

import torch
import torch.distributed as dist

from moecomm import _nccl
from moecomm._enum import ChoiceEnum
from moecomm.launch import rank_device

__all__ = [
    "Algorithm",
    "all_gatherv",
    "reduce_scatterv",
    "all_reduce",
    "choose_algorithm",
    "check_consistency",
    "check_agreement",
    "run_checks",
    "validation_enabled",
    "gather_sizes",
    "size_pattern",
    "all_gatherv_ref",
    "reduce_scatterv_ref",
    "VALIDATE_ENV",
]

TensorOrList = Union[torch.Tensor, Sequence[Union[torch.Tensor, None]]]
REDUCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
VALIDATE_ENV = "MOECOMM_VALIDATE"  # "1": every collective validates as with validate=True
# torch >= 2.13 renames the equal-size collectives (the old names warn); torch 2.6-2.12 has only the old ones.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Algorithm(ChoiceEnum):
    """How :func:`all_gatherv` / :func:`reduce_scatterv` move the rows (module docstring)."""

    AUTO = "auto"  # the measured fastest for this call (data/collectives.json)
    BROADCAST = "broadcast"  # one NCCL group: a broadcast (reduce) per root rank; exactly the rows
    PADDED = "padded"  # pad to max(sizes), native equal-size all_gather / reduce_scatter, compact
    SYMM = "symm"  # torch symmetric memory: stage rows, copy-engine pulls over NVLink
    ALLREDUCE = "allreduce"  # reducescatterv only: all_reduce the whole tensor, slice own rows


# ----------------------------------------------------------------------------------------------------
# Validation: cheap local checks always; the cross-rank check with validate=True (or the environment)
# ----------------------------------------------------------------------------------------------------


def validation_enabled(validate: bool) -> bool:
    """``validate``, or the environment asking every call to validate: ``MOECOMM_VALIDATE=1`` or torch's
    ``TORCH_DISTRIBUTED_DEBUG=DETAIL``. ``TypeError`` unless ``validate`` is a bool (``"no"`` is not False)."""
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {validate!r}")
    return (validate or os.environ.get(VALIDATE_ENV, "0") not in ("0", "")
            or os.environ.get("TORCH_DISTRIBUTED_DEBUG", "").upper() == "DETAIL")


_GROUPS: dict = {}  # process group -> (rank, world size, NCCL?), filled on first use


def _group_info(group) -> tuple[int, int, bool]:
    """``(rank, world_size, runs NCCL)`` of ``group`` (cached: these calls cost microseconds each);
    ``ValueError`` when this process is not a member of it."""
    key = group if group is not None else dist.group.WORLD
    info = _GROUPS.get(key)
    if info is None:
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the process group "
                             f"it called a moecomm collective of; call it only on the group's ranks")
        info = _GROUPS[key] = (rank, dist.get_world_size(group), dist.get_backend(group) == "nccl")
    return info


def _world(group) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``ValueError`` when this process is not a member of it."""
    rank, world, _ = _group_info(group)
    return rank, world


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


def _as_list(tensors: TensorOrList, name: str = "tensors") -> tuple[list[torch.Tensor | None], bool]:
    if isinstance(tensors, torch.Tensor):
        return [tensors], True
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name}: expected a tensor or a list/tuple of tensors, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] is a {type(t).__name__}, expected a tensor or None")
    return list(tensors), False


def _is_nccl(group) -> bool:
    """Whether ``group`` runs NCCL."""
    return _group_info(group)[2]


def _check_rows(ts: list[torch.Tensor | None], rows: int, rank: int, what: str, group) -> None:
    cuda = _is_nccl(group)
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


def _check_out(out_list, ts, rows: int | None, rank: int, group) -> None:
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
        _check_rows(out_list, rows, rank, "out", group)


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


def _agreement(tensors, sizes, algorithm) -> dict:
    algorithm = None if algorithm is None else Algorithm(algorithm).value  # by value: enum or string alike
    return {"sizes": list(sizes), "meta": _meta(tensors), "algorithm": algorithm}


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
    run_checks(op, lambda: _PREPARE[op](tensors, sizes, out, group),
               lambda: _agreement(tensors, sizes, None), group, True)


def gather_sizes(num_rows: int, group=None) -> list[int]:
    """Every rank's row count: ``sizes[r]`` is ``num_rows`` of rank ``r``. One small all_gather; syncs the host.

    Raises ``ValueError`` on EVERY rank when any rank passed something other than a non-negative int
    (the bad value travels as -1, so no rank is left waiting), and on a rank outside ``group``.
    """
    _, world = _world(group)
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
# Choosing the algorithm
# ----------------------------------------------------------------------------------------------------


def size_pattern(sizes: Sequence[int]) -> str:
    """``"balanced"`` (all equal), ``"idle"`` (some rank has 0 rows, not all) or ``"skewed"``."""
    if all(s == sizes[0] for s in sizes):
        return "balanced"
    return "idle" if min(sizes) == 0 else "skewed"


_TABLES: dict = {}


def _table(op: str, world: int, mode: str) -> dict[str, tuple[list[float], list[str]]] | None:
    """``pattern -> (sorted log2 bytes, algorithm at each)`` for ``op`` at ``world`` ranks in ``mode``
    (``"eager"`` or ``"graphed"``), from ``data/collectives.json``; None where nothing was measured."""
    key = (op, world, mode)
    if key not in _TABLES:
        with resources.files("moecomm").joinpath("data/collectives.json").open() as f:
            entry = json.load(f)["tables"].get(op, {}).get(str(world), {}).get(mode)
        table = None
        if entry:
            table = {}
            for pattern, points in entry.items():
                points = sorted(points)
                table[pattern] = ([math.log2(max(b, 1)) for b, _ in points], [a for _, a in points])
        _TABLES[key] = table
    return _TABLES[key]


def choose_algorithm(op: str, sizes: Sequence[int], row_bytes: int, *, capturing: bool = False) -> Algorithm:
    """The algorithm ``"auto"`` runs for one call: the same on every rank for the same arguments.

    Parameters
    ----------
    op : {"all_gatherv", "reduce_scatterv"}
    sizes : list[int], rows per rank (its length is the world size).
    row_bytes : int, bytes of one row over all tensors of the call.
    capturing : bool, whether the call is being captured in a CUDA graph (the device-time table is used;
        eager calls use the table measured eagerly, host time included).

    Returns the measured-fastest algorithm at the nearest measured byte count (log scale) of the same
    size pattern (:func:`size_pattern`), or without a table ``padded`` for equal sizes, else
    ``broadcast``.
    """
    return _choose(op, tuple(sizes), row_bytes, capturing)


@functools.lru_cache(maxsize=4096)
def _choose(op: str, sizes: tuple[int, ...], row_bytes: int, capturing: bool) -> Algorithm:
    pattern = size_pattern(sizes)
    table = _table(op, len(sizes), "graphed" if capturing else "eager")
    if table is None or pattern not in table:
        return Algorithm.PADDED if pattern == "balanced" else Algorithm.BROADCAST
    xs, algos = table[pattern]
    x = math.log2(max(sum(sizes) * row_bytes, 1))
    i = bisect.bisect_left(xs, x)
    if i == len(xs) or (i > 0 and x - xs[i - 1] <= xs[i] - x):
        i -= 1
    return Algorithm(algos[i])


def _resolve(algorithm, op: str, sizes: list[int], row_bytes: int, device: torch.device, nccl: bool) -> Algorithm:
    algorithm = Algorithm.AUTO if algorithm is Algorithm.AUTO or algorithm == "auto" else Algorithm(algorithm)
    if algorithm == Algorithm.AUTO:
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        algorithm = choose_algorithm(op, sizes, row_bytes, capturing=capturing)
        if algorithm == Algorithm.SYMM and not (nccl and _symm_available()):
            algorithm = Algorithm.PADDED if size_pattern(sizes) == "balanced" else Algorithm.BROADCAST
    elif algorithm == Algorithm.SYMM and not (nccl and _symm_available()):
        raise ValueError("algorithm='symm' needs CUDA tensors on an NCCL group and torch symmetric memory")
    elif algorithm == Algorithm.ALLREDUCE and op == "all_gatherv":
        raise ValueError("algorithm='allreduce' exists for reduce_scatterv only")
    return algorithm


# ----------------------------------------------------------------------------------------------------
# The communication layer: moecomm's NCCL binding, or torch.distributed (gloo, or NCCL when asked)
# ----------------------------------------------------------------------------------------------------


class _TorchComm:
    """The operations the algorithms need, through ``torch.distributed`` (in-place ops emulate out-of-place)."""

    def __init__(self, group, rank: int, world: int, device: torch.device, nccl: bool):
        self.group, self.rank, self.world_size, self.device, self.nccl = group, rank, world, device, nccl
        self._coalescing = None

    def group_start(self) -> None:
        if self.nccl:
            self._coalescing = dist._coalescing_manager(self.group, self.device)
            self._coalescing.__enter__()

    def group_end(self) -> None:
        if self._coalescing is not None:
            self._coalescing.__exit__(None, None, None)
            self._coalescing = None

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        if self.nccl:
            all_gather_single(out, inp, group=self.group)
        else:
            dist.all_gather(list(out.chunk(self.world_size)), inp, group=self.group)

    def broadcast(self, out: torch.Tensor, inp: torch.Tensor | None, root: int) -> None:
        if inp is not None:
            out.copy_(inp)
        dist.broadcast(out, group=self.group, group_src=root)

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``t``. NCCL: an all-reduce in ``t``'s dtype. Gloo: every rank's ``t``
        gathered and added in rank order in float32 (int32 for int32), rounded once: the same bits
        whichever algorithm or chunking asked, as a CPU oracle should be."""
        if self.nccl:
            acc = t.clone()
            dist.all_reduce(acc, group=self.group)
            return acc
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        acc = parts[0].to(torch.int32 if t.dtype == torch.int32 else torch.float32)
        for p in parts[1:]:
            acc += p
        return acc.to(t.dtype)

    def reduce(self, out: torch.Tensor | None, inp: torch.Tensor, root: int) -> None:
        if self.nccl:
            acc = inp.clone()
            dist.reduce(acc, group=self.group, group_dst=root)
        else:
            acc = self._sum(inp)
        if out is not None:
            out.copy_(acc)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        if self.nccl:
            reduce_scatter_single(out, inp, group=self.group)
        else:
            out.copy_(self._sum(inp).chunk(self.world_size)[self.rank])

    def all_reduce(self, buf: torch.Tensor) -> None:
        buf.copy_(self._sum(buf))


_COMMS: dict = {}


def _comm(group, rank: int, world: int, device: torch.device):
    """The communication layer of ``group`` on ``device`` (cached): moecomm's NCCL binding where it is
    available and not switched off (``MOECOMM_TORCH_NCCL=1``, read on first use), else torch.distributed."""
    key = (group if group is not None else dist.group.WORLD, device)
    comm = _COMMS.get(key)
    if comm is None:
        nccl = _is_nccl(group)
        if nccl and _nccl.available():
            comm = _nccl.communicator(group, device)
        else:
            comm = _TorchComm(group, rank, world, device, nccl)
        _COMMS[key] = comm
    return comm


# ----------------------------------------------------------------------------------------------------
# Byte views: every dtype travels as uint8 rows
# ----------------------------------------------------------------------------------------------------


def _row_bytes(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:]) * t.element_size()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor as a ``uint8 [rows, row_bytes]`` view (a copy only if ``t`` is not contiguous)."""
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dim() != 2:
        t = t.reshape(t.shape[0], math.prod(t.shape[1:]))
    return t.view(torch.uint8)


def _starts(sizes: list[int]) -> list[int]:
    starts, s = [], 0
    for n in sizes:
        starts.append(s)
        s += n
    return starts


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
        dtype or layout, an unknown algorithm or ``"symm"`` without CUDA symmetric memory, a rank outside
        the group; with validation also ranks that disagree. Raised before any communication.
    TypeError
        ``tensors`` is not a tensor or a list/tuple of tensors and ``None``.

    Notes
    -----
    Under ``torch.compile`` (or with ``sizes`` a CPU int tensor) this calls the custom op
    ``moecomm::all_gatherv`` (:mod:`moecomm.ops`); eager calls with a list do not pass through it.
    """
    if torch.compiler.is_compiling() or isinstance(sizes, torch.Tensor):
        from moecomm import ops

        return ops.all_gatherv(tensors, sizes, group, out=out, validate=validate, algorithm=algorithm)
    ts, single, sizes, outs, rank, world = run_checks(
        "all_gatherv", lambda: _prepare_gather(tensors, sizes, out, group),
        lambda: _agreement(tensors, sizes, algorithm), group, validate)
    total = sum(sizes)
    if outs is None:
        outs = [None if t is None else t.new_empty((total, *t.shape[1:])) for t in ts]
    pairs = [(_bytes(t), _bytes(o)) for t, o in zip(ts, outs) if t is not None and _row_bytes(t) > 0]
    if pairs and total > 0:
        if world == 1:  # a gather over one rank is a copy: no collective launch
            for src, dst in pairs:
                dst.copy_(src)
        else:
            device = pairs[0][0].device
            row_bytes = sum(src.shape[1] for src, _ in pairs)
            algo = _resolve(algorithm, "all_gatherv", sizes, row_bytes, device, _is_nccl(group))
            _GATHER[algo](pairs, sizes, rank, world, group, device)
    return outs[0] if single else (tuple(outs) if isinstance(tensors, tuple) else outs)


def _prepare_gather(tensors, sizes, out, group):
    """The local checks of all_gatherv: (tensors as a list, single?, sizes, outs or None, rank, world)."""
    rank, world = _world(group)
    ts, single = _as_list(tensors)
    sizes = _check_sizes(sizes, world)
    _check_rows(ts, sizes[rank], rank, "tensors", group)
    outs = None
    if out is not None:
        outs, _ = _as_list(out, "out")
        _check_out(outs, ts, sum(sizes), rank, group)
    return ts, single, sizes, outs, rank, world


def _gather_broadcast(pairs, sizes, rank, world, group, device) -> None:
    comm = _comm(group, rank, world, device)
    starts = _starts(sizes)
    comm.group_start()
    try:
        for src, dst in pairs:
            for r, n in enumerate(sizes):
                if n:
                    comm.broadcast(dst[starts[r] : starts[r] + n], src if r == rank else None, r)
    finally:
        comm.group_end()


def _gather_padded(pairs, sizes, rank, world, group, device) -> None:
    comm = _comm(group, rank, world, device)
    pad, equal = max(sizes), all(s == sizes[0] for s in sizes)
    staged = []
    for src, dst in pairs:
        if equal:
            staged.append((src, dst))
            continue
        send = src.new_empty((pad, src.shape[1]))
        send[: sizes[rank]].copy_(src)
        staged.append((send, src.new_empty((pad * world, src.shape[1]))))
    comm.group_start()
    try:
        for send, recv in staged:
            comm.all_gather(recv, send)
    finally:
        comm.group_end()
    if not equal:
        starts = _starts(sizes)
        for (_, dst), (_, recv) in zip(pairs, staged):
            for r, n in enumerate(sizes):
                if n:
                    dst[starts[r] : starts[r] + n].copy_(recv[r * pad : r * pad + n])


def _gather_symm(pairs, sizes, rank, world, group, device) -> None:
    buf = _symm_buffer(group, device, max(sizes) * sum(src.shape[1] for src, _ in pairs))
    starts = _starts(sizes)
    col = 0
    for src, _ in pairs:  # this rank's rows, tensor after tensor, in its staging buffer
        buf.view(rank, col, sizes[rank], src.shape[1]).copy_(src)
        col += sizes[rank] * src.shape[1]
    buf.barrier(0)  # every rank's rows are staged
    for r, n in enumerate(sizes):
        col = 0
        for src, dst in pairs:
            if n:
                dst[starts[r] : starts[r] + n].copy_(buf.view(r, col, n, src.shape[1]))
            col += n * src.shape[1]
    buf.barrier(1)  # no rank restages while a peer still reads


_GATHER = {Algorithm.BROADCAST: _gather_broadcast, Algorithm.PADDED: _gather_padded, Algorithm.SYMM: _gather_symm}


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
    algorithm: Algorithm | str = Algorithm.AUTO,
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
        ``"allreduce"`` (module docstring); the same on every rank.

    Returns
    -------
    Tensor
        ``[sizes[rank], *trailing]``, same dtype. NCCL sums in the input dtype (``symm`` in float32 beyond
        two ranks); gloo sums 16-bit inputs in float32 and rounds once.

    Raises
    ------
    ValueError
        Bad ``sizes`` (length, sign, type), ``tensor.shape[0] != sum(sizes)``, a dtype other than
        bf16/fp16/fp32, a tensor on the wrong device, a bad ``out``, an unknown or unavailable algorithm,
        a rank outside the group; with validation also ranks that disagree. Raised before any
        communication.

    Notes
    -----
    Under ``torch.compile`` (or with ``sizes`` a CPU int tensor) this calls the custom op
    ``moecomm::reduce_scatterv`` (:mod:`moecomm.ops`); eager calls with a list do not pass through it.
    """
    if torch.compiler.is_compiling() or isinstance(sizes, torch.Tensor):
        from moecomm import ops

        return ops.reduce_scatterv(tensor, sizes, group, out=out, validate=validate, algorithm=algorithm)
    sizes, rank, world = run_checks("reduce_scatterv", lambda: _prepare_reduce(tensor, sizes, out, group),
                                    lambda: _agreement(tensor, sizes, algorithm), group, validate)
    if out is None:
        out = tensor.new_empty((sizes[rank], *tensor.shape[1:]))
    if tensor.numel() == 0:
        return out
    tensor = tensor.contiguous()
    if world == 1:  # a sum over one rank is a copy
        return out.copy_(tensor)
    algo = _resolve(algorithm, "reduce_scatterv", sizes, _row_bytes(tensor), tensor.device, _is_nccl(group))
    flat = tensor.view(tensor.shape[0], -1)
    _REDUCE[algo](flat, sizes, out.view(out.shape[0], flat.shape[1]), rank, world, group)
    return out


def all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum the contiguous ``tensor`` (bf16, fp16, fp32 or int32) over the ranks of ``group``, in place, through
    the same communication layer as :func:`all_gatherv` (the classic DP baseline's all-reduce). Returns
    ``tensor``. Raises ``ValueError`` for another dtype, a non-contiguous tensor or a rank outside the group,
    ``TypeError`` for a non-tensor."""
    rank, world = _world(group)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"rank {rank}: all_reduce takes one tensor, got {type(tensor).__name__}")
    if tensor.dtype not in (*REDUCE_DTYPES, torch.int32) or not tensor.is_contiguous():
        raise ValueError(f"rank {rank}: all_reduce needs a contiguous bf16/fp16/fp32/int32 tensor, got "
                         f"{tensor.dtype} {tuple(tensor.shape)} strides {tensor.stride()}")
    if world > 1 and tensor.numel():
        _comm(group, rank, world, tensor.device).all_reduce(tensor)
    return tensor


def _prepare_reduce(tensor, sizes, out, group):
    """The local checks of reduce_scatterv: (sizes, rank, world)."""
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
    return sizes, rank, world


def _reduce_broadcast(flat, sizes, out, rank, world, group) -> None:
    comm = _comm(group, rank, world, flat.device)
    starts = _starts(sizes)
    comm.group_start()
    try:
        for r, n in enumerate(sizes):
            if n:
                comm.reduce(out if r == rank else None, flat[starts[r] : starts[r] + n], r)
    finally:
        comm.group_end()


def _reduce_padded(flat, sizes, out, rank, world, group) -> None:
    comm = _comm(group, rank, world, flat.device)
    pad, n = max(sizes), sizes[rank]
    if all(s == pad for s in sizes):
        comm.reduce_scatter(out, flat)
        return
    send = flat.new_empty((pad * world, flat.shape[1]))
    for r, (s, m) in enumerate(zip(_starts(sizes), sizes)):
        if m:
            send[r * pad : r * pad + m].copy_(flat[s : s + m])
    recv = out if n == pad else flat.new_empty((pad, flat.shape[1]))
    comm.reduce_scatter(recv, send)
    if recv is not out and n:
        out.copy_(recv[:n])


def _reduce_allreduce(flat, sizes, out, rank, world, group) -> None:
    comm = _comm(group, rank, world, flat.device)
    buf = flat.clone()
    comm.all_reduce(buf)
    start = sum(sizes[:rank])
    out.copy_(buf[start : start + sizes[rank]])


def _reduce_symm(flat, sizes, out, rank, world, group) -> None:
    row_bytes = flat.shape[1] * flat.element_size()
    buf = _symm_buffer(group, flat.device, flat.shape[0] * row_bytes)
    buf.view(rank, 0, flat.shape[0], row_bytes).copy_(_bytes(flat))
    buf.barrier(0)
    start, n = sum(sizes[:rank]), sizes[rank]
    if n:
        rows = [buf.view(r, start * row_bytes, n, row_bytes).view(flat.dtype) for r in range(world)]
        if world == 2:  # one bf16 add rounds once, like a float32 sum rounded at the end
            torch.add(rows[0], rows[1], out=out)
        else:
            acc = rows[0].float()
            for r in range(1, world):
                acc += rows[r]
            out.copy_(acc)
    buf.barrier(1)


_REDUCE = {Algorithm.BROADCAST: _reduce_broadcast, Algorithm.PADDED: _reduce_padded,
           Algorithm.ALLREDUCE: _reduce_allreduce, Algorithm.SYMM: _reduce_symm}


# ----------------------------------------------------------------------------------------------------
# Symmetric memory: one growing staging buffer per group and device
# ----------------------------------------------------------------------------------------------------


def _symm_available() -> bool:
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


class _SymmBuffer:
    """A uint8 buffer of ``capacity`` bytes on every rank, each rank's mapped into every peer's address space."""

    def __init__(self, group, device: torch.device, capacity: int):
        import torch.distributed._symmetric_memory as symm_mem

        self.capacity = capacity
        self.local = symm_mem.empty(capacity, dtype=torch.uint8, device=device)
        self.handle = symm_mem.rendezvous(self.local, (group or dist.group.WORLD).group_name)
        self.peers = [self.handle.get_buffer(r, (capacity,), torch.uint8) for r in range(self.handle.world_size)]

    def view(self, r: int, offset: int, rows: int, row_bytes: int) -> torch.Tensor:
        """Rank ``r``'s bytes ``[offset, offset + rows * row_bytes)`` as ``uint8 [rows, row_bytes]``."""
        return self.peers[r][offset : offset + rows * row_bytes].view(rows, row_bytes)

    def barrier(self, channel: int) -> None:
        self.handle.barrier(channel=channel)


_SYMM: dict = {}


def _symm_buffer(group, device: torch.device, nbytes: int) -> _SymmBuffer:
    """The staging buffer of ``group`` on ``device`` with at least ``nbytes``; grown (collectively: every rank
    asks for the same ``nbytes``, computed from agreed sizes) to the next power of two of at least 1 MiB."""
    key = ((group or dist.group.WORLD).group_name, device.index)
    buf = _SYMM.get(key)
    if buf is None or buf.capacity < nbytes:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"algorithm 'symm' needs a {nbytes} B staging buffer, which cannot be allocated "
                               "during CUDA-graph capture: run the same call once before capturing")
        buf = _SYMM[key] = _SymmBuffer(group, device, max(1 << 20, 1 << (max(nbytes, 1) - 1).bit_length()))
    return buf


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
    start = sum(sizes[:rank])
    return acc[start : start + sizes[rank]].to(tensor.dtype)


_PREPARE = {"all_gatherv": _prepare_gather, "reduce_scatterv": _prepare_reduce}
