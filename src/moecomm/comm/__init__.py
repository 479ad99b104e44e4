"""The transport: variable-size collectives over ``torch.distributed`` process groups, and starting ranks.

Modules, bottom to top: ``group`` (rank, world size, backend, device of a group), ``_nccl`` (a ctypes NCCL
binding), ``transport`` (NCCL or torch.distributed behind one interface; byte views), ``symm`` (torch
symmetric-memory staging buffers), ``algorithms`` (broadcast / padded / symm / allreduce and the measured
choice), ``checks`` (argument checks at the door, agreement across ranks), ``collectives`` (the public
:func:`all_gatherv`, :func:`reduce_scatterv`, :func:`gather_sizes` and their custom ops), ``counted_workspace``
and ``counted`` (the collectives whose counts stay on the device: :func:`all_gather_counted`,
:func:`reduce_scatter_counted`, transports ``padded`` and ``symm``, Triton kernels in ``_kernels_counted``),
``launch`` (N processes over gloo or NCCL, or in place under torchrun). Everything public is re-exported here.
"""

from moecomm.comm.launch import RankError, default_backend, launch
from moecomm.comm.algorithms import Algorithm, choose_algorithm, size_pattern
from moecomm.comm.checks import (
    VALIDATE_ENV,
    check_agreement,
    check_consistency,
    validation_enabled,
)
from moecomm.comm.collectives import (
    all_gatherv,
    all_gatherv_ref,
    all_reduce,
    gather_sizes,
    reduce_scatterv,
    reduce_scatterv_ref,
    sizes_tensor,
)
from moecomm.comm.counted import (
    CountedWorkspace,
    Transport,
    all_gather_counted,
    clamp_count,
    counted_workspace,
    reduce_scatter_counted,
)
from moecomm.comm.group import rank_device

__all__ = [
    "Algorithm",
    "all_gatherv",
    "reduce_scatterv",
    "all_reduce",
    "gather_sizes",
    "check_consistency",
    "check_agreement",
    "validation_enabled",
    "choose_algorithm",
    "size_pattern",
    "sizes_tensor",
    "all_gatherv_ref",
    "reduce_scatterv_ref",
    "VALIDATE_ENV",
    "launch",
    "RankError",
    "default_backend",
    "rank_device",
    "Transport",
    "CountedWorkspace",
    "counted_workspace",
    "all_gather_counted",
    "reduce_scatter_counted",
    "clamp_count",
]
