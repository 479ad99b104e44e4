"""moecomm.moe / moecomm.moe: routing, expert weights under EP, expert compute.

* the float32 reference vs an independent float64 computation, one token and one expert at a time;
* the grouped backend (and the emulated FP8 one) vs the reference;
* the numerics contract: quantizing inside experts_forward (input_format) is bit-identical to passing
  tokens quantized before the gather, and NVFP4 / FP8 tokens behave exactly as their dequantized values;
* the Triton kernels (interpreter on CPU) vs their torch versions;
* GPU tests at DeepSeek-V3 shapes (marked ``gpu``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re

import pytest
import torch
import torch.nn.functional as F

from moecomm import moe, quant
from moecomm.moe import (
    Activation,
    WeightFormat,
    ep_partition,
    experts_forward,
    experts_forward_ref,
    grouped_topk,
    make_expert_weights,
    normalize_topk,
    topk_softmax,
)
from moecomm.moe import _kernels as _moe_triton
from moecomm.moe import experts as moe_experts
from moecomm.quant import QuantFormat, QuantizedTensor
from moecomm.testing import assert_close, rel_error

# Tolerances (relative L2 error), by arithmetic:
REF_TOL = 1e-5  # float32 reference vs float64: float32 rounding only
BF16_TOL = 1e-2  # grouped backend vs reference: bf16 GEMM outputs and activations (measured ~4e-3 .. 6e-3)
FP8_TOL = 4e-2  # fp8 backend vs reference: + e4m3 re-quantization of the activation (measured ~2e-2)

TOKEN_FORMATS = [None, QuantFormat.NVFP4, QuantFormat.MXFP4, QuantFormat.FP8_TOKEN, QuantFormat.FP8_GROUP]
QUANT_FORMATS = TOKEN_FORMATS[1:]
H, I = 256, 80  # I = 80: partial 128 x 128 FP8 blocks; both multiples of 16 (NVFP4) and H of 128 (FP8_GROUP)
# (num_experts, k, num_tokens), k <= E: few to many experts, top-1 to top-8, no / one / odd / many tokens
ROUTING_GRID = [(e, k, t) for e, k, t in itertools.product((4, 8, 16), (1, 2, 8), (0, 1, 37, 300)) if k <= e]
FORMAT_GRID = list(itertools.product(WeightFormat, TOKEN_FORMATS, Activation))


def _fid(v):
    return "bf16" if v is None else getattr(v, "value", str(v))


# ----------------------------------------------------------------------------------------------------
# Problem construction and the independent float64 computation
# ----------------------------------------------------------------------------------------------------


def _weights(num_experts, activation=Activation.SILU, *, hidden=H, inter=I, bias=False, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    n13 = 2 * inter if activation is Activation.SILU else inter
    w13 = (torch.randn(num_experts, n13, hidden, generator=g) * hidden**-0.5).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, generator=g) * inter**-0.5).bfloat16()
    b13 = torch.randn(num_experts, n13, generator=g) * 0.1 if bias else None
    b2 = torch.randn(num_experts, hidden, generator=g) * 0.1 if bias else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(w13), to(w2), to(b13), to(b2)


def _tokens(num_tokens, *, hidden=H, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    if num_tokens:
        x[:, 3] *= 10  # an outlier channel
    return x.bfloat16().to(device)


def _gs(x):
    return quant.nvfp4_global_scale(x.float().abs().amax() if x.numel() else torch.zeros(()))


def _quantize(x, fmt):
    """Tokens as the dispatcher ships them: bf16, or quantized with a batch-wide NVFP4 global scale."""
    if fmt is None:
        return x
    return quant.quantize(x, fmt, global_scale=_gs(x) if fmt is QuantFormat.NVFP4 else None)


def _route(num_tokens, num_experts, k, *, seed=2, exclude=()):
    """Softmax top-k on random logits; experts in ``exclude`` are never picked."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    logits[:, list(exclude)] = float("-inf")
    return topk_softmax(logits, k)


def _qdq(w: torch.Tensor, fmt: WeightFormat) -> torch.Tensor:
    """``w [N, K]`` through ``fmt`` with moecomm.quant directly (block by block for FP8_BLOCK), float64."""
    if fmt is WeightFormat.BF16:
        return w.bfloat16().double()
    if fmt is WeightFormat.FP8_CHANNEL:
        return quant.dequantize_fp8(*quant.quantize_fp8(w, group_size=None)).double()
    if fmt is WeightFormat.NVFP4:
        gs = quant.nvfp4_global_scale(w.float().abs().amax())
        return quant.dequantize_nvfp4(*quant.quantize_nvfp4(w, gs), gs).double()
    out = torch.empty(w.shape, dtype=torch.float64)
    for i in range(0, w.shape[0], 128):
        for j in range(0, w.shape[1], 128):
            block = w[i : i + 128, j : j + 128]
            q, s = quant.quantize_fp8(block.reshape(1, -1), group_size=None)
            out[i : i + 128, j : j + 128] = quant.dequantize_fp8(q, s).view(block.shape).double()
    return out


def _dense_f64(x, ids, tw, w13, w2, b13, b2, activation, experts, fmt=WeightFormat.BF16):
    """Independent float64 MoE: loop over tokens and their k experts; only ``experts`` contribute."""
    x = (x.dequantize(torch.float64) if isinstance(x, QuantizedTensor) else x).double()
    w13 = {e: _qdq(w13[e], fmt) for e in experts}
    w2 = {e: _qdq(w2[e], fmt) for e in experts}
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e not in experts:
                continue
            h = w13[e] @ x[t] + (0 if b13 is None else b13[e].double())
            if activation is Activation.SILU:
                gate, up = h.chunk(2)
                a = gate * torch.sigmoid(gate) * up
            else:
                a = 0.5 * h * (1 + torch.erf(h / 2**0.5))
            out[t] += float(tw[t, j]) * (w2[e] @ a + (0 if b2 is None else b2[e].double()))
    return out


# ----------------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("renormalize", [True, False])
def test_topk_softmax(renormalize):
    logits = torch.randn(37, 8).bfloat16()
    ids, w = topk_softmax(logits, 3, renormalize=renormalize)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and ids.shape == w.shape == (37, 3)
    p = torch.softmax(logits.float(), dim=-1)
    expect = p.gather(1, ids.long())
    if renormalize:
        expect = expect / expect.sum(-1, keepdim=True)
        assert_close(w.sum(-1), torch.ones(37), rel=1e-6)
    assert_close(w, expect, rel=1e-6)
    assert (p.gather(1, ids.long()).min(-1).values >= p.topk(3).values[:, -1]).all()


def _logit(p):
    p = torch.tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p)).float()


