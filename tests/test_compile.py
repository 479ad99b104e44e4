"""moecomm inside ``torch.compile``: custom ops, no graph breaks, no recompiles for new sizes.

On 2 gloo ranks, ``examples/compiled_model.py``'s ``MoEBlock`` (linear, MoE, linear) compiled with
``fullgraph=True`` (Inductor, C++ code generation on the CPU) gives the same bits as eager for every
strategy over steps of different, uneven and zero sizes, compiles once per strategy, and matches a
single-process reference of the same layer (no collectives). The compiled collectives and quantizers
(``aot_eager`` backend: Dynamo and AOTAutograd, the ops and fakes as Inductor sees them) are checked
against torch references. The CUDA-graph test (``mode="reduce-overhead"``, marked gpu) runs where GPUs are.
"""

import importlib
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.decorators import mark_unbacked
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from moecomm import ops, quant
from moecomm.comm import collectives, launch, rank_device
from moecomm.layer import step as dispatch
from moecomm.moe import experts_forward_ref, make_expert_weights
from moecomm.quant import QuantFormat, nvfp4_global_scale
from moecomm.testing import assert_close

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
example = importlib.import_module("compiled_model")  # the README's example (spawned ranks import it by name)

# (strategy, format the experts consume): every strategy
CASES = [("allreduce", None), ("agrs", None), ("agrs-nvfp4", QuantFormat.NVFP4), ("agrs-fp8", QuantFormat.FP8_GROUP)]
# Tolerance vs the float32 single-process reference: bf16 partial outputs summed over ranks, a bf16 linear.
TOL = 2e-2


def _tokens(seed, step, rank, n):
    return torch.randn(n, example.HIDDEN, generator=torch.Generator().manual_seed(seed + 10 * step + rank)).bfloat16()


