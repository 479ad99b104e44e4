"""The quantized combine on 2-4 gloo ranks: ``reduce_scatterv(..., wire_format=)`` and ``moe_forward(...,
combine_format=)`` against float64 references with tolerances derived from the formats, bit-identity with the
reference path (quantize each rank's rows -> fixed-order fp32 sum -> bf16) across algorithms, chunks and
layouts, the Inf / NaN policy, and the errors raised on every rank. NCCL tests are marked ``gpu``.

Every rank builds every rank's inputs from a shared seed, so each computes the expected result locally. Inputs
are fresh random draws (the seed is in the failure message).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist

from moecomm.comm import launch, rank_device, reduce_scatterv, sizes_tensor
from moecomm.layer import combine, dispatch, moe_forward, wire_bytes_per_token
from moecomm.moe import experts_forward, make_expert_weights, topk_softmax
from moecomm.quant import QuantFormat, dequantize_sum_ref, quantize_partials
from moecomm.testing import assert_raised_on_every_rank, error_of, on_every_gpu_count

FORMATS = ["int8", "fp8"]
HIDDEN = 256


def _partials(seed, world, total, hidden=HIDDEN, dtype=torch.bfloat16):
    """Every rank's partial ``[total, hidden]``: rows over five orders of magnitude with an outlier channel; some
    rows zero on some ranks (a token none of the rank's experts serve) and an all-zero group."""
    gen = torch.Generator().manual_seed(seed)
    xs = []
    for _ in range(world):
        x = torch.randn(total, hidden, generator=gen) * torch.logspace(-2, 3, max(total, 1))[:total].unsqueeze(1)
        x[:, 7] *= 30
        x[torch.rand(total, generator=gen) < 0.25] = 0
        if total:
            x[0, 128:256] = 0
        xs.append(x.to(dtype))
    return xs


def _expected(xs, start, n, fmt, dtype=torch.bfloat16):
    """The reference path: each rank's rows quantized by the reference, then the fixed-order fp32 sum."""
    pieces = [quantize_partials(x[start : start + n], fmt, backend="torch") for x in xs]
    codes, scales = torch.stack([p[0] for p in pieces]), torch.stack([p[1] for p in pieces])
    return dequantize_sum_ref(codes, scales, dtype=dtype), pieces


def _check_bounds(got, pieces, rows, fmt, name):
    """``got`` (bf16) against float64 references, element by element.

    (a) Against the exact float64 sum of the dequantized pieces: the owner rounds each product to fp32 and adds
    left to right in fp32 (P roundings, each at most 2**-24 of a running sum bounded by sum |t|), then rounds
    once to bf16 (unit roundoff 2**-8; below bf16's normal range 2**-134 absolute).
    (b) Against the exact sum of the unquantized partials: (a) plus each piece's quantization error, at most
    int8: scale * (1/2 + 2**-16) (half a step, and the fp32 quotient's rounding of at most 127 steps);
    fp8: max(|x| 2**-4, scale 2**-10) * (1 + 2**-18) (half an e4m3 ulp, or half the subnormal step; the fp32
    quotient adds 2**-24 relative).
    """
    got = got.double()
    n = got.shape[0]
    terms = [c.double().reshape(n, -1, 128) * s.double().unsqueeze(-1) for c, s in pieces]
    exact_q = sum(terms).reshape(n, -1)
    spread = sum(t.abs() for t in terms).reshape(n, -1)
    bound_a = 2**-8 * exact_q.abs() + (1 + 2**-8) * len(pieces) * 2**-24 * spread * 1.0001 + 2**-133
    assert ((got - exact_q).abs() <= bound_a).all(), f"{name}: (a) off by {((got - exact_q).abs() - bound_a).max()}"
    quant_err = torch.zeros_like(exact_q)
    for (_, s), x in zip(pieces, rows):
        step = s.double().repeat_interleave(128, dim=1)
        x = x.double()
        quant_err += (step * (0.5 + 2**-16) if fmt == "int8"
                      else torch.maximum(x.abs() * 2**-4, step * 2**-10) * (1 + 2**-18))
    exact = sum(x.double() for x in rows)
    assert ((got - exact).abs() <= bound_a + quant_err).all(), f"{name}: (b)"


def _reduce_cases(seed, sizes_list):
    rank, world = dist.get_rank(), dist.get_world_size()
    device = rank_device()
    for case, sizes in enumerate(sizes_list):
        total, start, n = sum(sizes), sum(sizes[:rank]), sizes[rank]
        for fmt in FORMATS:
            for dtype in (torch.bfloat16, torch.float32) if case == 0 else (torch.bfloat16,):
                xs = _partials(seed + case, world, total, dtype=dtype)
                want, pieces = _expected(xs, start, n, fmt, dtype)
                name = f"{fmt} {dtype} sizes {sizes} rank {rank} seed {seed}"
                out = torch.full((n, HIDDEN), float("nan"), dtype=dtype, device=device)
                got = reduce_scatterv(xs[rank].to(device), sizes, wire_format=fmt, out=out)
                assert got is out and torch.equal(got.cpu(), want), name
                if dtype == torch.bfloat16 and n:
                    _check_bounds(got.cpu(), pieces, [x[start : start + n] for x in xs], fmt, name)
                # Every transport and entry point gives the same bits
                for algorithm in ("broadcast", "padded"):
                    assert torch.equal(reduce_scatterv(xs[rank].to(device), sizes, wire_format=fmt,
                                                       algorithm=algorithm).cpu(), want), (name, algorithm)
                assert torch.equal(reduce_scatterv(xs[rank].to(device), sizes_tensor(sizes), wire_format=fmt).cpu(),
                                   want), (name, "custom op")
                assert torch.equal(reduce_scatterv(xs[rank].to(device), sizes, wire_format=fmt, validate=True).cpu(),
                                   want), (name, "validate")
        # Trailing dims: rows of [2, 128] are rows of 256
        xs = _partials(seed, world, total)
        got = reduce_scatterv(xs[rank].view(total, 2, 128).to(device), sizes, wire_format="fp8")
        assert got.shape == (n, 2, 128) and torch.equal(got.cpu().view(n, HIDDEN), _expected(xs, start, n, "fp8")[0])
    return "ok"


def _size_patterns(world, rng):
    return [
        [rng.randint(1, 9) for _ in range(world)],
        [0] + [rng.randint(1, 9) for _ in range(world - 1)],  # an idle rank
        [0] * (world - 1) + [5],  # one rank owns every row
        [0] * world,  # all idle
        [4] * world,  # equal sizes (the padded layout's slots)
    ]


@pytest.mark.parametrize("world_size", [2, 4])  # 3 ranks: the layer and error tests below
def test_quantized_reduce_scatterv(world_size):
    seed = random.randrange(1 << 30)
    sizes_list = _size_patterns(world_size, random.Random(seed))
    results = launch(_reduce_cases, world_size, (seed, sizes_list), backend="gloo", timeout=300)
    assert results == ["ok"] * world_size, seed


def _special_values(seed):
    """Inf and NaN partials: their (row, 128-column group) of the owner's result is NaN, nothing else is."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [3] * world
    for fmt in FORMATS:
        xs = _partials(seed, world, 3 * world)
        xs[0][3, 5] = float("inf")  # rank 1's row 0, group 0
        xs[1][4, 200] = -float("inf")  # rank 1's row 1, group 1
        xs[world - 1][0, 130] = float("nan")  # rank 0's row 0, group 1
        xs[0][5, 0] = 3e38  # finite but beyond bf16: quantizes finely, overflows only when rounded to bf16
        xs[1][5, 0] = 3e38
        got = reduce_scatterv(xs[rank], sizes, wire_format=fmt)
        want, _ = _expected(xs, 3 * rank, 3, fmt)
        nan = {0: [(0, 1)], 1: [(0, 0), (1, 1)]}.get(rank, [])
        for row in range(3):
            for group in range(2):
                cols = got[row, 128 * group : 128 * (group + 1)]
                assert cols.isnan().all() == ((row, group) in nan) and cols.isnan().any() == ((row, group) in nan), (
                    fmt, rank, row, group)
        if rank == 1:  # 6e38 in fp32 overflows to Inf, as the bf16 sum would
            assert got[2, 0] == float("inf") and torch.isfinite(got[2, 1:]).all()
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(0), want.nan_to_num(0))
    return "ok"


def _one_rank(seed):
    x = _partials(seed, 1, 5)[0]
    return all(torch.equal(reduce_scatterv(x, [5], wire_format=fmt), x) for fmt in FORMATS)


def test_one_rank_is_a_copy():
    """At world size 1 nothing travels, so nothing is quantized: the result is the input, as for bf16."""
    seed = random.randrange(1 << 30)
    assert launch(_one_rank, 1, (seed,), backend="gloo", timeout=120) == [True], seed


def test_inf_and_nan_partials_poison_their_group():
    seed = random.randrange(1 << 30)
    assert launch(_special_values, 2, (seed,), backend="gloo", timeout=300) == ["ok"] * 2, seed


# ----------------------------------------------------------------------------------------------------
# The layer: moe_forward / combine with combine_format

INTER, TOPK = 32, 3


def _problem(seed, sizes, num_experts):
    gen = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    x = torch.randn(total, HIDDEN, generator=gen).bfloat16()
    x[:, 5] *= 8
    ids, w = topk_softmax(torch.randn(total, num_experts, generator=gen), TOPK)
    masked = torch.rand(total, TOPK, generator=gen) < 0.2  # masked slots, and every 4th token wholly masked
    masked[::4] = True
    ids = torch.where(masked, -1, ids)
    w13 = torch.randn(num_experts, 2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5
    w2 = torch.randn(num_experts, HIDDEN, INTER, generator=gen) / INTER**0.5
    return x, ids, w, w13, w2


def _layer_cases(seed, sizes_list):
    rank, world = dist.get_rank(), dist.get_world_size()
    num_experts = 2 * world
    for sizes in sizes_list:
        x, ids, w, w13, w2 = _problem(seed, sizes, num_experts)
        start, n = sum(sizes[:rank]), sizes[rank]
        mine = make_expert_weights(w13, w2, ep_size=world, ep_rank=rank)
        args = (x[start : start + n], ids[start : start + n], w[start : start + n], mine)
        for fmt, strategy, consumed in [("int8", "agrs", None), ("fp8", "agrs", None),
                                        ("int8", "agrs-fp8", QuantFormat.FP8_GROUP)]:
            # Every rank's partial output, computed here from all tokens and that rank's experts (the experts are
            # row-local, and quantizing before the gather gives the bytes of quantizing after it)
            partials = [experts_forward(x, ids, w, make_expert_weights(w13, w2, ep_size=world, ep_rank=p),
                                        input_format=consumed) for p in range(world)]
            want, _ = _expected(partials, start, n, fmt)
            name = f"{fmt} {strategy} sizes {sizes} rank {rank} seed {seed}"
            kw = dict(sizes=sizes, strategy=strategy, expert_input_format=consumed, combine_format=fmt)
            assert torch.equal(moe_forward(*args, **kw), want), name
            for extra in (dict(chunks=2), dict(chunks=3), dict(algorithm="padded"), dict(validate=True)):
                assert torch.equal(moe_forward(*args, **kw, **extra), want), (name, extra)
            # dispatch + combine, the padded layout (equal-size slots, padding rows masked) included
            for algorithm in ("auto", "padded"):
                tokens, gids, gw, handle = dispatch(*args[:3], sizes=sizes, strategy=strategy,
                                                    expert_input_format=consumed, algorithm=algorithm)
                partial = experts_forward(tokens, gids, gw, mine,
                                          input_format=consumed if isinstance(tokens, torch.Tensor) else None)
                out = torch.full((n, HIDDEN), float("nan"), dtype=torch.bfloat16)
                assert combine(partial, handle, combine_format=fmt, out=out) is out, name
                assert torch.equal(out, want), (name, algorithm, handle.padded_rows)
    return "ok"


@pytest.mark.parametrize("world_size", [2, 3])
def test_moe_forward_with_a_quantized_combine(world_size):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    sizes_list = [[rng.randint(1, 7) for _ in range(world_size)], [0] + [rng.randint(2, 7)] * (world_size - 1)]
    results = launch(_layer_cases, world_size, (seed, sizes_list), backend="gloo", timeout=300)
    assert results == ["ok"] * world_size, seed


def test_combine_bytes_per_token():
    # hidden 7168, top-8: the NVFP4 dispatch message (4096 B) + an int8 / FP8 combine (7168 + 224 B vs 14336 B)
    assert wire_bytes_per_token("agrs-nvfp4", 7168, 8) == 4096 + 14336
    for fmt in FORMATS:
        assert wire_bytes_per_token("agrs-nvfp4", 7168, 8, combine_format=fmt) == 4096 + 7168 + 224
    with pytest.raises(ValueError, match="allreduce strategy combines in bf16"):
        wire_bytes_per_token("allreduce", 7168, 8, combine_format="int8")


def test_bench_accuracy_small(tmp_path):
    """``moecomm bench accuracy`` on small shapes: a row per activation set and format, errors within what the
    formats allow. Relative L2 against the exact sum of the partials: bf16 rounds once (at most 2**-8 relative
    per element). int8 adds at most half a step per piece and element, scale / 2 = amax / 254, and a group's
    amax is at most sqrt(128) times its RMS: at most sqrt(128) / 254 = 0.045 of a piece's norm; two pieces add at
    most 0.09 of their norms' sum, which is the sum's norm while the pieces do not cancel (independent random
    experts here). FP8: at most 2**-4 relative per element per piece (subnormals aside)."""
    import json

    from moecomm.cli import main

    path = tmp_path / "acc.json"
    assert main(["bench", "accuracy", "--world-sizes", "2", "--hidden", "256", "--inter", "64", "--experts", "16",
                 "--tokens", "16", "--json", str(path)]) == 0
    rows = {(r["activations"], r["combine_format"]): r for r in json.loads(path.read_text())["results"]}
    assert set(rows) == {(a, f) for a in ("gaussian", "outliers", "massive") for f in ("bf16", "int8", "fp8")}
    for (act, fmt), r in rows.items():
        assert r["combine_bytes_per_token"] == (512 if fmt == "bf16" else 256 + 8)
        assert 0 < r["rel_l2_vs_exact_combine"] <= {"bf16": 2**-8, "int8": 0.09, "fp8": 2**-4}[fmt], (act, fmt, r)
        assert r["rel_l2_vs_fp64_layer"] > 0 and (r["vs_bf16_combine"] == 1) == (fmt == "bf16")


# ----------------------------------------------------------------------------------------------------
# Errors: before any communication, on every rank when validating


def _errors():
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [2] * world
    x = torch.randn(2 * world, HIDDEN).bfloat16()
    odd = make_expert_weights(torch.randn(world, 64, 200), torch.randn(world, 200, 32), ep_size=world, ep_rank=rank)
    mine = make_expert_weights(torch.randn(world, 64, HIDDEN), torch.randn(world, HIDDEN, 32), ep_size=world,
                               ep_rank=rank)
    ids, w = topk_softmax(torch.randn(2, world), 1)
    cases = {
        "odd hidden": lambda: reduce_scatterv(torch.randn(2 * world, 200).bfloat16(), sizes, wire_format="int8",
                                              validate=True),
        "fp16": lambda: reduce_scatterv(x.half(), sizes, wire_format="fp8", validate=True),
        "unknown format": lambda: reduce_scatterv(x, sizes, wire_format="int4", validate=True),
        "allreduce": lambda: reduce_scatterv(x, sizes, wire_format="int8", algorithm="allreduce", validate=True),
        "symm on gloo": lambda: reduce_scatterv(x, sizes, wire_format="int8", algorithm="symm", validate=True),
        "disagree": lambda: reduce_scatterv(x, sizes, wire_format=["int8", "fp8", "bf16"][rank % 3], validate=True),
        "moe odd hidden": lambda: moe_forward(torch.randn(2, 200).bfloat16(), ids, w, odd, sizes=sizes,
                                              strategy="agrs", combine_format="fp8", validate=True),
        "moe allreduce": lambda: moe_forward(x[:2], ids, w, mine, sizes=sizes, strategy="allreduce",
                                             combine_format="int8", validate=True),
        "moe disagree": lambda: moe_forward(x[:2], ids, w, mine, sizes=sizes,
                                            strategy="agrs", combine_format="bf16" if rank else "int8",
                                            validate=True),
    }
    return {case: error_of(fn) for case, fn in cases.items()}


def test_errors_are_raised_on_every_rank():
    results = launch(_errors, 3, (), backend="gloo", timeout=300)
    assert_raised_on_every_rank(results)
    mine = results[0]
    assert "positive multiple of 128 elements, got 200" in mine["odd hidden"]
    assert "sums bf16 or fp32 partials, got torch.float16" in mine["fp16"]
    assert "choose one of 'bf16', 'int8', 'fp8'" in mine["unknown format"]
    assert "algorithm='allreduce' sums on the wire" in mine["allreduce"]
    assert "needs CUDA tensors on an NCCL group" in mine["symm on gloo"]
    assert "ranks disagree on wire_format" in mine["disagree"]
    assert "combine_format: the fp8 wire format quantizes per 128 columns" in mine["moe odd hidden"]
    assert "needs an agrs strategy" in mine["moe allreduce"]
    assert "ranks disagree on combine_format" in mine["moe disagree"]


# ----------------------------------------------------------------------------------------------------
# GPU (NCCL): the same bits as the CPU reference, every transport, CUDA-graph capture


def _gpu_case(seed):
    rank, world = dist.get_rank(), dist.get_world_size()
    device = rank_device()
    hidden = 7168
    for sizes in ([1000 + 7 * r for r in range(world)], [0] + [300] * (world - 1), [512] * world):
        total, start, n = sum(sizes), sum(sizes[:rank]), sizes[rank]
        xs = _partials(seed, world, total, hidden)
        for fmt in FORMATS:
            want = _expected(xs, start, n, fmt)[0] if world > 1 else xs[0]  # one rank: nothing travels, a copy
            for algorithm in ("auto", "symm"):
                got = reduce_scatterv(xs[rank].to(device), sizes, wire_format=fmt, algorithm=algorithm)
                assert torch.equal(got.cpu(), want), (fmt, algorithm, sizes, seed)
            # captured in a CUDA graph with a preallocated out (no host sync inside)
            x, out = xs[rank].to(device), torch.empty(n, hidden, dtype=torch.bfloat16, device=device)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                reduce_scatterv(x, sizes, wire_format=fmt, out=out)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                reduce_scatterv(x, sizes, wire_format=fmt, out=out)
            out.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out.cpu(), want), (fmt, "graph", sizes, seed)
    return "ok"


@pytest.mark.gpu
def test_gpu_quantized_reduce_scatterv_equals_cpu_reference():
    on_every_gpu_count(_gpu_case)


def _gpu_graphed_moe(seed):
    from moecomm.layer import GraphedMoE

    rank, world = dist.get_rank(), dist.get_world_size()
    device = rank_device()
    x, ids, w, w13, w2 = (t.to(device) for t in _problem(seed, [8] * world, 4 * world))  # at least topk experts
    mine = make_expert_weights(w13, w2, ep_size=world, ep_rank=rank)
    rows = slice(8 * rank, 8 * rank + 8)
    for fmt in FORMATS:
        eager = moe_forward(x[rows], ids[rows], w[rows], mine, sizes=[8] * world, strategy="agrs", combine_format=fmt)
        graphed = GraphedMoE(mine, hidden_size=HIDDEN, topk=TOPK, buckets=[8], strategy="agrs", combine_format=fmt)
        assert torch.equal(graphed(x[rows], ids[rows], w[rows], sizes=[8] * world), eager), (fmt, seed)
    return "ok"


@pytest.mark.gpu
def test_gpu_graphed_moe_with_a_quantized_combine():
    on_every_gpu_count(_gpu_graphed_moe)