def test_grouped_topk_hand_worked():
    # 8 experts in 4 groups of 2, keep 2 groups, k = 3. Sigmoid scores s and corrected scores c = s + bias:
    #   expert   0    1  |  2    3  |  4     5    |  6     7
    #   s       0.9  0.1 | 0.8  0.6 | 0.2   0.3   | 0.75  0.05
    #   bias    0    0   | 0    0   | 0.45  0.4   | 0     0
    #   c       0.9  0.1 | 0.8  0.6 | 0.65  0.7   | 0.75  0.05
    #   group   1.0      | 1.4      | 1.35        | 0.8          (sum of the top-2 c of each group)
    # Best groups: 1 and 2 -> allowed experts 2, 3, 4, 5; top-3 of c among them: 2 (0.8), 5 (0.7), 4 (0.65).
    # Expert 0 has the best score but its group loses. Weights are s, not c: 0.8, 0.3, 0.2 (sum 1.3),
    # renormalised and scaled by 2.5: 2.5 * [0.8, 0.3, 0.2] / 1.3.
    logits = _logit([0.9, 0.1, 0.8, 0.6, 0.2, 0.3, 0.75, 0.05])[None]
    bias = torch.tensor([0, 0, 0, 0, 0.45, 0.4, 0, 0])
    kw = dict(e_score_correction_bias=bias, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    ids, w = grouped_topk(logits, 3, **kw)
    assert ids.tolist() == [[2, 5, 4]] and ids.dtype == torch.int32
    assert_close(w, torch.tensor([[0.8, 0.3, 0.2]]) * 2.5 / 1.3, rel=1e-6)
    ids, w = grouped_topk(logits, 3, renormalize=False, **kw)
    assert_close(w, torch.tensor([[2.0, 0.75, 0.5]]), rel=1e-6)
    # Without the bias c = s: group scores 1.0, 1.4, 0.5, 0.8 -> groups 1 and 0 -> experts 0, 2, 3.
    ids, _ = grouped_topk(logits, 3, e_score_correction_bias=None, n_group=4, topk_group=2)
    assert ids.tolist() == [[0, 2, 3]]


def test_grouped_topk_all_groups_is_biased_sigmoid_topk():
    logits, bias = torch.randn(300, 16), 0.1 * torch.randn(16)
    ids, w = grouped_topk(logits, 4, e_score_correction_bias=bias, n_group=4, topk_group=4, renormalize=False)
    s = torch.sigmoid(logits)
    assert torch.equal(ids.long(), (s + bias).topk(4).indices)
    assert_close(w, s.gather(1, ids.long()), rel=0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_group=3, topk_group=1),  # 8 experts do not split into 3 groups
        dict(n_group=8, topk_group=1),  # groups of one expert (the top-2 group score needs two)
        dict(n_group=4, topk_group=5),  # more groups kept than exist
        dict(n_group=4, topk_group=1),  # k = 3 > 1 group of 2 experts
    ],
)
def test_grouped_topk_rejects_bad_groups(kw):
    with pytest.raises(ValueError):
        grouped_topk(torch.randn(5, 8), 3, e_score_correction_bias=None, **kw)


def test_routing_rejects_bad_inputs():
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        grouped_topk(torch.randn(5, 8), 2, e_score_correction_bias=torch.zeros(7), n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="k=9"):
        topk_softmax(torch.randn(5, 8), 9)
    with pytest.raises(ValueError, match="floating"):
        topk_softmax(torch.zeros(5, 8, dtype=torch.int64), 2)


