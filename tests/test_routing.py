"""moecomm.moe: ties broken by expert id, the same in every batch and on every device, and non-finite
router logits (docs/experts.md, "Routing: ties and non-finite logits").

Expected ids come from an independent Python sort by (-score, id); expected weights are hand-computed
or float64. The routing tests of the rest of the API are in test_moe.py.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from moecomm.moe import grouped_topk, ids_int32, normalize_topk, topk_softmax
from moecomm.testing import assert_close

INF, NAN = float("inf"), float("nan")
DSV3_GROUPS = dict(n_group=8, topk_group=4)  # 256 experts in 8 groups of 32, as DeepSeek-V3


def _logit(*p):
    """fp32 logits whose sigmoid is ``p`` (to fp32 rounding)."""
    return torch.logit(torch.tensor(p, dtype=torch.float64)).float()


def _tied_bf16(num_tokens, num_experts, seed, *, coarse):
    """bf16 logits with many ties: randn rounded to bf16, or (``coarse``) to multiples of 0.5."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, num_experts, generator=g) * 2
    return (x.round() / 2 if coarse else x).bfloat16()


def _by_score(scores, candidates):
    """``candidates`` sorted by score descending, then id ascending (plain Python)."""
    return sorted(candidates, key=lambda e: (-scores[e], e))


def _softmax_ref(logits, k, renormalize):
    """Finite logits: (ids, float64 weights, rows tied at the k-th place), expert by expert in Python."""
    x = logits.float()
    p = torch.softmax(x.double(), dim=-1)
    ids, weights, tied = [], [], 0
    for row, prow in zip(x.tolist(), p):
        order = _by_score(row, range(len(row)))
        tied += k < len(row) and row[order[k - 1]] == row[order[k]]
        w = prow[order[:k]]
        ids.append(order[:k])
        weights.append(w / w.sum() if renormalize else w)
    return torch.tensor(ids), torch.stack(weights), tied


def _grouped_ref(logits, k, bias, n_group, topk_group, scale, renormalize):
    """Finite logits: (ids, float64 weights, rows tied at the k-th expert, rows tied at the last kept
    group). The scores are computed in fp32 as documented; the choices are made in Python."""
    s = torch.sigmoid(logits.float())
    c = s if bias is None else s + bias
    num_experts = c.shape[1]
    size = num_experts // n_group
    # fp32 sums of each group's two best values (a sort's values do not depend on tie-breaking)
    group_score = c.view(-1, n_group, size).sort(dim=-1, descending=True).values[..., :2].sum(-1)
    ids, weights, tied_expert, tied_group = [], [], 0, 0
    for srow, crow, grow in zip(s.double(), c.tolist(), group_score.tolist()):
        groups = _by_score(grow, range(n_group))
        tied_group += topk_group < n_group and grow[groups[topk_group - 1]] == grow[groups[topk_group]]
        allowed = [e for g in groups[:topk_group] for e in range(g * size, (g + 1) * size)]
        order = _by_score(crow, allowed)
        tied_expert += k < len(order) and crow[order[k - 1]] == crow[order[k]]
        w = srow[order[:k]]
        ids.append(order[:k])
        weights.append(scale * (w / w.sum() if renormalize else w))
    return torch.tensor(ids), torch.stack(weights), tied_expert, tied_group


def _grouped(logits, k, bias=None, *, renormalize=True, scale=1.0, **groups):
    return grouped_topk(logits, k, e_score_correction_bias=bias, routed_scaling_factor=scale,
                        renormalize=renormalize, **(groups or DSV3_GROUPS))


# ----------------------------------------------------------------------------------------------------
# Ties
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("renormalize", [True, False])
def test_all_equal_logits_pick_experts_0_to_k_minus_1(renormalize):
    # a different random constant in each row: every expert (and every group) ties
    logits = torch.randn(3, 1).expand(3, 256).contiguous()
    ids, w = topk_softmax(logits, 8, renormalize=renormalize)
    assert ids.tolist() == [list(range(8))] * 3
    assert_close(w, torch.full((3, 8), 1 / 8 if renormalize else 1 / 256), rel=1e-6)
    # groups 0..3 are kept; experts 0..7 are the first 8 of group 0
    ids, w = _grouped(logits, 8, torch.zeros(256), renormalize=renormalize, scale=2.5)
    assert ids.tolist() == [list(range(8))] * 3
    s = torch.sigmoid(logits[:, :1].double()).expand(3, 8)
    assert_close(w, torch.full((3, 8), 2.5 / 8) if renormalize else 2.5 * s, rel=1e-6)