def _layer(seed, device):
    """This rank's experts and all experts (the single-process oracle), the same on every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(example.EXPERTS, 2 * example.INTER, example.HIDDEN, generator=gen) / example.HIDDEN**0.5
    w2 = torch.randn(example.EXPERTS, example.HIDDEN, example.INTER, generator=gen) / example.INTER**0.5
    return (make_expert_weights(w13.to(device), w2.to(device), ep_size=world, ep_rank=rank),
            make_expert_weights(w13.to(device), w2.to(device)))


def _reference(model, x, everything, fmt):
    """The block on this rank's rows in one process: the dense parts as the model computes them, the MoE
    from all experts in float32 (:func:`experts_forward_ref`); no communication, no custom op."""
    h = model.up(x)
    ids, weights = model.route(h)
    gs = model.global_scale if fmt == QuantFormat.NVFP4 else None
    y = experts_forward_ref(h, ids, weights, everything, input_format=fmt, global_scale=gs)
    return model.down(y.bfloat16())


def _model_compiled_vs_eager(seed, steps):
    rank = dist.get_rank()
    mine, everything = _layer(seed, rank_device())
    for strategy, fmt in CASES:
        torch._dynamo.reset()
        counters.clear()
        gs = nvfp4_global_scale(torch.tensor(5.0)) if fmt == QuantFormat.NVFP4 else None  # static, on every rank
        model = example.MoEBlock(mine, strategy=strategy, global_scale=gs, expert_input_format=fmt, seed=seed)
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(model, backend=counter, fullgraph=True)  # fullgraph: a graph break raises
        for step, sizes in enumerate(steps):
            x = _tokens(seed, step, rank, sizes[rank])
            mark_unbacked(x, 0)
            with torch.no_grad():
                got = compiled(x, ops.sizes_tensor(sizes))
                eager = model(x, sizes)  # a list: the plain Python path, no custom op
                ref = _reference(model, x, everything, fmt)
            assert got.shape == (sizes[rank], example.HIDDEN) and got.dtype == torch.bfloat16
            assert torch.equal(got, eager), f"{strategy} step {step} {sizes}: compiled != eager"
            assert_close(got.float(), ref.float(), rel=TOL, name=f"{strategy} step {step} {sizes}")
        # one graph for all steps: new sizes (values of an input tensor) and token counts never recompile
        assert counter.frame_count == 1, f"{strategy}: {counter.frame_count} compilations"
        assert not counters["graph_break"], dict(counters["graph_break"])
    return "ok"


def test_compiled_model_matches_eager_without_recompiles():
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    steps = [[rng.randint(1, 6), rng.randint(7, 12)],  # uneven
             [0, rng.randint(1, 9)],  # an idle rank
             [rng.randint(2, 9), 1]]
    assert launch(_model_compiled_vs_eager, 2, (seed, steps), backend="gloo", timeout=240) == ["ok", "ok"], seed


def test_readme_example_runs():
    """As a user runs it: a subprocess, which ends with "ok" and no warning (e.g. the resource tracker's
    "leaked semaphore objects" of compile workers the ranks left running)."""
    run = subprocess.run([sys.executable, str(Path(example.__file__))], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "ok"
    assert "leaked" not in run.stderr and "Warning" not in run.stderr, run.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------
# The collectives and the quantizers, compiled
# ----------------------------------------------------------------------------------------------------

HQ = 128  # hidden of the quantized rows: a multiple of every format's block


def _comm_step(x, y, sizes, group, gathered_out):
    q = quant.quantize(x, QuantFormat.NVFP4)  # global scale computed on the device, inside the op
    q8 = quant.quantize(x, "fp8-group")
    qt = quant.quantize(x, QuantFormat.FP8_TOKEN)
    q4 = quant.quantize(x, QuantFormat.NVFP4, global_scale=100.0)  # a Python number becomes a constant
    gathered = collectives.all_gatherv([x, None, q.data, q.scales], sizes, group)
    collectives.all_gatherv(y, sizes, group, out=gathered_out)
    reduced = collectives.reduce_scatterv(gathered[0].float() * 2, sizes, group)
    return gathered, reduced, q, q8, qt, q4


def _ops_compiled(seed, steps):
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))  # resolved by name inside the ops
    counter = CompileCounterWithBackend("aot_eager")
    step_fn = torch.compile(_comm_step, backend=counter, fullgraph=True)
    for step, sizes in enumerate(steps):
        xs = [_tokens(seed, step, r, n) for r, n in enumerate(sizes)]
        ys = [torch.randint(-9, 9, (n, 3), generator=torch.Generator().manual_seed(seed + r), dtype=torch.int32)
              for r, n in enumerate(sizes)]
        x, y = xs[rank], ys[rank]
        out = torch.full((sum(sizes), 3), 99, dtype=torch.int32)
        for t in (x, y, out):
            mark_unbacked(t, 0)
        gathered, reduced, q, q8, qt, q4 = step_fn(x, y, ops.sizes_tensor(sizes), group, out)
        everyone = torch.cat(xs)
        assert torch.equal(gathered[0], everyone) and gathered[1] is None
        assert torch.equal(out, torch.cat(ys)), "all_gatherv(out=...) under compile"
        expected = quant.quantize_nvfp4_ref(x, nvfp4_global_scale(x.abs().amax() if len(x) else 0.0))
        assert torch.equal(q.data, expected[0]) and torch.equal(q.scales.view(torch.uint8), expected[1].view(torch.uint8))
        assert torch.equal(gathered[2], torch.cat([quant.quantize_nvfp4_ref(
            t, nvfp4_global_scale(t.abs().amax() if len(t) else 0.0))[0] for t in xs]))
        assert q.global_scale.shape == () and q.format is QuantFormat.NVFP4
        for got, expected in [(q8, quant.quantize_fp8_ref(x)), (qt, quant.quantize_fp8_ref(x, group_size=None)),
                              (q4, quant.quantize_nvfp4_ref(x, 100.0))]:
            assert torch.equal(got.data.view(torch.uint8), expected[0].view(torch.uint8))
            assert torch.equal(got.scales.view(torch.uint8), expected[1].view(torch.uint8))
        start = sum(sizes[:rank])
        assert torch.equal(reduced, everyone.float()[start : start + sizes[rank]] * 2 * world)
    assert counter.frame_count == 1, counter.frame_count

    # Eager calls with sizes as a tensor (what a compiled model falls back to) go through the ops and give the
    # same results as with a list.
    sizes = steps[0]
    x = _tokens(seed, 0, rank, sizes[rank])
    mine, _ = _layer(seed, torch.device("cpu"))
    ids = torch.randint(-1, example.EXPERTS, (sizes[rank], 2), generator=torch.Generator().manual_seed(seed))
    moe_args = (x, ids, torch.rand(sizes[rank], 2), mine)
    everyone = torch.cat([_tokens(seed, 0, r, n) for r, n in enumerate(sizes)])
    by_list = (collectives.all_gatherv(x, sizes), collectives.reduce_scatterv(everyone, sizes),
               dispatch.moe_forward(*moe_args, sizes=sizes, strategy="agrs-fp8"))
    by_tensor = (collectives.all_gatherv(x, ops.sizes_tensor(sizes)),
                 collectives.reduce_scatterv(everyone, ops.sizes_tensor(sizes)),
                 dispatch.moe_forward(*moe_args, sizes=ops.sizes_tensor(sizes), strategy="agrs-fp8"))
    assert all(torch.equal(a, b) for a, b in zip(by_list, by_tensor))
    with pytest.raises(TypeError, match="1-D CPU int64"):
        collectives.all_gatherv(x, ops.sizes_tensor(sizes).float())
    # out= buffers are checked before the collective, as with a list (every rank raises alike)
    st, rows = ops.sizes_tensor(sizes), sum(sizes)
    for bad, message in ((torch.empty(rows, x.shape[1], dtype=torch.int64), r"out\[0\] is torch.int64"),
                         (torch.empty(2, rows, x.shape[1], dtype=x.dtype), rf"out\[0\] is {x.dtype} \(2, "),
                         (torch.empty(rows + 1, x.shape[1], dtype=x.dtype), rf"out\[0\] has {rows + 1} rows, "
                                                                             rf"expected {rows}")):
        with pytest.raises(ValueError, match=message):
            collectives.all_gatherv(x, st, out=bad)
    with pytest.raises(ValueError, match=rf"out\[0\] has {sizes[rank] + 1} rows, expected {sizes[rank]}"):
        collectives.reduce_scatterv(everyone, st, out=torch.empty(sizes[rank] + 1, everyone.shape[1],
                                                                   dtype=everyone.dtype))
    good = torch.empty(rows, x.shape[1], dtype=x.dtype)
    assert collectives.all_gatherv(x, st, out=good) is good and torch.equal(good, by_list[0])

    # Eager calls with a list of sizes never reach the ops (their host time stays as it was).
    saved = {name: getattr(ops, name) for name in ("moe_forward", "quantize", "all_gatherv", "reduce_scatterv")}
    try:
        for name in saved:
            setattr(ops, name, None)  # calling it would raise TypeError
        _comm_step(x, x, sizes, group, torch.empty(sum(sizes), example.HIDDEN, dtype=torch.bfloat16))
        assert torch.equal(dispatch.moe_forward(*moe_args, sizes=sizes, strategy="agrs-fp8"), by_list[2])
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)
    return "ok"


def test_compiled_collectives_and_quantize():
    seed = random.randrange(1 << 30)
    steps = [[3, 5], [0, 6], [4, 1], [0, 0]]
    assert launch(_ops_compiled, 2, (seed, steps), backend="gloo", timeout=240) == ["ok", "ok"], seed


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4", "fp8-group", "fp8-token"])
def test_quantize_op_fake_matches_real(fmt):
    # torch.library.opcheck: schema, fake vs real shapes/dtypes/strides, AOT dispatch with dynamic shapes
    x = torch.randn(5, HQ).bfloat16()
    torch.library.opcheck(torch.ops.moecomm.quantize.default, (x, fmt, None, "auto"))
    if fmt == "nvfp4":
        torch.library.opcheck(torch.ops.moecomm.quantize.default, (x, fmt, torch.tensor(3.0), "torch"))


def test_sizes_tensor():
    t = ops.sizes_tensor([3, 0, 5])
    assert t.dtype == torch.int64 and t.device.type == "cpu" and t.tolist() == [3, 0, 5]
    with pytest.raises(TypeError, match="CPU int64"):
        collectives.as_sizes(torch.tensor([1.0, 2.0]))


# ----------------------------------------------------------------------------------------------------
# CUDA graphs through Inductor (marked gpu)
# ----------------------------------------------------------------------------------------------------

BUCKET = 8  # tokens per rank that every rank's input is padded to (GraphedMoE's bucketing)


def _reduce_overhead(seed):
    """``torch.compile(mode="reduce-overhead")`` of the example block, tokens bucketed like GraphedMoE: each
    rank pads its rows to BUCKET (padding rows route to no expert), all ranks pass ``[BUCKET] * world``.

    The documented behaviour: the moecomm op reads sizes on the host each call, so it is never captured (it
    is tagged cudagraph_unsafe). With Inductor's graph partitions (torch's default) the dense parts around it
    are captured in CUDA graphs and the op runs eagerly between them on every step; without partitions
    Inductor skips CUDA graphs for the graph. Either way the results equal eager and nothing recompiles
    while the token counts change inside the bucket.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    mine, _ = _layer(seed, device)
    bucket_sizes = [BUCKET] * world
    rng = random.Random(seed + rank)
    calls = []  # per call of the op's implementation: was a CUDA graph being captured?
    real = dispatch.moe_forward

    def spy(*args, **kwargs):
        calls.append(torch.cuda.is_current_stream_capturing())
        return real(*args, **kwargs)

    for strategy, fmt in CASES:
        torch._dynamo.reset()
        counters.clear()
        calls.clear()
        gs = nvfp4_global_scale(torch.tensor(5.0)) if fmt == QuantFormat.NVFP4 else None
        model = example.MoEBlock(mine, strategy=strategy, global_scale=gs, expert_input_format=fmt, seed=seed)
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        steps = 4
        for step in range(steps):
            n = [BUCKET, 0, rng.randint(1, BUCKET - 1), 1][(step + rank) % steps]  # this rank's live tokens
            x = torch.zeros(BUCKET, example.HIDDEN, dtype=torch.bfloat16, device=device)
            x[:n] = _tokens(seed, step, rank, n).to(device)
            live = torch.arange(BUCKET, device=device) < n
            torch.compiler.cudagraph_mark_step_begin()
            dispatch.moe_forward = spy  # the op's implementation calls dispatch.moe_forward with a list
            try:
                with torch.no_grad():
                    got = compiled(x, ops.sizes_tensor(bucket_sizes), live)[:n].clone()
            finally:
                dispatch.moe_forward = real
            with torch.no_grad():
                eager = model(x, bucket_sizes, live)[:n]
            # A tolerance, not bits: Inductor's GPU kernels for the dense parts need not round as eager's do.
            assert_close(got.float(), eager.float(), rel=1e-2, name=f"{strategy} step {step}")
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        assert calls == [False] * steps, f"{strategy}: the MoE op ran {len(calls)} times, captured: {calls}"
        if torch._inductor.config.graph_partition:
            assert counters["inductor"]["cudagraph_skips"] == 0, "the dense partitions should be graphed"
        else:
            assert counters["inductor"]["cudagraph_skips"] >= 1
    return "ok"


@pytest.mark.gpu
def test_reduce_overhead_runs_the_moe_op_outside_cuda_graphs():
    seed = random.randrange(1 << 30)
    for ws in sorted({1, min(2, torch.cuda.device_count())}):
        assert launch(_reduce_overhead, ws, (seed,), backend="nccl", timeout=300) == ["ok"] * ws, (ws, seed)
