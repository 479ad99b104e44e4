"""What an engine integrating moecomm relies on: ``strategy="auto"`` fails the same way at every world size,
one rule for the NVFP4 global scale, what ``auto`` picked and why, string enums that print their value."""

import json
import logging
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moecomm.comm import Algorithm, launch
from moecomm.layer import Strategy, explain_strategy, moe_forward
from moecomm.moe import Activation, WeightFormat, experts_forward_ref, make_expert_weights, topk_softmax
from moecomm.quant import QuantFormat, nvfp4_global_scale, quantize
from moecomm.testing import assert_close, error_of

HIDDEN, INTER, TOPK = 128, 32, 2


def _problem(seed, sizes, num_experts):
    gen = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    x = torch.randn(total, HIDDEN, generator=gen).bfloat16()
    ids, w = topk_softmax(torch.randn(total, num_experts, generator=gen), TOPK)
    w13 = torch.randn(num_experts, 2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5
    w2 = torch.randn(num_experts, HIDDEN, INTER, generator=gen) / INTER**0.5
    return x, ids, w, w13, w2


def _auto_at_this_world_size(seed):
    """Every rank: the errors of ``auto`` (and of concrete strategies) with a missing or a misplaced global
    scale, and ``auto`` with the scale against the float32 reference. Returns ``{case: message or None}``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    rng = random.Random(seed)
    sizes = [rng.randint(1, 6) for _ in range(world)]
    x, ids, w, w13, w2 = _problem(seed, sizes, 2 * world)
    start, n = sum(sizes[:rank]), sizes[rank]
    mine = make_expert_weights(w13, w2, ep_size=world, ep_rank=rank)
    args = (x[start : start + n], ids[start : start + n], w[start : start + n], mine)
    gs = nvfp4_global_scale(x.float().abs().max())

    def step(**kw):
        return lambda: moe_forward(*args, sizes=sizes, **kw)

    found = {
        # NVFP4 experts need the static scale whatever auto picks (a crossover may pick agrs at this world size)
        "auto, nvfp4 experts, no scale": error_of(step(strategy="auto", expert_input_format=QuantFormat.NVFP4)),
        "auto, nvfp4 experts, no scale, quantized off": error_of(step(
            strategy="auto", expert_input_format=QuantFormat.NVFP4, allow_quantized=False)),
        "agrs, nvfp4 experts, no scale": error_of(step(strategy="agrs", expert_input_format=QuantFormat.NVFP4)),
        # a global scale where no NVFP4 is used is refused, as quantize() refuses it
        "auto, fp8 experts, a scale": error_of(step(strategy="auto", expert_input_format=QuantFormat.FP8_GROUP,
                                                    global_scale=gs)),
        "agrs-fp8, a scale": error_of(step(strategy="agrs-fp8", global_scale=gs)),
        "auto, bf16 experts, a scale": error_of(step(strategy="auto", global_scale=gs)),
        "allreduce, bf16 experts, a scale": error_of(step(strategy="allreduce", global_scale=gs)),
        "quantize fp8 with a scale": error_of(lambda: quantize(args[0], QuantFormat.FP8_GROUP, global_scale=gs)),
    }
    # With the scale, auto runs at every world size and equals the single-process float32 layer
    everything = make_expert_weights(w13, w2)
    out = moe_forward(*args, sizes=sizes, strategy="auto", global_scale=gs, expert_input_format=QuantFormat.NVFP4)
    ref = experts_forward_ref(x, ids, w, everything, input_format=QuantFormat.NVFP4, global_scale=gs)
    assert_close(out.float(), ref[start : start + n], rel=2e-2, name=f"auto nvfp4 world size {world}")
    fp8 = moe_forward(*args, sizes=sizes, strategy="auto", expert_input_format=QuantFormat.FP8_GROUP)
    ref = experts_forward_ref(x, ids, w, everything, input_format=QuantFormat.FP8_GROUP)
    assert_close(fp8.float(), ref[start : start + n], rel=2e-2, name=f"auto fp8 world size {world}")
    return found


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_auto_fails_the_same_way_at_every_world_size(world_size):
    seed = random.randrange(1 << 30)
    results = launch(_auto_at_this_world_size, world_size, (seed,), backend="gloo", timeout=120)
    for rank, found in enumerate(results):
        for case, message in found.items():
            assert message is not None, f"seed {seed}, world size {world_size}, rank {rank}: {case} did not raise"
            assert "global_scale" in message, (case, message)
        for case in ("auto, nvfp4 experts, no scale", "agrs, nvfp4 experts, no scale"):
            assert "NVFP4" in found[case] and "needs" in found[case], found[case]
        for case in ("auto, fp8 experts, a scale", "agrs-fp8, a scale", "auto, bf16 experts, a scale"):
            assert "NVFP4 only" in found[case], found[case]


def test_explain_strategy_says_what_auto_picked_and_why(monkeypatch):
    monkeypatch.delenv("MOECOMM_DISABLE_QUANTIZED_DISPATCH", raising=False)
    choice = explain_strategy(QuantFormat.NVFP4, 4096, world_size=8)
    assert choice.strategy == Strategy.AGRS_NVFP4 and isinstance(choice.reason, str)
    assert "4096" in choice.reason and "8" in choice.reason
    none = explain_strategy(None, 4096, world_size=8)
    assert none.strategy == Strategy.AGRS and "expert_input_format" in none.reason
    one = explain_strategy(QuantFormat.NVFP4, 1 << 20, world_size=1)
    assert one.strategy == Strategy.AGRS and "world size 1" in one.reason
    off = explain_strategy(QuantFormat.FP8_GROUP, 4096, world_size=8, allow_quantized=False)
    assert off.strategy == Strategy.AGRS and "allow_quantized=False" in off.reason
    monkeypatch.setenv("MOECOMM_DISABLE_QUANTIZED_DISPATCH", "1")
    env = explain_strategy(QuantFormat.FP8_GROUP, 4096, world_size=8)
    assert env.strategy == Strategy.AGRS and "MOECOMM_DISABLE_QUANTIZED_DISPATCH" in env.reason
    monkeypatch.delenv("MOECOMM_DISABLE_QUANTIZED_DISPATCH")
    ep = explain_strategy(QuantFormat.FP8_GROUP, 4096, world_size=8, ep_size=4)
    assert ep.strategy == Strategy.AGRS and "ep_size" in ep.reason
    # the choice moe_forward makes is logged (logger moecomm.layer), once per change
    (lines,) = launch(_logged_choices, 1, backend="gloo", timeout=60)
    assert len(lines) == 1 and lines[0].startswith("strategy 'auto' -> agrs: agrs-fp8 never beat agrs at world "
                                                   "size 1"), lines


def _logged_choices():
    """moe_forward with ``auto`` three times on one rank, the logger ``moecomm.layer`` at DEBUG: its lines."""
    lines = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("moecomm.layer")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    x, ids, w, w13, w2 = _problem(3, [5], 4)
    experts = make_expert_weights(w13, w2)
    for _ in range(3):
        moe_forward(x, ids, w, experts, sizes=[5], expert_input_format=QuantFormat.FP8_GROUP)
    return lines


@pytest.mark.parametrize("enum, member, value", [
    (Strategy, "AGRS", "agrs"), (Strategy, "AGRS_NVFP4", "agrs-nvfp4"), (QuantFormat, "FP8_GROUP", "fp8-group"),
    (Algorithm, "AUTO", "auto"), (Activation, "SILU", "silu"), (WeightFormat, "BF16", "bf16")])
def test_string_enums_print_their_value(enum, member, value):
    m = enum[member]
    assert str(m) == value and f"{m}" == value and format(m, ">12") == f"{value:>12}" and "%s" % m == value
    assert repr(m).startswith(f"<{enum.__name__}.{member}")  # repr still names the member
    assert m == value and enum(value) is m


_HELD = []  # what a rank keeps until it exits


def _hold_a_semaphore():
    import multiprocessing

    _HELD.append(multiprocessing.get_context("spawn").Lock())  # registered with the resource tracker
    return "ok"


def test_launched_ranks_release_their_semaphores():
    """Ranks leave with os._exit; what multiprocessing cleans up when a process ends (here a lock the rank
    keeps, in compiled models Inductor's compile workers) must still be released: no "leaked" warning."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from moecomm.comm import launch; import test_integration "
            "as t; assert launch(t._hold_a_semaphore, 2, backend='gloo', timeout=60) == ['ok', 'ok']; print('ok')")
    run = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
    assert "leaked" not in run.stderr, run.stderr[-3000:]


def _compilations(seed, steps, cases):
    """``MoEBlock`` of examples/compiled_model.py compiled per case ``(dynamic, mark_unbacked, "list" or
    "tensor")`` over ``steps``: the compilations of each case (every step checked against eager)."""
    from torch._dynamo.decorators import mark_unbacked
    from torch._dynamo.testing import CompileCounterWithBackend

    from moecomm.comm import rank_device
    from moecomm.ops import sizes_tensor

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from compiled_model import EXPERTS, HIDDEN, INTER, MoEBlock

    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, generator=gen) / INTER**0.5
    experts = make_expert_weights(w13.to(rank_device()), w2.to(rank_device()), ep_size=world, ep_rank=rank)
    model = MoEBlock(experts, strategy="agrs", seed=seed)
    counts = []
    for dynamic, mark, kind in cases:
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")  # Dynamo's decisions; Inductor's counts are the same
        compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=dynamic)
        for step, sizes in enumerate(steps):
            x = torch.randn(sizes[rank], HIDDEN, generator=torch.Generator().manual_seed(seed + step)).bfloat16()
            if mark:
                mark_unbacked(x, 0)
            with torch.no_grad():
                got = compiled(x, list(sizes) if kind == "list" else sizes_tensor(sizes))
                assert torch.equal(got, model(x, list(sizes))), (dynamic, mark, kind, step)
        counts.append(counter.frame_count)
    return counts


