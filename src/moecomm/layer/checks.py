"""Checks at the door of the layer step: the local checks of :func:`~moecomm.layer.exchange.dispatch` and
:func:`~moecomm.layer.step.moe_forward` (shapes, dtypes, devices, the NVFP4 global scale, the experts'
EP share, no input that requires grad in grad mode), and what the ranks must agree on when validating (exchanged by
:func:`moecomm.comm.checks.run_checks`). Everything behind these checks trusts its arguments.
"""

from __future__ import annotations

import math
import struct
from dataclasses import fields

import torch
import torch.distributed as dist

from moecomm import errors
from moecomm._modes import refuse_grad
from moecomm.comm import Algorithm
from moecomm.comm.checks import check_sizes
from moecomm.comm.group import rank_and_world
from moecomm.layer.message import message_layout
from moecomm.layer.strategy import Strategy, check_expert_format, wire_format
from moecomm.moe import ExpertWeights
from moecomm.quant import QuantFormat, ReduceFormat
from moecomm.quant.reduce import check_reduce_hidden

__all__ = ["check_global_scale", "check_global_scale_use", "check_dispatch", "dispatch_agreement", "check_experts",
           "check_combine_format"]


def check_global_scale(global_scale, rank: int) -> None:
    """An NVFP4 global scale: a finite positive number or one-element tensor, also as fp32 (a CUDA tensor's
    value is checked by the quantizer on the device: an invalid one makes every block scale NaN)."""
    if isinstance(global_scale, bool) or not isinstance(global_scale, (int, float, torch.Tensor)):
        raise TypeError(f"rank {rank}: global_scale must be a number or a one-element tensor, got {global_scale!r}")
    if isinstance(global_scale, torch.Tensor):
        if global_scale.numel() != 1:
            raise ValueError(f"rank {rank}: global_scale must have one element, got shape {tuple(global_scale.shape)}")
        if global_scale.is_cuda:
            return
    value = float(global_scale)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"rank {rank}: global_scale must be finite and > 0, got {value}")
    try:  # the kernels read it as fp32: 1e39 is inf there, 1e-46 is 0
        as_fp32 = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        as_fp32 = math.inf
    if not (math.isfinite(as_fp32) and as_fp32 > 0):
        raise ValueError(f"rank {rank}: global_scale must be finite and > 0 in fp32, got {value} ({as_fp32} in fp32)")


def check_global_scale_use(wire: QuantFormat | None, expert_input_format, global_scale, rank: int) -> None:
    """One rule for the NVFP4 global scale, whatever the strategy: required where NVFP4 is on the wire or is
    the experts' input format, refused everywhere else (as :func:`moecomm.quant.quantize` refuses it).

    The experts' format alone decides for ``"auto"``, so a missing scale raises at every world size, not
    only where the crossover picks ``agrs-nvfp4``.
    """
    if QuantFormat.NVFP4 in (wire, expert_input_format):
        if global_scale is None:
            raise ValueError(f"rank {rank}: NVFP4 (on the wire or as the experts' input) needs the layer's static "
                             f"global_scale, with every strategy (also 'auto' where it picks agrs)")
        check_global_scale(global_scale, rank)
    elif global_scale is not None:
        raise ValueError(f"rank {rank}: global_scale applies to NVFP4 only: neither the wire "
                         f"({'bf16' if wire is None else wire}) nor the experts ({expert_input_format or 'bf16'}) "
                         f"use NVFP4; pass global_scale=None")


