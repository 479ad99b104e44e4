"""Dispatch / combine contracts on 2-4 gloo ranks: every strategy vs the single-process MoE, bit-identity
of quantize-before-gather with quantize-after, bytes on the wire, and errors raised on every rank."""

import random

import pytest
import torch
import torch.distributed as dist

from moecomm.comm import Algorithm, launch, rank_device
from moecomm.layer import (
    DISABLE_ENV,
    Strategy,
    choose_strategy,
    dispatch,
    explain_strategy,
    message_layout,
    moe_forward,
    wire_bytes_per_token,
)
from moecomm.moe import (
    experts_forward,
    experts_forward_ref,
    make_expert_weights,
    topk_softmax,
)
from moecomm.quant import QuantFormat, nvfp4_global_scale
from moecomm.testing import (
    assert_close,
    assert_raised_on_every_rank,
    error_of,
    on_every_gpu_count,
)

HIDDEN, INTER, TOPK = 128, 32, 3
# Tolerance vs the float32 single-process reference: bf16 partial outputs, summed in bf16 across ranks.
TOL = 2e-2


def _problem(seed, sizes, num_experts):
    """Every rank's tokens and routing plus all experts' weights, drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    x = torch.randn(total, HIDDEN, generator=gen).bfloat16()
    x[:, 5] *= 8  # an outlier channel
    logits = torch.randn(total, num_experts, generator=gen)
    ids, w = topk_softmax(logits, TOPK)
    masked = torch.rand(total, TOPK, generator=gen) < 0.2  # masked slots (-1), and every 4th row whole
    masked[::4] = True
    ids = torch.where(masked, -1, ids)
    w = torch.where(masked, torch.rand(total, TOPK, generator=gen) * 9, w)  # a masked slot's weight is unread
    w13 = torch.randn(num_experts, 2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5
    w2 = torch.randn(num_experts, HIDDEN, INTER, generator=gen) / INTER**0.5
    return x, ids, w, w13, w2


def _rows(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start : start + sizes[rank]]


def _contracts(seed, sizes_list):
    rank, world = dist.get_rank(), dist.get_world_size()
    num_experts = 4 * world
    for sizes in sizes_list:
        x, ids, w, w13, w2 = (t.to(rank_device()) for t in _problem(seed, sizes, num_experts))
        total = sum(sizes)
        mine = make_expert_weights(w13, w2, ep_size=world, ep_rank=rank)
        everything = make_expert_weights(w13, w2)  # all experts in one process: the oracle
        nvfp4 = nvfp4_global_scale(x.float().abs().max() if total else 0.0)  # static, from the whole batch
        args = (_rows(x, sizes, rank), _rows(ids, sizes, rank), _rows(w, sizes, rank), mine)
        outs = {}
        for strategy, fmt in [(Strategy.ALLREDUCE, None), (Strategy.AGRS, None),
                              (Strategy.AGRS_NVFP4, QuantFormat.NVFP4), (Strategy.AGRS_FP8, QuantFormat.FP8_GROUP)]:
            gs = nvfp4 if fmt == QuantFormat.NVFP4 else None  # refused where no NVFP4 is used
            out = moe_forward(*args, sizes=sizes, strategy=strategy, global_scale=gs, expert_input_format=fmt)
            assert out.dtype == torch.bfloat16 and out.shape == (sizes[rank], HIDDEN)
            ref = experts_forward_ref(x, ids, w, everything, input_format=fmt,
                                      global_scale=gs if fmt == QuantFormat.NVFP4 else None)
            assert_close(out.float(), _rows(ref, sizes, rank), rel=TOL, name=f"{strategy.value} {sizes}")
            outs[strategy] = out
            # Quantized before the gather == the experts quantizing after it, bit for bit.
            if fmt is not None:
                after = moe_forward(*args, sizes=sizes, strategy=Strategy.AGRS, global_scale=gs,
                                    expert_input_format=fmt)
                assert torch.equal(out, after), f"{strategy.value} differs from agrs + experts quantizing"
                unpacked = moe_forward(*args, sizes=sizes, strategy=strategy, global_scale=gs,
                                       expert_input_format=fmt, pack=False)
                assert torch.equal(out, unpacked), "packed message differs from separate tensors"
                assert torch.equal(out, moe_forward(*args, sizes=sizes, strategy="auto", global_scale=gs,
                                                    expert_input_format=fmt, validate=True))
        # FP8 per token on the wire when the experts consume per-token FP8
        out = moe_forward(*args, sizes=sizes, strategy=Strategy.AGRS_FP8, expert_input_format=QuantFormat.FP8_TOKEN)
        after = moe_forward(*args, sizes=sizes, strategy=Strategy.AGRS, expert_input_format=QuantFormat.FP8_TOKEN)
        assert torch.equal(out, after)
        # The layouts of the gathered rows (padded: masked padding rows) and the collectives' algorithms agree
        for algorithm in ("broadcast", "padded"):
            for strategy, fmt in [(Strategy.AGRS, None), (Strategy.AGRS_NVFP4, QuantFormat.NVFP4)]:
                gs = nvfp4 if fmt == QuantFormat.NVFP4 else None
                got = moe_forward(*args, sizes=sizes, strategy=strategy, global_scale=gs, expert_input_format=fmt,
                                  algorithm=algorithm)
                assert_close(got.float(), outs[strategy].float(), rel=TOL, name=f"{strategy.value} {algorithm}")
        # Unquantized experts: allreduce and agrs agree to bf16 rounding of the cross-rank sums.
        assert_close(outs[Strategy.ALLREDUCE].float(), outs[Strategy.AGRS].float(), rel=TOL, name="allreduce vs agrs")
    return "ok"


def _sizes_list(world, rng):
    return [
        [rng.randint(1, 12) for _ in range(world)],
        [0] + [rng.randint(3, 20) for _ in range(world - 1)],  # an idle rank
        [0] * world,  # all idle
    ]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_strategies_match_reference(world_size):
    seed = random.randrange(1 << 30)
    sizes_list = _sizes_list(world_size, random.Random(seed))
    assert launch(_contracts, world_size, (seed, sizes_list), backend="gloo", timeout=300) == ["ok"] * world_size, seed


def test_wire_bytes_formula():
    # hidden 7168, top-8: payload + scales per token, + 32 B ids + 32 B weights, + 14336 B bf16 combine
    assert message_layout(QuantFormat.NVFP4, 7168, 8).row_bytes == 3584 + 448 + 64
    assert message_layout(QuantFormat.FP8_GROUP, 7168, 8).row_bytes == 7168 + 224 + 64
    assert message_layout(QuantFormat.FP8_TOKEN, 7168, 8).row_bytes == 7168 + 4 + 64 + 12  # 16-byte aligned
    assert wire_bytes_per_token("agrs", 7168, 8) == 14336 + 64 + 14336
    assert wire_bytes_per_token("allreduce", 7168, 8) == 14336 + 64 + 14336
    assert wire_bytes_per_token("agrs-nvfp4", 7168, 8) == 4032 + 64 + 14336
    assert wire_bytes_per_token("agrs-fp8", 7168, 8) == 7392 + 64 + 14336
    layout = message_layout(QuantFormat.NVFP4, 7168, 8)
    assert (layout.payload, layout.scales, layout.ids, layout.weights) == (
        slice(0, 3584), slice(3584, 4032), slice(4032, 4064), slice(4064, 4096))


def test_choose_strategy(monkeypatch):
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    kw = dict(world_size=8, ep_size=8)
    assert choose_strategy(QuantFormat.NVFP4, 4096, **kw) == Strategy.AGRS_NVFP4
    assert choose_strategy(QuantFormat.FP8_GROUP, 4096, **kw) == Strategy.AGRS_FP8
    assert choose_strategy(None, 4096, **kw) == Strategy.AGRS  # unquantized experts never quantize
    assert choose_strategy(QuantFormat.NVFP4, 4096, world_size=8, ep_size=1) == Strategy.AGRS
    assert choose_strategy(QuantFormat.NVFP4, 4096, allow_quantized=False, **kw) == Strategy.AGRS
    monkeypatch.setenv(DISABLE_ENV, "1")
    assert choose_strategy(QuantFormat.NVFP4, 4096, **kw) == Strategy.AGRS
    assert choose_strategy(QuantFormat.NVFP4, 4096, allow_quantized=True, **kw) == Strategy.AGRS_NVFP4
    # measured on one H200: with one rank nothing crosses a wire, so the quantized path never pays
    assert choose_strategy(QuantFormat.NVFP4, 1 << 20, world_size=1, ep_size=1, allow_quantized=True) == Strategy.AGRS


def test_strategy_choice_refuses_bad_arguments():
    """explain_strategy / choose_strategy name the bad value instead of choosing from it (an unknown format used
    to read as 'the experts consume xx', a negative count as 'below the crossover')."""
    kw = dict(world_size=8, ep_size=8)
    for fn in (explain_strategy, choose_strategy):
        for fmt in ("xx", 3, QuantFormat.MXFP4.value.upper()):
            with pytest.raises(ValueError, match=f"expert_input_format.*{fmt!r}"):
                fn(fmt, 4096, **kw)
        for tokens in (-1, "4096", 4096.0, None, True):
            with pytest.raises((TypeError, ValueError), match=f"total_tokens.*{tokens!r}"):
                fn(QuantFormat.NVFP4, tokens, **kw)
        for name, value in (("world_size", 0), ("world_size", "8"), ("ep_size", None if fn is choose_strategy else 0),
                            ("ep_size", 8.0)):
            with pytest.raises((TypeError, ValueError), match=f"{name}.*{value!r}"):
                fn(QuantFormat.NVFP4, 4096, **{**kw, name: value})
    # strings and enums alike; MXFP4 experts are valid (no strategy sends MXFP4, so agrs)
    assert explain_strategy("fp8-group", 4096, world_size=8).strategy == Strategy.AGRS_FP8
    assert explain_strategy(QuantFormat.MXFP4, 4096, world_size=8).strategy == Strategy.AGRS


def test_crossover_from_measurements(tmp_path):
    from moecomm.bench.moe import crossover, write_crossover

    def row(strategy, total, seconds):
        return {"pattern": "balanced", "strategy": strategy, "sizes": [total // 2, total - total // 2],
                "seconds": {"total": seconds}}

    # nvfp4 pays from 64 tokens on; fp8 only at 4096 (and not at 1024, so not below it either)
    results = [row("agrs", n, t) for n, t in [(2, 1.0), (64, 2.0), (1024, 3.0), (4096, 9.0)]]
    results += [row("agrs-nvfp4", n, t) for n, t in [(2, 1.5), (64, 1.9), (1024, 2.0), (4096, 5.0)]]
    results += [row("agrs-fp8", n, t) for n, t in [(2, 0.5), (64, 2.5), (1024, 3.5), (4096, 8.0)]]
    assert crossover(results) == {"agrs-nvfp4": 64, "agrs-fp8": 4096}
    results[-1]["seconds"]["total"] = 9.5
    assert crossover(results)["agrs-fp8"] is None
    path = tmp_path / "crossover.json"
    write_crossover(str(path), 2, {"agrs-nvfp4": 64, "agrs-fp8": None}, "test")
    write_crossover(str(path), 4, {"agrs-nvfp4": 8, "agrs-fp8": 8}, "test")
    import json
    table = json.loads(path.read_text())["min_total_tokens"]
    assert table["2"] == {"agrs-nvfp4": 64, "agrs-fp8": None} and table["4"]["agrs-fp8"] == 8 and "default" in table



def _with_id(ids, value):
    ids = ids.clone()
    ids[0, 0] = value
    return ids


def _errors():
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [2 + r for r in range(world)]
    n = sizes[rank]
    w13, w2 = torch.randn(2 * world, 2 * INTER, HIDDEN), torch.randn(2 * world, HIDDEN, INTER)
    mine = make_expert_weights(w13, w2, ep_size=world, ep_rank=rank)
    x = torch.randn(n, HIDDEN).bfloat16()
    ids, w = topk_softmax(torch.randn(n, 2 * world), 2)
    odd = torch.randn(n, HIDDEN - 8).bfloat16()
    return {
        "hidden not divisible by the block": error_of(lambda: moe_forward(
            odd, ids, w, mine, sizes=sizes, strategy="agrs-nvfp4", global_scale=1.0)),
        "fp32 hidden": error_of(lambda: moe_forward(x.float(), ids, w, mine, sizes=sizes, strategy="agrs")),
        "int16 ids": error_of(lambda: moe_forward(x, ids.short(), w, mine, sizes=sizes, strategy="agrs")),
        "missing global scale": error_of(lambda: moe_forward(x, ids, w, mine, sizes=sizes, strategy="agrs-nvfp4")),
        "non-finite global scale": error_of(lambda: moe_forward(
            x, ids, w, mine, sizes=sizes, strategy="agrs-nvfp4", global_scale=float("inf"))),
        # finite in float64 but not in fp32 (inf, 0): refused at the door, not by the experts' quantizer after the
        # gather
        "global scale beyond fp32": error_of(lambda: moe_forward(
            x, ids, w, mine, sizes=sizes, strategy="agrs", expert_input_format=QuantFormat.NVFP4, global_scale=1e39)),
        "global scale below fp32": error_of(lambda: moe_forward(
            x, ids, w, mine, sizes=sizes, strategy="agrs", expert_input_format=QuantFormat.NVFP4,
            global_scale=torch.tensor(1e-46, dtype=torch.float64))),
        "global scale disagrees": error_of(lambda: moe_forward(
            x, ids, w, mine, sizes=sizes, strategy="agrs-nvfp4", global_scale=1.0 + rank, validate=True)),
        "wire format differs from the experts'": error_of(lambda: moe_forward(
            x, ids, w, mine, sizes=sizes, strategy="agrs-fp8", expert_input_format=QuantFormat.NVFP4)),
        "numpy hidden on rank 1": error_of(lambda: moe_forward(
            x.float().numpy() if rank == 1 else x, ids, w, mine, sizes=sizes, strategy="agrs", validate=True)),
        "two-element global scale on rank 0": error_of(lambda: moe_forward(
            x, ids, w, mine, sizes=sizes, strategy="agrs-nvfp4",
            global_scale=torch.tensor([2.0, 2.0]) if rank == 0 else 2.0, validate=True)),
        "FP8 flavour disagrees": error_of(lambda: moe_forward(
            x, ids, w, mine, sizes=sizes, strategy="agrs-fp8", validate=True,
            expert_input_format=QuantFormat.FP8_TOKEN if rank == 0 else QuantFormat.FP8_GROUP)),
        "chunks disagree": error_of(lambda: moe_forward(
            x, ids, w, mine, sizes=sizes, strategy="agrs", chunks=1 + rank % 2, validate=True)),
        "chunks 0 on rank 1": error_of(lambda: moe_forward(
            x, ids, w, mine, sizes=sizes, strategy="agrs", chunks=0 if rank == 1 else 1, validate=True)),
        "pack not a bool": error_of(lambda: moe_forward(
            x, ids, w, mine, sizes=sizes, strategy="agrs-fp8", pack="no", validate=True)),
        "pack disagrees": error_of(lambda: moe_forward(
            x, ids, w, mine, sizes=sizes, strategy="agrs-fp8", pack=rank != 2, validate=True)),
        "experts not split over the ranks": error_of(lambda: moe_forward(
            x, ids, w, make_expert_weights(w13, w2), sizes=sizes, strategy="agrs")),
        "experts' hidden size on rank 2": error_of(lambda: moe_forward(
            x, ids, w, make_expert_weights(w13[..., :64], w2[:, :64], ep_size=world, ep_rank=rank) if rank == 2
            else mine, sizes=sizes, strategy="agrs", validate=True)),
        "int64 id past int32": error_of(lambda: moe_forward(
            x, _with_id(ids.long(), 2**32 + 1), w, mine, sizes=sizes, strategy="agrs", validate=True)),
        "id -2 on rank 1": error_of(lambda: moe_forward(
            x, _with_id(ids, -2) if rank == 1 else ids, w, mine, sizes=sizes, strategy="agrs-fp8", validate=True)),
        "rows on one rank": error_of(lambda: moe_forward(
            x[: n - (rank == 1)], ids[: n - (rank == 1)], w[: n - (rank == 1)], mine, sizes=sizes,
            strategy="agrs", validate=True)),
        # strategy and format names are checked inside the checks: validation raises on every rank
        "unknown strategy on rank 2": error_of(lambda: moe_forward(
            x, ids, w, mine, sizes=sizes, strategy="agrs-nvfp5" if rank == 2 else "agrs", validate=True)),
        "dispatch: auto on rank 0": error_of(lambda: dispatch(
            x, ids, w, sizes=sizes, strategy="auto" if rank == 0 else "agrs", validate=True)),
        # an unknown experts' format raises before the dispatch (it used to raise in the experts, after it)
        "unknown experts' format": error_of(lambda: moe_forward(
            x, ids, w, mine, sizes=sizes, strategy="agrs", expert_input_format="fp4")),
        "unknown experts' format on rank 1": error_of(lambda: moe_forward(
            x, ids, w, mine, sizes=sizes, strategy="agrs", expert_input_format="fp4" if rank == 1 else None,
            validate=True)),
    }


def _odd_hidden_sizes():
    """Hidden sizes whose payload is not a multiple of 4 bytes: the ids and weights still land on 4-byte
    columns, and the packed message carries the same values as separate tensors."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [3, 0, 2][:world]
    for hidden, strategy, fmt in [(16, "agrs-nvfp4", QuantFormat.NVFP4), (48, "agrs-nvfp4", QuantFormat.NVFP4),
                                  (30, "agrs-fp8", QuantFormat.FP8_TOKEN), (31, "agrs", None)]:
        gen = torch.Generator().manual_seed(hidden)
        x = torch.randn(sum(sizes), hidden, generator=gen).bfloat16()
        ids, w = topk_softmax(torch.randn(sum(sizes), 6, generator=gen), 2)
        mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        # enum or string spellings differ across ranks: validation compares values, not spellings
        kw = dict(sizes=sizes, strategy=strategy, global_scale=2.0 if fmt == QuantFormat.NVFP4 else None, validate=True,
                  expert_input_format=fmt.value if fmt is not None and rank == 1 else fmt,
                  algorithm=Algorithm.BROADCAST if rank == 0 else "broadcast")
        tokens, gids, gw, _ = dispatch(x[mine], ids[mine], w[mine], **kw)
        ref_tokens, _, _, _ = dispatch(x[mine], ids[mine], w[mine], pack=False, **kw)
        assert torch.equal(gids, ids) and torch.equal(gw, w), (hidden, strategy)
        if fmt is None:
            assert torch.equal(tokens, x), hidden
        else:
            assert torch.equal(tokens.data.view(torch.uint8), ref_tokens.data.view(torch.uint8)), hidden
            assert torch.equal(tokens.scales.view(torch.uint8), ref_tokens.scales.view(torch.uint8)), hidden
    return "ok"


