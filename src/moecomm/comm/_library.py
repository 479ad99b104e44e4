"""How arguments cross a ``torch.library`` custom op (private helpers of the op registrations, and the public
:func:`sizes_tensor`).

Custom ops take tensors, numbers and strings. Enums cross as their string values, process groups as their
``group_name`` (``""``: the default group), resolved when the op runs with
``torch.distributed.distributed_c10d._resolve_process_group``.

**How sizes enter: a CPU int64 tensor.** Per-rank token counts change every step. A Python list of ints
is baked into a compiled graph as constants and guarded on, so a new list recompiles. A tensor's *values*
are never guarded on: the graph takes ``sizes`` as an input and the op reads it with ``tolist()`` when it
runs. The tensor lives on the CPU so that this read is a host memory load, not a GPU sync.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["sizes_tensor"]


def sizes_tensor(sizes: Sequence[int]) -> Tensor:
    """Rows per rank as the tensor the compiled entry points take: CPU ``int64 [world_size]``.

    Pass it (instead of the list) to a compiled model each step: its values stay out of the graph, so new
    sizes never recompile (module docstring). Building it is a host-side copy of a few ints.

    Parameters
    ----------
    sizes : list[int]
        Rows of every rank (e.g. :func:`moecomm.comm.gather_sizes`), the same list on every rank.

    Returns
    -------
    Tensor
        ``int64 [len(sizes)]`` on the CPU.
    """
    return torch.tensor(list(sizes), dtype=torch.int64)


def enum_value(choice) -> Optional[str]:
    """An enum member's string value (the string itself for a string, None for None)."""
    return getattr(choice, "value", choice)


def group_name(group) -> str:
    return "" if group is None else group.group_name


def resolve_group(name: str):
    """The process group of ``name`` (None, the default group, for ``""``)."""
    if not name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def as_sizes(sizes) -> Tensor:
    """``sizes`` as the CPU integer tensor of the ops (under compile, a list becomes a constant of the graph,
    guarded on); ``TypeError`` for a tensor of another kind."""
    if isinstance(sizes, Tensor):
        if sizes.device.type != "cpu" or sizes.dtype not in (torch.int32, torch.int64) or sizes.dim() != 1:
            raise TypeError(f"sizes as a tensor must be a 1-D CPU int64 (or int32) tensor, got {sizes.dtype} "
                            f"{tuple(sizes.shape)} on {sizes.device} (a CUDA tensor would need a host sync)")
        return sizes
    return torch.tensor(list(sizes), dtype=torch.int64)


def host_rows(sizes, pick) -> int | None:
    """``pick(sizes as a list)`` where the sizes are known on the host, None while tracing (data-dependent)."""
    if torch.compiler.is_compiling():
        return None
    return pick(sizes.tolist() if isinstance(sizes, Tensor) else list(sizes))