def test_normalize_topk():
    ids64 = torch.tensor([[0, 3], [7, 1]])
    ids, w = normalize_topk(ids64, torch.ones(2, 2, dtype=torch.bfloat16), num_experts=8)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and ids.tolist() == ids64.tolist()
    for bad in (torch.tensor([[0, 8]]), torch.tensor([[-2, 0]]), torch.tensor([[2**32 + 1, 0]])):
        with pytest.raises(ValueError, match=r"\[0, 8\) or -1"):
            normalize_topk(bad, torch.ones(1, 2), num_experts=8)
    masked, _ = normalize_topk(torch.tensor([[-1, 0]]), torch.ones(1, 2), num_experts=8)  # -1: a masked slot
    assert masked.tolist() == [[-1, 0]]
    with pytest.raises(ValueError, match="integer"):
        normalize_topk(torch.zeros(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="floating"):
        normalize_topk(ids64, torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="num_tokens, k"):
        normalize_topk(ids64, torch.ones(2, 3))


# ----------------------------------------------------------------------------------------------------
# Weights and the EP partition
# ----------------------------------------------------------------------------------------------------


def test_ep_partition():
    assert [ep_partition(256, 8, r) for r in (0, 1, 7)] == [(0, 32), (32, 32), (224, 32)]
    assert ep_partition(4, 1, 0) == (0, 4)
    for args in [(10, 4, 0), (8, 4, 4), (8, 4, -1), (8, 0, 0)]:
        with pytest.raises(ValueError):
            ep_partition(*args)


@pytest.mark.parametrize("fmt", list(WeightFormat), ids=_fid)
def test_make_expert_weights_slices_then_quantizes(fmt):
    w13, w2, b13, b2 = _weights(8, bias=True)
    full = make_expert_weights(w13, w2, format=fmt, b13=b13, b2=b2)
    full13, full2 = full.dequantize()
    for rank in range(4):
        mine = make_expert_weights(w13, w2, ep_size=4, ep_rank=rank, format=fmt, b13=b13, b2=b2)
        assert (mine.first_expert, mine.num_local, mine.num_experts) == (2 * rank, 2, 8)
        assert (mine.hidden_size, mine.intermediate_size, mine.format) == (H, I, fmt)
        m13, m2 = mine.dequantize()
        assert_close(m13, full13[2 * rank : 2 * rank + 2], rel=0)  # quantization is per expert
        assert_close(m2, full2[2 * rank : 2 * rank + 2], rel=0)
        assert_close(mine.b2, b2[2 * rank : 2 * rank + 2], rel=0)
    # the stored format matches an independent quantize-dequantize with moecomm.quant
    assert_close(full13[5].double(), _qdq(w13[5], fmt), rel=0)
    assert_close(full2[3].double(), _qdq(w2[3], fmt), rel=0)


def test_make_expert_weights_rejects_bad_inputs():
    w13, w2, _, _ = _weights(8)
    with pytest.raises(ValueError, match="multiple of ep_size"):
        make_expert_weights(w13, w2, ep_size=3)
    with pytest.raises(ValueError, match="gelu"):
        make_expert_weights(w13, w2, activation=Activation.GELU)  # w13 has 2I rows
    with pytest.raises(ValueError, match="must be \\[E, N13, H\\]"):
        make_expert_weights(w13, w2[:4])
    with pytest.raises(ValueError, match="per expert"):
        make_expert_weights(w13, w2, b2=torch.zeros(H))  # a dense FFN's [H] bias
    with pytest.raises(ValueError, match="multiples of 16"):
        make_expert_weights(w13[:, :, :40], w2[:, :40], format=WeightFormat.NVFP4)
    with pytest.raises(ValueError):
        make_expert_weights(w13, w2, format="int4")


@pytest.mark.parametrize("fmt", list(WeightFormat), ids=_fid)
def test_make_expert_weights_accepts_only_sizes_the_kernels_run(fmt):
    """H and I must be multiples of 8 (bf16 rows of 16 bytes for torch._grouped_mm, which every format may run)
    or 16 (FP8_CHANNEL: torch._scaled_grouped_mm; NVFP4: 16-blocks). bf16 H = 100 used to be accepted and then
    fail inside torch._grouped_mm ("strides should be multiple of 16 bytes")."""
    m = 16 if fmt in (WeightFormat.FP8_CHANNEL, WeightFormat.NVFP4) else 8
    assert moe.SIZE_MULTIPLE[fmt] == m
    for h, i in [(100, m), (m, m + 4), (m + m // 2, 2 * m)]:
        w13, w2, _, _ = _weights(4, hidden=h, inter=i)
        with pytest.raises(ValueError, match=f"multiples of {m} .*got H={h}, I={i}; multiples per weight format: "
                                             "bf16 8, fp8-block 8, fp8-channel 16, nvfp4 16"):
            make_expert_weights(w13, w2, format=fmt)
    # the smallest accepted sizes run on the grouped backend and agree with the reference
    w13, w2, _, _ = _weights(4, hidden=m, inter=m)
    weights = make_expert_weights(w13, w2, format=fmt)
    x = _tokens(9, hidden=m)
    ids, tw = _route(9, 4, 2)
    out = experts_forward(x, ids, tw, weights, backend="grouped")
    assert_close(out, experts_forward_ref(x, ids, tw, weights), rel=BF16_TOL)


# ----------------------------------------------------------------------------------------------------
# Reference vs the independent float64 computation
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts,k,num_tokens", ROUTING_GRID)
def test_reference_vs_dense_routing_grid(num_experts, k, num_tokens):
    w13, w2, _, _ = _weights(num_experts, hidden=128, inter=32)
    x = _tokens(num_tokens, hidden=128)
    ids, tw = _route(num_tokens, num_experts, k)
    ep = 2
    total = torch.zeros(num_tokens, 128, dtype=torch.float64)
    for rank in range(ep):
        mine = make_expert_weights(w13, w2, ep_size=ep, ep_rank=rank)
        experts = range(mine.first_expert, mine.first_expert + mine.num_local)
        ref = experts_forward_ref(x, ids, tw, mine)
        assert ref.dtype == torch.float32 and ref.shape == (num_tokens, 128)
        dense = _dense_f64(x, ids, tw, w13, w2, None, None, Activation.SILU, experts)
        assert_close(ref, dense, rel=REF_TOL, name=f"rank {rank}")
        assert_close(experts_forward(x, ids, tw, mine), dense, rel=BF16_TOL, name=f"grouped rank {rank}")
        total += dense
    everything = make_expert_weights(w13, w2)
    assert_close(experts_forward_ref(x, ids, tw, everything), total, rel=REF_TOL, name="sum over ranks")


@pytest.mark.parametrize("wfmt,tfmt,act", FORMAT_GRID, ids=lambda v: _fid(v))
def test_reference_vs_dense_formats(wfmt, tfmt, act):
    """Every weight format x token format x activation, 4 EP ranks; rank 3 owns experts no token picked."""
    bias = act is Activation.GELU
    w13, w2, b13, b2 = _weights(8, act, bias=bias)
    x = _quantize(_tokens(37), tfmt)
    ids, tw = _route(37, 8, 2, exclude=(6, 7))
    for rank in range(4):
        mine = make_expert_weights(w13, w2, ep_size=4, ep_rank=rank, format=wfmt, activation=act, b13=b13, b2=b2)
        experts = range(mine.first_expert, mine.first_expert + mine.num_local)
        ref = experts_forward_ref(x, ids, tw, mine)
        assert_close(ref, _dense_f64(x, ids, tw, w13, w2, b13, b2, act, experts, wfmt), rel=REF_TOL)
        out = experts_forward(x, ids, tw, mine)
        assert out.dtype == torch.bfloat16
        if rank == 3:
            assert not out.any() and not ref.any()
        else:
            assert_close(out, ref, rel=BF16_TOL, name=f"grouped rank {rank}")


@pytest.mark.parametrize("act", list(Activation), ids=_fid)
@pytest.mark.parametrize("wfmt", [WeightFormat.BF16, WeightFormat.NVFP4], ids=_fid)
def test_biases(act, wfmt):
    """b13 before the activation, b2 per expert scaled by the routing weight; k = 8 of 16, EP 2."""
    w13, w2, b13, b2 = _weights(16, act, bias=True)
    x = _tokens(300)
    ids, tw = _route(300, 16, 8)
    for rank in range(2):
        mine = make_expert_weights(w13, w2, ep_size=2, ep_rank=rank, format=wfmt, activation=act, b13=b13, b2=b2)
        experts = range(mine.first_expert, mine.first_expert + mine.num_local)
        ref = experts_forward_ref(x, ids, tw, mine)
        assert_close(ref, _dense_f64(x, ids, tw, w13, w2, b13, b2, act, experts, wfmt), rel=REF_TOL)
        assert_close(experts_forward(x, ids, tw, mine), ref, rel=BF16_TOL)


def test_dense_gelu_ffn_split_into_experts_is_exact():
    """BERT's FFN ``W2 gelu(W1 x + b1) + b2`` split along I into 4 experts, all at weight 1, over 2 ranks."""
    g = torch.Generator().manual_seed(3)
    hidden, inter, num_experts = 64, 256, 4
    w1 = torch.randn(inter, hidden, generator=g) / hidden**0.5
    b1 = torch.randn(inter, generator=g) * 0.1
    w2 = torch.randn(hidden, inter, generator=g) / inter**0.5
    b2 = torch.randn(hidden, generator=g) * 0.1
    x = torch.randn(37, hidden, generator=g)
    dense = F.linear(F.gelu(F.linear(x.double(), w1.double(), b1.double())), w2.double(), b2.double())
    ie = inter // num_experts
    w13 = w1.view(num_experts, ie, hidden)
    b13 = b1.view(num_experts, ie)
    w2e = w2.view(hidden, num_experts, ie).permute(1, 0, 2)
    ids = torch.arange(num_experts).expand(37, num_experts)
    tw = torch.ones(37, num_experts)
    expert0_b2 = torch.zeros(num_experts, hidden)
    expert0_b2[0] = b2
    kw = dict(format=WeightFormat.BF16, activation=Activation.GELU, b13=b13, ep_size=2)
    # bf16 weights: compare with the dense FFN on the same bf16-rounded weights
    dense_bf16w = F.linear(
        F.gelu(F.linear(x.double(), w1.bfloat16().double(), b1.double())), w2.bfloat16().double(), b2.double()
    )
    none_b2 = sum(experts_forward_ref(x, ids, tw, make_expert_weights(w13, w2e, ep_rank=r, **kw)) for r in (0, 1))
    assert_close(none_b2 + b2, dense_bf16w, rel=REF_TOL, name="b2=None, dense bias added once")
    row0 = sum(experts_forward_ref(x, ids, tw, make_expert_weights(w13, w2e, ep_rank=r, b2=expert0_b2, **kw)) for r in (0, 1))
    assert_close(row0, dense_bf16w, rel=REF_TOL, name="dense bias given to expert 0")
    grouped = sum(experts_forward(x, ids, tw, make_expert_weights(w13, w2e, ep_rank=r, **kw)).double() for r in (0, 1))
    assert_close(grouped + b2, dense, rel=BF16_TOL, name="grouped backend")


# ----------------------------------------------------------------------------------------------------
# The numerics contract
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "grouped", "reference"])
@pytest.mark.parametrize("tfmt", QUANT_FORMATS, ids=_fid)
def test_input_format_is_bit_identical_to_prequantized(tfmt, backend):
    w13, w2, _, _ = _weights(8)
    weights = make_expert_weights(w13, w2, ep_size=2, ep_rank=1)
    x = _tokens(37)
    ids, tw = _route(37, 8, 2)
    gs = _gs(x) if tfmt is QuantFormat.NVFP4 else None
    q = quant.quantize(x, tfmt, global_scale=gs)
    pre = experts_forward(q, ids, tw, weights, backend=backend)
    inside = experts_forward(x, ids, tw, weights, input_format=tfmt, global_scale=gs, backend=backend)
    assert_close(inside, pre, rel=0)
    # ... and quantized tokens are their dequantized values, exactly (the permute dequantizes in float32)
    assert_close(pre, experts_forward(q.dequantize(torch.float32), ids, tw, weights, backend=backend), rel=0)
    # vs the bf16 tokens: the error is the tokens' quantization error, amplified a little by the MLP
    token_err = rel_error(q.dequantize(torch.float32), x.float())
    assert_close(pre, experts_forward(x, ids, tw, weights, backend=backend), rel=2 * token_err)



def test_nvfp4_global_scale_as_a_number_or_a_one_element_tensor():
    """experts_forward takes the NVFP4 global scale in every form its docstring names, with the same result."""
    w13, w2, _, _ = _weights(8)
    weights = make_expert_weights(w13, w2, ep_size=2, ep_rank=0)
    x = _tokens(19)
    ids, tw = _route(19, 8, 2)
    gs = _gs(x)
    want = experts_forward(quant.quantize(x, QuantFormat.NVFP4, global_scale=gs), ids, tw, weights)
    assert want.abs().sum() > 0
    for form in (gs, gs.reshape(1), float(gs)):
        got = experts_forward(x, ids, tw, weights, input_format=QuantFormat.NVFP4, global_scale=form)
        assert_close(got, want, rel=0)


def test_input_format_fp8_backend():
    w13, w2, _, _ = _weights(8)
    weights = make_expert_weights(w13, w2, ep_size=2, ep_rank=0, format=WeightFormat.FP8_CHANNEL)
    x = _tokens(37)
    ids, tw = _route(37, 8, 2)
    q = quant.quantize(x, QuantFormat.FP8_TOKEN)
    pre = experts_forward(q, ids, tw, weights, backend="fp8")
    inside = experts_forward(x, ids, tw, weights, input_format=QuantFormat.FP8_TOKEN, backend="fp8")
    assert_close(inside, pre, rel=0)
    assert_close(pre, experts_forward_ref(q, ids, tw, weights), rel=FP8_TOL)


@pytest.mark.parametrize("tfmt", TOKEN_FORMATS, ids=_fid)
def test_rows_are_independent(tfmt):
    """Experts on a concatenation of token batches == the concatenation of the results, bit for bit."""
    w13, w2, _, _ = _weights(8)
    weights = make_expert_weights(w13, w2, ep_size=2, ep_rank=0)
    x = _tokens(48)
    ids, tw = _route(48, 8, 2)
    gs = _gs(x) if tfmt is QuantFormat.NVFP4 else None  # one scale shared by all batches

    def run(rows):
        return experts_forward(x[rows], ids[rows], tw[rows], weights, input_format=tfmt, global_scale=gs)

    whole = run(slice(0, 48))
    parts = torch.cat([run(slice(0, 37)), run(slice(37, 38)), run(slice(38, 48))])
    assert_close(parts, whole, rel=0)


def _strided(q: QuantizedTensor) -> QuantizedTensor:
    """The same tokens as row-strided views of one gathered byte buffer ``[T, data | scales | pad]``."""
    data, scales = q.data.view(torch.uint8), q.scales.contiguous().view(torch.uint8)
    buf = torch.zeros(q.rows, data.shape[1] + scales.shape[1] + 16, dtype=torch.uint8, device=data.device)
    buf[:, : data.shape[1]] = data
    buf[:, data.shape[1] : data.shape[1] + scales.shape[1]] = scales
    d = buf[:, : data.shape[1]].view(q.data.dtype)
    s = buf[:, data.shape[1] : data.shape[1] + scales.shape[1]].view(q.scales.dtype)
    return dataclasses.replace(q, data=d, scales=s)


@pytest.mark.parametrize("tfmt", QUANT_FORMATS, ids=_fid)
def test_row_strided_quantized_tokens(tfmt):
    w13, w2, _, _ = _weights(8)
    weights = make_expert_weights(w13, w2)
    q = _quantize(_tokens(37), tfmt)
    s = _strided(q)
    assert not s.data.is_contiguous()
    ids, tw = _route(37, 8, 2)
    assert_close(experts_forward(s, ids, tw, weights), experts_forward(q, ids, tw, weights), rel=0)


# ----------------------------------------------------------------------------------------------------
# Backends, edge cases and errors
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", list(Activation), ids=_fid)
def test_fp8_backend_emulated_vs_reference(act):
    w13, w2, b13, b2 = _weights(8, act, bias=act is Activation.GELU)
    weights = make_expert_weights(w13, w2, ep_size=2, format=WeightFormat.FP8_CHANNEL, activation=act, b13=b13, b2=b2)
    q = quant.quantize(_tokens(300), QuantFormat.FP8_TOKEN)
    ids, tw = _route(300, 8, 2)
    out = experts_forward(q, ids, tw, weights, backend="fp8")
    assert_close(out, experts_forward_ref(q, ids, tw, weights), rel=FP8_TOL)
    assert not torch.equal(out, experts_forward(q, ids, tw, weights, backend="grouped"))  # really another path
    assert not experts_forward(q, ids % 4 + 4, tw, weights, backend="fp8").any()  # rank 1's experts only


ZERO_TOKEN_CASES = [
    (b, f) for b in ("auto", "grouped", "reference", "fp8") for f in TOKEN_FORMATS
    if b != "fp8" or f is QuantFormat.FP8_TOKEN
]


@pytest.mark.parametrize("backend,tfmt", ZERO_TOKEN_CASES, ids=_fid)
def test_zero_tokens(backend, tfmt):
    weights = make_expert_weights(*_weights(4, hidden=128, inter=32)[:2], format=WeightFormat.FP8_CHANNEL)
    x = _quantize(torch.zeros(0, 128, dtype=torch.bfloat16), tfmt)
    ids, tw = torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2)
    out = experts_forward(x, ids, tw, weights, backend=backend)
    assert out.shape == (0, 128) and out.dtype == torch.bfloat16
    assert experts_forward_ref(x, ids, tw, weights).shape == (0, 128)


