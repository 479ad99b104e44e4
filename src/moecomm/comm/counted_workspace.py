"""The workspace of the counted collectives (:mod:`moecomm.comm.counted`): the buffers of one group on one
device for ``M = max_tokens_per_rank`` rows per rank, created once, collectively (:func:`counted_workspace`),
with the transport every rank runs (:class:`Transport`).

Creation is where ranks agree: every rank passes the same ``max_tokens_per_rank`` (and row sizes, dtype,
transport) or every rank raises ``ValueError``. ``symm`` workspaces hold one peer-visible buffer per rank
(torch symmetric memory; :meth:`CountedWorkspace.from_peer_buffers` for memory mapped by other means, as the
tests do) laid out by :func:`peer_layout`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moecomm._enum import ChoiceEnum
from moecomm._modes import kept_state
from moecomm.comm import _kernels_counted as kernels
from moecomm.comm.checks import REDUCE_DTYPES, check_agreement
from moecomm.comm.group import ByGroup, is_nccl, per_group, rank_and_world
from moecomm.comm.symm import symm_available
from moecomm.comm.transport import communicator

__all__ = ["Transport", "MAX_SPIN_ENV", "PeerLayout", "peer_layout", "CountedWorkspace", "counted_workspace"]

MAX_SPIN_ENV = "MOECOMM_SYMM_MAX_SPIN"  # polls of one flag word before a symm wait gives up (default 2**25)
_ALIGN = 256  # bytes: regions of the peer buffer start on this boundary


class Transport(ChoiceEnum):
    """How the counted collectives move rows (:mod:`moecomm.comm.counted`). At world size 1 every transport
    is a local copy (``PADDED``)."""

    AUTO = "auto"  # symm where torch symmetric memory works (CUDA, NCCL group, one host), else padded
    PADDED = "padded"  # every rank's whole slot through the native equal-size collectives
    SYMM = "symm"  # Triton kernels pull live rows from peer memory; counts and barriers in flag words


@dataclass(frozen=True)
class PeerLayout:
    """Byte offsets of the regions of one rank's peer-visible buffer: ``int64 flags [ROUNDS][W]``, send rows
    ``uint8 [M, row_bytes]``, partial ``dtype [W * M, hidden]``; ``nbytes`` in all."""

    flag_off: int
    send_off: int
    partial_off: int
    nbytes: int


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def peer_layout(world: int, rows: int, row_bytes: int, hidden: int, dtype: torch.dtype) -> PeerLayout:
    """The :class:`PeerLayout` of a ``symm`` workspace (what a test allocates per rank to map across processes)."""
    send_off = _align(kernels.ROUNDS * world * 8)
    partial_off = _align(send_off + rows * row_bytes)
    return PeerLayout(0, send_off, partial_off, _align(partial_off + world * rows * hidden * dtype.itemsize))


class CountedWorkspace:
    """The buffers of the counted collectives of one group on one device, for ``M`` rows per rank.

    Create it with :func:`counted_workspace` (collective, cached) or, for peer memory mapped by other means
    (shared CPU memory under the Triton interpreter, CUDA IPC), :meth:`from_peer_buffers`.

    Attributes
    ----------
    rank, world_size : int
    device : torch.device
    rows : int, ``M`` = max_tokens_per_rank.
    row_bytes, hidden : int, the gathered row size in bytes and the reduced row size in elements.
    dtype : torch.dtype, of the partial output and the reducescatter's result.
    transport : Transport, ``PADDED`` or ``SYMM`` (resolved).
    send : Tensor, ``uint8 [M, row_bytes]``: write this rank's rows here (``send[:n]``) and pass that view
        to :func:`all_gather_counted` to skip a copy (``symm``: peer-visible memory).
    partial : Tensor, ``dtype [W * M, hidden]``: the experts' output (``out=``); passing it to
        :func:`reduce_scatter_counted` skips a copy.
    gathered : Tensor, ``uint8 [W * M, row_bytes]``: the result of :func:`all_gather_counted`.
    counts : Tensor, ``int32 [W]``: every rank's clamped count, from :func:`all_gather_counted`.
    """

    def __init__(self, *, rank: int, world: int, device: torch.device, rows: int, row_bytes: int, hidden: int,
                 dtype: torch.dtype, transport: Transport, group=None, local=None, peer_ptrs=None, keep=None,
                 programs: int | None = None, max_spin: int | None = None):
        self.rank, self.world_size, self.device = rank, world, device
        self.rows, self.row_bytes, self.hidden, self.dtype, self.transport = rows, row_bytes, hidden, dtype, transport
        self._group = group
        self._count = torch.zeros(1, dtype=torch.int32, device=device)  # the padded path's clamped count
        self._reduce_count = torch.zeros(1, dtype=torch.int32, device=device)
        self._rows_index = torch.arange(rows, device=device)
        if transport == Transport.SYMM:
            layout = peer_layout(world, rows, row_bytes, hidden, dtype)
            self._keep = keep  # whatever keeps the peer mappings alive lives as long as the workspace
            self._table = torch.tensor(peer_ptrs, dtype=torch.int64, device=device)  # this process's addresses
            self._flag_slot = layout.flag_off // 8
            self._send_words = layout.send_off // 8
            self._partial_elems = layout.partial_off // dtype.itemsize
            self.send = local[layout.send_off : layout.send_off + rows * row_bytes].view(rows, row_bytes)
            nparts = world * rows * hidden * dtype.itemsize
            partial = local[layout.partial_off : layout.partial_off + nparts]
            self.partial = partial.view(dtype).view(world * rows, hidden)
            self.gathered = torch.empty((world * rows, row_bytes), dtype=torch.uint8, device=device)
            self.counts = torch.zeros(world, dtype=torch.int32, device=device)
            if programs is None:  # the fixed grid: one program per SM (2 under the interpreter)
                cuda = device.type == "cuda"
                programs = torch.cuda.get_device_properties(device).multi_processor_count if cuda else 2
            self._epochs = torch.zeros(kernels.ROUNDS, programs, dtype=torch.int64, device=device)
            self._max_spin = max_spin if max_spin is not None else int(os.environ.get(MAX_SPIN_ENV, str(1 << 25)))
        else:
            self.send = torch.zeros((rows, row_bytes), dtype=torch.uint8, device=device)  # no uninitialised bytes sent
            self.partial = torch.empty((world * rows, hidden), dtype=dtype, device=device)
            single = world == 1  # a gather over one rank is the send buffer itself
            self.gathered = self.send if single else torch.empty((world * rows, row_bytes), dtype=torch.uint8,
                                                                 device=device)
            self.counts = self._count if single else torch.zeros(world, dtype=torch.int32, device=device)
            self._scratch = torch.empty((rows, hidden), dtype=dtype, device=device) if not single else None

    @classmethod
    def from_peer_buffers(cls, buffers: list[torch.Tensor], rank: int, *, max_tokens_per_rank: int, row_bytes: int,
                          hidden: int, dtype: torch.dtype = torch.bfloat16, programs: int | None = None,
                          max_spin: int | None = None) -> CountedWorkspace:
        """A ``symm`` workspace over peer memory this process already maps.

        ``buffers[p]``: this process's mapping of rank ``p``'s buffer, ``uint8 [peer_layout(...).nbytes]``,
        zeroed before any rank uses it (shared CPU tensors under ``TRITON_INTERPRET=1``, CUDA IPC handles on one
        GPU). No process group is needed; every rank must build its workspace over the same buffers in the same
        order and make the same calls. ``programs``: the fixed grid (default: the SM count on CUDA, 2 on CPU);
        ``max_spin``: polls before a wait gives up (default ``MOECOMM_SYMM_MAX_SPIN`` or 2**25).
        Raises ``ValueError`` for buffers of the wrong size, dtype or device.
        """
        world = len(buffers)
        _check_shape_args(max_tokens_per_rank, row_bytes, hidden, dtype)
        need = peer_layout(world, max_tokens_per_rank, row_bytes, hidden, dtype).nbytes
        device = buffers[rank].device
        for p, b in enumerate(buffers):
            if b.dtype != torch.uint8 or b.dim() != 1 or b.numel() < need or b.device.type != device.type:
                raise ValueError(f"buffers[{p}] must be uint8 [>= {need}] on {device.type}, got {b.dtype} "
                                 f"{tuple(b.shape)} on {b.device}")
        return cls(rank=rank, world=world, device=device, rows=max_tokens_per_rank, row_bytes=row_bytes, hidden=hidden,
                   dtype=dtype, transport=Transport.SYMM, local=buffers[rank],
                   peer_ptrs=[b.data_ptr() for b in buffers], keep=list(buffers), programs=programs,
                   max_spin=max_spin)

    def _comm(self):
        return communicator(self._group, self.rank, self.world_size, self.device)


def _check_shape_args(rows, row_bytes, hidden, dtype) -> None:
    for name, v, least in (("max_tokens_per_rank", rows, 1), ("row_bytes", row_bytes, 0), ("hidden", hidden, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"{name} must be an int >= {least}, got {v!r}")
    if row_bytes % 8:
        raise ValueError(f"row_bytes = {row_bytes} must be a multiple of 8 (rows travel as 8-byte words)")
    if dtype not in REDUCE_DTYPES:
        raise ValueError(f"dtype must be one of {REDUCE_DTYPES}, got {dtype}")


_WORKSPACES = ByGroup()  # group -> {(device, sizes, transport): CountedWorkspace}
_AUTO = ByGroup()  # group -> {device: the transport "auto" resolved to}


def _symm_ok(device: torch.device) -> bool:
    return device.type == "cuda" and symm_available()


def _resolve_transport(transport: Transport, group, device: torch.device, world: int) -> Transport:
    """The transport every rank runs (collective where it asks the ranks); ValueError on every rank for an
    explicit ``symm`` some rank cannot run."""
    if world == 1 or transport == Transport.PADDED:
        return Transport.PADDED
    resolved = per_group(_AUTO, group)
    if transport == Transport.AUTO and device in resolved:
        return resolved[device]
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (_symm_ok(device), is_nccl(group), socket.gethostname()), group=group)
    works = all(ok for ok, _, _ in everyone) and len({host for _, _, host in everyone}) == 1
    if transport == Transport.SYMM:
        if not works:
            raise ValueError("transport 'symm' needs CUDA tensors, torch symmetric memory and all ranks on one host "
                             f"on every rank; (symm works, NCCL, host) per rank: {everyone}")
        return Transport.SYMM
    resolved[device] = Transport.SYMM if works and all(nccl for _, nccl, _ in everyone) else Transport.PADDED
    return resolved[device]


def _symm_buffers(group, device: torch.device, nbytes: int):
    """This rank's zeroed buffer in torch symmetric memory, every rank's buffer address as this process maps it
    (``buffer_ptrs``, what the kernels address), and the handle that keeps the mappings alive."""
    import torch.distributed._symmetric_memory as symm_mem

    local = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    local.zero_()
    torch.cuda.synchronize(device)  # zeroed before any peer can learn the address and publish into it
    handle = symm_mem.rendezvous(local, (group or dist.group.WORLD).group_name)
    ptrs = list(handle.buffer_ptrs)
    if ptrs[handle.rank] != local.data_ptr():  # newer torch may hand out allocation-level pointers
        raise RuntimeError(f"torch symmetric memory: buffer_ptrs[{handle.rank}] = {ptrs[handle.rank]:#x} is not the "
                           f"tensor's address {local.data_ptr():#x}; this torch version is not supported")
    return local, ptrs, handle


def counted_workspace(group: dist.ProcessGroup | None, device: torch.device, *, max_tokens_per_rank: int,
                      row_bytes: int, hidden: int, dtype: torch.dtype = torch.bfloat16,
                      transport: Transport | str = Transport.AUTO) -> CountedWorkspace:
    """The :class:`CountedWorkspace` of ``group`` on ``device`` for these sizes; created on first use, cached.

    Creation is collective (call it on every rank in the same order; the counted collectives' layer path does)
    and must not happen during CUDA-graph capture: run the step once before capturing.

    Parameters
    ----------
    group : ProcessGroup or None (the world). The cache is keyed by the group object, not its name.
    device : torch.device or its name, where the buffers live (CUDA; the CPU for gloo).
    max_tokens_per_rank : int >= 1, ``M``: the static slot of every rank. THE setting ranks must agree on.
    row_bytes : int, bytes of one gathered row (a multiple of 8; 0: no gather). ``hidden`` : int, elements of
        one reduced row (0: no reducescatter). ``dtype`` : bf16, fp16 or fp32, of the partial and the result.
    transport : ``"auto"`` (default), ``"padded"`` or ``"symm"`` (module docstring).

    Raises
    ------
    TypeError
        ``device`` neither a torch.device nor a string (locally).
    ValueError
        On EVERY rank when any rank passed a bad value or the ranks' ``max_tokens_per_rank``, ``row_bytes``,
        ``hidden``, ``dtype`` or ``transport`` differ (naming each rank's value); ``"symm"`` where some rank
        cannot run it.
    RuntimeError
        Called during CUDA-graph capture while the workspace does not exist yet.
    """
    if isinstance(device, str):
        device = torch.device(device)
    if not isinstance(device, torch.device):
        raise TypeError(f"device must be a torch.device or its name, got {device!r}")
    rank, world = rank_and_world(group)
    workspaces = per_group(_WORKSPACES, group)
    key = (device, max_tokens_per_rank, row_bytes, hidden, dtype, str(transport))
    ws = workspaces.get(key)
    if ws is not None:
        return ws
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("the counted collectives' workspace is created on first use, which cannot happen during "
                           "CUDA-graph capture: run the step once before capturing")
    try:
        _check_shape_args(max_tokens_per_rank, row_bytes, hidden, dtype)
        transport, error = Transport(transport), None
    except (TypeError, ValueError) as e:
        error = e
    mine = {"max_tokens_per_rank": max_tokens_per_rank, "row_bytes": row_bytes, "hidden": hidden,
            "dtype": str(dtype), "transport": getattr(transport, "value", str(transport))}
    if world > 1 or error is not None:
        check_agreement("counted_workspace", mine, group, error)
    transport = _resolve_transport(transport, group, device, world)
    local = ptrs = handle = None
    with kept_state():  # tensors kept between calls: normal tensors whatever the caller's grad mode
        if transport == Transport.SYMM:
            nbytes = peer_layout(world, max_tokens_per_rank, row_bytes, hidden, dtype).nbytes
            local, ptrs, handle = _symm_buffers(group, device, nbytes)
        ws = workspaces[key] = CountedWorkspace(rank=rank, world=world, device=device, rows=max_tokens_per_rank,
                                                row_bytes=row_bytes, hidden=hidden, dtype=dtype, transport=transport,
                                                group=group, local=local, peer_ptrs=ptrs, keep=handle)
    return ws
