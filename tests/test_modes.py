"""moecomm under torch's grad modes (src/moecomm/_modes.py states the policy).

1. State made in one mode serves every other: a warm-up under ``torch.inference_mode()`` (as serving engines
   run theirs) must not break later calls under ``no_grad`` or in grad mode, nor the other way round; every
   cached tensor is a normal tensor.
2. Inputs that require grad are refused while grad mode is on (no silently missing or wrong gradients) at
   every entry point that computes, before any communication; under ``no_grad`` / ``inference_mode`` they
   work and give the values of their detached inputs. Routing is plain torch and differentiable.

Values are checked against the float32 single-process oracle (``experts_forward_ref``) or float64 math.
"""

import random

import pytest
import torch
import torch.distributed as dist

from moecomm import errors, ops, quant
from moecomm.comm import all_gatherv, all_reduce, launch, reduce_scatterv
from moecomm.layer import GraphedMoE, combine, dispatch, exchange, moe_forward
from moecomm.moe import (
    experts_forward,
    experts_forward_ref,
    grouped_topk,
    make_expert_weights,
    normalize_topk,
    topk_softmax,
)
from moecomm.quant import QuantFormat, nvfp4_global_scale
from moecomm.testing import assert_close

MODES = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}
PAIRS = [(a, b) for a in MODES for b in MODES if a != b]
HIDDEN, INTER, EXPERTS, TOPK = 128, 32, 8, 2
TOL = 2e-2  # bf16 GEMMs (and bf16 sums over ranks) vs the float32 oracle


def _problem(seed, tokens=6):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=gen).bfloat16()
    ids, w = topk_softmax(torch.randn(tokens, EXPERTS, generator=gen), TOPK)
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, generator=gen) / INTER**0.5
    return x, ids, w, w13, w2


@pytest.fixture
def fresh_caches(monkeypatch):
    """Empty caches, so that the first call of a test makes them in the mode the test picks."""
    monkeypatch.setattr(errors, "_BUFFERS", {})
    monkeypatch.setattr(exchange, "_SCALES", {})


# ----------------------------------------------------------------------------------------------------
# 1. State made in one mode serves every other


@pytest.mark.parametrize("first, later", PAIRS)
def test_error_buffer_made_in_one_mode_serves_every_other(first, later, fresh_caches):
    x, ids, w, w13, w2 = _problem(random.randrange(1 << 30))
    mine = make_expert_weights(w13, w2, ep_size=2, ep_rank=1)
    bad = ids.clone()
    bad[1, 0] = EXPERTS + 3
    with MODES[first]():
        experts_forward(x, bad, w, mine)  # makes the error buffer and flags the id
    ref = experts_forward_ref(x, ids, w, mine)
    with MODES[later]():
        with pytest.raises(ValueError, match=rf"values in \[{EXPERTS + 3}, {EXPERTS + 3}\]"):
            errors.check_errors()
        errors.check_errors()  # cleared: nothing left to raise
        out = experts_forward(x, ids, w, mine)
        bad[2, 1] = -5
        experts_forward(x, bad, w, mine)  # flags again, in this mode
        with pytest.raises(ValueError, match=rf"values in \[-5, {EXPERTS + 3}\]"):
            errors.check_errors()
    assert_close(out.float(), ref, rel=TOL, name=f"{first} -> {later}")


def test_every_cached_tensor_made_in_inference_mode_is_a_normal_tensor(fresh_caches):
    with torch.inference_mode():
        buf = errors.error_buffer(torch.device("cpu"))
        gs = exchange._global_scale(2.5, torch.device("cpu"))
    for name, t in (("error buffer", buf), ("global scale", gs)):
        assert not torch.is_inference(t) and not t.requires_grad, name
    assert gs.item() == 2.5 and buf.tolist() == [0, 2**31 - 1, -(2**31), 2**31 - 1, -(2**31)]