def test_int64_ids_and_out():
    w13, w2, _, _ = _weights(8)
    weights = make_expert_weights(w13, w2, ep_size=2, ep_rank=1)
    x = _tokens(37)
    ids, tw = _route(37, 8, 2)
    expect = experts_forward(x, ids, tw, weights)
    out = torch.full((37, H), float("nan"), dtype=torch.bfloat16)
    got = experts_forward(x, ids.long(), tw.double(), weights, out=out)
    assert got is out
    assert_close(out, expect, rel=0)
    assert_close(experts_forward(x, ids, tw, weights, backend="reference"), experts_forward_ref(x, ids, tw, weights).bfloat16(), rel=0)


def test_make_expert_weights_argument_checks():
    with pytest.raises(ValueError, match="must be positive, got H=8, I=0"):
        make_expert_weights(torch.randn(2, 0, 8), torch.randn(2, 8, 0))
    with pytest.raises(ValueError, match="must be positive, got H=0, I=8"):
        make_expert_weights(torch.randn(2, 16, 0), torch.randn(2, 0, 8))
    w13, w2, _, _ = _weights(2)
    with pytest.raises(TypeError, match="b2 must be a torch.Tensor"):
        make_expert_weights(w13, w2, b2=[[0.0] * H] * 2)
    with pytest.raises(TypeError, match="b13 must be a torch.Tensor"):
        make_expert_weights(w13, w2, b13=1.0)
    with pytest.raises(TypeError, match="w13 must be a torch.Tensor"):
        make_expert_weights(w13.tolist(), w2)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.uint8], ids=str)
