"""The device-count mode of the layer step: ``moe_forward(..., num_tokens=<int32 scalar on the device>,
max_tokens_per_rank=M)`` (:func:`moe_forward_counted`), and its custom op ``moecomm::moe_forward_counted``.

Each rank passes its tokens in a buffer ``hidden [n, H]`` (``n <= M``; a static ``[M, H]`` buffer in a CUDA
graph) and its live count as a one-element integer tensor on ``hidden``'s device. No host list of sizes:
the counts cross ranks on the device (:mod:`moecomm.comm.counted`), rank ``r``'s rows occupy the static slot
``[r * M, r * M + count_r)`` of the gathered rows, the rows past each count carry masked slots
(``topk_ids = -1``) so the experts skip them, and the result is ``[n, H]`` for this rank, its rows at or past
``num_tokens`` zero. Nothing is read on the host, so one CUDA graph serves every step, whatever the counts
of this rank and of the others (idle ranks included), and the op carries no ``cudagraph_unsafe`` tag: under
``torch.compile(mode="reduce-overhead")`` it is captured with the rest of the model.

Strategies: ``agrs``, ``agrs-nvfp4``, ``agrs-fp8`` (one packed message per token in the padded layout),
``allreduce`` (every rank's slot written at ``r * M`` in zero buffers, all-reduced; the combine an
all-reduce of the ``[W * M, H]`` partial), ``auto`` (resolved from ``W * M`` tokens, the same on every
rank). ``algorithm`` picks the transport of the ``agrs*`` strategies: ``"auto"``, ``"padded"`` or
``"symm"`` (:class:`moecomm.comm.counted.Transport`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from moecomm import errors
from moecomm._modes import refuse_grad
from moecomm.comm import all_reduce
from moecomm.comm._library import enum_value, group_name, resolve_group
from moecomm.comm.checks import run_checks
from moecomm.comm.counted import (
    Transport,
    all_gather_counted,
    clamp_count,
    counted_workspace,
    reduce_scatter_counted,
)
from moecomm.comm.group import rank_and_world
from moecomm.layer._op_args import (
    flatten_experts,
    split_global_scale,
    unflatten_experts,
)
from moecomm.layer.checks import check_dispatch, check_experts
from moecomm.layer.exchange import _global_scale
from moecomm.layer.message import message_layout
from moecomm.layer.strategy import Strategy, choose_strategy, wire_format
from moecomm.moe import ExpertWeights, experts_forward, ids_int32
from moecomm.quant import QuantFormat, QuantizedTensor, ReduceFormat, quantize

__all__ = ["counted_mode", "moe_forward_counted", "moe_forward_counted_op"]


def counted_mode(sizes, num_tokens, max_tokens_per_rank) -> bool:
    """Whether a :func:`moecomm.layer.moe_forward` call runs the device-count mode (``num_tokens`` and
    ``max_tokens_per_rank``) or the host-list one (``sizes``); ``TypeError`` unless exactly one is given."""
    if sizes is not None and num_tokens is None and max_tokens_per_rank is None:
        return False
    if sizes is None and num_tokens is not None and max_tokens_per_rank is not None:
        return True
    raise TypeError("moe_forward takes either sizes= (every rank's token count, a host list) or num_tokens= (this "
                    "rank's count, a device tensor) together with max_tokens_per_rank=, not both and not neither; got "
                    f"sizes={'given' if sizes is not None else None}, num_tokens="
                    f"{'given' if num_tokens is not None else None}, max_tokens_per_rank={max_tokens_per_rank!r}")


def _refuse_unbuilt(combine_format, shared_experts, rank: int) -> None:
    """What :func:`moecomm.layer.moe_forward` offers with ``sizes=`` but this mode does not run yet."""
    try:
        fmt = ReduceFormat(combine_format)
    except ValueError as e:
        raise ValueError(f"rank {rank}: combine_format: {e}") from None
    if fmt != ReduceFormat.BF16:
        raise ValueError(f"rank {rank}: the device-count mode runs no quantized combine_format yet "
                         f"(got {fmt.value!r}); pass sizes= for it")
    if shared_experts is not None:
        raise ValueError(f"rank {rank}: the device-count mode runs no shared_experts yet; pass sizes=, or add the "
                         f"shared experts' output to the live rows after the step")


def _check(hidden, topk_ids, topk_weights, weights, num_tokens, max_tokens_per_rank, strategy, global_scale,
           expert_input_format, group, pack, algorithm, allow_quantized, chunks, combine_format, shared_experts):
    """Local checks at the door; returns ``(strategy, transport, rank, world)``. Raises TypeError/ValueError."""
    rank, world = rank_and_world(group)
    _refuse_unbuilt(combine_format, shared_experts, rank)
    check_experts(weights, hidden, rank, world)
    refuse_grad(f"rank {rank}", hidden=hidden, topk_weights=topk_weights, global_scale=global_scale)
    m = max_tokens_per_rank
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"rank {rank}: max_tokens_per_rank must be a positive int, got {m!r}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or hidden.shape[0] > m:
        raise ValueError(f"rank {rank}: hidden must be a [n <= max_tokens_per_rank = {m}, hidden] tensor, got "
                         f"{getattr(hidden, 'shape', type(hidden).__name__)}")
    if not isinstance(num_tokens, torch.Tensor):
        raise TypeError(f"rank {rank}: num_tokens must be a one-element int32/int64 tensor on hidden's device, got "
                        f"{type(num_tokens).__name__} (a Python int would be baked into a CUDA graph)")
    if (num_tokens.numel() != 1 or num_tokens.dtype not in (torch.int32, torch.int64)
            or num_tokens.device != hidden.device):
        raise ValueError(f"rank {rank}: num_tokens must be a one-element int32/int64 tensor on {hidden.device}, got "
                         f"{num_tokens.dtype} {tuple(num_tokens.shape)} on {num_tokens.device}")
    if pack is not True:
        raise ValueError(f"rank {rank}: the device-count mode sends one packed message per token; pack={pack!r}")
    if chunks not in (None, 1):
        raise ValueError(f"rank {rank}: the device-count mode runs in one piece (chunks None or 1), got {chunks!r}")
    transport = Transport(enum_value(algorithm))
    strategy = Strategy(strategy)
    if strategy == Strategy.AUTO:
        strategy = choose_strategy(expert_input_format, world * m, world_size=world, ep_size=world,
                                   allow_quantized=allow_quantized)
    # the host-list checks of the same tensors, with the sizes this rank's buffer implies (always consistent)
    check_dispatch(hidden, topk_ids, topk_weights, [hidden.shape[0]] * world, strategy, global_scale, group,
                   expert_input_format, pack)
    return strategy, transport, rank, world


def _agreement(hidden, topk_ids, num_tokens, weights, m, strategy, global_scale, expert_input_format,
               transport) -> dict:
    """What ranks must agree on, and the host checks of validation (reads the count: a sync)."""
    count = int(num_tokens.reshape(-1)[0])
    if not 0 <= count <= hidden.shape[0]:
        raise ValueError(f"rank {dist.get_rank()}: num_tokens = {count} is outside [0, {hidden.shape[0]}] (the rows "
                         f"of hidden)")
    errors.check_ids(topk_ids[:count], weights.num_experts, dist.get_rank())
    fmt = wire_format(strategy, expert_input_format)
    return {"max_tokens_per_rank": m, "hidden": hidden.shape[1], "topk": topk_ids.shape[1],
            "strategy": strategy.value, "wire format": None if fmt is None else fmt.value,
            "transport": transport.value, "num_experts": weights.num_experts,
            "global_scale": float(global_scale) if fmt == QuantFormat.NVFP4 else None}


def moe_forward_counted(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                        weights: ExpertWeights, *, num_tokens: torch.Tensor, max_tokens_per_rank: int,
                        strategy: Strategy | str = Strategy.AUTO, global_scale: torch.Tensor | float | None = None,
                        expert_input_format: QuantFormat | None = None, group: dist.ProcessGroup | None = None,
                        pack: bool = True, algorithm: Transport | str = Transport.AUTO, validate: bool = False,
                        allow_quantized: bool | None = None, chunks: int | None = None,
                        combine_format: ReduceFormat | str = "bf16", shared_experts=None) -> torch.Tensor:
    """One EP MoE layer step with this rank's token count on the device (module docstring).

    What :func:`moecomm.layer.moe_forward` runs when given ``num_tokens`` and ``max_tokens_per_rank``.

    Parameters
    ----------
    hidden : Tensor
        ``bf16 [n, H]``, ``n <= max_tokens_per_rank``: this rank's token buffer; rows at or past
        ``num_tokens`` are ignored (never read by the experts, their bytes may cross the wire only in the
        ``padded`` transport, as masked slots). Ranks may pass different ``n``.
    topk_ids, topk_weights : Tensor
        ``int32/int64 [n, topk]`` (-1: a masked slot) and ``float32 [n, topk]``.
    weights : ExpertWeights
        This rank's experts (``ep_size = world_size``).
    num_tokens : Tensor
        This rank's live count: a one-element int32/int64 tensor on ``hidden``'s device (CUDA; the CPU for
        gloo). Never read on the host. A value outside ``[0, n]`` is clamped on the device and reported by
        :func:`moecomm.errors.check_errors`; no buffer is overrun.
    max_tokens_per_rank : int
        ``M``, the static slot of every rank: the one setting all ranks must agree on (checked once, when
        the buffers are created: ``ValueError`` on every rank when it differs).
    strategy, global_scale, expert_input_format, group, allow_quantized :
        As for :func:`moecomm.layer.moe_forward`; ``"auto"`` is resolved from ``world_size * M`` tokens.
    pack : bool
        Must be True (one packed message per token). ``chunks`` : None or 1.
    algorithm : ``"auto"``, ``"padded"`` or ``"symm"``
        The transport of the ``agrs*`` strategies (:mod:`moecomm.comm.counted`), the same on every rank.
    validate : bool
        Read the count and the live ids on the host and check them, and exchange what ranks must agree on
        (``M``, strategy, wire format, transport, sizes, global scale): ``ValueError`` on every rank. A sync.
    combine_format, shared_experts :
        Not run in this mode yet: ``"bf16"`` and None only (``ValueError`` otherwise, on every rank when
        validating).

    Returns
    -------
    Tensor
        ``bf16 [n, H]``: rows below ``num_tokens`` are this rank's tokens' outputs (the sum over all ranks'
        experts); rows at or past it are zero.

    Raises
    ------
    TypeError, ValueError
        Before any communication: ``num_tokens`` not a one-element integer tensor on ``hidden``'s device,
        ``n > max_tokens_per_rank``, ``pack=False``, ``chunks > 1``, an unknown transport, and what
        :func:`moecomm.layer.moe_forward` raises for shapes, dtypes, formats and experts. ``ValueError`` on
        every rank at the first call when ranks pass different ``max_tokens_per_rank``.
    RuntimeError
        The first call for a new shape happens during CUDA-graph capture (warm up first).
    """
    if torch.compiler.is_compiling():
        # the op has none of these: refuse rather than ignore them (plain comparisons: no graph break)
        if pack is not True or chunks not in (None, 1) or combine_format != "bf16" or shared_experts is not None:
            raise ValueError(f"the device-count mode sends one packed message in one piece, with a bf16 combine and "
                             f"no shared experts; pack={pack!r}, chunks={chunks!r}, combine_format={combine_format!r}, "
                             f"shared_experts={shared_experts!r}")
        return moe_forward_counted_op(hidden, topk_ids, topk_weights, weights, num_tokens=num_tokens,
                                      max_tokens_per_rank=max_tokens_per_rank, strategy=strategy,
                                      global_scale=global_scale, expert_input_format=expert_input_format, group=group,
                                      algorithm=algorithm, validate=validate, allow_quantized=allow_quantized)
    checked: list = []

    def prepare():
        checked[:] = _check(hidden, topk_ids, topk_weights, weights, num_tokens, max_tokens_per_rank, strategy,
                            global_scale, expert_input_format, group, pack, algorithm, allow_quantized, chunks,
                            combine_format, shared_experts)
        return checked

    def agreement():
        return _agreement(hidden, topk_ids, num_tokens, weights, max_tokens_per_rank, checked[0], global_scale,
                          expert_input_format, checked[1])

    strategy, transport, rank, world = run_checks("moe_forward", prepare, agreement, group, validate)
    ids = ids_int32(topk_ids)
    if strategy == Strategy.ALLREDUCE:
        return _allreduce_step(hidden, ids, topk_weights, weights, num_tokens, max_tokens_per_rank, rank, world,
                               global_scale, expert_input_format, group)
    fmt = wire_format(strategy, expert_input_format)
    gs = _global_scale(global_scale, hidden.device) if QuantFormat.NVFP4 in (fmt, expert_input_format) else None
    n, h = hidden.shape
    layout = message_layout(fmt, h, ids.shape[1])
    ws = counted_workspace(group, hidden.device, max_tokens_per_rank=max_tokens_per_rank, row_bytes=layout.row_bytes,
                           hidden=h, dtype=torch.bfloat16, transport=transport)
    send = ws.send[:n]  # written in place: the peers (symm) or the all-gather (padded) read it from here
    tokens, ids_view, weights_view = layout.views(send)
    if fmt is None:
        tokens.copy_(hidden)
    else:
        quantize(hidden, fmt, global_scale=gs, out=(tokens.data, tokens.scales))
    ids_view.copy_(ids)
    weights_view.copy_(topk_weights)
    gathered, _ = all_gather_counted(send, num_tokens, ws, mask_cols=layout.ids, paired=True)
    tokens, gids, gw = layout.views(gathered)
    after = expert_input_format if fmt is None else None
    if fmt is not None:
        tokens = QuantizedTensor._trusted(fmt, tokens.data, tokens.scales, gs)
    experts_forward(tokens, gids, gw, weights, input_format=after,
                    global_scale=gs if after == QuantFormat.NVFP4 else None, out=ws.partial)
    return reduce_scatter_counted(ws.partial, num_tokens, ws, out=hidden.new_empty((n, h)), paired=True)


def _allreduce_step(hidden, ids, tw, weights, num_tokens, m, rank, world, global_scale, expert_input_format, group):
    """The classic DP gather in the padded layout: this rank's slot (live rows; ids -1 on the rest of it) at
    ``rank * M`` of zero buffers, all-reduced (x + 0 = x exactly); the experts' partial all-reduced, sliced."""
    # no workspace buffers, but the same one-time collective check that every rank has the same M
    counted_workspace(group, hidden.device, max_tokens_per_rank=m, row_bytes=0, hidden=0, transport=Transport.PADDED)
    n, h = hidden.shape
    k = ids.shape[1]
    live = (torch.arange(n, device=hidden.device) < clamp_count(num_tokens, n))[:, None]
    start = rank * m
    buf = hidden.new_zeros((world * m, h))
    meta = torch.zeros((world * m, 2 * k), dtype=torch.int32, device=hidden.device)
    buf[start : start + n] = torch.where(live, hidden, 0)
    meta[start : start + m, :k] = -1
    meta[start : start + n, :k] = torch.where(live, ids, -1)
    meta[start : start + n, k:] = torch.where(live, tw.view(torch.int32), 0)
    all_reduce(buf, group)
    all_reduce(meta, group)
    gs = _global_scale(global_scale, hidden.device) if expert_input_format == QuantFormat.NVFP4 else None
    partial = experts_forward(buf, meta[:, :k], meta[:, k:].view(torch.float32), weights,
                              input_format=expert_input_format, global_scale=gs)
    all_reduce(partial, group)
    return partial[start : start + n]


