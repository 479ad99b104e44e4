"""The MoE layer step with DP attention and EP experts: quantize before the all-gather, combine with
reducescatterv.

With attention data-parallel, rank ``r`` holds ``sizes[r]`` tokens. One MoE layer step is::

    dispatch: every rank receives every rank's tokens (+ topk_ids, topk_weights)
    experts:  each rank runs its local experts on all tokens -> partial [rows, hidden]
    combine:  partials are summed over ranks and each rank keeps its own rows

Modules, bottom to top: ``message`` (the packed row of one token), ``strategy`` (strategies, the
crossover choice, bytes per token), ``checks`` (the checks at the door), ``asynchronous`` (moecomm's
communication stream and :class:`Pending`, what ``async_op=True`` returns), ``exchange`` (:func:`dispatch`,
:func:`combine`), ``shared`` (shared experts during the dispatch), ``overlap`` (the step on the
communication stream: chunks, shared experts), ``step`` (:func:`moe_forward` and its custom op), ``graphs``
(:class:`GraphedMoE`); the device-count mode beside them: ``counted`` (:func:`moe_forward` with
``num_tokens`` and ``max_tokens_per_rank``, its op) and ``counted_graphs`` (:class:`CountedGraphedMoE`, one
CUDA graph per rank). Everything public is re-exported here.
"""

from moecomm.layer.asynchronous import CARVEOUT_ENV, Pending
from moecomm.layer.counted import moe_forward_counted
from moecomm.layer.counted_graphs import CountedGraphedMoE
from moecomm.layer.exchange import DispatchHandle, combine, dispatch
from moecomm.layer.graphs import GraphedMoE
from moecomm.layer.message import MessageLayout, message_layout
from moecomm.layer.step import EXPERT_TENSORS, moe_forward
from moecomm.quant.reduce import ReduceFormat
from moecomm.layer.strategy import (
    DISABLE_ENV,
    Strategy,
    StrategyChoice,
    choose_strategy,
    explain_strategy,
    wire_bytes_per_token,
)

__all__ = [
    "Strategy",
    "ReduceFormat",
    "DispatchHandle",
    "MessageLayout",
    "message_layout",
    "wire_bytes_per_token",
    "choose_strategy",
    "explain_strategy",
    "StrategyChoice",
    "dispatch",
    "combine",
    "Pending",
    "moe_forward",
    "GraphedMoE",
    "moe_forward_counted",
    "CountedGraphedMoE",
    "EXPERT_TENSORS",
    "DISABLE_ENV",
    "CARVEOUT_ENV",
]