def _guide_compile_table():
    """docs/integration.md's table of compilations: the steps, and ``(dynamic, mark_unbacked, kind) -> count``."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "integration.md").read_text()
    steps = json.loads(re.search(r"Compilations over the steps `(\[\[.*?\]\])`", text).group(1))
    table = {}
    for dynamic, mark, as_list, as_tensor in re.findall(
            r"^\| `(True|None|False)`[^|]*\| (`mark_unbacked\(x, 0\)`|not marked) \| (\d+)[^|]*\| (\d+)[^|]*\|$",
            text, flags=re.M):
        for kind, count in (("list", as_list), ("tensor", as_tensor)):
            table[({"True": True, "None": None, "False": False}[dynamic], mark != "not marked", kind)] = int(count)
    return steps, table


def test_the_guides_compile_counts_hold():
    """Under torch.compile(fullgraph=True), how often a model recompiles with ``sizes`` as a list or as a tensor,
    per ``dynamic=`` and whether the token dimension is marked unbacked, is what docs/integration.md says."""
    steps, table = _guide_compile_table()
    assert len(table) == 8 and len(steps) == 4, table
    cases = sorted(table, key=str)
    counts = launch(_compilations, 2, (random.randrange(1 << 30), steps, cases), backend="gloo", timeout=300)
    for rank_counts in counts:
        assert dict(zip(cases, rank_counts)) == table


def _moe_step_in_an_engine_graph(seed):
    """As an engine captures its decode step per batch bucket, every rank padded to the bucket: the router,
    the masking of the padding rows and moe_forward (``sizes=[bucket] * world``, a list) in ONE CUDA graph of
    the engine's, replayed with new tokens; equal to eager on the same padded rows, and close to eager on the
    live rows alone with their true sizes."""
    from moecomm.comm import gather_sizes

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    import integration as ex

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    weights = ex.make_weights(ex.EXPERTS_PER_RANK * world)
    scales = [nvfp4_global_scale(a) for a in ex.reference(weights, [], ex.prompts(ex.CALIBRATION, 1), True)]
    layer = ex.Model(weights, scales, rank, world, device).layers[0]
    bucket = 8
    x, live = torch.zeros(bucket, ex.HIDDEN, device=device), torch.zeros(bucket, dtype=torch.bool, device=device)

    def step(x, live, sizes):
        h = ex.rms_norm(x, layer["ffn_norm"])
        ids, w = topk_softmax(h @ layer["router"].T, ex.TOPK)
        ids = torch.where(live[:, None], ids, -1)  # padding rows: masked slots, no expert work
        return moe_forward(h.bfloat16(), ids, w, layer["experts"], sizes=sizes, global_scale=layer["global_scale"],
                           expert_input_format=QuantFormat.NVFP4)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: kernels compiled, communicators, buffers
        step(x, live, [bucket] * world)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(x, live, [bucket] * world)
    rng = random.Random(seed)
    for step_count in [rng.randint(0, bucket) for _ in range(4)] + [bucket, 0]:
        n = (step_count + rank) % (bucket + 1)  # this rank's live tokens: another count on every rank
        tokens = torch.randn(n, ex.HIDDEN, generator=torch.Generator().manual_seed(seed + n + rank)).to(device)
        x.zero_()
        x[:n] = tokens
        live.copy_(torch.arange(bucket, device=device) < n)
        graph.replay()
        assert torch.equal(out, step(x, live, [bucket] * world)), n  # eager, the same padded rows
        unpadded = step(tokens, live[:n], gather_sizes(n))  # eager, the live rows alone, their true sizes
        assert_close(out[:n].float(), unpadded.float(), rel=1e-2, name=f"graphed vs unpadded, {n} tokens")
    return "ok"


@pytest.mark.gpu
def test_moe_forward_captured_in_an_engine_graph():
    from moecomm.testing import on_every_gpu_count

    on_every_gpu_count(_moe_step_in_an_engine_graph)


def test_a_torchrun_rank_frees_its_process_group():
    """Under torchrun launch() runs in place and destroys its process group at the end; moecomm's caches of
    per-group facts must not keep it alive (a gloo group freed only at interpreter exit can abort the process:
    "terminate called without an active exception", seen at 3 ranks)."""
    code = """if True:
        import gc, weakref, torch, torch.distributed as dist
        from moecomm.comm import all_gatherv, launch
        held = []
        def fn():
            held.append(weakref.ref(dist.group.WORLD))
            return all_gatherv(torch.randn(3, 4), [3]).shape[0]
        assert launch(fn, 1) == [3]
        gc.collect()
        print("freed" if held[0]() is None else "alive")
    """
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "freed", run.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
