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
import os
from importlib import resources

from moecomm._enum import ChoiceEnum
from moecomm.layer.message import message_layout
from moecomm.quant import QuantFormat, ReduceFormat, reduce_row_bytes

__all__ = ["Strategy", "DISABLE_ENV", "wire_format", "choose_strategy", "resolve_chunks", "wire_bytes_per_token"]

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


def wire_format(strategy: Strategy, expert_input_format: QuantFormat | None) -> QuantFormat | None:
    """The format on the wire (None: bf16): the experts' own FP8 flavour where they have one, else the
    strategy's default."""
    if strategy not in _STRATEGY_FORMAT:
        return None
    if strategy == Strategy.AGRS_FP8 and expert_input_format in (QuantFormat.FP8_GROUP, QuantFormat.FP8_TOKEN):
        return QuantFormat(expert_input_format)  # the enum, also where the caller passed its string
    return _STRATEGY_FORMAT[strategy]


@functools.lru_cache(maxsize=None)
def crossover(world_size: int) -> dict[str, int | None]:
    """Per quantized strategy, the smallest ``sum(sizes)`` from which it pays at this world size (None: never).

    From ``data/crossover.json``: the entry of the measured world size, else ``"default"``.
    """
    with resources.files("moecomm").joinpath("data/crossover.json").open() as f:
        table = json.load(f)["min_total_tokens"]
    return table.get(str(world_size), table["default"])


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
    (bf16), which gives bit-identical results.
    """
    if allow_quantized is None:
        allow_quantized = os.environ.get(DISABLE_ENV, "0") not in ("1", "true", "yes")
    elif not isinstance(allow_quantized, bool):
        raise TypeError(f"allow_quantized must be a bool or None, got {allow_quantized!r}")
    if expert_input_format not in _FORMAT_STRATEGY or not allow_quantized or ep_size != world_size:
        return Strategy.AGRS
    strategy = _FORMAT_STRATEGY[expert_input_format]
    min_tokens = crossover(world_size).get(strategy.value)
    return strategy if min_tokens is not None and total_tokens >= min_tokens else Strategy.AGRS


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