def test_small_integer_ids(dtype):
    """Any integer dtype of topk_ids (int8 / int16 crashed in ids_int32); -1 slots stay masked."""
    w13, w2, _, _ = _weights(8)
    weights = make_expert_weights(w13, w2, ep_size=2, ep_rank=1)
    x = _tokens(9)
    ids, tw = _route(9, 8, 2)
    if dtype.is_signed:
        ids[1, 1] = ids[4, 0] = -1
    expect = experts_forward(x, ids, tw, weights)
    for validate in (False, True):
        assert_close(experts_forward(x, ids.to(dtype), tw, weights, validate=validate), expect, rel=0)
    assert_close(experts_forward_ref(x, ids.to(dtype), tw, weights), experts_forward_ref(x, ids, tw, weights), rel=0)


def test_errors():
    w13, w2, _, _ = _weights(8)
    weights = make_expert_weights(w13, w2, ep_size=2, ep_rank=1)
    x = _tokens(5)
    ids, tw = _route(5, 8, 2)
    bad_ids = ids.clone()
    bad_ids[2, 1] = 8
    with pytest.raises(ValueError, match=r"\[0, 8\) or -1"):
        experts_forward(x, bad_ids, tw, weights, validate=True)
    with pytest.raises(ValueError, match=r"\[0, 8\) or -1"):
        experts_forward_ref(x, -ids - 2, tw, weights, validate=True)
    with pytest.raises(ValueError, match="backend"):
        experts_forward(x, ids, tw, weights, backend="cutlass")
    with pytest.raises(ValueError, match="FP8_TOKEN tokens and FP8_CHANNEL"):
        experts_forward(x, ids, tw, weights, backend="fp8")
    with pytest.raises(ValueError, match="rows"):
        experts_forward(x[:4], ids, tw, weights)
    with pytest.raises(ValueError, match="rows"):
        experts_forward(x[:, :128], ids, tw, weights)
    with pytest.raises(TypeError):
        experts_forward(x.to(torch.int32), ids, tw, weights)
    with pytest.raises(ValueError, match="out must be"):
        experts_forward(x, ids, tw, weights, out=torch.empty(5, H))
    q = _quantize(x, QuantFormat.NVFP4)
    with pytest.raises(ValueError, match="carries its own"):
        experts_forward(q, ids, tw, weights, global_scale=q.global_scale)
    with pytest.raises(ValueError, match="input_format"):
        experts_forward(q, ids, tw, weights, input_format=QuantFormat.FP8_GROUP)
    with pytest.raises(ValueError, match="without input_format"):
        experts_forward(x, ids, tw, weights, global_scale=q.global_scale)


def test_tensors_on_different_devices_raise():
    weights = make_expert_weights(*_weights(8)[:2], ep_size=2, ep_rank=1)
    x = _tokens(5)
    q = _quantize(x, QuantFormat.NVFP4)
    ids, tw = _route(5, 8, 2)
    meta = torch.device("meta")
    cases = [
        ((x, ids.to(meta), tw.to(meta), weights), "topk_ids on meta"),
        ((dataclasses.replace(q, scales=q.scales.to(meta)), ids, tw, weights), "tokens.scales on meta"),
        ((dataclasses.replace(q, global_scale=q.global_scale.to(meta)), ids, tw, weights), "tokens.global_scale on meta"),
        ((x, ids, tw, dataclasses.replace(weights, w2=weights.w2.to(meta))), "weights.w2 on meta"),
    ]
    for fn in (experts_forward, experts_forward_ref):
        for args, where in cases:
            with pytest.raises(ValueError, match=f"{fn.__name__}: tensors must be on one device, .*{where}"):
                fn(*args)


# ----------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU) vs their torch versions
# ----------------------------------------------------------------------------------------------------


def _plan_case(act=Activation.SILU, bias=False, num_tokens=37, k=3, device="cpu"):
    w13, w2, b13, b2 = _weights(8, act, bias=bias, device=device)
    weights = make_expert_weights(w13, w2, ep_size=2, ep_rank=1, activation=act, b13=b13, b2=b2)
    ids, tw = _route(num_tokens, 8, k)
    plan = moe_experts._plan(ids.to(device), weights.first_expert, weights.num_local, 8)
    m = int(plan.end)
    assert 0 < m < num_tokens * k  # some padding rows
    return weights, plan, tw.to(device), m