# ----------------------------------------------------------------------------------------------------
# The custom op moecomm::moe_forward_counted: no host read, so no cudagraph_unsafe tag


@torch.library.custom_op("moecomm::moe_forward_counted", mutates_args=())
def _moe_forward_counted_op(
    hidden: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    num_tokens: Tensor,
    max_tokens_per_rank: int,
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
    algorithm: str,
    validate: bool,
    allow_quantized: Optional[bool],
) -> Tensor:
    weights = unflatten_experts(experts, activation, weight_format, first_expert, num_experts)
    return moe_forward_counted(
        hidden, topk_ids, topk_weights, weights, num_tokens=num_tokens, max_tokens_per_rank=max_tokens_per_rank,
        strategy=strategy, global_scale=global_scale if global_scale is not None else global_scale_value,
        expert_input_format=expert_input_format, group=resolve_group(group_name), algorithm=algorithm,
        validate=validate, allow_quantized=allow_quantized)


@_moe_forward_counted_op.register_fake
def _(hidden, *args):
    if hidden.dim() != 2:
        raise ValueError(f"moe_forward: hidden must be [tokens, hidden], got shape {tuple(hidden.shape)}")
    return hidden.new_empty(hidden.shape)


def moe_forward_counted_op(hidden, topk_ids, topk_weights, weights, *, num_tokens, max_tokens_per_rank,
                           strategy="auto", global_scale=None, expert_input_format=None, group=None, algorithm="auto",
                           validate=False, allow_quantized=None) -> Tensor:
    """:func:`moe_forward_counted` as the op ``moecomm::moe_forward_counted`` (what it calls under
    ``torch.compile``). Arguments and results as there; enums may be strings. Its output is shaped like
    ``hidden`` and it reads nothing on the host, so it has no ``cudagraph_unsafe`` tag: CUDA graphs
    (``mode="reduce-overhead"``, an engine's own capture) take it with the model. Raises as
    :func:`moe_forward_counted` does (``ValueError`` for a non-2-D ``hidden`` already while tracing)."""
    gs_tensor, gs_value = split_global_scale(global_scale)
    return torch.ops.moecomm.moe_forward_counted(
        hidden, topk_ids, topk_weights, num_tokens, max_tokens_per_rank, *flatten_experts(weights),
        enum_value(strategy), gs_tensor, gs_value, enum_value(expert_input_format), group_name(group),
        enum_value(algorithm), validate, allow_quantized)
