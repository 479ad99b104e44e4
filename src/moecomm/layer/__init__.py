"""The MoE layer step with DP attention and EP experts: quantize before the all-gather, combine with
reducescatterv.

With attention data-parallel, rank ``r`` holds ``sizes[r]`` tokens. One MoE layer step is::

    dispatch: every rank receives every rank's tokens (+ topk_ids, topk_weights)
    experts:  each rank runs its local experts on all tokens -> partial [rows, hidden]
    combine:  partials are summed over ranks and each rank keeps its own rows

Modules, bottom to top: ``message`` (the packed row of one token), ``strategy`` (strategies, the
crossover choice, bytes per token), ``checks`` (the checks at the door), ``exchange`` (:func:`dispatch`,
:func:`combine`), ``overlap`` (the chunked pipeline), ``step`` (:func:`moe_forward` and its custom op),
``graphs`` (:class:`GraphedMoE`). Everything public is re-exported here.
"""

from moecomm.layer.exchange import DispatchHandle, combine, dispatch
from moecomm.layer.graphs import GraphedMoE
from moecomm.layer.message import MessageLayout, message_layout
from moecomm.layer.overlap import CARVEOUT_ENV
from moecomm.layer.step import EXPERT_TENSORS, moe_forward
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
    "DispatchHandle",
    "MessageLayout",
    "message_layout",
    "wire_bytes_per_token",
    "choose_strategy",
    "explain_strategy",
    "StrategyChoice",
    "dispatch",
    "combine",
    "moe_forward",
    "GraphedMoE",
    "EXPERT_TENSORS",
    "DISABLE_ENV",
    "CARVEOUT_ENV",
]