# (T, k, num_experts, first local expert, num_local); the last: no pair is local
PLAN_CASES = [(37, 3, 8, 4, 4), (300, 8, 16, 0, 16), (1, 1, 4, 2, 2), (1000, 8, 256, 32, 32), (200, 8, 256, 0, 256),
              (50, 2, 8, 6, 2)]


def _distinct_ids(num_tokens, k, num_experts, exclude=(), device="cpu"):
    """k distinct experts per token, none of ``exclude``."""
    g = torch.Generator().manual_seed(4)
    pool = torch.tensor([e for e in range(num_experts) if e not in exclude])
    picks = torch.rand(num_tokens, len(pool), generator=g).argsort(dim=1)[:, :k]
    return pool[picks].to(device=device, dtype=torch.int32)


def _check_plan(ids, first, num_local, num_experts):
    got = _moe_triton.plan(ids, first, num_local, num_experts)
    for name, a, b in zip(("src_rows", "row_expert", "offs", "inv"), got, moe_experts._plan_torch(ids, first, num_local)):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("num_tokens,k,num_experts,first,num_local", PLAN_CASES)
def test_triton_plan(num_tokens, k, num_experts, first, num_local):
    exclude = (6, 7) if first == 6 else ()
    _check_plan(_distinct_ids(num_tokens, k, num_experts, exclude), first, num_local, num_experts)


def _check_permute_kernels(tokens, plan, m):
    """The Triton permute kernels on rows below ``end`` vs the torch permute (bit for bit)."""
    if isinstance(tokens, QuantizedTensor):
        got = _moe_triton.permute_dequant(tokens, plan.src_rows, plan.end)
        rows = plan.src_rows[:m].long()
        codes = _moe_triton.gather_rows(tokens.data, plan.src_rows, plan.end)[:m]
        assert torch.equal(codes.view(torch.uint8), tokens.data.view(torch.uint8)[rows])
    else:
        got = _moe_triton.gather_rows(tokens, plan.src_rows, plan.end)
    assert_close(got[:m], moe_experts._permute_torch(tokens, plan)[:m], rel=0)


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("tfmt", [None, *_moe_triton._PERMUTE_FORMATS], ids=_fid)
def test_triton_permute(tfmt, strided):
    _, plan, _, m = _plan_case()
    tokens = _quantize(_tokens(37), tfmt)
    if strided:
        tokens = _strided(tokens) if tfmt else torch.zeros(37, H + 8, dtype=torch.bfloat16)[:, :H].copy_(tokens)
    assert tfmt is None or _moe_triton.permute_supported(tokens)
    _check_permute_kernels(tokens, plan, m)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act", list(Activation), ids=_fid)
def test_triton_activation(act, bias):
    weights, plan, _, m = _plan_case(act, bias)
    h = torch.randn(plan.src_rows.shape[0], weights.w13.shape[1]).bfloat16() * 3
    got = _moe_triton.activation(h, weights.b13, plan.row_expert, plan.end, gated=act is Activation.SILU)
    # exp / erf differ in the last float32 bit between numpy and torch: at most one bf16 rounding step
    assert_close(got[:m], moe_experts._act_torch(h, plan, weights)[:m], rel=2e-3)


@pytest.mark.parametrize("bias", [False, True])
def test_triton_unpermute(bias):
    weights, plan, tw, _ = _plan_case(bias=bias)
    y = torch.randn(plan.src_rows.shape[0], H).bfloat16()
    got = _moe_triton.unpermute(y, plan.inv, tw, weights.b2, plan.local_ids, torch.empty(37, H, dtype=torch.bfloat16))
    expect = moe_experts._unpermute_torch(y, plan, tw, weights.b2, torch.empty(37, H, dtype=torch.bfloat16))
    assert_close(got, expect, rel=0)


def test_every_kernel_launch_runs_in_the_device_guard_of_its_tensors(monkeypatch):
    """Each Triton launch (recorded by wrapping the kernels) happens inside ``device_guard`` (recorded by a
    stand-in) of the device of all its tensor arguments. Triton on the CPU tensors via the interpreter."""
    guards, launches = [], []

    @contextlib.contextmanager
    def recording_guard(device):
        guards.append(device)
        try:
            yield
        finally:
            guards.pop()

    class Recorded:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                devices = {a.device for a in args if isinstance(a, torch.Tensor)}
                launches.append((self.name, guards[-1] if guards else None, devices))
                return self.kernel[grid](*args, **kwargs)

            return launch

    kernels = {name for name in vars(_moe_triton) if name.endswith("_kernel")}
    for name in kernels:
        monkeypatch.setattr(_moe_triton, name, Recorded(name, getattr(_moe_triton, name)))
    monkeypatch.setattr(_moe_triton, "device_guard", recording_guard)
    # every entry point, as the CUDA path of experts_forward calls them
    weights, _, tw, _ = _plan_case(bias=True)
    ids, _ = _route(37, 8, 3)
    src_rows, row_expert, offs, inv = _moe_triton.plan(ids, weights.first_expert, weights.num_local, 8)
    end, rows = offs[-1:], src_rows.shape[0]
    x = _tokens(37)
    _moe_triton.permute_dequant(_quantize(x, QuantFormat.NVFP4), src_rows, end)
    _moe_triton.gather_rows(x, src_rows, end)
    h = torch.randn(rows, weights.w13.shape[1]).bfloat16()
    _moe_triton.activation(h, weights.b13, row_expert, end, gated=True)
    y = torch.randn(rows, H).bfloat16()
    _moe_triton.unpermute(y, inv, tw, weights.b2, ids - weights.first_expert, torch.empty(37, H, dtype=torch.bfloat16))
    assert {name for name, _, _ in launches} == kernels
    for name, guard, devices in launches:
        assert devices == {guard}, (name, guard, devices)


# ----------------------------------------------------------------------------------------------------
# GPU: DeepSeek-V3 shapes (H=7168, I=2048, 256 experts, top-8, EP 8 -> 32 local experts)
# ----------------------------------------------------------------------------------------------------

DSV3 = dict(hidden=7168, inter=2048, experts=256, k=8, ep=8)