def test_odd_hidden_sizes_travel_packed():
    layout = message_layout(QuantFormat.NVFP4, 16, 2)  # 8 B of e2m1 + 1 B of e4m3 scale, ids from byte 12
    assert (layout.payload, layout.scales, layout.ids, layout.weights) == (
        slice(0, 8), slice(8, 9), slice(12, 20), slice(20, 28))
    assert launch(_odd_hidden_sizes, 3, backend="gloo", timeout=120) == ["ok"] * 3


def test_bad_input_raises_on_every_rank():
    results = launch(_errors, 3, backend="gloo", timeout=120)
    assert_raised_on_every_rank(results)
    assert "global_scale" in results[0]["global scale disagrees"]
    assert "rank 1" in results[2]["rows on one rank"]
    assert "experts consume nvfp4" in results[0]["wire format differs from the experts'"]
    assert "chunks" in results[0]["chunks disagree"] and "rank 1" in results[2]["chunks 0 on rank 1"]
    assert "wire format" in results[1]["FP8 flavour disagrees"] and "pack" in results[0]["pack disagrees"]
    assert "ep_size=3" in results[0]["experts not split over the ranks"]
    assert "topk_ids must be in [0, 6) or -1" in results[1]["int64 id past int32"]
    assert "rank 1: topk_ids must be in [0, 6) or -1 (a masked slot), got values in [-2" in results[0]["id -2 on rank 1"]
    assert "rank 1: global_scale must be finite and > 0 in fp32, got 1e+39 (inf in fp32)" in results[1][
        "global scale beyond fp32"]
    assert "rank 0: global_scale must be finite and > 0 in fp32, got 1e-46 (0.0 in fp32)" in results[0][
        "global scale below fp32"]
    assert "rank 2: 'agrs-nvfp5' is not a valid Strategy" in results[0]["unknown strategy on rank 2"]
    assert "rank 0: dispatch needs a concrete strategy" in results[1]["dispatch: auto on rank 0"]
    assert "rank 2: expert_input_format: 'fp4' is not a valid QuantFormat" in results[2]["unknown experts' format"]
    assert "rank 1: expert_input_format: 'fp4' is not a valid" in results[0]["unknown experts' format on rank 1"]


