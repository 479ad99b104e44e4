"""How the demo's FFNs become EP MoEs, and the MoE step: the one place of the demo that calls the library.

Also the demo's splits of the sentences over the ranks (:func:`split_counts`) and its expert count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["STRATEGIES", "STRATEGY_CHOICES", "SPLITS", "COMBINE_FORMATS", "runs_of", "split_counts", "default_num_experts", "resolve_strategy",
           "MoEPlan", "make_plan", "LayerExperts", "build_experts", "moe_ffn"]

STRATEGIES = ("allreduce", "agrs", "agrs-nvfp4", "agrs-fp8")  # the default: every concrete strategy
STRATEGY_CHOICES = (*STRATEGIES, "auto")
SPLITS = ("uneven", "idle")  # every rank busy with different counts / the last rank has no sentences
COMBINE_FORMATS = ("bf16", "int8", "fp8")  # the combine's wire formats (moecomm.quant.ReduceFormat)


def runs_of(strategies: Sequence[str], combine_formats: Sequence[str]) -> list[tuple[str, str]]:
    """``(strategy, combine format)`` pairs, strategy-major; ``allreduce`` (a bf16 all-reduce) with ``bf16`` only."""
    return [(s, f) for s in strategies for f in combine_formats if s != "allreduce" or f == "bf16"]


def split_counts(num_sentences: int, world_size: int, *, idle_last: bool = False) -> list[int]:
    """Sentences per rank, proportional to 1, 2, ..., busy ranks (largest remainder); sums to ``num_sentences``.

    With ``idle_last`` the last rank gets 0 and the others share all sentences.

    Raises
    ------
    ValueError
        ``world_size < 1``, ``num_sentences < 0``, or ``idle_last`` with a single rank.
    """
    if world_size < 1 or num_sentences < 0:
        raise ValueError(f"need world_size >= 1 and num_sentences >= 0, got {world_size}, {num_sentences}")
    if idle_last and world_size < 2:
        raise ValueError("an idle rank needs world_size >= 2")
    busy = world_size - 1 if idle_last else world_size
    weights = list(range(1, busy + 1))
    exact = [num_sentences * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(busy), key=lambda i: counts[i] - exact[i])[: num_sentences - sum(counts)]:
        counts[i] += 1
    return counts + [0] * (world_size - busy)


def default_num_experts(world_size: int, base: int = 8) -> int:
    """``base`` when ``world_size`` divides it, else the smallest multiple of ``world_size`` above ``base``."""
    return base if base % world_size == 0 else world_size * math.ceil(base / world_size)


def resolve_strategy(strategy: str, sizes: Sequence[int]) -> str:
    """The concrete strategy :func:`moecomm.layer.moe_forward` runs for ``strategy`` with these ``sizes``.

    ``"auto"`` is resolved as ``moe_forward`` resolves it for the demo's experts, which are bf16 and quantize
    nothing (so it runs ``agrs``); any other strategy is returned as it is.
    """
    from moecomm.layer import choose_strategy

    if strategy != "auto":
        return strategy
    return choose_strategy(None, sum(sizes), world_size=len(sizes), ep_size=len(sizes)).value


@dataclass(frozen=True)
class MoEPlan:
    """How every layer's FFN is split and routed; the same on every rank (numpy, so it pickles by value).

    ``top_k == num_experts``: contiguous neuron groups, every token to every expert at weight 1 -- exact.
    ``top_k < num_experts``: clustered neuron groups and a linear router per layer -- approximate.
    """

    num_experts: int
    top_k: int
    groups: tuple[tuple[np.ndarray, ...], ...] | None = None  # [layer][expert] neuron ids; None: contiguous
    routers: tuple[tuple[np.ndarray, np.ndarray], ...] | None = None  # [layer] (weight [E, H], bias [E]) fp32

    @property
    def exact(self) -> bool:
        return self.top_k == self.num_experts

    def layer_groups(self, layer: int) -> list[torch.Tensor] | None:
        return None if self.groups is None else [torch.from_numpy(g) for g in self.groups[layer]]

    def route(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(topk_ids [T, k] int32, topk_weights [T, k] fp32)`` for rows ``[T, H]`` of ``layer``."""
        from moecomm.demo.minilm import Router, all_experts_routing

        if self.exact:
            return all_experts_routing(rows.shape[0], self.num_experts, rows.device)
        w, b = self.routers[layer]
        return Router(torch.from_numpy(w), torch.from_numpy(b)).route(rows, self.top_k)


