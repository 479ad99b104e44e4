"""MoE routing: router logits -> ``topk_ids`` int32 ``[T, k]`` and ``topk_weights`` fp32 ``[T, k]``.

Two routers, both plain torch (they are a few small kernels next to the expert GEMMs):

* :func:`topk_softmax` -- softmax over all experts, top-k, optional renormalisation (Mixtral, Qwen-MoE;
  vLLM ``fused_topk``).
* :func:`grouped_topk` -- DeepSeek-V3's node-limited routing: sigmoid scores, a per-expert correction bias
  for the choice only, the best ``topk_group`` of ``n_group`` groups, top-k inside them, renormalise,
  scale (DeepSeek-V3 technical report, section 2.1.2; HF ``modeling_deepseek.py`` ``MoEGate``; vLLM and
  SGLang ``grouped_topk``).

:func:`normalize_topk` validates routing that a caller made itself and brings it to int32 / fp32.

**Ties.** Routing is a function of each row's scores alone, the same on every device and in every batch
composition: experts (and the groups of :func:`grouped_topk`) rank by score descending, then by id
ascending, and ``topk_ids`` lists them in that order. ``torch.topk`` breaks ties differently on CPU and
CUDA, so the ranking is a ``torch.topk`` over keys that are unique within a row: the order-preserving
bits of the fp32 score (``-0.0`` as ``+0.0``) times the number of candidates, plus the reversed id
(triton_kernels' ``topk`` packs value bits and index into one key the same way). No host sync.

**Non-finite logits** (the weights are never NaN):

* NaN ranks as ``-inf``, below every number.
* A slot whose expert has a ``-inf`` or NaN logit is a *masked slot*: ``topk_ids = -1``,
  ``topk_weights = 0`` (vLLM / SGLang's convention). Such experts fill slots only when fewer than ``k``
  others are left, so an all ``-inf`` / all NaN row routes to no expert.
* :func:`topk_softmax`: in a row with ``+inf`` logits the ``+inf`` experts share the probability
  equally (the limit of the softmax) and rank first; the row's other experts get probability 0 (routed
  with weight 0, not masked, unless their logit is ``-inf`` or NaN).
* :func:`grouped_topk`: ``sigmoid(+inf) = 1`` is an ordinary score, the largest, and competes through the
  correction bias like any other. A ``-inf`` or NaN logit masks its expert whatever its bias. A group
  ranks by how many of its two best experts are unmasked (2, 1 or 0), then by the sum of their
  corrected scores, then by group id; slots that fall outside the chosen groups are masked too.
* Renormalisation divides by ``sum + 1e-20``, so a row of masked slots keeps weights 0.

``e_score_correction_bias`` must be finite (checking it would read it on the host).
"""

from __future__ import annotations

import numbers

import torch

from moecomm.errors import check_ids

__all__ = ["topk_softmax", "grouped_topk", "normalize_topk", "ids_int32"]

_NEG_INF = float("-inf")


def _check_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")


def _check_logits(router_logits: torch.Tensor, k: int) -> None:
    if not isinstance(router_logits, torch.Tensor):
        raise TypeError(f"router_logits must be a torch.Tensor, got {type(router_logits).__name__}")
    _check_int(k, "k")
    if router_logits.dim() != 2 or not router_logits.is_floating_point():
        raise ValueError(
            f"router_logits must be a floating [num_tokens, num_experts] tensor, got "
            f"{router_logits.dtype} of shape {tuple(router_logits.shape)}"
        )
    if not 1 <= k <= router_logits.shape[1]:
        raise ValueError(f"k={k} must be in [1, num_experts={router_logits.shape[1]}]")


def _order_bits(x: torch.Tensor) -> torch.Tensor:
    """fp32 (no NaN) -> int64 in the same order: the bits, with those of negative numbers' magnitude
    flipped so that they compare as integers; ``-0.0`` first becomes ``+0.0`` (they compare equal)."""
    bits = torch.where(x == 0, 0.0, x).view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()