def _layer_in_every_mode(seed, first):
    """On 2 ranks: moe_forward (a Python-number NVFP4 global scale: the cached scale) with a bad id under
    ``first``, then every other mode; each result vs the single-process oracle, check_errors each time."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [3, 5]
    x, ids, w, w13, w2 = _problem(seed, sum(sizes))
    mine, everything = make_expert_weights(w13, w2, ep_size=world, ep_rank=rank), make_expert_weights(w13, w2)
    gs = float(nvfp4_global_scale(x.float().abs().amax()))
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    for mode in [first] + [m for m in MODES if m != first]:
        for strategy, fmt in (("agrs-nvfp4", QuantFormat.NVFP4), ("allreduce", None), ("agrs", None)):
            bad = ids[rows].clone()
            bad[0, 1] = 99
            with MODES[mode]():
                out = moe_forward(x[rows], bad, w[rows], mine, sizes=sizes, strategy=strategy,
                                  global_scale=gs if fmt == QuantFormat.NVFP4 else None, expert_input_format=fmt)
                try:
                    errors.check_errors()
                    return f"{mode} {strategy}: check_errors did not raise"
                except ValueError as e:
                    if "[99, 99]" not in str(e):
                        return f"{mode} {strategy}: {e}"
            all_ids = ids.clone()
            for r in range(world):
                all_ids[sum(sizes[:r]), 1] = -1  # every rank's bad id is skipped, as a masked slot is
            ref = experts_forward_ref(x, all_ids, w, everything, input_format=fmt,
                                      global_scale=torch.tensor(gs) if fmt else None)
            assert_close(out.float(), ref[rows], rel=TOL, name=f"{first}: {mode} {strategy}")
    for t in list(errors._BUFFERS.values()) + list(exchange._SCALES.values()):
        assert not torch.is_inference(t)
    return "ok"


@pytest.mark.parametrize("first", ["inference", "grad"])
def test_layer_step_after_a_warm_up_in_another_mode(first):
    seed = random.randrange(1 << 30)
    assert launch(_layer_in_every_mode, 2, (seed, first), backend="gloo", timeout=180) == ["ok", "ok"], seed


# ----------------------------------------------------------------------------------------------------
# 2. Inputs that require grad: refused in grad mode, working under no_grad / inference_mode


def _local_calls(x, ids, w, w13, w2):
    """Name -> (a call of a local entry point, the input that will require grad). Each call returns tensors."""
    mine = make_expert_weights(w13, w2, ep_size=2, ep_rank=0)
    xf = x.float()
    q8 = quant.quantize_fp8(xf)
    q4 = quant.quantize_nvfp4(xf, 3.0)
    gs = torch.tensor(3.0)
    scales = q8[1].clone()
    amax = xf.abs().amax()
    return {
        "quantize": (lambda: quant.quantize(xf, "fp8-group").data.view(torch.uint8), xf),
        "quantize nvfp4 global scale": (lambda: quant.quantize(x, "nvfp4", global_scale=gs).data, gs),
        "quantize_op": (lambda: ops.quantize(xf, "mxfp4").data, xf),
        "quantize_nvfp4": (lambda: quant.quantize_nvfp4(xf, 3.0)[0], xf),
        "quantize_mxfp4": (lambda: quant.quantize_mxfp4(xf)[0], xf),
        "quantize_fp8": (lambda: quant.quantize_fp8(xf, group_size=None)[0].view(torch.uint8), xf),
        "dequantize_fp8": (lambda: quant.dequantize_fp8(q8[0], scales), scales),
        "dequantize_nvfp4": (lambda: quant.dequantize_nvfp4(*q4, gs), gs),
        "nvfp4_global_scale": (lambda: nvfp4_global_scale(amax), amax),
        "experts_forward tokens": (lambda: experts_forward(xf, ids, w, mine), xf),
        "experts_forward topk_weights": (lambda: experts_forward(x, ids, w, mine), w),
        "experts_forward weights": (lambda: experts_forward(x, ids, w, mine), mine.w13),
        "experts_forward_ref": (lambda: experts_forward_ref(xf, ids, w, mine), xf),
        "make_expert_weights": (lambda: make_expert_weights(w13, w2, format="fp8-channel").w13.view(torch.uint8), w13),
    }


CASES = list(_local_calls(*_problem(0)))


@pytest.mark.parametrize("case", CASES)
def test_local_entry_points_refuse_inputs_that_require_grad(case):
    calls = _local_calls(*_problem(random.randrange(1 << 30)))
    call, tensor = calls[case]
    expected = call()  # nothing requires grad yet
    tensor.requires_grad_()
    with pytest.raises(ValueError, match="requires grad.*no_grad"):
        call()
    for mode in ("no_grad", "inference"):
        with MODES[mode]():
            got = call()
        assert not got.requires_grad
        assert torch.equal(got, expected), f"{case} under {mode}"


def _collective_calls(seed):
    """On 2 gloo ranks: every entry point that communicates refuses a requires-grad input in grad mode on the
    rank that has it, before communicating (both ranks have one, so no rank waits); under no_grad and
    inference_mode the calls run and match the oracle."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [2, 4]
    x, ids, w, w13, w2 = _problem(seed, sum(sizes))
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    mine, everything = make_expert_weights(w13, w2, ep_size=world, ep_rank=rank), make_expert_weights(w13, w2)
    h = x[rows].clone().requires_grad_()
    partial = x.clone().requires_grad_()
    handle = dispatch(x[rows], ids[rows], w[rows], sizes=sizes, strategy="agrs")[-1]
    calls = {
        "moe_forward allreduce": lambda: moe_forward(h, ids[rows], w[rows], mine, sizes=sizes, strategy="allreduce"),
        "moe_forward agrs": lambda: moe_forward(h, ids[rows], w[rows], mine, sizes=sizes, strategy="agrs"),
        "moe_forward_op": lambda: ops.moe_forward(h, ids[rows], w[rows], mine, sizes=sizes, strategy="agrs"),
        "dispatch": lambda: dispatch(h, ids[rows], w[rows], sizes=sizes, strategy="agrs-fp8")[0].data,
        "combine": lambda: combine(partial, handle),
        "all_gatherv": lambda: all_gatherv([None, h], sizes)[1],
        "all_gatherv_op": lambda: ops.all_gatherv(h, sizes),
        "reduce_scatterv": lambda: reduce_scatterv(partial, sizes),
        "reduce_scatterv_op": lambda: ops.reduce_scatterv(partial, ops.sizes_tensor(sizes)),
        "all_reduce": lambda: all_reduce(partial.clone()),
    }
    for name, call in calls.items():
        try:
            call()
            return f"{name}: no error for an input that requires grad"
        except ValueError as e:
            if "requires grad" not in str(e):
                return f"{name}: {e}"
    expected = {
        "moe": experts_forward_ref(x, ids, w, everything)[rows],
        "partial sum": world * x.float()[rows],
        "gathered": x,
    }
    for mode in ("no_grad", "inference"):
        with MODES[mode]():
            got = {name: call() for name, call in calls.items()}
        for name, out in got.items():
            assert not out.requires_grad, (mode, name)
        for name in ("moe_forward allreduce", "moe_forward agrs", "moe_forward_op"):
            assert_close(got[name].float(), expected["moe"], rel=TOL, name=f"{mode} {name}")
        for name in ("combine", "reduce_scatterv", "reduce_scatterv_op"):
            assert_close(got[name].float(), expected["partial sum"], rel=0, name=f"{mode} {name}")
        for name in ("all_gatherv", "all_gatherv_op"):
            assert torch.equal(got[name], expected["gathered"]), (mode, name)
        assert torch.equal(got["all_reduce"], world * partial.detach()), mode
    return "ok"


