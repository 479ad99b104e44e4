"""Strategies of the layer step (:class:`Strategy`), the format each puts on the wire, what ``"auto"`` picks
(:func:`choose_strategy`, from the measured crossover table ``data/crossover.json``), the chunk count of the
overlapped pipeline (:func:`resolve_chunks`) and the bytes a token costs (:func:`wire_bytes_per_token`).

- ``allreduce``: the classic DP gather (SGLang/vLLM DP attention): each rank writes its rows at its
  offset into a zero buffer of ``sum(sizes)`` rows, all-reduce; all-reduce the experts' output, slice.
- ``agrs``: bf16 allgatherv of hidden states, ids and weights (one message); reducescatterv.
- ``agrs-nvfp4``: quantize to NVFP4 with the layer's static global scale BEFORE the gather; reducescatterv
  in bf16.
- ``agrs-fp8``: the same with FP8 e4m3, per-128-group scales (DeepSeek-V3 / DeepEP) or per-token.

Quantization is row-local, so quantizing before the gather gives the same bytes as quantizing after it:
``agrs-nvfp4`` is bit-identical to ``agrs`` with experts that quantize their input to NVFP4
(``expert_input_format``), and likewise for FP8. ``strategy="auto"`` therefore changes no numerics.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from importlib import resources
from typing import NamedTuple

from moecomm._enum import ChoiceEnum
from moecomm.layer.message import message_layout
from moecomm.quant import QuantFormat, ReduceFormat, reduce_row_bytes

__all__ = ["Strategy", "StrategyChoice", "DISABLE_ENV", "wire_format", "check_expert_format", "choose_strategy",
           "explain_strategy", "resolve_chunks", "wire_bytes_per_token"]

_log = logging.getLogger("moecomm.layer")
DISABLE_ENV = "MOECOMM_DISABLE_QUANTIZED_DISPATCH"  # "1": strategy="auto" never quantizes before the gather


class Strategy(ChoiceEnum):
    ALLREDUCE = "allreduce"  # pad + all-reduce gather, all-reduce combine + slice (baseline)
    AGRS = "agrs"  # bf16 allgatherv + reducescatterv
    AGRS_NVFP4 = "agrs-nvfp4"  # NVFP4 quantize -> allgatherv -> experts -> bf16 reducescatterv
    AGRS_FP8 = "agrs-fp8"  # FP8 e4m3 (per-128 group or per token) quantize -> allgatherv -> ...
    AUTO = "auto"  # choose_strategy(): quantized where the experts consume it and it pays


_STRATEGY_FORMAT = {Strategy.AGRS_NVFP4: QuantFormat.NVFP4, Strategy.AGRS_FP8: QuantFormat.FP8_GROUP}
_FORMAT_STRATEGY = {QuantFormat.NVFP4: Strategy.AGRS_NVFP4, QuantFormat.FP8_GROUP: Strategy.AGRS_FP8,
                    QuantFormat.FP8_TOKEN: Strategy.AGRS_FP8}


def check_expert_format(expert_input_format) -> None:
    """``ValueError`` naming ``expert_input_format`` unless it is None or a :class:`QuantFormat` (a member or
    its value)."""
    if expert_input_format is not None and not isinstance(expert_input_format, QuantFormat):
        try:
            QuantFormat(expert_input_format)
        except ValueError as e:
            raise ValueError(f"expert_input_format: {e}") from None


def _check_count(name: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < least:
        raise ValueError(f"{name} must be >= {least}, got {value!r}")


def wire_format(strategy: Strategy, expert_input_format: QuantFormat | None) -> QuantFormat | None:
    """The format on the wire (None: bf16): the experts' own FP8 flavour where they have one, else the
    strategy's default."""
    if strategy not in _STRATEGY_FORMAT:
        return None
    if strategy == Strategy.AGRS_FP8 and expert_input_format in (QuantFormat.FP8_GROUP, QuantFormat.FP8_TOKEN):
        return QuantFormat(expert_input_format)  # the enum, also where the caller passed its string
    return _STRATEGY_FORMAT[strategy]


@functools.lru_cache(maxsize=None)
def _crossover_table() -> dict:
    with resources.files("moecomm").joinpath("data/crossover.json").open() as f:
        return json.load(f)["min_total_tokens"]


@functools.lru_cache(maxsize=None)
def crossover(world_size: int) -> dict[str, int | None]:
    """Per quantized strategy, the smallest ``sum(sizes)`` from which it pays at this world size (None: never).

    From ``data/crossover.json``: the entry of the measured world size, else ``"default"``.
    """
    table = _crossover_table()
    return table.get(str(world_size), table["default"])