def _rank(keys: torch.Tensor, k: int) -> torch.Tensor:
    """int64 ``[T, k]``: the indices of the ``k`` largest ``keys [T, N]`` (int64, ``|keys| * N < 2**62``),
    largest first, equal keys in ascending index order. The keys are made unique within a row, so the
    result does not depend on how ``torch.topk`` breaks ties."""
    n = keys.shape[1]
    lower_index_first = torch.arange(n - 1, -1, -1, device=keys.device)
    return (keys * n + lower_index_first).topk(k, dim=-1).indices


def _finish(weights: torch.Tensor, ids: torch.Tensor, keep: torch.Tensor, renormalize: bool, scale: float = 1.0):
    """Mask the slots where ``keep`` is False (id -1, weight 0), renormalise, scale; int32 ids, fp32 weights."""
    weights = torch.where(keep, weights, 0.0)
    ids = torch.where(keep, ids, -1)
    if renormalize:
        # + 1e-20 as DeepSeek-V3's MoEGate: a sum of 0 (masked slots, sigmoid scores that underflow) must
        # not give 0/0 = NaN
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if scale != 1.0:
        weights = weights * scale
    return ids.to(torch.int32), weights.float().contiguous()


def topk_softmax(
    router_logits: torch.Tensor, k: int, *, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing (Mixtral / Qwen-MoE; vLLM ``fused_topk``).

    ``p = softmax(logits)`` over all experts in fp32; keep the ``k`` experts of largest logit (so of
    largest ``p``: ranking the logits themselves keeps the order exact where fp32 ``p`` would round two
    logits to one value), ties to the lower id; with ``renormalize`` divide their ``p`` by their sum so that
    each token's weights add up to 1. Non-finite logits follow the module docstring: NaN ranks as
    ``-inf``, ``+inf`` experts share the probability, slots of ``-inf`` / NaN experts are masked.

    Parameters
    ----------
    router_logits : Tensor ``[num_tokens, num_experts]``, any floating dtype (computed in fp32).
    k : int, experts per token, ``1 <= k <= num_experts``.
    renormalize : bool, divide the kept probabilities by their sum.

    Returns
    -------
    topk_ids : Tensor ``[num_tokens, k]`` int32, expert ids by logit descending, then id ascending;
        -1 for a masked slot (always after the others).
    topk_weights : Tensor ``[num_tokens, k]`` float32; 0 for a masked slot.

    Raises
    ------
    ValueError
        If ``router_logits`` is not a floating 2-D tensor or ``k`` is out of range.
    """
    _check_logits(router_logits, k)
    x = router_logits.float()
    x = torch.where(x.isnan(), _NEG_INF, x)
    pos_inf = x == float("inf")
    # rows with +inf logits: softmax of 0 for the +inf experts and -inf for the others (its limit)
    limit = torch.where(pos_inf.any(dim=-1, keepdim=True), torch.where(pos_inf, 0.0, _NEG_INF), x)
    probs = torch.softmax(limit, dim=-1)  # NaN in all -inf rows: their slots are all masked
    ids = _rank(_order_bits(x), k)
    return _finish(probs.gather(1, ids), ids, x.gather(1, ids) > _NEG_INF, renormalize)


def grouped_topk(
    router_logits: torch.Tensor,
    k: int,
    *,
    e_score_correction_bias: torch.Tensor | None,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float = 1.0,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 grouped ("node-limited", ``noaux_tc``) top-k routing.

    With ``s = sigmoid(logits)`` and ``c = s + e_score_correction_bias`` (the bias steers the choice only)::

        group score  = sum of the top-2 ``c`` in each of the ``n_group`` equal groups of experts
        allowed      = experts of the ``topk_group`` best groups (others get ``c = -inf``)
        topk_ids     = top-k of ``c`` over allowed experts
        topk_weights = s[topk_ids] (/ their sum if ``renormalize``) * routed_scaling_factor

    Ties go to the lower group id and the lower expert id; ``-inf`` / NaN logits are masked and a
    group's rank counts its unmasked best two first (module docstring).

    Sources: DeepSeek-V3 technical report (arXiv:2412.19437) section 2.1.2; HF ``modeling_deepseek.py``
    ``MoEGate.forward`` (``topk_method="noaux_tc"``); vLLM / SGLang ``grouped_topk``. HF fills masked experts
    with 0.0 rather than -inf; that differs only when a corrected score of an allowed expert is negative,
    and we follow vLLM / SGLang. DeepSeek-V3 uses 256 experts, k=8, ``n_group=8``, ``topk_group=4``,
    ``routed_scaling_factor=2.5``.

    Parameters
    ----------
    router_logits : Tensor ``[num_tokens, num_experts]``, any floating dtype (computed in fp32).
    k : int, experts per token, at most ``topk_group * num_experts / n_group``.
    e_score_correction_bias : Tensor ``[num_experts]`` (finite) or None (no correction).
    n_group : int, number of expert groups; ``num_experts / n_group >= 2``.
    topk_group : int, groups kept per token, ``1 <= topk_group <= n_group``.
    routed_scaling_factor : float, multiplies the final weights.
    renormalize : bool, divide the kept scores by their sum before scaling.

    Returns
    -------
    topk_ids : Tensor ``[num_tokens, k]`` int32, by corrected score descending, then id ascending; -1 for
        a masked slot (always after the others).
    topk_weights : Tensor ``[num_tokens, k]`` float32; 0 for a masked slot.

    Raises
    ------
    ValueError
        On a bad shape or a group configuration that does not fit ``num_experts`` and ``k``.
    """
    _check_logits(router_logits, k)
    _check_int(n_group, "n_group")
    _check_int(topk_group, "topk_group")
    num_tokens, num_experts = router_logits.shape
    if e_score_correction_bias is not None and not isinstance(e_score_correction_bias, torch.Tensor):
        raise TypeError(
            f"e_score_correction_bias must be a torch.Tensor [num_experts] or None, got "
            f"{type(e_score_correction_bias).__name__}"
        )
    if n_group < 1 or num_experts % n_group or num_experts // n_group < 2:
        raise ValueError(f"num_experts={num_experts} must split into n_group={n_group} groups of >= 2 experts")
    group_size = num_experts // n_group
    if not 1 <= topk_group <= n_group or k > topk_group * group_size:
        raise ValueError(
            f"topk_group={topk_group} must be in [1, n_group={n_group}] and k={k} at most "
            f"topk_group * group_size = {topk_group * group_size}"
        )
    x = router_logits.float()
    scores = torch.sigmoid(x)
    choice = scores
    if e_score_correction_bias is not None:
        if e_score_correction_bias.shape != (num_experts,):
            raise ValueError(
                f"e_score_correction_bias must have shape ({num_experts},), "
                f"got {tuple(e_score_correction_bias.shape)}"
            )
        choice = scores + e_score_correction_bias.float()
    unmasked = x > _NEG_INF  # False for -inf and NaN logits
    grouped = torch.where(unmasked, choice, _NEG_INF).view(num_tokens, n_group, group_size)
    best2 = grouped.topk(2, dim=-1).values  # values only: they do not depend on how ties are broken
    counted = best2 > _NEG_INF
    group_keys = counted.sum(dim=-1) * 2**32 + _order_bits(torch.where(counted, best2, 0.0).sum(dim=-1))
    allowed = torch.zeros_like(counted[..., 0]).scatter_(1, _rank(group_keys, topk_group), True)
    keep = (unmasked.view(num_tokens, n_group, group_size) & allowed.unsqueeze(-1)).view(num_tokens, num_experts)
    ids = _rank(_order_bits(torch.where(keep, choice, _NEG_INF)), k)
    return _finish(scores.gather(1, ids), ids, keep.gather(1, ids), renormalize, routed_scaling_factor)


def normalize_topk(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, *, num_experts: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate caller-made routing and return contiguous int32 ids and float32 weights.

    Parameters
    ----------
    topk_ids : Tensor ``[num_tokens, k]``, any integer dtype (int64 from ``torch.topk`` is fine).
    topk_weights : Tensor ``[num_tokens, k]``, any floating dtype.
    num_experts : int or None. When given, every id must be in ``[0, num_experts)`` or be -1 (a masked
        slot); checking reads the ids' min and max on the host (one device synchronisation on a GPU).

    Returns
    -------
    topk_ids : Tensor ``[num_tokens, k]`` int32, contiguous (the input itself when already so).
    topk_weights : Tensor ``[num_tokens, k]`` float32, contiguous.

    Raises
    ------
    ValueError
        If the shapes differ or are not 2-D, the dtypes are wrong, the devices differ, an id is out
        of range, or ``num_experts < 1``.
    TypeError
        If the ids or weights are not tensors, or ``num_experts`` is not an int (or None).
    """
    if not isinstance(topk_ids, torch.Tensor) or not isinstance(topk_weights, torch.Tensor):
        raise TypeError(
            f"topk_ids and topk_weights must be torch.Tensors, got {type(topk_ids).__name__} and "
            f"{type(topk_weights).__name__}"
        )
    if num_experts is not None:
        _check_int(num_experts, "num_experts")
        if num_experts < 1:
            raise ValueError(f"num_experts must be positive, got {num_experts}")
    if topk_ids.dim() != 2 or topk_ids.shape != topk_weights.shape:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must both be "
            "[num_tokens, k]"
        )
    if topk_ids.is_floating_point() or topk_ids.is_complex() or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must have an integer dtype, got {topk_ids.dtype}")
    if not topk_weights.is_floating_point():
        raise ValueError(f"topk_weights must have a floating dtype, got {topk_weights.dtype}")
    if topk_ids.device != topk_weights.device:
        raise ValueError(f"topk_ids on {topk_ids.device} but topk_weights on {topk_weights.device}")
    if num_experts is not None:
        check_ids(_comparable_ids(topk_ids), num_experts)
    return ids_int32(topk_ids).contiguous(), topk_weights.float().contiguous()


# Integer dtypes whose every value fits in int32: a plain cast is exact.
_FITS_INT32 = (torch.int8, torch.int16, torch.uint8, torch.uint16)


def _comparable_ids(topk_ids: torch.Tensor) -> torch.Tensor:
    """The ids in a dtype that torch can compare and reduce (no sync), same order and values: uint16 / uint32
    widen to int64 (torch has no comparisons for them); uint64 ids of 2**63 and more saturate to the int64
    maximum (still out of range)."""
    if topk_ids.dtype in (torch.uint16, torch.uint32):
        return topk_ids.to(torch.int64)
    if topk_ids.dtype == torch.uint64:
        wide = topk_ids.view(torch.int64)
        return torch.where(wide < 0, torch.iinfo(torch.int64).max, wide)
    return topk_ids


def ids_int32(topk_ids: torch.Tensor) -> torch.Tensor:
    """Integer ids as int32 without wrapping: ids outside the int32 range become -2**31 (no sync).

    -2**31 is below -1, so it stays an error that :func:`moecomm.errors.check_errors` reports, instead of
    a wrapped id silently picking a real expert (``2**32 + 1`` would wrap to 1) or becoming a masked slot.
    """
    if topk_ids.dtype == torch.int32:
        return topk_ids
    if topk_ids.dtype in _FITS_INT32:  # int8 / int16 / uint8 / uint16: exact, -1 stays -1
        return topk_ids.to(torch.int32)
    wide = _comparable_ids(topk_ids)
    info = torch.iinfo(torch.int32)
    fits = (wide >= info.min) & (wide <= info.max)
    return torch.where(fits, wide, info.min).to(torch.int32)
