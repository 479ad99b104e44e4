"""One EP MoE layer step for DP attention: :func:`moe_forward` = dispatch, local experts, combine.

Reading order: the checks at the door (:mod:`moecomm.layer.checks`, one call), the strategy chosen
(:mod:`moecomm.layer.strategy`), then a straight data path: :func:`~moecomm.layer.exchange.dispatch` ->
:func:`moecomm.moe.experts_forward` -> :func:`~moecomm.layer.exchange.combine` (or the chunked pipeline of
:mod:`moecomm.layer.overlap`).

:func:`moe_forward` is also the custom op ``moecomm::moe_forward``, registered at the end of this module;
it calls the op only while ``torch.compile`` traces it or when ``sizes`` is a CPU tensor. Arguments that
are not tensors, numbers or strings are flattened for the op: :class:`moecomm.moe.ExpertWeights` into its
tensors (in the order of :data:`EXPERT_TENSORS`) plus ``activation``, ``weight_format``,
``first_expert``, ``num_experts``; enums into their values; a process group into its name; a Python-number
NVFP4 global scale into ``global_scale_value``. The op reads ``sizes`` on the host, so it carries the
``cudagraph_unsafe`` tag: a CUDA graph must never capture it (use :class:`moecomm.layer.graphs.GraphedMoE`).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from moecomm._modes import refuse_grad
from moecomm.comm import Algorithm
from moecomm.comm._library import as_sizes, enum_value, group_name, resolve_group
from moecomm.comm.checks import check_sizes, run_checks
from moecomm.comm.group import rank_and_world
from moecomm.layer._op_args import (
    EXPERT_TENSORS,
    flatten_experts,
    split_global_scale,
    unflatten_experts,
)
from moecomm.layer.checks import (
    check_combine_format,
    check_dispatch,
    check_experts,
    dispatch_agreement,
)
from moecomm.layer.counted import counted_mode, moe_forward_counted
from moecomm.layer.exchange import combine, dispatch_checked
from moecomm.layer.overlap import pipelined
from moecomm.layer.shared import SharedExperts, SharedOutput, check_shared_experts, shared_output
from moecomm.layer.strategy import Strategy, choose_strategy, resolve_chunks
from moecomm.moe import ExpertWeights, experts_forward
from moecomm.quant import QuantFormat, ReduceFormat

__all__ = ["moe_forward", "moe_forward_op", "EXPERT_TENSORS"]


def moe_forward(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    weights: ExpertWeights,
    *,
    sizes: Sequence[int] | None = None,
    num_tokens: torch.Tensor | None = None,
    max_tokens_per_rank: int | None = None,
    strategy: Strategy | str = Strategy.AUTO,
    global_scale: torch.Tensor | float | None = None,
    expert_input_format: QuantFormat | None = None,
    group: dist.ProcessGroup | None = None,
    pack: bool = True,
    algorithm: Algorithm | str = Algorithm.AUTO,
    validate: bool = False,
    allow_quantized: bool | None = None,
    chunks: int | None = None,
    combine_format: ReduceFormat | str = "bf16",
    shared_experts: SharedExperts | None = None,
) -> torch.Tensor:
    """One EP MoE layer step for DP attention: dispatch, local experts, combine.

    ``hidden`` ``bf16 [sizes[rank], hidden]``, ``topk_ids`` / ``topk_weights`` ``[sizes[rank], topk]``
    (``topk_ids == -1``: a masked slot, no expert); ``weights`` are this rank's experts
    (:func:`moecomm.moe.make_expert_weights` with ``ep_size = world_size``). ``sizes`` must be the same
    list on every rank: take it from :func:`moecomm.comm.gather_sizes` (or DP metadata all ranks
    share). It is not checked across ranks unless validating (a host sync): ranks that disagree get wrong
    rows without an error (tokens shifted or zero in the dispatch, rows lost in the combine) or hang.
    ``validate=True``, ``MOECOMM_VALIDATE=1`` or ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` exchange the metadata
    first and raise on every rank instead. ``expert_input_format``: the format
    the experts quantize their input to (None: bf16 experts); with ``agrs`` it is applied after the
    gather, with a quantized strategy before it -- the same bytes either way. ``strategy="auto"`` resolves
    through :func:`choose_strategy` (``allow_quantized`` or ``MOECOMM_DISABLE_QUANTIZED_DISPATCH=1``
    switch the quantized path off); ``algorithm`` is the collectives' algorithm of the dispatch and the
    combine (``"auto"``: per call). Returns ``bf16 [sizes[rank], hidden]``: this rank's rows of the sum
    over all ranks' experts. Never reads a device value on the host unless validating.

    ``chunks``: split every rank's rows into ``chunks`` consecutive pieces (rank ``r``'s chunk ``c`` is its
    rows ``[n_r * c // chunks, n_r * (c + 1) // chunks)``, so every rank derives all chunk sizes from
    ``sizes``; a rank may have none in a chunk) and pipeline them on CUDA: the dispatch of chunk ``c + 1``
    and the combine of chunk ``c - 1`` run on a communication stream while the experts run on chunk ``c``
    (TensorRT-LLM's chunked MoE; CUDA events, no host sync). The result is bit-identical to ``chunks=1``
    where the sums over ranks are (two ranks; gloo always): the experts are row-local. ``None`` picks the
    count measured to pay at this world size and token count (``data/crossover.json``, ``"chunks"``), 1
    where nothing was measured or overlap does not pay (decode). At DeepSeek-V3 prefill shapes on 2 H200s
    chunks did not pay (every chunk re-reads all local experts' weights and halves the rows per GEMM:
    :mod:`moecomm.layer.overlap`); shared experts and micro-batch overlap give the communication other work.

    ``shared_experts``: a callable on ``bf16 [sizes[rank], hidden]`` returning the same shape, or
    :class:`moecomm.moe.ExpertWeights` of shared experts that moecomm runs with every token routed to every
    one at weight 1, in ``expert_input_format`` (:mod:`moecomm.layer.shared`). They run on the caller's
    stream while the dispatch runs on moecomm's communication stream (no host sync), and their output is
    added to this rank's rows after the combine: the result is bit for bit ``moe_forward(...) +
    shared_experts(hidden)``. On a CPU, under ``torch.compile`` and with ``sizes`` a tensor they run after
    the step instead (the same result). One that raises or returns another shape raises after the combine.

    ``combine_format``: the wire format of the combine's reducescatterv. ``"bf16"`` (default) as above;
    ``"int8"`` or ``"fp8"`` (e4m3) quantize each rank's partial output per (token, 128 columns) with an
    fp32 scale, and each token's owner dequantizes and sums the ``world_size`` pieces in float32 in rank
    order (:mod:`moecomm.comm.quantized`): about half the combine's bytes, deterministic (the same bits on
    CPU and GPU, for every algorithm and chunk count), at the accuracy of the format (docs/accuracy.md). It
    changes numerics, so it is never chosen automatically. Needs an ``agrs*`` strategy (``"auto"`` resolves
    to one) and a hidden size that is a multiple of 128.

    **Device counts** (instead of ``sizes``): ``num_tokens`` (this rank's live count, a one-element int32
    tensor on ``hidden``'s device) with ``max_tokens_per_rank`` (the static slot ``M`` of every rank, the one
    setting ranks agree on): ``hidden`` is any ``[n <= M, H]`` buffer, nothing is read on the host, one CUDA
    graph serves every step, and the result is ``[n, H]`` with its rows at or past ``num_tokens`` zero
    (:func:`moecomm.layer.counted.moe_forward_counted`, docs/device-counts.md). ``algorithm`` is then its
    transport (``"auto"``, ``"padded"``, ``"symm"``).

    Raises as :func:`dispatch` does, and ``ValueError`` when ``weights`` are not this rank's share of an EP
    split over the group, their hidden size differs or one of their tensors requires grad in grad mode
    (moecomm is inference-only: call it under ``torch.no_grad()`` or ``torch.inference_mode()``);
    ``TypeError`` / ``ValueError`` for ``shared_experts`` that are neither a callable nor ExpertWeights of all
    shared experts of this hidden size and device (:func:`~moecomm.layer.shared.check_shared_experts`);
    ``validate=True`` also compares ``num_experts`` across ranks and checks the ids against it on the host,
    on every rank. ``TypeError`` unless exactly one of ``sizes`` and ``num_tokens`` (with
    ``max_tokens_per_rank``) is given; ``ValueError`` for ``shared_experts`` or a quantized
    ``combine_format`` in the device-count mode (not built there yet: add the shared experts' output to the
    live rows after the step; with validation on every rank).

    Under ``torch.compile`` (or with ``sizes`` a CPU int tensor) this calls the custom op
    ``moecomm::moe_forward`` (:func:`moe_forward_op`): no graph break, and sizes passed as a tensor never
    recompile. Eager calls with a list do not pass through the op.
    """
    if counted_mode(sizes, num_tokens, max_tokens_per_rank):
        return moe_forward_counted(hidden, topk_ids, topk_weights, weights, num_tokens=num_tokens,
                                   max_tokens_per_rank=max_tokens_per_rank, strategy=strategy,
                                   global_scale=global_scale, expert_input_format=expert_input_format, group=group,
                                   pack=pack, algorithm=algorithm, validate=validate, allow_quantized=allow_quantized,
                                   chunks=chunks, combine_format=combine_format, shared_experts=shared_experts)
    shared = None
    if shared_experts is not None:
        shared = functools.partial(shared_output, shared_experts, rank=rank_and_world(group)[0],
                                   expert_input_format=expert_input_format, global_scale=global_scale)
    if torch.compiler.is_compiling() or isinstance(sizes, torch.Tensor):
        if shared is not None:
            check_shared_experts(shared_experts, hidden, shared.keywords["rank"])
        out = moe_forward_op(hidden, topk_ids, topk_weights, weights, sizes=sizes, strategy=strategy,
                             global_scale=global_scale, expert_input_format=expert_input_format, group=group,
                             pack=pack, algorithm=algorithm, validate=validate, allow_quantized=allow_quantized,
                             chunks=chunks, combine_format=combine_format)
        return out if shared is None else out + shared(hidden)

    def prepare():
        rank, world = rank_and_world(group)
        try:
            resolved = Strategy(strategy)
        except ValueError as e:
            raise ValueError(f"rank {rank}: {e}") from None
        check_experts(weights, hidden, rank, world)
        check_shared_experts(shared_experts, hidden, rank)
        if resolved == Strategy.AUTO:
            resolved = choose_strategy(expert_input_format, sum(check_sizes(sizes, world)), world_size=world,
                                       ep_size=world, allow_quantized=allow_quantized)
        checked = check_dispatch(hidden, topk_ids, topk_weights, sizes, resolved, global_scale, group, expert_input_format,
                            pack)
        check_combine_format(combine_format, resolved, hidden.shape[1], rank)
        chosen.append((resolved, resolve_chunks(chunks, checked[0], world)))
        return resolved, checked

    chosen: list = []  # the resolved strategy and chunk count, for the agreement (which runs after prepare)
    strategy, (checked_sizes, rank, world) = run_checks(
        "moe_forward", prepare,
        lambda: {**dispatch_agreement(hidden, topk_ids, sizes, chosen[0][0], global_scale, expert_input_format, pack,
                              algorithm, weights.num_experts),
                 "num_experts": weights.num_experts, "chunks": chosen[0][1],
                 "combine_format": ReduceFormat(combine_format).value},
        group, validate)
    chunks = chosen[0][1]
    send = functools.partial(dispatch_checked, rank=rank, world=world, strategy=strategy, global_scale=global_scale,
                             expert_input_format=expert_input_format, group=group, pack=pack, algorithm=algorithm)

    def compute(tokens, ids, tw):
        after = expert_input_format if isinstance(tokens, torch.Tensor) else None
        return experts_forward(tokens, ids, tw, weights, input_format=after,
                               global_scale=global_scale if after == QuantFormat.NVFP4 else None)

    if world == 1 or (shared is None and chunks == 1):  # one rank: no wire for the shared experts to hide behind
        tokens, ids, tw, handle = send(hidden, topk_ids, topk_weights, checked_sizes)
        out = combine(compute(tokens, ids, tw), handle, algorithm=algorithm, combine_format=combine_format)
        return out if shared is None else SharedOutput(shared, hidden).add_to(out)
    return pipelined(send, compute, hidden, topk_ids, topk_weights, checked_sizes, rank, chunks, algorithm, shared,
                     combine_format)


# ----------------------------------------------------------------------------------------------------
# The custom op moecomm::moe_forward (what moe_forward calls under torch.compile or for tensor sizes)


@torch.library.custom_op("moecomm::moe_forward", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def _moe_forward_op(
    hidden: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    sizes: Tensor,
    experts: Sequence[Optional[Tensor]],
    activation: str,
    weight_format: str,
    first_expert: int,
    num_experts: int,
    strategy: str,
    global_scale: Optional[Tensor],
    global_scale_value: Optional[float],
    expert_input_format: Optional[str],
    group_name: str,
    pack: bool,
    algorithm: str,
    validate: bool,
    allow_quantized: Optional[bool],
    chunks: Optional[int],
    combine_format: str,
) -> Tensor:
    weights = unflatten_experts(experts, activation, weight_format, first_expert, num_experts)
    out = moe_forward(
        hidden, topk_ids, topk_weights, weights, sizes=sizes.tolist(), strategy=strategy,
        global_scale=global_scale if global_scale is not None else global_scale_value,
        expert_input_format=expert_input_format, group=resolve_group(group_name), pack=pack, algorithm=algorithm,
        validate=validate, allow_quantized=allow_quantized, chunks=chunks, combine_format=combine_format)
    # the fake's layout: a fresh tensor (the allreduce strategy returns a slice of its sum buffer)
    return out if out.storage_offset() == 0 else out.clone()


@_moe_forward_op.register_fake
def _(hidden, topk_ids, topk_weights, sizes, *args):
    if hidden.dim() != 2:
        raise ValueError(f"moe_forward: hidden must be [tokens, hidden], got shape {tuple(hidden.shape)}")
    return hidden.new_empty(hidden.shape)


def moe_forward_op(hidden, topk_ids, topk_weights, weights, *, sizes, strategy="auto", global_scale=None,
                expert_input_format=None, group=None, pack=True, algorithm="auto", validate=False,
                allow_quantized=None, chunks=None, combine_format="bf16") -> Tensor:
    """:func:`moe_forward` as the op ``moecomm::moe_forward``: one EP MoE layer step.

    What :func:`moe_forward` calls under ``torch.compile`` or for a tensor ``sizes``.

    Parameters
    ----------
    hidden, topk_ids, topk_weights, weights :
        As for :func:`moe_forward`: ``bf16 [sizes[rank], H]``, ``int32/int64 [sizes[rank],
        topk]`` (-1: masked slot), ``float32 [sizes[rank], topk]``, this rank's ``ExpertWeights``.
    sizes : Tensor or list[int]
        Rows per rank: a CPU ``int64 [world_size]`` tensor (:func:`sizes_tensor`; read when the op runs,
        never baked into a graph) or a list (a constant of the graph).
    strategy, global_scale, expert_input_format, group, pack, algorithm, validate, allow_quantized, chunks :
        As for :func:`moe_forward`; enums may be given as their strings.
    combine_format : {"bf16", "int8", "fp8"}
        As for :func:`moe_forward` (a :class:`moecomm.quant.ReduceFormat` or its string).

    Returns
    -------
    Tensor
        ``bf16 [sizes[rank], H]``, shaped like ``hidden`` (also in the fake: no data-dependent size).

    Raises
    ------
    TypeError
        ``sizes`` is a tensor that is not a 1-D CPU int32/int64 tensor.
    ValueError
        ``hidden`` not 2-D (in the fake, while tracing); an input that requires grad while grad mode is on
        (the op has no backward); when the op runs, everything :func:`moe_forward` raises.
    """
    refuse_grad("moe_forward", hidden=hidden, topk_weights=topk_weights, global_scale=global_scale,
                **{f"weights.{f}": getattr(weights, f, None) for f in EXPERT_TENSORS})
    gs_tensor, gs_value = split_global_scale(global_scale)
    return torch.ops.moecomm.moe_forward(
        hidden, topk_ids, topk_weights, as_sizes(sizes), *flatten_experts(weights), enum_value(strategy), gs_tensor, gs_value, enum_value(expert_input_format), group_name(group), pack,
        enum_value(algorithm), validate, allow_quantized, chunks, enum_value(combine_format))