class StrategyChoice(NamedTuple):
    """What ``strategy="auto"`` runs (:func:`explain_strategy`) and why, in one sentence."""

    strategy: Strategy
    reason: str


def explain_strategy(
    expert_input_format: QuantFormat | str | None,
    total_tokens: int,
    *,
    world_size: int,
    ep_size: int | None = None,
    allow_quantized: bool | None = None,
) -> StrategyChoice:
    """The strategy ``"auto"`` runs for these arguments, and the reason.

    Parameters
    ----------
    expert_input_format : QuantFormat, str or None
        The format the experts quantize their input to (``moe_forward``'s ``expert_input_format``; None:
        bf16 experts).
    total_tokens : int
        ``sum(sizes)``: the tokens of all ranks in this step (the same on every rank).
    world_size : int
        Ranks of the group (DP size = EP size).
    ep_size : int, optional
        Ranks the experts are spread over (default ``world_size``, as ``moe_forward`` requires).
    allow_quantized : bool or None
        As for ``moe_forward``: False never quantizes before the gather; None reads the environment variable
        ``MOECOMM_DISABLE_QUANTIZED_DISPATCH`` (``1``, ``true`` or ``yes``: off).

    Returns
    -------
    StrategyChoice
        ``(strategy, reason)``: a concrete :class:`Strategy` (``agrs``, ``agrs-nvfp4`` or ``agrs-fp8``) and
        one sentence naming the condition that decided, e.g. ``"sum(sizes)=4096 reaches the crossover 0 of
        agrs-nvfp4 at world size 8 (data/crossover.json, 'default': not measured at world size 8)"``.

    Raises
    ------
    TypeError
        ``allow_quantized`` not a bool or None; ``total_tokens``, ``world_size`` or ``ep_size`` not an int.
    ValueError
        An unknown ``expert_input_format``; ``total_tokens < 0``, ``world_size`` or ``ep_size < 1``.

    Notes
    -----
    The rule (:func:`choose_strategy`, which ``moe_forward`` applies): quantize before the gather only
    where the experts consume that format anyway (so the result is bit-identical to ``agrs``), the experts
    are spread over the data's ranks, it is not switched off, and ``total_tokens`` reaches the crossover
    measured at this world size by ``moecomm bench moe --write-crossover`` (``data/crossover.json``). The
    choice ``moe_forward`` makes is also logged at DEBUG level by the logger ``moecomm.layer``, once per
    change.
    """
    strategy, why, *detail = _decide(expert_input_format, total_tokens, world_size,
                                     world_size if ep_size is None else ep_size, allow_quantized)
    return StrategyChoice(strategy, _reason(why, detail))


_REASONS = {
    "env": "quantized dispatch is switched off (" + DISABLE_ENV + "={})",
    "off": "quantized dispatch is switched off (allow_quantized=False)",
    "experts": "the experts consume {} (expert_input_format={!r}): only a format the experts quantize their input "
               "to anyway may travel quantized",
    "ep": "the experts are spread over ep_size={} ranks, the data over world size {}: quantized dispatch needs "
          "them equal",
    "never": "{} never beat agrs at world size {} (data/crossover.json, {})",
    "below": "sum(sizes)={} is below the crossover {} of {} at world size {} (data/crossover.json, {})",
    "pays": "sum(sizes)={} reaches the crossover {} of {} at world size {} (data/crossover.json, {})",
}


def _decide(expert_input_format, total_tokens: int, world_size: int, ep_size: int, allow_quantized) -> tuple:
    """``(strategy, key of _REASONS, the reason's values...)``: the rule of :func:`choose_strategy`, with no
    string formatting (it runs on every ``auto`` step)."""
    check_expert_format(expert_input_format)
    _check_count("total_tokens", total_tokens, 0)
    _check_count("world_size", world_size, 1)
    _check_count("ep_size", ep_size, 1)
    if allow_quantized is None:
        if os.environ.get(DISABLE_ENV, "0") in ("1", "true", "yes"):
            return Strategy.AGRS, "env", os.environ[DISABLE_ENV]
    elif not isinstance(allow_quantized, bool):
        raise TypeError(f"allow_quantized must be a bool or None, got {allow_quantized!r}")
    elif not allow_quantized:
        return Strategy.AGRS, "off"
    if expert_input_format not in _FORMAT_STRATEGY:
        return Strategy.AGRS, "experts", expert_input_format or "bf16", expert_input_format
    if ep_size != world_size:
        return Strategy.AGRS, "ep", ep_size, world_size
    strategy = _FORMAT_STRATEGY[expert_input_format]
    min_tokens = crossover(world_size).get(strategy.value)
    if min_tokens is None:
        return Strategy.AGRS, "never", strategy, world_size
    if total_tokens < min_tokens:
        return Strategy.AGRS, "below", total_tokens, min_tokens, strategy, world_size
    return strategy, "pays", total_tokens, min_tokens, strategy, world_size


