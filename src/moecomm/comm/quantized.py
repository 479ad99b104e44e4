"""The quantized reducescatterv: ``reduce_scatterv(..., wire_format="int8" | "fp8")``.

NCCL cannot sum int8 or FP8 codes that carry their own scales, so the sum moves to the row's owner
(:mod:`moecomm.quant.reduce` has the formats and the sum)::

    every rank:  quantize all its partial rows per (row, 128 columns)        [sum(sizes), H + 4 H / 128] bytes
    exchange:    rank r receives rows [start_r, start_r + sizes[r]) of every rank's quantized partial
    owner r:     dequantize the world_size pieces and sum them in float32 in rank order, round once

Transports (the ``algorithm`` argument):

- grouped send / receive (``"auto"``, ``"broadcast"``, ``"padded"``): every rank sends each peer that peer's
  rows and receives its own rows from every peer, in one NCCL group of ``ncclSend`` / ``ncclRecv`` (moecomm's
  binding; this rank's own piece is a send to itself, a local copy NCCL overlaps with the transfers). On
  gloo the same bytes move by ``batch_isend_irecv``. Each row crosses the wire once, ``world_size - 1`` times
  in all: the bytes of a bf16 reducescatterv times ``reduce_row_bytes / (2 H)`` (0.516 at H = 7168).
  ``"padded"`` and ``"broadcast"`` name bf16 constructions that sum on the wire; a quantized partial cannot
  be summed there, so they run this exchange, which moves exactly the rows whatever the sizes.
- ``"symm"``: each rank quantizes into its torch symmetric-memory buffer; after a barrier each rank pulls its
  rows of every peer's buffer (the copy engines, over NVLink), then sums locally.
- ``"allreduce"`` raises ``ValueError``: an all-reduce sums on the wire.

Every transport delivers the same bytes and the sum is the same fixed-order kernel, so the result is the same
bits for every transport, chunking and device (:func:`moecomm.quant.dequantize_sum`). With an ``out`` tensor
nothing waits on the host (temporary buffers come from the caching allocator, the graph's pool under
capture): the NCCL path is CUDA-graph capturable. At world size 1 nothing travels and nothing is quantized:
the result is a copy, as for bf16.
"""

from __future__ import annotations

import math

import torch

from moecomm.comm.algorithms import Algorithm
from moecomm.comm.checks import prepare_reduce
from moecomm.comm.symm import symm_available, symm_buffer
from moecomm.comm.transport import communicator, row_starts
from moecomm.quant.reduce import (
    ReduceFormat,
    check_reduce_hidden,
    dequantize_sum,
    partial_views,
    quantize_partials,
    reduce_row_bytes,
)

__all__ = ["QUANTIZED_DTYPES", "prepare_reduce_format", "quantized_reduce_scatterv"]

QUANTIZED_DTYPES = (torch.bfloat16, torch.float32)  # inputs (and results) of the quantized wire formats


def prepare_reduce_format(tensor, sizes, out, group, wire_format, algorithm, nccl: bool):
    """The local checks of a reducescatterv with its wire format: ``(sizes, rank, world, format)``.

    Beyond :func:`moecomm.comm.checks.prepare_reduce`: a known ``wire_format``; for a quantized one a bf16 /
    fp32 tensor whose row (all trailing dims) is a positive multiple of 128 elements, and an algorithm that
    can carry it (not ``"allreduce"``; ``"symm"`` only on CUDA with symmetric memory). Raises ``ValueError``.
    """
    sizes, rank, world = prepare_reduce(tensor, sizes, out, group)
    fmt = ReduceFormat(wire_format)
    if fmt == ReduceFormat.BF16:
        return sizes, rank, world, fmt
    if tensor.dtype not in QUANTIZED_DTYPES:
        raise ValueError(f"rank {rank}: reduce_scatterv with wire_format={fmt.value!r} sums bf16 or fp32 partials, "
                         f"got {tensor.dtype}")
    check_reduce_hidden(fmt, math.prod(tensor.shape[1:]), f"rank {rank}: reduce_scatterv")
    algo = Algorithm(algorithm)
    if algo == Algorithm.ALLREDUCE:
        raise ValueError(f"rank {rank}: algorithm='allreduce' sums on the wire, which wire_format={fmt.value!r} "
                         "cannot: use 'auto' (grouped send/recv) or 'symm'")
    if algo == Algorithm.SYMM and not (nccl and symm_available()):
        raise ValueError("algorithm='symm' needs CUDA tensors on an NCCL group and torch symmetric memory")
    return sizes, rank, world, fmt


def quantized_reduce_scatterv(tensor, sizes: list[int], out, rank: int, world: int, group, fmt: ReduceFormat,
                              algorithm) -> torch.Tensor:
    """The quantized reducescatterv after :func:`prepare_reduce_format` (module docstring). ``out``: None or a
    checked ``[sizes[rank], *trailing]`` tensor of ``tensor``'s dtype; returns it (or a new one)."""
    if out is None:
        out = tensor.new_empty((sizes[rank], *tensor.shape[1:]))
    if tensor.numel() == 0:
        return out
    if world == 1:  # nothing travels
        return out.copy_(tensor)
    flat = tensor.contiguous().view(tensor.shape[0], -1)
    run = _pull_symm if Algorithm(algorithm) == Algorithm.SYMM else _exchange
    run(flat, sizes, out.view(sizes[rank], flat.shape[1]), rank, world, group, fmt)
    return out


def _exchange(flat, sizes, out, rank, world, group, fmt) -> None:
    hidden, n = flat.shape[1], sizes[rank]
    row_bytes = reduce_row_bytes(fmt, hidden)
    send = torch.empty((flat.shape[0], row_bytes), dtype=torch.uint8, device=flat.device)
    quantize_partials(flat, fmt, out=partial_views(send, fmt, hidden))
    recv = torch.empty((world, n, row_bytes), dtype=torch.uint8, device=flat.device)
    starts = row_starts(sizes)
    sends = [(send[s : s + m], p) for p, (s, m) in enumerate(zip(starts, sizes)) if m]
    recvs = [(recv[p], p) for p in range(world)] if n else []
    communicator(group, rank, world, flat.device).exchange(sends, recvs)
    if n:
        dequantize_sum(*partial_views(recv, fmt, hidden), dtype=out.dtype, out=out)


def _pull_symm(flat, sizes, out, rank, world, group, fmt) -> None:
    hidden, n = flat.shape[1], sizes[rank]
    row_bytes = reduce_row_bytes(fmt, hidden)
    buf = symm_buffer(group, flat.device, flat.shape[0] * row_bytes)
    quantize_partials(flat, fmt, out=partial_views(buf.view(rank, 0, flat.shape[0], row_bytes), fmt, hidden))
    buf.barrier(0)  # every rank's partial is quantized in its buffer
    recv = torch.empty((world, n, row_bytes), dtype=torch.uint8, device=flat.device)
    start = sum(sizes[:rank])
    if n:
        for p in range(world):
            recv[p].copy_(buf.view(p, start * row_bytes, n, row_bytes))
    buf.barrier(1)  # no rank requantizes while a peer still reads
    if n:
        dequantize_sum(*partial_views(recv, fmt, hidden), dtype=out.dtype, out=out)