def test_tie_at_the_kth_place_keeps_the_lower_id():
    # experts 2, 4 and 6 tie for the 3rd place: expert 2 wins
    logits = torch.tensor([[0.5, 2.0, 1.0, 3.0, 1.0, -1.0, 1.0, 0.0]])
    ids, w = topk_softmax(logits, 3, renormalize=False)
    assert ids.tolist() == [[3, 1, 2]]
    assert_close(w, torch.softmax(logits.double(), -1)[:, [3, 1, 2]].float(), rel=1e-6)
    # -0.0 and +0.0 are equal scores
    assert topk_softmax(torch.tensor([[-1.0, 0.0, -0.0, -2.0]]), 1)[0].tolist() == [[1]]
    assert topk_softmax(torch.tensor([[-1.0, -0.0, 0.0, -2.0]]), 1)[0].tolist() == [[1]]
    # 4 groups of 2, keep 2, k = 2. Sigmoid scores by group: [.2 .6] [.6 .2] [.5 .5] [.6 .2].
    # Group scores .8, .8, 1.0, .8: group 2, then group 0 of the three tied at .8 (group 1 holds a .6 that
    # would win). Among experts 0, 1, 4, 5: expert 1 (.6), then experts 4 and 5 tie at .5: expert 4.
    logits = _logit(0.2, 0.6, 0.6, 0.2, 0.5, 0.5, 0.6, 0.2)[None]
    ids, w = _grouped(logits, 2, n_group=4, topk_group=2)
    assert ids.tolist() == [[1, 4]]
    assert_close(w, torch.tensor([[0.6, 0.5]]) / 1.1, rel=1e-6)


@pytest.mark.parametrize("coarse", [False, True], ids=["bf16", "halves"])
def test_random_tied_logits_follow_the_documented_order(coarse):
    logits = _tied_bf16(300, 256, seed=5, coarse=coarse)
    for renormalize in (True, False):
        ids, w = topk_softmax(logits, 8, renormalize=renormalize)
        ref_ids, ref_w, tied = _softmax_ref(logits, 8, renormalize)
        assert tied > 10  # the test data has ties at the 8th place, so a wrong tie-break fails
        assert torch.equal(ids.long(), ref_ids)
        assert_close(w, ref_w, rel=1e-6)
    bias = (0.05 * torch.randn(256, generator=torch.Generator().manual_seed(6))).bfloat16().float()
    for b in (None, bias):
        ids, w = _grouped(logits, 8, b, scale=2.5)
        ref_ids, ref_w, tied_expert, tied_group = _grouped_ref(logits, 8, b, 8, 4, 2.5, True)
        assert torch.equal(ids.long(), ref_ids)
        assert_close(w, ref_w, rel=1e-6)
        if b is None:  # without a bias the scores tie as the logits do
            assert tied_expert > 10 and (tied_group > 10 or not coarse)


@pytest.mark.parametrize("coarse", [False, True], ids=["bf16", "halves"])
def test_a_row_alone_equals_the_row_in_a_batch(coarse):
    logits = _tied_bf16(64, 256, seed=7, coarse=coarse)
    bias = 0.05 * torch.randn(256, generator=torch.Generator().manual_seed(8))
    for route in (lambda x: topk_softmax(x, 8), lambda x: _grouped(x, 8, bias)):
        ids, w = route(logits)
        for rows in (slice(0, 1), slice(17, 18), slice(63, 64), slice(5, 42)):
            alone_ids, alone_w = route(logits[rows])
            assert torch.equal(alone_ids, ids[rows])
            assert_close(alone_w, w[rows], rel=0)


# ----------------------------------------------------------------------------------------------------
# Non-finite logits
# ----------------------------------------------------------------------------------------------------