def test_collectives_and_layer_refuse_inputs_that_require_grad():
    seed = random.randrange(1 << 30)
    assert launch(_collective_calls, 2, (seed,), backend="gloo", timeout=180) == ["ok", "ok"], seed


def test_graphed_moe_refuses_inputs_that_require_grad_before_anything_else():
    with pytest.raises(ValueError, match="requires grad"):
        GraphedMoE.__call__(object.__new__(GraphedMoE), torch.ones(1, 4, requires_grad=True),
                            torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1))


def test_routing_gradients_match_float64_autograd():
    """Routing is plain torch: the weights' gradient wrt the logits is that of the renormalised top-k
    softmax (sigmoid for grouped top-k), computed here in float64 from the chosen ids."""
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    logits = torch.randn(5, EXPERTS, generator=gen, dtype=torch.float64)
    upstream = torch.randn(5, TOPK, generator=gen, dtype=torch.float64)
    route = {
        "topk_softmax": (lambda t: topk_softmax(t, TOPK), lambda t: torch.softmax(t, -1)),
        "grouped_topk": (lambda t: grouped_topk(t, TOPK, e_score_correction_bias=None, n_group=2, topk_group=2),
                         torch.sigmoid),
        "normalize_topk": (lambda t: normalize_topk(*topk_softmax(t, TOPK)), lambda t: torch.softmax(t, -1)),
    }
    for name, (fn, scores) in route.items():
        mine = logits.float().requires_grad_()
        ids, w = fn(mine)
        (w.double() * upstream).sum().backward()
        ref = logits.clone().requires_grad_()
        p = scores(ref).gather(1, ids.long())
        ((p / p.sum(-1, keepdim=True)) * upstream).sum().backward()
        assert_close(mine.grad.double(), ref.grad, rel=1e-5, name=f"{name} grad")


# ----------------------------------------------------------------------------------------------------
# GPU: symmetric-memory buffers and CUDA-graph statics made under inference_mode, used in the other modes


def _gpu_state_across_modes(seed):
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank)
    sizes = [3, 5]
    x, ids, w, w13, w2 = _problem(seed, sum(sizes))
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    mine = make_expert_weights(w13.to(device), w2.to(device), ep_size=world, ep_rank=rank)
    ref = experts_forward_ref(x, ids, w, make_expert_weights(w13, w2))[rows]
    args = (x[rows].to(device), ids[rows].to(device), w[rows].to(device))
    with torch.inference_mode():  # the warm-up: symmetric memory, communicators, graphs all made here
        moe_forward(*args, mine, sizes=sizes, strategy="agrs", algorithm="symm")
        graphed = GraphedMoE(mine, hidden_size=HIDDEN, topk=TOPK, buckets=[8], strategy="agrs")
    for mode in ("no_grad", "grad", "inference"):
        with MODES[mode]():
            eager = moe_forward(*args, mine, sizes=sizes, strategy="agrs", algorithm="symm")
            replay = graphed(*args, sizes=sizes).clone()
        assert_close(eager.float().cpu(), ref, rel=TOL, name=f"symm {mode}")
        assert_close(replay.float().cpu(), ref, rel=TOL, name=f"graph {mode}")
    return "ok"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_symmetric_memory_and_graphs_made_under_inference_mode():
    seed = random.randrange(1 << 30)
    assert launch(_gpu_state_across_modes, 2, (seed,), backend="nccl", timeout=300) == ["ok", "ok"], seed
