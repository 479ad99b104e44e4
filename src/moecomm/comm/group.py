"""Which process group a call runs on: this rank, the world size, the backend, the device (cached per group).

``torch.distributed.get_rank`` / ``get_world_size`` / ``get_backend`` cost microseconds each; a decode step
calls them several times, so :func:`group_info` caches the answers per group object.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["group_info", "rank_and_world", "is_nccl", "rank_device", "forget_groups"]

_GROUPS: dict = {}  # process group -> (rank, world size, NCCL?), filled on first use


def group_info(group) -> tuple[int, int, bool]:
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


def forget_groups() -> None:
    """Drop the cache (call before ``destroy_process_group``: a cached group would outlive it)."""
    _GROUPS.clear()


def rank_and_world(group) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``ValueError`` when this process is not a member of it."""
    rank, world, _ = group_info(group)
    return rank, world


def is_nccl(group) -> bool:
    """Whether ``group`` runs NCCL."""
    return group_info(group)[2]


def rank_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device this rank's tensors live on: ``cuda:<local rank>`` under NCCL, else CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