# topk_softmax, 5 experts, k = 2: (logits, ids, weights, renormalised weights)
SOFTMAX_CASES = [
    # NaN ranks as -inf; p = [0, 1/5, 3/5, 1/5, 0]; experts 1 and 3 tie: expert 1
    ([NAN, 0.0, math.log(3), 0.0, -INF], [2, 1], [0.6, 0.2], [0.75, 0.25]),
    # +inf takes all the probability; expert 2 (logit 5) ranks next with probability 0, not masked
    ([0.0, INF, 5.0, NAN, -INF], [1, 2], [1.0, 0.0], [1.0, 0.0]),
    # two +inf experts share it
    ([INF, 0.0, INF, -INF, NAN], [0, 2], [0.5, 0.5], [0.5, 0.5]),
    # -inf and NaN experts fill only masked slots
    ([-INF, 2.0, NAN, -INF, NAN], [1, -1], [1.0, 0.0], [1.0, 0.0]),
    ([-INF] * 5, [-1, -1], [0.0, 0.0], [0.0, 0.0]),
    ([NAN] * 5, [-1, -1], [0.0, 0.0], [0.0, 0.0]),
    ([NAN, -INF, NAN, -INF, NAN], [-1, -1], [0.0, 0.0], [0.0, 0.0]),
]


def test_topk_softmax_non_finite_logits():
    logits = torch.tensor([case[0] for case in SOFTMAX_CASES])
    for renormalize, col in ((False, 2), (True, 3)):
        ids, w = topk_softmax(logits, 2, renormalize=renormalize)
        assert ids.tolist() == [case[1] for case in SOFTMAX_CASES]
        assert_close(w, torch.tensor([case[col] for case in SOFTMAX_CASES]), rel=1e-6)  # also fails on NaN
        for i in range(len(SOFTMAX_CASES)):  # each row alone as in the batch
            alone_ids, alone_w = topk_softmax(logits[i : i + 1], 2, renormalize=renormalize)
            assert torch.equal(alone_ids, ids[i : i + 1])
            assert_close(alone_w, w[i : i + 1], rel=0)


# grouped_topk, 4 experts in groups {0, 1} and {2, 3}, scale 2:
# (logits, bias, topk_group, k, ids, weights before renormalisation and scaling)
GROUPED_CASES = [
    # group 0 has one unmasked expert (.9), group 1 two (.3 + .2): group 1 ranks first anyway
    (_logit(NAN, 0.9, 0.3, 0.2), None, 1, 2, [2, 3], [0.3, 0.2]),
    # -inf logits are masked whatever their bias; the third slot finds no unmasked expert
    (torch.tensor([-INF, -INF, *_logit(0.5, 0.4)]), [1.0, 1.0, 0.0, 0.0], 2, 3, [2, 3, -1], [0.5, 0.4, 0.0]),
    # +inf is sigmoid score 1: group 0 (1.4) beats group 1 (1.3) ...
    (torch.tensor([_logit(0.4)[0], INF, *_logit(0.7, 0.6)]), None, 1, 2, [1, 0], [1.0, 0.4]),
    # ... unless the bias lifts group 1 to 1.7
    (torch.tensor([_logit(0.4)[0], INF, *_logit(0.7, 0.6)]), [0.0, 0.0, 0.2, 0.2], 1, 2, [2, 3], [0.7, 0.6]),
    # groups of one unmasked expert each: group 1 (.9) wins; expert 0 (finite) lies outside it, so the
    # second slot is masked
    (torch.tensor([_logit(0.5)[0], -INF, _logit(0.9)[0], NAN]), None, 1, 2, [2, -1], [0.9, 0.0]),
    (torch.full((4,), -INF), None, 2, 2, [-1, -1], [0.0, 0.0]),
    (torch.full((4,), NAN), [0.5, 0.5, 0.5, 0.5], 2, 3, [-1, -1, -1], [0.0, 0.0, 0.0]),
]


