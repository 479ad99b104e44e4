"""The MoE layer's own computation under expert parallelism: routing, expert weights, expert compute.

Modules: ``routing`` (softmax top-k, DeepSeek-V3 grouped top-k, the ``topk_ids`` / ``topk_weights``
conventions), ``weights`` (:class:`ExpertWeights`, :func:`make_expert_weights`, :func:`ep_partition`),
``experts`` (:func:`experts_forward` and its float32 reference :func:`experts_forward_ref`), and the
private Triton kernels ``_kernels``. Everything public is re-exported here.
"""

from moecomm.moe.experts import experts_forward, experts_forward_ref
from moecomm.moe.routing import grouped_topk, ids_int32, normalize_topk, topk_softmax
from moecomm.moe.weights import (
    FP8_BLOCK_SIZE,
    SIZE_MULTIPLE,
    Activation,
    ExpertWeights,
    WeightFormat,
    ep_partition,
    make_expert_weights,
)

__all__ = [
    "topk_softmax",
    "grouped_topk",
    "normalize_topk",
    "ids_int32",
    "Activation",
    "WeightFormat",
    "FP8_BLOCK_SIZE",
    "SIZE_MULTIPLE",
    "ep_partition",
    "ExpertWeights",
    "make_expert_weights",
    "experts_forward",
    "experts_forward_ref",
]