def _padded_layout_and_deferred_errors():
    from moecomm import errors
    from moecomm.layer import combine, dispatch

    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for sizes in ([3, 0, 5], [3, 2, 5]):
        n, start = sizes[rank], sum(sizes[:rank])
        x, ids, w, w13, w2 = _problem(11, sizes, 4 * world)
        mine = make_expert_weights(w13, w2, ep_size=world, ep_rank=rank)
        args = (x[start : start + n], ids[start : start + n], w[start : start + n])
        tokens, gids, gw, handle = dispatch(*args, sizes=sizes, strategy="agrs-fp8", algorithm="padded")
        pad = max(sizes)
        assert handle.padded_rows == pad and handle.rows == pad * world and gids.shape == (pad * world, TOPK)
        for r in range(world):  # rank r's rows, then its padding rows: every slot masked
            s = sum(sizes[:r])
            assert torch.equal(gids[r * pad : r * pad + sizes[r]], ids[s : s + sizes[r]])
            assert (gids[r * pad + sizes[r] : (r + 1) * pad] == -1).all()
        out = combine(experts_forward(tokens, gids, gw, mine), handle)
        compact = moe_forward(*args, mine, sizes=sizes, strategy="agrs-fp8", algorithm="broadcast")
        assert_close(out.float(), compact.float(), rel=TOL, name=f"padded layout {sizes}")
        # an id out of range on rank 1 only: no rank raises in the step, every rank raises in check_errors
        bad = _with_id(args[1], 4 * world) if rank == 1 and n else args[1]
        moe_forward(args[0], bad, args[2], mine, sizes=sizes, strategy="agrs")
        results[str(sizes)] = error_of(lambda: errors.check_errors(every_rank=True))
    return results


