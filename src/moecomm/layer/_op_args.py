"""How the layer step's custom ops flatten their non-tensor arguments (private): :class:`moecomm.moe.ExpertWeights`
into its tensors (in the order of :data:`EXPERT_TENSORS`) plus four plain fields, and an NVFP4 global scale into
a tensor or a Python number. Shared by ``moecomm::moe_forward`` and ``moecomm::moe_forward_counted``."""

from __future__ import annotations

from torch import Tensor

from moecomm.comm._library import enum_value
from moecomm.moe import Activation, ExpertWeights, WeightFormat

__all__ = ["EXPERT_TENSORS", "flatten_experts", "unflatten_experts", "split_global_scale"]

# The tensor fields of ExpertWeights, in the order of the ops' ``experts`` list
EXPERT_TENSORS = ("w13", "w2", "w13_scale", "w2_scale", "w13_global_scale", "w2_global_scale", "b13", "b2")


def flatten_experts(weights: ExpertWeights) -> tuple:
    """``(tensors, activation, weight_format, first_expert, num_experts)`` as the ops take them."""
    return ([getattr(weights, f) for f in EXPERT_TENSORS], enum_value(weights.activation), enum_value(weights.format),
            weights.first_expert, weights.num_experts)


def unflatten_experts(tensors, activation: str, weight_format: str, first_expert: int,
                      num_experts: int) -> ExpertWeights:
    """The inverse of :func:`flatten_experts`."""
    return ExpertWeights(**dict(zip(EXPERT_TENSORS, tensors)), activation=Activation(activation),
                         format=WeightFormat(weight_format), first_expert=first_expert, num_experts=num_experts)


def split_global_scale(global_scale) -> tuple[Tensor | None, float | None]:
    """A global scale as ``(tensor, None)``, ``(None, number)`` or ``(None, None)``."""
    if isinstance(global_scale, Tensor):
        return global_scale, None
    return None, None if global_scale is None else float(global_scale)
