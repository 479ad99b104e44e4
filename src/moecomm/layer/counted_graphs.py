"""ONE CUDA graph per rank for every step: :class:`CountedGraphedMoE`, the device-count mode of the layer step
(:mod:`moecomm.layer.counted`) captured once with static buffers and a static device count.

Which graph class an engine should use (docs/device-counts.md):

- :class:`CountedGraphedMoE` when ranks' token counts differ from step to step and the engine does not want
  to agree on them: no per-step agreement, no bucket choice, any local count up to ``max_tokens_per_rank``
  on any rank (idle ranks included), ranks may even capture different local buffer sizes. On one NVLink
  host the ``symm`` transport moves only live rows; elsewhere ``padded`` sends every rank's whole slot.
- :class:`moecomm.layer.GraphedMoE` (one graph per token bucket, every rank replaying the same bucket)
  when the engine already agrees on the step's largest count (DP metadata) and the interconnect is not
  NVLink: a small bucket sends fewer bytes than a ``padded`` slot of ``max_tokens_per_rank`` rows.
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.distributed as dist

from moecomm._modes import kept_state, refuse_grad
from moecomm.comm.counted import Transport
from moecomm.layer.counted import moe_forward_counted
from moecomm.layer.strategy import Strategy
from moecomm.moe import ExpertWeights, ids_int32
from moecomm.quant import QuantFormat

__all__ = ["CountedGraphedMoE", "check_replay"]


def check_replay(hidden, topk_ids, topk_weights, num_tokens, statics: torch.Tensor, topk: int) -> None:
    """The checks at the door of :meth:`CountedGraphedMoE.__call__` (``statics``: its static ``hidden``): what
    ``moe_forward`` takes, on the statics' device, at most their rows; no silent cast, broadcast or host read.
    Raises ``TypeError`` / ``ValueError`` naming the argument."""
    refuse_grad("CountedGraphedMoE", hidden=hidden, topk_weights=topk_weights)
    rows, hidden_size = statics.shape
    for name, t, dtypes, cols in (("hidden", hidden, (torch.bfloat16,), hidden_size),
                                  ("topk_ids", topk_ids, (torch.int32, torch.int64), topk),
                                  ("topk_weights", topk_weights, (torch.float32,), topk)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"CountedGraphedMoE: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.shape[1] != cols or t.dtype not in dtypes or t.device != statics.device:
            raise ValueError(f"CountedGraphedMoE: {name} must be {' or '.join(map(str, dtypes))} [t, {cols}] on "
                             f"{statics.device}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    t = hidden.shape[0]
    if t > rows or topk_ids.shape[0] != t or topk_weights.shape[0] != t:
        raise ValueError(f"CountedGraphedMoE: hidden {tuple(hidden.shape)}, topk_ids {tuple(topk_ids.shape)}, "
                         f"topk_weights {tuple(topk_weights.shape)}: the same rows, at most {rows}")
    if num_tokens is not None and not isinstance(num_tokens, torch.Tensor):
        raise TypeError(f"CountedGraphedMoE: num_tokens must be None or a one-element int32/int64 tensor on "
                        f"{statics.device}, got {type(num_tokens).__name__}")
    if num_tokens is not None and (num_tokens.numel() != 1 or num_tokens.dtype not in (torch.int32, torch.int64)
                                   or num_tokens.device != statics.device):
        raise ValueError(f"CountedGraphedMoE: num_tokens must be a one-element int32/int64 tensor on "
                         f"{statics.device}, got {num_tokens.dtype} {tuple(num_tokens.shape)} on {num_tokens.device}")


class CountedGraphedMoE:
    """:func:`moe_forward` with device counts, captured in ONE CUDA graph on this rank.

    The graph reads this rank's tokens from static buffers (:attr:`hidden` ``bf16 [rows, H]``,
    :attr:`topk_ids` ``int32 [rows, topk]``, :attr:`topk_weights` ``float32 [rows, topk]``) and its live count
    from :attr:`num_tokens` (int32, 0-dim, on the device); it writes :attr:`out` ``bf16 [rows, H]``. A call
    copies the inputs in and replays: a few small copies and one replay of host time, whatever the counts of
    this rank or any other. Construction is collective (every rank of ``group`` constructs one, in the same
    order): it warms the step up (kernels compiled, buffers created: ``max_tokens_per_rank`` is checked
    across ranks there) and captures it. Every rank must then make the same sequence of calls (one
    collective per call), as with any collective.

    Parameters
    ----------
    weights : ExpertWeights of this rank (CUDA).
    hidden_size, topk : int
    max_tokens_per_rank : int, ``M``, the same on every rank.
    rows : int, optional
        This rank's static buffer rows, ``<= M`` (default ``M``); ranks may choose differently.
    strategy, global_scale, expert_input_format, group, algorithm :
        As for :func:`moecomm.layer.counted.moe_forward_counted` (``algorithm``: the transport, ``"auto"``,
        ``"padded"`` or ``"symm"``; ``"auto"`` strategy is resolved from ``world_size * M`` tokens).

    Raises
    ------
    ValueError
        Without CUDA or with CPU weights; ``rows`` outside ``[0, M]``; what ``moe_forward`` raises (on every
        rank where ranks disagree on ``M``). At call time: more rows than :attr:`hidden` holds, bad shapes.
    """

    def __init__(self, weights: ExpertWeights, *, hidden_size: int, topk: int, max_tokens_per_rank: int,
                 rows: int | None = None, strategy: Strategy | str = Strategy.AUTO,
                 global_scale: torch.Tensor | float | None = None, expert_input_format: QuantFormat | None = None,
                 group: dist.ProcessGroup | None = None, algorithm: Transport | str = Transport.AUTO):
        if not isinstance(weights, ExpertWeights):
            raise TypeError(f"CountedGraphedMoE: weights must be moecomm.moe.ExpertWeights, got {type(weights).__name__}")
        if not torch.cuda.is_available() or weights.w13.device.type != "cuda":
            raise ValueError("CountedGraphedMoE captures a CUDA graph: it needs a CUDA device and CUDA expert weights "
                             "(on a CPU, call moe_forward with num_tokens)")
        rows = max_tokens_per_rank if rows is None else rows
        if isinstance(rows, bool) or not isinstance(rows, int) or not 0 <= rows <= max_tokens_per_rank:
            raise ValueError(f"rows must be an int in [0, max_tokens_per_rank = {max_tokens_per_rank}], got {rows!r}")
        refuse_grad("CountedGraphedMoE", global_scale=global_scale,
                    **{f"weights.{f.name}": getattr(weights, f.name) for f in fields(weights)})
        device = weights.w13.device
        self.rows, self.topk = rows, topk
        with kept_state():  # the statics are normal tensors, whatever the caller's grad mode
            self.hidden = torch.zeros(rows, hidden_size, dtype=torch.bfloat16, device=device)
            self.topk_ids = torch.full((rows, topk), -1, dtype=torch.int32, device=device)
            self.topk_weights = torch.zeros(rows, topk, dtype=torch.float32, device=device)
            self.num_tokens = torch.zeros((), dtype=torch.int32, device=device)

        def step():
            return moe_forward_counted(self.hidden, self.topk_ids, self.topk_weights, weights,
                                       num_tokens=self.num_tokens, max_tokens_per_rank=max_tokens_per_rank,
                                       strategy=strategy, global_scale=global_scale,
                                       expert_input_format=expert_input_format, group=group, algorithm=algorithm)

        with kept_state(), torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: kernels compiled, workspace created (collective)
                step()
            torch.cuda.current_stream().wait_stream(side)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self.out = step()
        self._live = 0  # rows of topk_ids a call wrote (the rest stay -1)

    def replay(self) -> torch.Tensor:
        """Replay on what the static buffers hold (an engine that writes :attr:`hidden`, :attr:`topk_ids`,
        :attr:`topk_weights` and :attr:`num_tokens` in place skips the copies); returns :attr:`out`."""
        self._graph.replay()
        return self.out

    def __call__(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 num_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Replay on this rank's ``bf16 [t, H]`` tokens (``t <= rows``); returns ``bf16 [t, H]``.

        ``num_tokens``: a one-element int32/int64 tensor on the graph's device (an engine's device count,
        copied in; rows at or past it are dead) or None (the count is ``t``, written on the device without a
        sync). Rows of the static buffer past ``t`` are masked, whatever the count says. The result is a view
        of :attr:`out`, overwritten by the next call. ``TypeError`` / ``ValueError`` (:func:`check_replay`)
        for inputs ``moe_forward`` would refuse (dtypes, shapes, another device), more than ``rows`` rows.
        """
        check_replay(hidden, topk_ids, topk_weights, num_tokens, self.hidden, self.topk)
        t = hidden.shape[0]
        self.hidden[:t].copy_(hidden)
        self.topk_ids[:t].copy_(ids_int32(topk_ids))
        self.topk_weights[:t].copy_(topk_weights)
        if self._live > t:  # rows a larger call wrote: masked again
            self.topk_ids[t : self._live].fill_(-1)
        self._live = t
        if num_tokens is None:
            self.num_tokens.fill_(t)
        else:
            self.num_tokens.copy_(num_tokens.reshape(()))
        self._graph.replay()
        return self.out[:t]