def test_padded_layout_and_deferred_errors():
    results = launch(_padded_layout_and_deferred_errors, 3, backend="gloo", timeout=120)
    assert [r["[3, 0, 5]"] for r in results] == [None] * 3  # rank 1 has no token to spoil
    for r in results:
        assert "rank 1: topk_ids outside [-1, num_experts) reached the experts" in r["[3, 2, 5]"]


# ---------------------------------------------------------------------------------------------------
# GPU (marked): CUDA-graph replay equals eager, on every visible GPU
# ---------------------------------------------------------------------------------------------------


def _graph_vs_eager(seed):
    from moecomm.comm import gather_sizes
    from moecomm.layer import GraphedMoE

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    num_experts = 4 * world
    w13 = torch.randn(num_experts, 2 * INTER, HIDDEN, generator=torch.Generator().manual_seed(seed)) / HIDDEN**0.5
    w2 = torch.randn(num_experts, HIDDEN, INTER, generator=torch.Generator().manual_seed(seed + 1)) / INTER**0.5
    mine = make_expert_weights(w13.to(device), w2.to(device), ep_size=world, ep_rank=rank)
    gs = nvfp4_global_scale(torch.tensor(6.0, device=device))
    for strategy, fmt in [("agrs", None), ("agrs-nvfp4", QuantFormat.NVFP4), ("agrs-fp8", QuantFormat.FP8_GROUP),
                          ("allreduce", None)]:
        graphed = GraphedMoE(mine, hidden_size=HIDDEN, topk=TOPK, buckets=[4, 16], strategy=strategy,
                             global_scale=gs if fmt == QuantFormat.NVFP4 else None, expert_input_format=fmt)
        for step, n in enumerate([3, 16, 1, 0, 9]):
            n = (n + rank) % 17
            gen = torch.Generator().manual_seed(seed * 7 + step * 31 + rank)
            x = torch.randn(n, HIDDEN, generator=gen).bfloat16().to(device)
            ids, w = topk_softmax(torch.randn(n, num_experts, generator=gen).to(device), TOPK)
            sizes = gather_sizes(n)
            got = graphed(x, ids, w, sizes=sizes).clone()
            assert torch.equal(got, graphed(x, ids, w))  # the bucket found by the all-reduce is the same
            # eager on the same padded bucket, padding rows masked: identical work, so identical bytes
            bucket = graphed.bucket_for(n, sizes)
            pad = bucket - n
            xp = torch.cat([x, x.new_zeros(pad, HIDDEN)])
            idp = torch.cat([ids, ids.new_full((pad, TOPK), -1)])
            wp = torch.cat([w, w.new_zeros(pad, TOPK)])
            eager = moe_forward(xp, idp, wp, mine, sizes=[bucket] * world, strategy=strategy,
                                global_scale=gs if fmt == QuantFormat.NVFP4 else None, expert_input_format=fmt)[:n]
            assert torch.equal(got, eager), (strategy, n)
        with pytest.raises(ValueError, match="largest captured bucket"):
            graphed(torch.zeros(17, HIDDEN, dtype=torch.bfloat16, device=device),
                    torch.zeros(17, TOPK, dtype=torch.int32, device=device),
                    torch.zeros(17, TOPK, device=device))
    return "ok"


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager():
    on_every_gpu_count(_graph_vs_eager)


