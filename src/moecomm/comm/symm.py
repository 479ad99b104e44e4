"""Staging buffers in torch symmetric memory (``torch.distributed._symmetric_memory``): one growing buffer per
group object and device, each rank's mapped into every peer's address space (CUDA with peer access, NVLink).

Only unicast peer loads, stores and copies are used; NVLink multicast (multimem, NVLS) is never called.
"""

from __future__ import annotations


import torch
import torch.distributed as dist

from moecomm._modes import kept_state
from moecomm.comm.group import ByGroup, per_group

__all__ = ["symm_available", "symm_buffer"]

def symm_available() -> bool:
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


_SYMM = ByGroup()  # group -> {device index: _SymmBuffer} (moecomm.comm.group)


def symm_buffer(group, device: torch.device, nbytes: int) -> _SymmBuffer:
    """The staging buffer of ``group`` on ``device`` with at least ``nbytes``; grown (collectively: every rank
    asks for the same ``nbytes``, computed from agreed sizes) to the next power of two of at least 1 MiB.

    Cached per group object (a group re-initialised under a reused name gets buffers of its own ranks), and
    made as a normal tensor whatever the caller's grad mode (``moecomm._modes``)."""
    mine = per_group(_SYMM, group)
    buf = mine.get(device.index)
    if buf is None or buf.capacity < nbytes:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"algorithm 'symm' needs a {nbytes} B staging buffer, which cannot be allocated "
                               "during CUDA-graph capture: run the same call once before capturing")
        with kept_state():
            buf = mine[device.index] = _SymmBuffer(group, device,
                                                   max(1 << 20, 1 << (max(nbytes, 1) - 1).bit_length()))
    return buf