def _reason(why: str, detail: list) -> str:
    """The sentence of :func:`_decide`'s result; a crossover's names the entry of data/crossover.json it read."""
    if why in ("never", "below", "pays"):
        world = detail[-1]
        detail = [*detail, f"'{world}'" if str(world) in _crossover_table() else
                  f"'default': not measured at world size {world}"]
    return _REASONS[why].format(*detail)


_logged: dict = {}  # (world size, experts' format) -> the strategy last logged


def choose_strategy(
    expert_input_format: QuantFormat | None,
    total_tokens: int,
    *,
    world_size: int,
    ep_size: int,
    allow_quantized: bool | None = None,
) -> Strategy:
    """The strategy ``"auto"`` runs: quantized dispatch where the experts consume that format and it pays.

    Quantized (``agrs-nvfp4`` / ``agrs-fp8``) only when all hold: the experts quantize their input to that
    format anyway (``expert_input_format``; layers with unquantized experts, e.g. a draft model's,
    never take it), experts are spread over the same ranks as the data (``ep_size == world_size``),
    it is not switched off (``allow_quantized=False``, or the environment variable
    ``MOECOMM_DISABLE_QUANTIZED_DISPATCH=1`` when ``allow_quantized`` is None), and ``total_tokens``
    (``sum(sizes)``, the same on every rank) reaches the crossover measured at this world size by
    ``moecomm bench moe --write-crossover`` and kept in ``data/crossover.json``. Otherwise ``agrs``
    (bf16), which gives bit-identical results. :func:`explain_strategy` gives the reason as well; a change
    of choice is logged at DEBUG level (logger ``moecomm.layer``) with its reason. Raises as
    :func:`explain_strategy` does.
    """
    strategy, why, *detail = _decide(expert_input_format, total_tokens, world_size, ep_size, allow_quantized)
    key = (world_size, expert_input_format)
    if _log.isEnabledFor(logging.DEBUG) and _logged.get(key) != strategy:
        _logged[key] = strategy
        _log.debug("strategy 'auto' -> %s: %s", strategy, _reason(why, detail))
    return strategy


def resolve_chunks(chunks, sizes: list[int], world: int) -> int:
    """The chunk count: ``chunks`` checked (a positive int), or for None the measured choice."""
    if chunks is None:
        table = crossover(world).get("chunks") or []
        total = sum(sizes)
        return max([c for min_tokens, c in table if total >= min_tokens], default=1)
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be a positive int or None, got {chunks!r}")
    return chunks


def wire_bytes_per_token(strategy: Strategy | str, hidden: int, topk: int,
                         expert_input_format: QuantFormat | None = None,
                         combine_format: ReduceFormat | str = "bf16") -> int:
    """Bytes one token occupies in the dispatch message plus in the combine message.

    Dispatch: the packed :func:`message_layout` row (bf16 ``2*hidden`` + int32 ids + fp32 weights for
    ``allreduce`` / ``agrs``). Combine: ``2*hidden`` (bf16), or for a quantized ``combine_format``
    ``hidden + 4*hidden/128`` (:func:`moecomm.quant.reduce_row_bytes`). ``allreduce`` moves these bytes for
    every token of the global batch on every rank (and an all-reduce moves about twice the bytes of an
    all-gather on the bus); ``agrs`` strategies gather each token once (padded layouts add the padding
    rows). Hidden 7168: bf16 14336 B, NVFP4 4032 B, FP8 per-128 7392 B of payload and scales per token;
    an int8 or FP8 combine 7392 B (0.516x of bf16). ``ValueError`` for ``"auto"``, or a quantized combine
    with ``allreduce`` (which sums in bf16 on the wire).
    """
    strategy = Strategy(strategy)
    if strategy == Strategy.AUTO:
        raise ValueError("wire_bytes_per_token needs a concrete strategy, not 'auto'")
    if strategy == Strategy.ALLREDUCE and ReduceFormat(combine_format) != ReduceFormat.BF16:
        raise ValueError(f"the allreduce strategy combines in bf16, not {ReduceFormat(combine_format).value}")
    dispatch_bytes = message_layout(wire_format(strategy, expert_input_format), hidden, topk).row_bytes
    return dispatch_bytes + reduce_row_bytes(combine_format, hidden)