@pytest.mark.gpu
def test_strategies_match_reference_nccl():
    world = torch.cuda.device_count()
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for ws in sorted({1, world}):
        assert launch(_contracts, ws, (seed, _sizes_list(ws, rng) if ws > 1 else [[7], [0]]), backend="nccl",
                      timeout=300) == ["ok"] * ws, (ws, seed)



def _eager_step_never_syncs(seed):
    """An eager step reads no device value on the host: torch's sync debug mode "error" raises on any."""
    from moecomm import errors
    from moecomm.comm import gather_sizes
    from moecomm.layer import combine, dispatch
    from moecomm.moe import WeightFormat
    from moecomm.quant import quantize

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(4 * world, 2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5
    w2 = torch.randn(4 * world, HIDDEN, INTER, generator=gen) / INTER**0.5
    experts = {f: make_expert_weights(w13.to(device), w2.to(device), ep_size=world, ep_rank=rank, format=f)
               for f in (WeightFormat.BF16, WeightFormat.FP8_CHANNEL)}
    sizes = gather_sizes(3 + 2 * rank)  # uneven, agreed before the steps
    x = torch.randn(sizes[rank], HIDDEN, generator=gen).bfloat16().to(device)
    ids, w = topk_softmax(torch.randn(sizes[rank], 4 * world, generator=gen).to(device), TOPK)
    ids[0, 0] = -1
    gs = nvfp4_global_scale(torch.tensor(6.0, device=device))
    cases = [("allreduce", WeightFormat.FP8_CHANNEL, QuantFormat.FP8_TOKEN, "auto"),
             ("agrs", WeightFormat.FP8_CHANNEL, QuantFormat.FP8_TOKEN, "auto"),
             ("agrs-fp8", WeightFormat.FP8_CHANNEL, QuantFormat.FP8_TOKEN, "padded"),
             ("agrs-nvfp4", WeightFormat.BF16, QuantFormat.NVFP4, "broadcast"),
             ("auto", WeightFormat.BF16, QuantFormat.FP8_GROUP, "auto")]
    for strategy, wfmt, fmt, algorithm in cases:
        kw = dict(sizes=sizes, strategy=strategy, global_scale=gs if fmt == QuantFormat.NVFP4 else None,
                  expert_input_format=fmt, algorithm=algorithm)
        step = lambda: moe_forward(x, ids, w, experts[wfmt], **kw)  # noqa: E731
        expected = step()  # warm-up: kernels compiled, communicator and buffers created
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = step()
            quantize(x, fmt, global_scale=gs if fmt == QuantFormat.NVFP4 else None)
            if strategy != "auto":
                tokens, gids, gw, handle = dispatch(x, ids, w, **{k: v for k, v in kw.items() if k != "algorithm"})
                combine(experts_forward(tokens, gids, gw, experts[wfmt],
                                        input_format=fmt if isinstance(tokens, torch.Tensor) else None,
                                        global_scale=gs if fmt == QuantFormat.NVFP4 and isinstance(tokens, torch.Tensor) else None),
                        handle)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.equal(got, expected), strategy
    errors.check_errors()
    return "ok"


@pytest.mark.gpu
def test_eager_step_never_syncs():
    on_every_gpu_count(_eager_step_never_syncs)


def _chunks_are_exact(seed):
    """moe_forward in C pipelined chunks equals one piece, bit for bit, for every strategy (experts are
    row-local; gloo sums in rank order)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    rng = random.Random(seed)
    for sizes in ([rng.randint(0, 9) for _ in range(world)], [0] * (world - 1) + [5], [1] * world):
        x, ids, w, w13, w2 = (t.to(rank_device()) for t in _problem(seed, sizes, 4 * world))
        mine = make_expert_weights(w13, w2, ep_size=world, ep_rank=rank)
        gs = nvfp4_global_scale(x.float().abs().max() if sum(sizes) else 0.0)
        start, n = sum(sizes[:rank]), sizes[rank]
        args = (x[start : start + n], ids[start : start + n], w[start : start + n], mine)
        for strategy, fmt in [("allreduce", None), ("agrs", None), ("agrs-nvfp4", QuantFormat.NVFP4),
                              ("agrs-fp8", QuantFormat.FP8_TOKEN)]:
            kw = dict(sizes=sizes, strategy=strategy, global_scale=gs if fmt == QuantFormat.NVFP4 else None,
                      expert_input_format=fmt)
            one = moe_forward(*args, chunks=1, **kw)
            for chunks in (2, 3, 7):
                got = moe_forward(*args, chunks=chunks, **kw)
                assert got.shape == one.shape and torch.equal(got, one), (strategy, sizes, chunks)
    return "ok"


@pytest.mark.parametrize("world_size", [2, 3])
def test_chunks_are_bit_identical(world_size):
    seed = random.randrange(1 << 30)
    assert launch(_chunks_are_exact, world_size, (seed,), backend="gloo", timeout=300) == ["ok"] * world_size, seed


def test_flags_and_graphs_refuse_what_they_cannot_take():
    from moecomm.layer import GraphedMoE, choose_strategy

    w13, w2 = torch.randn(4, 2 * INTER, HIDDEN), torch.randn(4, HIDDEN, INTER)
    with pytest.raises(ValueError, match="needs a CUDA device"):  # CPU weights (and, here, no CUDA at all)
        GraphedMoE(make_expert_weights(w13, w2), hidden_size=HIDDEN, topk=TOPK, buckets=[1, 2])
    with pytest.raises(TypeError, match="allow_quantized must be a bool"):
        choose_strategy(QuantFormat.NVFP4, 4096, world_size=2, ep_size=2, allow_quantized="no")
    from moecomm.comm import validation_enabled

    with pytest.raises(TypeError, match="validate must be a bool"):
        validation_enabled("no")
    from moecomm.layer import combine

    with pytest.raises(TypeError, match="needs the DispatchHandle"):
        combine(torch.randn(4, HIDDEN).bfloat16(), {"rows": 4})


def test_chunks_argument():
    from moecomm.layer.strategy import resolve_chunks

    assert resolve_chunks(3, [4, 4], 2) == 3
    assert resolve_chunks(None, [4, 4], 2) == 1  # nothing measured: no chunking
    for bad in (0, -1, 2.0, True, "2"):
        with pytest.raises(ValueError, match="chunks must be a positive int"):
            resolve_chunks(bad, [4, 4], 2)


def _chunks_on_gpu(seed):
    from moecomm.layer import GraphedMoE

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    sizes = [37 + 50 * r for r in range(world)]
    x, ids, w, w13, w2 = (t.to(device) for t in _problem(seed, sizes, 4 * world))
    mine = make_expert_weights(w13, w2, ep_size=world, ep_rank=rank)
    start, n = sum(sizes[:rank]), sizes[rank]
    args = (x[start : start + n], ids[start : start + n], w[start : start + n], mine)
    for strategy, fmt in [("agrs", None), ("agrs-fp8", QuantFormat.FP8_GROUP), ("allreduce", None)]:
        kw = dict(sizes=sizes, strategy=strategy, expert_input_format=fmt)
        one = moe_forward(*args, chunks=1, **kw)
        for chunks in (2, 3):
            assert torch.equal(moe_forward(*args, chunks=chunks, **kw), one), (strategy, chunks)
        graphed = GraphedMoE(mine, hidden_size=HIDDEN, topk=TOPK, buckets=[max(sizes)], strategy=strategy,
                             expert_input_format=fmt, chunks=3)
        got = graphed(*args[:3], sizes=sizes).clone()
        pad = max(sizes) - n
        eager = moe_forward(torch.cat([args[0], args[0].new_zeros(pad, HIDDEN)]),
                            torch.cat([args[1], args[1].new_full((pad, TOPK), -1)]),
                            torch.cat([args[2], args[2].new_zeros(pad, TOPK)]), mine,
                            sizes=[max(sizes)] * world, strategy=strategy, expert_input_format=fmt, chunks=1)[:n]
        assert torch.equal(got, eager), strategy
    return "ok"


@pytest.mark.gpu
def test_chunks_on_gpu_eager_and_graphed():
    on_every_gpu_count(_chunks_on_gpu)