def make_plan(model, num_experts: int, top_k: int, calibration_rows: Sequence[torch.Tensor] | None) -> MoEPlan:
    """The exact plan, or for ``top_k < num_experts`` clustered experts and routers fitted on ``calibration_rows``."""
    from moecomm.demo.minilm import cluster_neurons, fit_router, moefy

    if top_k == num_experts:
        return MoEPlan(num_experts, top_k)
    groups, routers = [], []
    for i, w in enumerate(model.layers):
        g = cluster_neurons(w, num_experts)
        r = fit_router(moefy(w, num_experts, groups=g), calibration_rows[i])
        groups.append(tuple(x.numpy() for x in g))
        routers.append((r.weight.cpu().numpy(), r.bias.cpu().numpy()))
    return MoEPlan(num_experts, top_k, tuple(groups), tuple(routers))


@dataclass(frozen=True)
class LayerExperts:
    """One layer's MoE on this rank: its experts and the dense FFN's down-projection bias."""

    experts: Any  # moecomm.moe.ExpertWeights: this rank's E / ep_size experts, bf16, GELU, b13 in fp32, b2=None
    b2: torch.Tensor  # [H] fp32, added once to the combined output (the experts carry no b2)


def build_experts(model, plan: MoEPlan, ep_size: int, ep_rank: int) -> list[LayerExperts]:
    """This rank's experts of every layer (MoEfied with :func:`moecomm.demo.minilm.moefy`), on the model's device.

    The dense ``b2`` stays out of the experts and is added once after the combine, which
    :func:`moecomm.moe.make_expert_weights` documents as exact for any routing.
    """
    from moecomm.demo.minilm import moefy
    from moecomm.moe import Activation, WeightFormat, make_expert_weights

    layers = []
    for i, w in enumerate(model.layers):
        moe = moefy(w, plan.num_experts, groups=plan.layer_groups(i))
        experts = make_expert_weights(
            moe.w13.to(torch.bfloat16),
            moe.w2.to(torch.bfloat16),
            ep_size=ep_size,
            ep_rank=ep_rank,
            format=WeightFormat.BF16,
            activation=Activation.GELU,
            b13=moe.b13,  # stored in fp32 by make_expert_weights
            b2=None,
        )
        layers.append(LayerExperts(experts, moe.b2.float()))
    return layers


def moe_ffn(layers: list[LayerExperts], plan: MoEPlan, *, strategy: str, sizes: list[int],
            global_scales: Sequence[float], combine_format: str = "bf16", on_layer=None):
    """An FFN hook for :meth:`MiniLM.encode` running each layer's MoE over all ranks with ``strategy`` (concrete).

    Rows ``[n, H]`` fp32 are routed by ``plan``, cast to bf16 and passed to :func:`moecomm.layer.moe_forward`;
    its bf16 output (combined in ``combine_format``) comes back as fp32 plus the dense ``b2``. ``moe_forward`` is collective: every rank calls the
    hook for every layer, also with ``n = 0``.
    """
    from moecomm.layer import Strategy, moe_forward

    strat = Strategy(strategy)

    def ffn(layer: int, rows: torch.Tensor) -> torch.Tensor:
        ids, wts = plan.route(layer, rows)
        gs = torch.tensor(global_scales[layer], dtype=torch.float32, device=rows.device)
        out = moe_forward(
            rows.to(torch.bfloat16),
            ids,
            wts,
            layers[layer].experts,
            sizes=sizes,
            strategy=strat,
            global_scale=gs if strat is Strategy.AGRS_NVFP4 else None,
            combine_format=combine_format,
        )
        if on_layer is not None:
            on_layer(layer)
        return out.float() + layers[layer].b2

    return ffn
