"""How :func:`~moecomm.comm.collectives.all_gatherv` / :func:`~moecomm.comm.collectives.reduce_scatterv` move
the rows (:class:`Algorithm`), and which one ``"auto"`` picks for a call (:func:`choose_algorithm`).

All algorithms give the same bytes:

- ``"broadcast"``: one NCCL group per call holding one out-of-place broadcast per root rank (allgatherv)
  or one reduce per root rank (reducescatterv): the construction of vLLM's and SGLang's ``all_gatherv``
  / ``reduce_scatterv`` and of ProcessGroupNCCL's uneven list collectives. Moves exactly the rows.
- ``"padded"``: pad every rank to ``max(sizes)`` rows and run the native equal-size ``all_gather`` /
  ``reduce_scatter`` (NCCL's ring algorithms), then compact (no copies when the sizes are equal).
- ``"symm"``: through torch symmetric memory (:mod:`moecomm.comm.symm`): each rank stages its rows in a
  buffer every peer can map, and the copy engines pull the peers' rows over NVLink (reducescatterv: pull
  this rank's rows of every peer, then sum).
- ``"allreduce"`` (reducescatterv only): all-reduce the whole tensor, keep this rank's rows (the
  classic baseline).
- ``"auto"`` (default): per call, the algorithm measured fastest for this world size, size pattern
  (balanced, skewed, an idle rank) and byte count, eagerly or under CUDA-graph capture, from the table
  ``data/collectives.json`` written by ``moecomm bench collectives --write-table``. Without a measured
  table: ``"padded"`` for equal sizes, ``"broadcast"`` otherwise. At world size 1 every algorithm is a copy.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
from importlib import resources
from typing import Sequence

import torch

from moecomm._enum import ChoiceEnum
from moecomm.comm.symm import symm_available, symm_buffer
from moecomm.comm.transport import as_bytes, communicator, row_starts

__all__ = ["Algorithm", "size_pattern", "choose_algorithm", "resolve_algorithm", "GATHER", "REDUCE"]

class Algorithm(ChoiceEnum):
    """How :func:`all_gatherv` / :func:`reduce_scatterv` move the rows (module docstring)."""

    AUTO = "auto"  # the measured fastest for this call (data/collectives.json)
    BROADCAST = "broadcast"  # one NCCL group: a broadcast (reduce) per root rank; exactly the rows
    PADDED = "padded"  # pad to max(sizes), native equal-size all_gather / reduce_scatter, compact
    SYMM = "symm"  # torch symmetric memory: stage rows, copy-engine pulls over NVLink
    ALLREDUCE = "allreduce"  # reducescatterv only: all_reduce the whole tensor, slice own rows


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


def resolve_algorithm(algorithm, op: str, sizes: list[int], row_bytes: int, device: torch.device, nccl: bool) -> Algorithm:
    algorithm = Algorithm.AUTO if algorithm is Algorithm.AUTO or algorithm == "auto" else Algorithm(algorithm)
    if algorithm == Algorithm.AUTO:
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        algorithm = choose_algorithm(op, sizes, row_bytes, capturing=capturing)
        if algorithm == Algorithm.SYMM and not (nccl and symm_available()):
            algorithm = Algorithm.PADDED if size_pattern(sizes) == "balanced" else Algorithm.BROADCAST
    elif algorithm == Algorithm.SYMM and not (nccl and symm_available()):
        raise ValueError("algorithm='symm' needs CUDA tensors on an NCCL group and torch symmetric memory")
    elif algorithm == Algorithm.ALLREDUCE and op == "all_gatherv":
        raise ValueError("algorithm='allreduce' exists for reduce_scatterv only")
    return algorithm


# ----------------------------------------------------------------------------------------------------
# allgatherv: pairs of (this rank's rows, the gathered output) as uint8 [rows, row_bytes], sizes checked


def _gather_broadcast(pairs, sizes, rank, world, group, device) -> None:
    comm = communicator(group, rank, world, device)
    starts = row_starts(sizes)
    comm.group_start()
    try:
        for src, dst in pairs:
            for r, n in enumerate(sizes):
                if n:
                    comm.broadcast(dst[starts[r] : starts[r] + n], src if r == rank else None, r)
    finally:
        comm.group_end()


def _gather_padded(pairs, sizes, rank, world, group, device) -> None:
    comm = communicator(group, rank, world, device)
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
        starts = row_starts(sizes)
        for (_, dst), (_, recv) in zip(pairs, staged):
            for r, n in enumerate(sizes):
                if n:
                    dst[starts[r] : starts[r] + n].copy_(recv[r * pad : r * pad + n])


def _gather_symm(pairs, sizes, rank, world, group, device) -> None:
    buf = symm_buffer(group, device, max(sizes) * sum(src.shape[1] for src, _ in pairs))
    starts = row_starts(sizes)
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


GATHER = {Algorithm.BROADCAST: _gather_broadcast, Algorithm.PADDED: _gather_padded, Algorithm.SYMM: _gather_symm}


# ----------------------------------------------------------------------------------------------------
# reducescatterv: flat [sum(sizes), columns] input, this rank's [sizes[rank], columns] output


def _reduce_broadcast(flat, sizes, out, rank, world, group) -> None:
    comm = communicator(group, rank, world, flat.device)
    starts = row_starts(sizes)
    comm.group_start()
    try:
        for r, n in enumerate(sizes):
            if n:
                comm.reduce(out if r == rank else None, flat[starts[r] : starts[r] + n], r)
    finally:
        comm.group_end()


def _reduce_padded(flat, sizes, out, rank, world, group) -> None:
    comm = communicator(group, rank, world, flat.device)
    pad, n = max(sizes), sizes[rank]
    if all(s == pad for s in sizes):
        comm.reduce_scatter(out, flat)
        return
    send = flat.new_empty((pad * world, flat.shape[1]))
    for r, (s, m) in enumerate(zip(row_starts(sizes), sizes)):
        if m:
            send[r * pad : r * pad + m].copy_(flat[s : s + m])
    recv = out if n == pad else flat.new_empty((pad, flat.shape[1]))
    comm.reduce_scatter(recv, send)
    if recv is not out and n:
        out.copy_(recv[:n])


def _reduce_allreduce(flat, sizes, out, rank, world, group) -> None:
    comm = communicator(group, rank, world, flat.device)
    buf = flat.clone()
    comm.all_reduce(buf)
    start = sum(sizes[:rank])
    out.copy_(buf[start : start + sizes[rank]])


def _reduce_symm(flat, sizes, out, rank, world, group) -> None:
    row_bytes = flat.shape[1] * flat.element_size()
    buf = symm_buffer(group, flat.device, flat.shape[0] * row_bytes)
    buf.view(rank, 0, flat.shape[0], row_bytes).copy_(as_bytes(flat))
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


REDUCE = {Algorithm.BROADCAST: _reduce_broadcast, Algorithm.PADDED: _reduce_padded,
           Algorithm.ALLREDUCE: _reduce_allreduce, Algorithm.SYMM: _reduce_symm}
