"""MoE routing: router logits -> ``topk_ids`` int32 ``[T, k]`` and ``topk_weights`` fp32 ``[T, k]``.

Two routers, both plain torch (they are a few small kernels next to the expert GEMMs):

* :func:`topk_softmax` -- softmax over all experts, top-k, optional renormalisation (Mixtral, Qwen-MoE;
  vLLM ``fused_topk``).
* :func:`grouped_topk` -- DeepSeek-V3's node-limited routing: sigmoid scores, a per-expert correction bias
  for the choice only, the best ``topk_group`` of ``n_group`` groups, top-k inside them, renormalise,
  scale (DeepSeek-V3 technical report, section 2.1.2; HF ``modeling_deepseek.py`` ``MoEGate``; vLLM and
  SGLang ``grouped_topk``).

:func:`normalize_topk` validates routing that a caller made itself and brings it to int32 / fp32.
"""

from __future__ import annotations

import torch

from moecomm.errors import check_ids

__all__ = ["topk_softmax", "grouped_topk", "normalize_topk", "ids_int32"]


def _check_logits(router_logits: torch.Tensor, k: int) -> None:
    if router_logits.dim() != 2 or not router_logits.is_floating_point():
        raise ValueError(
            f"router_logits must be a floating [num_tokens, num_experts] tensor, got "
            f"{router_logits.dtype} of shape {tuple(router_logits.shape)}"
        )
    if not 1 <= k <= router_logits.shape[1]:
        raise ValueError(f"k={k} must be in [1, num_experts={router_logits.shape[1]}]")


def _finish(weights: torch.Tensor, ids: torch.Tensor, renormalize: bool, scale: float = 1.0):
    if renormalize:
        # + 1e-20 as DeepSeek-V3's MoEGate: sigmoid scores that underflow to 0 must not give 0/0 = NaN
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if scale != 1.0:
        weights = weights * scale
    return ids.to(torch.int32), weights.float().contiguous()


def topk_softmax(
    router_logits: torch.Tensor, k: int, *, renormalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing (Mixtral / Qwen-MoE; vLLM ``fused_topk``).

    ``p = softmax(logits)`` over all experts in fp32; keep the ``k`` largest; with ``renormalize`` divide
    them by their sum so that each token's weights add up to 1.

    Parameters
    ----------
    router_logits : Tensor ``[num_tokens, num_experts]``, any floating dtype.
    k : int, experts per token, ``1 <= k <= num_experts``.
    renormalize : bool, divide the kept probabilities by their sum.

    Returns
    -------
    topk_ids : Tensor ``[num_tokens, k]`` int32, expert indices, largest weight first.
    topk_weights : Tensor ``[num_tokens, k]`` float32.

    Raises
    ------
    ValueError
        If ``router_logits`` is not a floating 2-D tensor or ``k`` is out of range.
    """
    _check_logits(router_logits, k)
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    return _finish(weights, ids, renormalize)


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

    Sources: DeepSeek-V3 technical report (arXiv:2412.19437) section 2.1.2; HF ``modeling_deepseek.py``
    ``MoEGate.forward`` (``topk_method="noaux_tc"``); vLLM / SGLang ``grouped_topk``. HF fills masked experts
    with 0.0 rather than -inf; that differs only when a corrected score of an allowed expert is negative,
    and we follow vLLM / SGLang. DeepSeek-V3 uses 256 experts, k=8, ``n_group=8``, ``topk_group=4``,
    ``routed_scaling_factor=2.5``.

    Parameters
    ----------
    router_logits : Tensor ``[num_tokens, num_experts]``, any floating dtype (computed in fp32).
    k : int, experts per token, at most ``topk_group * num_experts / n_group``.
    e_score_correction_bias : Tensor ``[num_experts]`` or None (no correction).
    n_group : int, number of expert groups; ``num_experts / n_group >= 2``.
    topk_group : int, groups kept per token, ``1 <= topk_group <= n_group``.
    routed_scaling_factor : float, multiplies the final weights.
    renormalize : bool, divide the kept scores by their sum before scaling.

    Returns
    -------
    topk_ids : Tensor ``[num_tokens, k]`` int32, largest corrected score first.
    topk_weights : Tensor ``[num_tokens, k]`` float32.

    Raises
    ------
    ValueError
        On a bad shape or a group configuration that does not fit ``num_experts`` and ``k``.
    """
    _check_logits(router_logits, k)
    num_tokens, num_experts = router_logits.shape
    if n_group < 1 or num_experts % n_group or num_experts // n_group < 2:
        raise ValueError(f"num_experts={num_experts} must split into n_group={n_group} groups of >= 2 experts")
    group_size = num_experts // n_group
    if not 1 <= topk_group <= n_group or k > topk_group * group_size:
        raise ValueError(
            f"topk_group={topk_group} must be in [1, n_group={n_group}] and k={k} at most "
            f"topk_group * group_size = {topk_group * group_size}"
        )
    scores = torch.sigmoid(router_logits.float())
    choice = scores
    if e_score_correction_bias is not None:
        if e_score_correction_bias.shape != (num_experts,):
            raise ValueError(
                f"e_score_correction_bias must have shape ({num_experts},), "
                f"got {tuple(e_score_correction_bias.shape)}"
            )
        choice = scores + e_score_correction_bias.float()
    grouped = choice.view(num_tokens, n_group, group_size)
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, n_group]
    best_groups = group_scores.topk(topk_group, dim=-1).indices
    allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
    masked = grouped.masked_fill(~allowed.unsqueeze(-1), float("-inf")).view(num_tokens, num_experts)
    ids = masked.topk(k, dim=-1).indices
    return _finish(scores.gather(1, ids), ids, renormalize, routed_scaling_factor)


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
        If the shapes differ or are not 2-D, the dtypes are wrong, the devices differ, or an id is out
        of range.
    """
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
        check_ids(topk_ids, num_experts)
    return ids_int32(topk_ids).contiguous(), topk_weights.float().contiguous()


def ids_int32(topk_ids: torch.Tensor) -> torch.Tensor:
    """Integer ids as int32 without wrapping: ids outside the int32 range become -2**31 (no sync).

    -2**31 is below -1, so it stays an error that :func:`moecomm.errors.check_errors` reports, instead of
    a wrapped id silently picking a real expert (``2**32 + 1`` would wrap to 1) or becoming a masked slot.
    """
    if topk_ids.dtype == torch.int32:
        return topk_ids
    info = torch.iinfo(torch.int32)
    fits = (topk_ids >= info.min) & (topk_ids <= info.max)
    return torch.where(fits, topk_ids, info.min).to(torch.int32)