def check_dispatch(hidden, topk_ids, topk_weights, sizes, strategy, global_scale, group, expert_input_format, pack):
    """Local checks of a dispatch; returns ``(sizes as a list, rank, world)``. Raises ValueError/TypeError."""
    rank, world = rank_and_world(group)
    if not isinstance(pack, bool):
        raise TypeError(f"rank {rank}: pack must be a bool, got {pack!r}")
    for name, t in (("hidden", hidden), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rank {rank}: {name} must be a tensor, got {type(t).__name__}")
    sizes = check_sizes(sizes, world)
    if hidden.dim() != 2 or hidden.dtype != torch.bfloat16:
        raise ValueError(f"rank {rank}: hidden must be bf16 [tokens, hidden], got {hidden.dtype} {tuple(hidden.shape)}")
    n = hidden.shape[0]
    if n != sizes[rank]:
        raise ValueError(f"rank {rank}: hidden has {n} rows but sizes[{rank}] = {sizes[rank]}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"rank {rank}: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [{n}, topk]")
    if topk_ids.dtype not in (torch.int32, torch.int64) or topk_weights.dtype != torch.float32:
        raise ValueError(f"rank {rank}: topk_ids must be int32/int64 and topk_weights float32, got "
                         f"{topk_ids.dtype} and {topk_weights.dtype}")
    refuse_grad(f"rank {rank}", hidden=hidden, topk_weights=topk_weights, global_scale=global_scale)
    try:
        check_expert_format(expert_input_format)
    except ValueError as e:
        raise ValueError(f"rank {rank}: {e}") from None
    if topk_ids.device != hidden.device or topk_weights.device != hidden.device:
        raise ValueError(f"rank {rank}: hidden, topk_ids and topk_weights must be on one device, got "
                         f"{hidden.device}, {topk_ids.device}, {topk_weights.device}")
    fmt = wire_format(strategy, expert_input_format)
    if fmt is not None:
        if expert_input_format is not None and QuantFormat(expert_input_format) != fmt:
            raise ValueError(f"rank {rank}: {strategy.value} sends {fmt.value} tokens but the experts consume "
                             f"{QuantFormat(expert_input_format).value}: the experts would see other values than "
                             f"their own quantizer's; use strategy 'auto' or the matching one")
    check_global_scale_use(fmt, expert_input_format, global_scale, rank)
    message_layout(fmt, hidden.shape[1], topk_ids.shape[1])  # raises on a bad hidden size
    return sizes, rank, world


def dispatch_agreement(hidden, topk_ids, sizes, strategy, global_scale, expert_input_format, pack, algorithm,
               num_experts=None) -> dict:
    """What every rank must agree on for one dispatch (exchanged by validation, which may sync: it reads a
    CUDA global scale and checks the ids on the host)."""
    fmt = wire_format(strategy, expert_input_format)
    if topk_ids.numel() and num_experts is None:  # dispatch alone: at least no id below -1
        errors.check_ids(topk_ids, 2**31 - 1, dist.get_rank())
    elif num_experts is not None:
        errors.check_ids(topk_ids, num_experts, dist.get_rank())
    return {
        "sizes": list(sizes), "hidden": tuple(hidden.shape[1:]), "topk": tuple(topk_ids.shape[1:]),
        "strategy": strategy.value, "wire format": None if fmt is None else fmt.value,
        "pack": pack if strategy != Strategy.ALLREDUCE else None, "algorithm": Algorithm(algorithm).value,
        "global_scale": float(global_scale) if QuantFormat.NVFP4 in (fmt, expert_input_format) else None,
    }


def check_experts(weights: ExpertWeights, hidden, rank: int, world: int) -> None:
    """The experts must be this rank's share of an EP split over exactly the ranks of the group (each expert
    on one rank, or the combine's sum counts it twice) and match the hidden size."""
    if not isinstance(weights, ExpertWeights):
        raise TypeError(f"rank {rank}: weights must be moecomm.moe.ExpertWeights, got {type(weights).__name__}")
    refuse_grad(f"rank {rank}", **{f"weights.{f.name}": getattr(weights, f.name) for f in fields(weights)})
    first, n, total = weights.first_expert, weights.num_local, weights.num_experts
    if n * world != total or first != rank * n:
        raise ValueError(f"rank {rank}: these are experts [{first}, {first + n}) of {total}; over {world} ranks "
                         f"rank {rank} needs make_expert_weights(..., ep_size={world}, ep_rank={rank})")
    if isinstance(hidden, torch.Tensor) and hidden.dim() == 2 and hidden.shape[1] != weights.hidden_size:
        raise ValueError(f"rank {rank}: hidden has {hidden.shape[1]} columns, the experts' hidden size is "
                         f"{weights.hidden_size}")


def check_combine_format(combine_format, strategy: Strategy, hidden_size: int, rank: int) -> ReduceFormat:
    """The combine's wire format: a :class:`moecomm.quant.ReduceFormat`; a quantized one needs an ``agrs*``
    strategy (``allreduce`` sums on the wire) and a hidden size that is a multiple of 128. Raises ``ValueError``."""
    try:
        fmt = ReduceFormat(combine_format)
    except ValueError as e:
        raise ValueError(f"rank {rank}: combine_format: {e}") from None
    if fmt != ReduceFormat.BF16:
        if strategy == Strategy.ALLREDUCE:
            raise ValueError(f"rank {rank}: combine_format={fmt.value!r} needs an agrs strategy: the allreduce "
                             "strategy sums the partial outputs on the wire, in bf16")
        check_reduce_hidden(fmt, hidden_size, f"rank {rank}: combine_format")
    return fmt