@pytest.fixture(scope="module")
def dsv3():
    """Rank 1's 32 experts (bf16 and FP8 per channel), 512 tokens routed with grouped top-k."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    n_local, h, i = DSV3["experts"] // DSV3["ep"], DSV3["hidden"], DSV3["inter"]
    w13 = (torch.randn(n_local, 2 * i, h, device=dev, generator=g) * h**-0.5).bfloat16()
    w2 = (torch.randn(n_local, h, i, device=dev, generator=g) * i**-0.5).bfloat16()
    weights = {
        fmt: dataclasses.replace(make_expert_weights(w13, w2, format=fmt), first_expert=n_local, num_experts=DSV3["experts"])
        for fmt in (WeightFormat.BF16, WeightFormat.FP8_CHANNEL, WeightFormat.NVFP4)
    }
    x = torch.randn(512, h, device=dev, generator=g).bfloat16()
    logits = torch.randn(512, DSV3["experts"], device=dev, generator=g)
    bias = 0.1 * torch.randn(DSV3["experts"], device=dev, generator=g)
    ids, tw = grouped_topk(logits, 8, e_score_correction_bias=bias, n_group=8, topk_group=4, routed_scaling_factor=2.5)
    return weights, x, ids, tw


GPU_CASES = [
    (WeightFormat.BF16, None, "grouped", BF16_TOL),
    (WeightFormat.BF16, QuantFormat.NVFP4, "grouped", BF16_TOL),
    (WeightFormat.BF16, QuantFormat.FP8_GROUP, "grouped", BF16_TOL),
    (WeightFormat.NVFP4, QuantFormat.NVFP4, "grouped", BF16_TOL),
    (WeightFormat.FP8_CHANNEL, QuantFormat.FP8_TOKEN, "grouped", BF16_TOL),
    (WeightFormat.FP8_CHANNEL, QuantFormat.FP8_TOKEN, "fp8", FP8_TOL),
]


@pytest.mark.gpu
@pytest.mark.parametrize("wfmt,tfmt,backend,tol", GPU_CASES, ids=lambda v: _fid(v))
def test_gpu_dsv3_vs_reference(dsv3, wfmt, tfmt, backend, tol):
    weights, x, ids, tw = dsv3
    tokens = _quantize(x, tfmt)
    ref = experts_forward_ref(tokens, ids, tw, weights[wfmt])
    out = experts_forward(tokens, ids, tw, weights[wfmt], backend=backend)
    assert_close(out, ref, rel=tol)
    if tfmt is QuantFormat.FP8_TOKEN and wfmt is WeightFormat.FP8_CHANNEL:
        assert moe_experts._pick_backend("auto", tokens, weights[wfmt]) == "fp8"  # native on sm90


@pytest.mark.gpu
@pytest.mark.parametrize("tfmt", [QuantFormat.NVFP4, QuantFormat.FP8_GROUP, QuantFormat.FP8_TOKEN], ids=_fid)
def test_gpu_input_format_contract(dsv3, tfmt):
    weights, x, ids, tw = dsv3
    wfmt = WeightFormat.FP8_CHANNEL if tfmt is QuantFormat.FP8_TOKEN else WeightFormat.BF16
    gs = _gs(x) if tfmt is QuantFormat.NVFP4 else None
    q = quant.quantize(x, tfmt, global_scale=gs)
    pre = experts_forward(q, ids, tw, weights[wfmt])
    assert_close(experts_forward(x, ids, tw, weights[wfmt], input_format=tfmt, global_scale=gs), pre, rel=0)
    if wfmt is WeightFormat.BF16:  # the permute kernel dequantizes exactly as moecomm.quant does
        assert_close(experts_forward(q.dequantize(torch.float32), ids, tw, weights[wfmt]), pre, rel=0)


@pytest.mark.gpu
@pytest.mark.parametrize("act", list(Activation), ids=_fid)
def test_gpu_kernels_match_torch(act):
    """The compiled kernels vs the torch steps, incl. row-strided quantized tokens and biases."""
    weights, plan, tw, m = _plan_case(act, bias=True, num_tokens=300, k=8, device="cuda")
    _check_plan(_distinct_ids(16384, 8, 256, device="cuda"), 32, 32, 256)  # EP 8
    _check_plan(_distinct_ids(4096, 8, 256, device="cuda"), 0, 256, 256)  # no EP: 512 histogram bins
    x = _tokens(300, device="cuda")
    for tfmt in [None, *_moe_triton._PERMUTE_FORMATS]:
        tokens = _quantize(x, tfmt)
        _check_permute_kernels(_strided(tokens) if tfmt else tokens, plan, m)
    h = torch.randn(plan.src_rows.shape[0], weights.w13.shape[1], device="cuda").bfloat16() * 3
    got = _moe_triton.activation(h, weights.b13, plan.row_expert, plan.end, gated=act is Activation.SILU)
    assert_close(got[:m], moe_experts._act_torch(h, plan, weights)[:m], rel=2e-3)
    y = torch.randn(plan.src_rows.shape[0], H, device="cuda").bfloat16()
    out = torch.empty(300, H, device="cuda", dtype=torch.bfloat16)
    got = _moe_triton.unpermute(y, plan.inv, tw, weights.b2, plan.local_ids, out.clone())
    assert_close(got, moe_experts._unpermute_torch(y, plan, tw, weights.b2, out.clone()), rel=1e-3)  # FMA contraction


@pytest.mark.gpu
def test_gpu_rows_are_independent(dsv3):
    """Documents whether the CUDA grouped GEMM depends on the batch composition (docs/experts.md)."""
    weights, x, ids, tw = dsv3
    w = weights[WeightFormat.BF16]
    whole = experts_forward(x, ids, tw, w)
    parts = torch.cat([experts_forward(x[a:b], ids[a:b], tw[a:b], w) for a, b in [(0, 37), (37, 38), (38, 512)]])
    assert_close(parts, whole, rel=0)


@pytest.mark.gpu
@pytest.mark.parametrize("wfmt,tfmt", [(WeightFormat.BF16, QuantFormat.NVFP4), (WeightFormat.FP8_CHANNEL, QuantFormat.FP8_TOKEN)],
                         ids=_fid)
def test_gpu_cuda_graph_capture(dsv3, wfmt, tfmt):
    """experts_forward has static shapes and no host sync under capture: captured once, replayed on new
    routing, bit-identical to eager (the fp8 backend then re-quantizes all T * k rows, row-locally)."""
    weights, x, ids, tw = dsv3
    w = weights[wfmt]
    q = _quantize(x, tfmt)
    s_ids, s_tw = ids.clone(), tw.clone()
    out = torch.empty(512, DSV3["hidden"], device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: kernels compiled
        experts_forward(q, s_ids, s_tw, w, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        experts_forward(q, s_ids, s_tw, w, out=out)
    s_ids.copy_(ids.flip(0))
    s_tw.copy_(tw.flip(0))
    graph.replay()
    assert_close(out, experts_forward(q, ids.flip(0), tw.flip(0), w), rel=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "grouped", "fp8"])
def test_gpu_no_local_tokens(dsv3, backend):
    """A rank whose experts no token picked (and no token at all) returns zeros."""
    weights, x, ids, tw = dsv3
    w = weights[WeightFormat.FP8_CHANNEL]
    q = _quantize(x, QuantFormat.FP8_TOKEN)
    elsewhere = ids % w.first_expert  # all ids in [0, 32): not rank 1's
    assert not experts_forward(q, elsewhere, tw, w, backend=backend).any()
    empty = quant.quantize(x[:0], QuantFormat.FP8_TOKEN)
    assert experts_forward(empty, ids[:0], tw[:0], w, backend=backend).shape == (0, DSV3["hidden"])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("tfmt", [None, QuantFormat.NVFP4, QuantFormat.FP8_TOKEN], ids=_fid)
def test_gpu_inputs_on_another_gpu_than_the_current_one(tfmt):
    """With cuda:0 current and every input on cuda:1, the kernels run on cuda:1 and give cuda:0's result."""

    def run(device):
        w13, w2, b13, b2 = _weights(8, bias=True, device=device)
        weights = make_expert_weights(w13, w2, ep_size=2, ep_rank=1, b13=b13, b2=b2)
        ids, tw = _route(300, 8, 3)
        with torch.cuda.device(device):  # the quantizer's device handling is not this test's subject
            tokens = _quantize(_tokens(300, device=device), tfmt)
        with torch.cuda.device(0):
            return experts_forward(tokens, ids.to(device), tw.to(device), weights)

    out = run(torch.device("cuda:1"))
    assert out.device == torch.device("cuda:1")
    assert_close(out.cpu(), run(torch.device("cuda:0")).cpu(), rel=0)