@pytest.mark.parametrize("logits,bias,topk_group,k,expect_ids,raw", GROUPED_CASES)
def test_grouped_topk_non_finite_logits(logits, bias, topk_group, k, expect_ids, raw):
    bias = None if bias is None else torch.tensor(bias)
    raw = torch.tensor([raw], dtype=torch.float64)
    total = raw.sum()
    for renormalize, expect in ((False, raw), (True, raw / total if total > 0 else raw)):
        ids, w = _grouped(logits[None], k, bias, renormalize=renormalize, scale=2.0, n_group=2, topk_group=topk_group)
        assert ids.tolist() == [expect_ids]
        assert_close(w, 2.0 * expect.float(), rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# GPU: the same routing on the CPU and on CUDA
# ----------------------------------------------------------------------------------------------------

# Logits in {0, 0.5, 1, 1.5, 2} (and a few non-finite): exact ties, and sigmoid scores (+inf: 1) whose
# pair sums are far apart (checked below), so that a last-bit difference between the CPU's and the
# GPU's sigmoid cannot reorder distinct values.
GPU_LEVELS = [0.0, 0.5, 1.0, 1.5, 2.0]


@pytest.mark.gpu
def test_gpu_routing_equals_cpu_on_tied_bf16_logits():
    s = [1 / (1 + math.exp(-v)) for v in GPU_LEVELS] + [1.0]
    for values in (s, [a + b for a, b in itertools.combinations_with_replacement(s, 2)]):  # experts, groups
        values = sorted(set(values))
        assert min(b - a for a, b in zip(values, values[1:])) > 1e-4
    g = torch.Generator().manual_seed(9)
    logits = torch.tensor(GPU_LEVELS)[torch.randint(len(GPU_LEVELS), (512, 256), generator=g)].bfloat16()
    logits[:8, :3] = torch.tensor([NAN, INF, -INF]).bfloat16()
    logits[8, :] = NAN
    logits[9, :] = -INF
    for route in (lambda x: topk_softmax(x, 8), lambda x: _grouped(x, 8, scale=2.5)):
        cpu_ids, cpu_w = route(logits)
        gpu_ids, gpu_w = route(logits.cuda())
        assert torch.equal(gpu_ids.cpu(), cpu_ids)
        assert_close(gpu_w.cpu(), cpu_w, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8, torch.uint16, torch.uint32, torch.uint64,
                                   torch.int32, torch.int64], ids=str)
def test_normalize_topk_any_integer_dtype(dtype):
    """Small and unsigned integer ids convert exactly (int8 / int16 crashed in ids_int32); -1 stays a masked slot."""
    want = [[0, 5], [7, 1], [3, 3]]
    if dtype.is_signed:
        want[1][1] = -1
    ids = torch.tensor(want).to(dtype)
    for num_experts in (None, 8):
        got, w = normalize_topk(ids, torch.ones(3, 2, dtype=torch.float16), num_experts=num_experts)
        assert got.dtype == torch.int32 and got.is_contiguous() and got.tolist() == want
        assert w.dtype == torch.float32
    assert ids_int32(ids).tolist() == want
    top = torch.tensor([[8, 0]]).to(dtype)  # out of range, in every dtype
    with pytest.raises(ValueError, match=r"\[0, 8\) or -1"):
        normalize_topk(top, torch.ones(1, 2), num_experts=8)
    if dtype.is_signed:
        with pytest.raises(ValueError, match=r"\[0, 8\) or -1"):
            normalize_topk(torch.tensor([[-2, 0]]).to(dtype), torch.ones(1, 2), num_experts=8)


def test_ids_int32_outside_int32_is_an_error_value():
    i32min = -(2**31)
    assert ids_int32(torch.tensor([2**32 + 1, -5, 2**31, -(2**31) - 1])).tolist() == [i32min, -5, i32min, i32min]
    assert ids_int32(torch.tensor([2**32 + 1, 2**31, 7]).to(torch.uint64)).tolist() == [i32min, i32min, 7]
    assert ids_int32(torch.tensor([2**64 - 1], dtype=torch.uint64)).tolist() == [i32min]  # not -1 (a masked slot)
    assert ids_int32(torch.tensor([2**32 - 1], dtype=torch.uint32)).tolist() == [i32min]


def test_argument_types_are_checked():
    ids, w = torch.zeros(2, 2, dtype=torch.int32), torch.ones(2, 2)
    for bad in (True, 2.5, "8"):
        with pytest.raises(TypeError, match="num_experts must be an int"):
            normalize_topk(ids, w, num_experts=bad)
    with pytest.raises(ValueError, match="num_experts must be positive"):
        normalize_topk(ids, w, num_experts=0)
    for bad in (None, 2.0, True):
        with pytest.raises(TypeError, match="k must be an int"):
            topk_softmax(torch.randn(3, 8), bad)
    with pytest.raises(TypeError, match="e_score_correction_bias must be a torch.Tensor"):
        grouped_topk(torch.randn(3, 8), 2, e_score_correction_bias=[0.0] * 8, n_group=4, topk_group=2)
    with pytest.raises(TypeError, match="n_group must be an int"):
        grouped_topk(torch.randn(3, 8), 2, e_score_correction_bias=None, n_group=4.0, topk_group=2)
