"""Shared experts during the dispatch: the ``shared_experts`` argument of :func:`moecomm.layer.moe_forward`.

DeepSeek-V2/V3/R1 (one shared expert of intermediate 2048 in V3), Qwen2-MoE, Llama-4 and others run
*shared experts* on every token besides the routed ones. They need no communication, so
:func:`~moecomm.layer.moe_forward` runs them on the caller's stream while the dispatch runs on moecomm's
communication stream (:mod:`moecomm.layer.asynchronous`), and adds their output to this rank's rows after
the combine (SGLang and vLLM overlap shared experts with DeepEP's dispatch the same way).

``shared_experts`` is either

* a callable ``f(hidden) -> bf16 [n, H]`` on this rank's ``bf16 [n, H]`` tokens (an ``nn.Module`` MLP,
  with a gate if the model has one, as Qwen2-MoE's sigmoid-gated shared expert): it must be row-local and
  queue its work on the current stream without reading device values on the host; or
* :class:`moecomm.moe.ExpertWeights` of the shared experts, every one on every rank
  (``make_expert_weights(w13, w2)`` with the default ``ep_size=1``), which moecomm runs itself with
  :func:`moecomm.moe.experts_forward`: every token routed to every shared expert at weight 1, in the
  ``expert_input_format`` of the routed experts (and its NVFP4 global scale). Several shared experts (or
  DeepSeek's one shared MLP of ``n_shared_experts * moe_intermediate_size``) are one such set.

The result is exactly ``moe_forward(...) + shared_experts(hidden)``: the step adds the shared output to the
combined bf16 rows once, after the combine (``out.add_(shared)``: per element the same bf16 addition as
``a + b``, the sum of two bf16 values rounded to bf16). So it is bit for bit the same as adding the shared
output to ``moe_forward``'s result afterwards, for every strategy, world size and chunk count, on every
device, as long as the shared experts give the same bits on the same rows (a callable that is not
deterministic cannot promise that; under :class:`~moecomm.layer.GraphedMoE` they run on the bucket's rows,
and a row's output is the same where the GEMM's result for a row does not depend on the other rows: true
on a CPU and observed on an H200, docs/experts.md). Adding the shared output to this rank's rows of the partial output *before* the combine
would save that one elementwise pass but lose this equality: the reduce-scatter then sums it with the
other ranks' partials in the collective's order (NCCL rounds bf16 at every step of its ring), which agrees
with the reference only to bf16 rounding.

A shared expert that raises or returns a wrong shape, dtype or device makes its rank raise *after* the
combine, so that no other rank is left waiting in a collective.
"""

from __future__ import annotations

from typing import Callable, Union

import torch

from moecomm.moe import ExpertWeights, experts_forward
from moecomm.quant import QuantFormat

__all__ = ["SharedExperts", "check_shared_experts", "shared_output", "SharedOutput"]

SharedExperts = Union[Callable[[torch.Tensor], torch.Tensor], ExpertWeights]


def check_shared_experts(shared_experts, hidden: torch.Tensor, rank: int) -> None:
    """The checks at the door (before any collective): ``shared_experts`` is None, a callable, or
    :class:`ExpertWeights` of all shared experts of the hidden size and device of ``hidden``.

    Raises ``TypeError`` for anything else, ``ValueError`` for weights split over ranks or of another hidden
    size or device.
    """
    if shared_experts is None or (callable(shared_experts) and not isinstance(shared_experts, ExpertWeights)):
        return
    if not isinstance(shared_experts, ExpertWeights):
        raise TypeError(f"rank {rank}: shared_experts must be a callable on bf16 [n, hidden] or "
                        f"moecomm.moe.ExpertWeights, got {type(shared_experts).__name__}")
    w = shared_experts
    if w.first_expert != 0 or w.num_local != w.num_experts:
        raise ValueError(f"rank {rank}: shared experts run on every rank: they must be all {w.num_experts} "
                         f"experts (make_expert_weights(w13, w2) with ep_size=1), got experts "
                         f"[{w.first_expert}, {w.first_expert + w.num_local})")
    if hidden.dim() == 2 and w.hidden_size != hidden.shape[1]:
        raise ValueError(f"rank {rank}: hidden has {hidden.shape[1]} columns, the shared experts' hidden size is "
                         f"{w.hidden_size}")
    if w.w13.device != hidden.device:
        raise ValueError(f"rank {rank}: the shared experts are on {w.w13.device}, hidden on {hidden.device}")


def shared_output(shared_experts: SharedExperts, hidden: torch.Tensor, *, rank: int,
                  expert_input_format: QuantFormat | str | None = None,
                  global_scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """The shared experts on this rank's tokens: ``bf16 [n, H]`` from ``hidden`` ``bf16 [n, H]``.

    :class:`ExpertWeights` run through :func:`moecomm.moe.experts_forward` with every token routed to
    every expert at weight 1 and ``input_format=expert_input_format`` (``global_scale`` for NVFP4); a
    callable is called on ``hidden``. Raises ``TypeError`` / ``ValueError`` when the callable's result is
    not a bf16 ``[n, H]`` tensor on ``hidden``'s device.
    """
    if isinstance(shared_experts, ExpertWeights):
        fmt = None if expert_input_format is None else QuantFormat(expert_input_format)
        n, e = hidden.shape[0], shared_experts.num_local
        ids = torch.arange(e, dtype=torch.int32, device=hidden.device).expand(n, e)
        weights = torch.ones((n, e), dtype=torch.float32, device=hidden.device)
        return experts_forward(hidden, ids, weights, shared_experts, input_format=fmt,
                               global_scale=global_scale if fmt == QuantFormat.NVFP4 else None)
    out = shared_experts(hidden)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"rank {rank}: shared_experts returned {type(out).__name__}, not a tensor")
    if out.dtype != torch.bfloat16 or out.shape != hidden.shape or out.device != hidden.device:
        raise ValueError(f"rank {rank}: shared_experts must return bf16 {tuple(hidden.shape)} on {hidden.device} "
                         f"(shaped like hidden), got {out.dtype} {tuple(out.shape)} on {out.device}")
    return out


class SharedOutput:
    """The shared experts' output, computed when made (on the current stream); an error they raise is kept
    until :meth:`add_to`, which the step calls after its last collective.

    ``shared``: ``hidden -> bf16 [n, H]`` (:func:`shared_output` bound to its arguments) or None.
    """

    __slots__ = ("value", "error")

    def __init__(self, shared: Callable[[torch.Tensor], torch.Tensor] | None, hidden: torch.Tensor):
        self.value, self.error = None, None
        if shared is not None:
            try:
                self.value = shared(hidden)
            except Exception as e:  # noqa: BLE001 - raised after the combine, so no rank hangs in it
                self.error = e

    def add_to(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` (the combined rows) plus the shared output, in place; raises what the shared experts raised."""
        if self.error is not None:
            raise self.error
        return out if self.value is None else out.add_(self.value)