def test_bad_partition_and_weight_dtypes_raise():
    with pytest.raises(ValueError, match="ep_size must be an int"):
        ep_partition(4, 2.0, 1)
    w13, w2 = torch.randn(4, 16, 32), torch.randn(4, 32, 8)
    with pytest.raises(ValueError, match="w13 must be a floating tensor"):
        make_expert_weights(w13.int(), w2)


def test_grouped_topk_weights_stay_finite_when_sigmoid_underflows():
    # sigmoid(-200) is 0 in fp32: the renormalisation must not divide 0 by 0 (DeepSeek-V3 adds 1e-20)
    ids, w = grouped_topk(torch.full((2, 16), -200.0), 4, e_score_correction_bias=torch.zeros(16),
                          n_group=4, topk_group=2)
    assert torch.isfinite(w).all() and ids.shape == (2, 4)


# ----------------------------------------------------------------------------------------------------
# Masked slots (topk_ids == -1) and the deferred id check
# ----------------------------------------------------------------------------------------------------


def _mask_patterns(num_tokens, k, gen):
    """Boolean ``[T, k]`` masks: random slots, whole rows, everything, nothing."""
    random_slots = torch.rand(num_tokens, k, generator=gen) < 0.4
    rows = torch.zeros(num_tokens, k, dtype=torch.bool)
    rows[::3] = True
    return {"random slots": random_slots, "whole rows": rows, "all": torch.ones(num_tokens, k, dtype=torch.bool),
            "none": torch.zeros(num_tokens, k, dtype=torch.bool)}


MASK_CASES = [("grouped", WeightFormat.BF16, None), ("grouped", WeightFormat.NVFP4, QuantFormat.NVFP4),
              ("grouped", WeightFormat.FP8_BLOCK, QuantFormat.FP8_GROUP),
              ("fp8", WeightFormat.FP8_CHANNEL, QuantFormat.FP8_TOKEN)]


@pytest.mark.parametrize("backend,wfmt,tfmt", MASK_CASES, ids=_fid)
def test_masked_slots_add_exactly_zero(backend, wfmt, tfmt):
    """A -1 slot gives the same bits as that slot pointing at a real expert (local or not) with weight 0,
    whatever weight the -1 slot carries (NaN included). The float32 oracle agrees to float32 rounding: its
    CPU GEMM is not bitwise invariant to the number of rows, which the weight-0 slots change."""
    gen = torch.Generator().manual_seed(torch.seed() % (1 << 31))
    w13, w2, b13, b2 = _weights(8, bias=True)
    weights = make_expert_weights(w13, w2, ep_size=2, ep_rank=1, format=wfmt, b13=b13, b2=b2)
    x = _quantize(_tokens(40), tfmt)
    ids, tw = _route(40, 8, 3, seed=int(torch.randint(0, 1000, (1,), generator=gen)))
    for name, mask in _mask_patterns(40, 3, gen).items():
        masked_ids = torch.where(mask, -1, ids)
        junk = torch.where(torch.rand(40, 3, generator=gen) < 0.5, float("nan"), 7.0)
        got = experts_forward(x, masked_ids, torch.where(mask, junk, tw), weights, backend=backend)
        want = experts_forward(x, ids, torch.where(mask, 0.0, tw), weights, backend=backend)
        assert torch.equal(got, want), name
        if name == "all":
            assert not got.any()
        ref = experts_forward_ref(x, masked_ids, torch.where(mask, junk, tw), weights)
        assert_close(ref, experts_forward_ref(x, ids, torch.where(mask, 0.0, tw), weights), rel=REF_TOL, name=name)
        assert_close(got.float(), ref, rel=FP8_TOL if backend == "fp8" else BF16_TOL, name=name)


def test_masked_slots_in_the_triton_plan():
    """The counting sort treats -1 as nobody's expert and flags only ids outside [-1, E)."""
    from moecomm import errors

    ids = _distinct_ids(300, 8, 16)
    ids[torch.rand(300, 8) < 0.3] = -1
    errors.check_errors()  # nothing pending
    _check_plan(ids, 4, 4, 16)
    errors.check_errors()  # -1 is no error
    ids[5, 2], ids[9, 0] = 16, -7
    _check_plan(ids, 4, 4, 16)
    with pytest.raises(ValueError, match=r"outside \[-1, num_experts\).*values in \[-7, 16\]"):
        errors.check_errors()
    errors.check_errors()  # cleared by the check


@pytest.mark.parametrize("backend", ["grouped", "reference"])
def test_bad_ids_are_reported_without_a_sync(backend):
    from moecomm import errors

    w13, w2, _, _ = _weights(8)
    weights = make_expert_weights(w13, w2, ep_size=2, ep_rank=1)
    x = _tokens(6)
    ids, tw = _route(6, 8, 2)
    for bad_value, shown in [(8, "[8, 8]"), (-2, "[-2, -2]"), (2**40, "[-2147483648, -2147483648]")]:
        bad = ids.long().clone()
        bad[3, 1] = bad_value
        out = experts_forward(x, bad, tw, weights, backend=backend)  # no raise: no host read of the ids
        skipped = experts_forward(x, torch.where(bad == bad_value, -1, bad), tw, weights, backend=backend)
        assert torch.equal(out, skipped)  # the bad slot is skipped like a masked one
        with pytest.raises(ValueError, match=re.escape(shown)):
            errors.check_errors()
    errors.check_errors()
