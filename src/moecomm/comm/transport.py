"""The transport under the algorithms: moecomm's NCCL binding, or ``torch.distributed`` (gloo, or NCCL when
asked), behind one small interface (:func:`communicator`), and the byte views every dtype travels as.

NCCL calls go through a thin ctypes binding of the NCCL library torch loaded (:mod:`moecomm.comm._nccl`),
a few microseconds of host time per call instead of ProcessGroupNCCL's ~46; ``MOECOMM_TORCH_NCCL=1``
uses ``torch.distributed`` instead. Calls run on the caller's current CUDA stream.

Gloo (CPU) sums gather every rank's rows and add them in rank order in float32, so they give the same bits
whatever the algorithm or chunking (a CPU oracle).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from moecomm.comm import _nccl
from moecomm.comm import group as group_module
from moecomm.comm.group import is_nccl

__all__ = ["all_gather_single", "reduce_scatter_single", "communicator", "bytes_per_row", "as_bytes", "row_starts"]

# torch >= 2.13 renames the equal-size collectives (the old names warn); torch 2.6-2.12 has only the old ones.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


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


def communicator(group, rank: int, world: int, device: torch.device):
    """The communication layer of ``group`` on ``device`` (cached): moecomm's NCCL binding where it is
    available and not switched off (``MOECOMM_TORCH_NCCL=1``, read on first use), else torch.distributed."""
    key = (group if group is not None else dist.group.WORLD, device)
    comm = _COMMS.get(key)
    if comm is None:
        nccl = is_nccl(group)
        if nccl and _nccl.available():
            comm = _nccl.communicator(group, device)
        else:
            comm = _TorchComm(group, rank, world, device, nccl)
        _COMMS[key] = comm
    return comm


def forget_groups() -> None:
    """Drop the cached communication layers and group facts, which hold the process groups: call before
    ``destroy_process_group``, else the groups outlive it, and a gloo group destroyed at interpreter exit can
    abort the process ("terminate called without an active exception")."""
    _COMMS.clear()
    group_module.forget_groups()


def bytes_per_row(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:]) * t.element_size()


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor as a ``uint8 [rows, row_bytes]`` view (a copy only if ``t`` is not contiguous)."""
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dim() != 2:
        t = t.reshape(t.shape[0], math.prod(t.shape[1:]))
    return t.view(torch.uint8)


def row_starts(sizes: list[int]) -> list[int]:
    starts, s = [], 0
    for n in sizes:
        starts.append(s)
        s += n
    return starts
