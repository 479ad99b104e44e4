"""Which process group a call runs on: this rank, the world size, the backend, the device (cached per group).

``torch.distributed.get_rank`` / ``get_world_size`` / ``get_backend`` cost microseconds each; a decode step
calls them several times, so :func:`group_info` caches the answers per group object.

**Caches are keyed by the group object, never by its name.** After ``destroy_process_group`` torch reuses
group names ("0", "1", ...), and fault-tolerant engines rebuild their groups with new rank numbers. Every
per-group cache of moecomm (this one, the transports, the NCCL communicators, the symmetric-memory
buffers) is a :class:`ByGroup` keyed by the group object and holding it weakly: a re-initialised group is
a new object with fresh entries, and an old group's entries go when the group is freed.
"""

from __future__ import annotations

import os
import weakref

import torch
import torch.distributed as dist

__all__ = ["group_info", "rank_and_world", "is_nccl", "rank_device", "ByGroup", "per_group",
           "forget_groups"]


_CACHES: list = []  # every ByGroup of the package, for forget_groups


class ByGroup:
    """``process group object -> value``, holding the groups weakly (module docstring).

    A dict keyed by ``id(group)`` whose entries carry a weak reference that checks the identity and removes
    the entry when the group is freed: the semantics of a ``WeakKeyDictionary`` at the cost of a plain dict
    lookup (a ``WeakKeyDictionary`` makes a weak reference per lookup, ~0.5 us; a step looks up ~10 times).
    """

    def __init__(self):
        self._entries: dict[int, tuple[weakref.ref, object]] = {}
        _CACHES.append(self)

    def clear(self) -> None:
        """Drop every entry."""
        self._entries.clear()

    def get(self, group):
        """The value of ``group``, or None (also for an object that is not a group)."""
        entry = self._entries.get(id(group))
        return entry[1] if entry is not None and entry[0]() is group else None

    def set(self, group, value):
        """Store and return ``value`` for ``group``."""
        key = id(group)
        self._entries[key] = (weakref.ref(group, lambda _: self._entries.pop(key, None)), value)
        return value


_GROUPS = ByGroup()  # process group -> (rank, world size, NCCL?), filled on first use


def per_group(cache: ByGroup, group) -> dict:
    """The entries of ``cache`` that belong to ``group`` (None: the current world group), a dict made on first
    use that lives as long as the group object does (module docstring). ``ValueError`` when ``group`` is None
    and no default group exists."""
    key = group if group is not None else dist.group.WORLD
    if key is None:  # e.g. a workspace kept past destroy_process_group
        raise ValueError("no default process group: call init_process_group first (was it destroyed?)")
    entries = cache.get(key)
    return entries if entries is not None else cache.set(key, {})


def group_info(group) -> tuple[int, int, bool]:
    """``(rank, world_size, runs NCCL)`` of ``group`` (cached per group object: these calls cost microseconds
    each); ``ValueError`` when this process is not a member of it."""
    key = group if group is not None else dist.group.WORLD
    info = _GROUPS.get(key)  # None also for torch's NON_GROUP_MEMBER int, which new_group gives non-members
    if info is None:
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the process group "
                             f"it called a moecomm collective of; call it only on the group's ranks")
        info = _GROUPS.set(key, (rank, dist.get_world_size(group), dist.get_backend(group) == "nccl"))
    return info


def forget_groups() -> None:
    """Drop every per-group cache of the package (group facts, communicators, symmetric and counted buffers):
    call before ``destroy_process_group``. Their values can hold the group, so it would outlive its
    destruction, and a gloo group destroyed at interpreter exit can abort the process ("terminate called
    without an active exception")."""
    for cache in _CACHES:
        cache.clear()


def rank_and_world(group) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group``; ``ValueError`` when this process is not a member of it."""
    rank, world, _ = group_info(group)
    return rank, world


def is_nccl(group) -> bool:
    """Whether ``group`` runs NCCL."""
    return group_info(group)[2]


def rank_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device this rank's tensors live on: CPU unless ``group`` runs NCCL, then this rank's GPU.

    The GPU is taken from the group, never from the calling thread (a new Python thread's current CUDA
    device is 0 whatever its rank's): the device the group is bound to (``init_process_group(device_id=...)``,
    which :func:`moecomm.comm.launch` passes; subgroups inherit it, or this falls back to the world group's),
    else ``cuda:LOCAL_RANK`` (torchrun and most launchers set it), else ``cuda:(rank % device_count)``,
    torch's own guess for an unbound group.
    """
    if dist.get_backend(group) != "nccl":
        return torch.device("cpu")
    for pg in (group, dist.group.WORLD):
        bound = getattr(pg, "bound_device_id", None)
        if bound is not None:
            return bound
    if "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
