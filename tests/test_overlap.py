"""Overlap that keeps the results: shared experts during the dispatch (bit for bit ``moe_forward(...) +
shared(hidden)``, and right against float references), asynchronous dispatch / combine (equal to the
synchronous ones), on 2-3 gloo ranks with an idle rank; on CUDA, streams, graphs and no host sync."""

import random

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moecomm.comm import gather_sizes, launch, rank_device
from moecomm.layer import Pending, combine, dispatch, moe_forward
from moecomm.moe import experts_forward, experts_forward_ref, make_expert_weights, topk_softmax
from moecomm.quant import QuantFormat, QuantizedTensor, nvfp4_global_scale
from moecomm.testing import assert_close, assert_raised_on_every_rank, error_of, on_every_gpu_count

HIDDEN, INTER, TOPK, SHARED = 128, 32, 3, 2
TOL = 2e-2  # bf16 partial outputs summed in bf16 over ranks, against float32 / float64 references
STRATEGIES = [("allreduce", None), ("agrs", None), ("agrs-nvfp4", QuantFormat.NVFP4),
              ("agrs-fp8", QuantFormat.FP8_TOKEN)]


class GatedMLP:
    """A shared expert as a model defines it: ``sigmoid(x g) * W2 (silu(x Wg) * x Wu)`` in bf16 (Qwen2-MoE's
    gated shared expert)."""

    def __init__(self, gen, device):
        self.w13 = (torch.randn(2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5).bfloat16().to(device)
        self.w2 = (torch.randn(HIDDEN, INTER, generator=gen) / INTER**0.5).bfloat16().to(device)
        self.gate = (torch.randn(1, HIDDEN, generator=gen) / HIDDEN**0.5).bfloat16().to(device)

    def __call__(self, x):
        gate, up = (x @ self.w13.T).chunk(2, dim=-1)
        return torch.sigmoid(x @ self.gate.T) * ((F.silu(gate) * up) @ self.w2.T)

    def reference(self, x):
        """float64 of the same function."""
        w13, w2, g = self.w13.double(), self.w2.double(), self.gate.double()
        gate, up = (x.double() @ w13.T).chunk(2, dim=-1)
        return torch.sigmoid(x.double() @ g.T) * ((F.silu(gate) * up) @ w2.T)


def _problem(seed, sizes, device):
    """Every rank's tokens and routing (masked slots included) and all experts, routed and shared."""
    world = len(sizes)
    gen = torch.Generator().manual_seed(seed)
    total = sum(sizes)
    x = torch.randn(total, HIDDEN, generator=gen).bfloat16()
    ids, w = topk_softmax(torch.randn(total, 4 * world, generator=gen), TOPK)
    ids = torch.where(torch.rand(total, TOPK, generator=gen) < 0.2, -1, ids)
    w13 = torch.randn(4 * world, 2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5
    w2 = torch.randn(4 * world, HIDDEN, INTER, generator=gen) / INTER**0.5
    s13 = torch.randn(SHARED, 2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5
    s2 = torch.randn(SHARED, HIDDEN, INTER, generator=gen) / INTER**0.5
    return [t.to(device) for t in (x, ids, w, w13, w2, s13, s2)], GatedMLP(gen, device)


def _all_ones(n, device):
    """Every token routed to every shared expert at weight 1, built here (not by moecomm)."""
    ids = torch.tensor([list(range(SHARED))] * n, dtype=torch.int32, device=device).reshape(n, SHARED)
    return ids, torch.ones(n, SHARED, device=device)


def _shared_experts_exact(seed):
    rank, world = dist.get_rank(), dist.get_world_size()
    rng = random.Random(seed)
    device = rank_device()
    idle = [rng.randint(1, 9) for _ in range(world)]
    idle[1] = 0  # rank 1 has no tokens
    for sizes in (idle, [0] * world):
        (x, ids, w, w13, w2, s13, s2), mlp = _problem(seed, sizes, device)
        start, n = sum(sizes[:rank]), sizes[rank]
        mine = make_expert_weights(w13, w2, ep_size=world, ep_rank=rank)
        everything, shared_weights = make_expert_weights(w13, w2), make_expert_weights(s13, s2)
        gs = nvfp4_global_scale(x.float().abs().max() if sum(sizes) else 0.0)
        args = (x[start : start + n], ids[start : start + n], w[start : start + n], mine)
        hidden = args[0]
        for strategy, fmt in STRATEGIES:
            nvfp4 = dict(global_scale=gs) if fmt == QuantFormat.NVFP4 else {}
            kw = dict(sizes=sizes, strategy=strategy, expert_input_format=fmt, **nvfp4)
            shared_cases = [
                (mlp, mlp(hidden), mlp.reference(hidden)),
                (shared_weights, experts_forward(hidden, *_all_ones(n, device), shared_weights, input_format=fmt,
                                                 **nvfp4),
                 experts_forward_ref(hidden, *_all_ones(n, device), shared_weights, input_format=fmt, **nvfp4)),
            ]
            routed_ref = experts_forward_ref(x, ids, w, everything, input_format=fmt, **nvfp4)[start : start + n]
            for chunks in (1, 3):
                routed = moe_forward(*args, chunks=chunks, **kw)
                for shared, shared_out, shared_ref in shared_cases:
                    got = moe_forward(*args, chunks=chunks, shared_experts=shared, **kw)
                    name = f"{strategy} chunks={chunks} {type(shared).__name__} sizes {sizes}"
                    assert got.dtype == torch.bfloat16 and got.shape == hidden.shape, name
                    assert torch.equal(got, routed + shared_out), name  # bit for bit: the one addition after
                    assert_close(got.double(), routed_ref.double() + shared_ref.double(), rel=TOL, name=name)
        # validate=True, and sizes as a tensor (through the custom op, the shared experts after it)
        kw = dict(sizes=sizes, strategy="agrs", shared_experts=mlp)
        expected = moe_forward(*args, sizes=sizes, strategy="agrs") + mlp(hidden)
        assert torch.equal(moe_forward(*args, validate=True, **kw), expected)
        assert torch.equal(moe_forward(*args, **dict(kw, sizes=torch.tensor(sizes))), expected)
    return "ok"


@pytest.mark.parametrize("world_size", [2, 3])
def test_shared_experts_equal_adding_them_afterwards(world_size):
    seed = random.randrange(1 << 30)
    assert launch(_shared_experts_exact, world_size, (seed,), backend="gloo", timeout=300) == ["ok"] * world_size, seed


def _shared_experts_errors():
    rank, world = dist.get_rank(), dist.get_world_size()
    sizes = [3, 0, 4]
    (x, ids, w, w13, w2, s13, s2), mlp = _problem(7, sizes, rank_device())
    start, n = sum(sizes[:rank]), sizes[rank]
    args = (x[start : start + n], ids[start : start + n], w[start : start + n],
            make_expert_weights(w13, w2, ep_size=world, ep_rank=rank))
    kw = dict(sizes=sizes, strategy="agrs")
    out = {}
    # the door, before any collective: on every rank with validate=True
    out["not callable"] = error_of(lambda: moe_forward(*args, shared_experts=42 if rank == 2 else mlp, validate=True,
                                                       **kw))
    split = make_expert_weights(s13.repeat(3, 1, 1)[:3], s2.repeat(3, 1, 1)[:3], ep_size=3, ep_rank=rank)
    out["split over ranks"] = error_of(lambda: moe_forward(*args, shared_experts=split, validate=True, **kw))
    narrow = make_expert_weights(s13[:, :, :64], s2[:, :64], ep_size=1)
    out["hidden size"] = error_of(lambda: moe_forward(*args, shared_experts=narrow, validate=True, **kw))
    # a bad result on one rank raises there, after the combine: the others finish, and the next step works
    wrong = error_of(lambda: moe_forward(*args, shared_experts=(lambda h: h[:, :8]) if rank == 0 else mlp, **kw))
    assert (wrong is not None) == (rank == 0), wrong
    assert rank != 0 or "shared_experts must return bf16" in wrong and "(3, 8)" in wrong, wrong

    def fails_on_rank_2(h):
        if rank == 2:
            raise RuntimeError("shared expert failed")
        return mlp(h)

    try:
        moe_forward(*args, shared_experts=fails_on_rank_2, **kw)
        assert rank != 2, "rank 2 did not raise"
    except RuntimeError as e:
        assert rank == 2 and "shared expert failed" in str(e)
    again = moe_forward(*args, shared_experts=mlp, **kw)
    assert torch.equal(again, moe_forward(*args, **kw) + mlp(args[0]))
    return out


def test_bad_shared_experts_raise_without_hanging_the_other_ranks():
    results = launch(_shared_experts_errors, 3, backend="gloo", timeout=120)
    assert_raised_on_every_rank(results)
    assert "shared_experts must be a callable" in results[0]["not callable"] and "rank 2" in results[0]["not callable"]
    assert "shared experts run on every rank" in results[1]["split over ranks"]
    assert "the shared experts' hidden size is 64" in results[2]["hidden size"]


def _same(a, b) -> bool:
    if isinstance(a, QuantizedTensor):
        return a.format == b.format and torch.equal(a.data, b.data) and torch.equal(a.scales, b.scales)
    return torch.equal(a, b)


def _async_equals_sync(seed):
    rank, world = dist.get_rank(), dist.get_world_size()
    device = rank_device()
    rng = random.Random(seed)
    sizes = [rng.randint(1, 9) for _ in range(world)]
    sizes[-1] = 0
    (x, ids, w, w13, w2, _, _), _ = _problem(seed, sizes, device)
    start, n = sum(sizes[:rank]), sizes[rank]
    mine = make_expert_weights(w13, w2, ep_size=world, ep_rank=rank)
    gs = nvfp4_global_scale(x.float().abs().max())
    args = (x[start : start + n], ids[start : start + n], w[start : start + n])
    for strategy, fmt in STRATEGIES:
        for pack in (True, False) if strategy != "allreduce" else (True,):
            kw = dict(sizes=sizes, strategy=strategy, global_scale=gs if fmt == QuantFormat.NVFP4 else None,
                      expert_input_format=fmt, pack=pack)
            sync = dispatch(*args, **kw)
            pending = dispatch(*args, async_op=True, **kw)
            assert isinstance(pending, Pending)
            got = pending.wait()
            assert got[3] == sync[3] and all(_same(a, b) for a, b in zip(got[:3], sync[:3])), (strategy, pack)
            tokens, gids, gw, handle = got
            partial = experts_forward(tokens, gids, gw, mine,
                                      input_format=fmt if isinstance(tokens, torch.Tensor) else None,
                                      global_scale=gs if fmt == QuantFormat.NVFP4 and isinstance(tokens, torch.Tensor)
                                      else None)
            want = combine(partial.clone(), handle)
            assert torch.equal(combine(partial.clone(), handle, async_op=True).wait(), want), strategy
            into = torch.full_like(want, 3.0)
            assert combine(partial.clone(), handle, out=into, async_op=True).wait() is into
            assert torch.equal(into, want), strategy
            assert torch.equal(want, moe_forward(*args, mine, **kw)), strategy  # the halves make the step
    # checks still raise at the call, before any collective and before a handle exists
    errors = {"dispatch": error_of(lambda: dispatch(*args[:2], args[2].double(), sizes=sizes, strategy="agrs",
                                                    async_op=True)),
              "combine": error_of(lambda: combine(torch.zeros(handle.rows + 1, HIDDEN, dtype=torch.bfloat16,
                                                              device=device), handle, async_op=True)),
              # a truthy string or a falsy None is not a bool (it picked the return type silently)
              "dispatch async_op": error_of(lambda: dispatch(*args, sizes=sizes, strategy="agrs", async_op="no")),
              "combine async_op": error_of(lambda: combine(partial, handle, async_op=None))}
    return errors


@pytest.mark.parametrize("world_size", [2, 3])
def test_async_dispatch_and_combine_equal_the_sync_ones(world_size):
    seed = random.randrange(1 << 30)
    results = launch(_async_equals_sync, world_size, (seed,), backend="gloo", timeout=300)
    assert_raised_on_every_rank(results)
    assert "topk_weights float32" in results[0]["dispatch"] and "partial must be" in results[0]["combine"]
    assert "TypeError: rank 0: async_op must be a bool, got 'no'" == results[0]["dispatch async_op"]
    assert "TypeError: rank 1: async_op must be a bool, got None" == results[1]["combine async_op"]


# ---------------------------------------------------------------------------------------------------
# CUDA: the lead runs these on the H200 (one GPU: world size 1; two: 1 and 2)


def _gpu_problem(seed, sizes):
    from moecomm.moe import WeightFormat

    device = torch.device("cuda", torch.cuda.current_device())
    rank, world = dist.get_rank(), dist.get_world_size()
    (x, ids, w, w13, w2, s13, s2), mlp = _problem(seed, sizes, device)
    start, n = sum(sizes[:rank]), sizes[rank]
    experts = {f: (make_expert_weights(w13, w2, ep_size=world, ep_rank=rank, format=f), make_expert_weights(s13, s2, format=f))
               for f in (WeightFormat.BF16, WeightFormat.FP8_CHANNEL)}
    cases = [("agrs", WeightFormat.FP8_CHANNEL, QuantFormat.FP8_TOKEN), ("agrs-fp8", WeightFormat.FP8_CHANNEL,
             QuantFormat.FP8_TOKEN), ("allreduce", WeightFormat.FP8_CHANNEL, QuantFormat.FP8_TOKEN),
             ("agrs-nvfp4", WeightFormat.BF16, QuantFormat.NVFP4), ("agrs", WeightFormat.BF16, None)]
    return device, (x[start : start + n], ids[start : start + n], w[start : start + n]), experts, mlp, cases


def _shared_on_gpu(seed):
    """Eager: moe_forward with shared experts == moe_forward + shared, bit for bit, chunks 1 and 2 (the shared
    experts on the caller's stream during the dispatch), uneven sizes and an idle rank. GraphedMoE with
    shared experts: replay == eager on the same padded bucket."""
    from moecomm.layer import GraphedMoE

    world, rank = dist.get_world_size(), dist.get_rank()
    uneven = gather_sizes(5 + 40 * rank)
    idle = gather_sizes(0 if rank == world - 1 else 9)  # the last rank has no tokens
    for sizes in (uneven, idle):
        device, args, experts, mlp, cases = _gpu_problem(seed, sizes)
        gs = nvfp4_global_scale(torch.tensor(8.0, device=device))
        n = args[0].shape[0]
        for strategy, wfmt, fmt in cases:
            routed_w, shared_w = experts[wfmt]
            nvfp4 = dict(global_scale=gs) if fmt == QuantFormat.NVFP4 else {}
            kw = dict(sizes=sizes, strategy=strategy, expert_input_format=fmt, **nvfp4)
            for shared, shared_out in [(mlp, mlp(args[0])),
                                       (shared_w, experts_forward(args[0], *_all_ones(n, device), shared_w,
                                                                  input_format=fmt, **nvfp4))]:
                for chunks in (1, 2):
                    got = moe_forward(*args, routed_w, chunks=chunks, shared_experts=shared, **kw)
                    want = moe_forward(*args, routed_w, chunks=chunks, **kw) + shared_out
                    assert got.shape == (n, HIDDEN) and torch.equal(got, want), (strategy, chunks, sizes)
                if sizes is idle:
                    continue
                bucket = max(sizes)
                graphed = GraphedMoE(routed_w, hidden_size=HIDDEN, topk=TOPK, buckets=[bucket], strategy=strategy,
                                     expert_input_format=fmt, shared_experts=shared, **nvfp4)
                replay = graphed(*args, sizes=sizes).clone()
                pad = bucket - n
                padded = (torch.cat([args[0], args[0].new_zeros(pad, HIDDEN)]),
                          torch.cat([args[1], args[1].new_full((pad, TOPK), -1)]),
                          torch.cat([args[2], args[2].new_zeros(pad, TOPK)]))
                eager = moe_forward(*padded, routed_w, shared_experts=shared, **dict(kw, sizes=[bucket] * world))[:n]
                assert torch.equal(replay, eager), (strategy, type(shared).__name__)
                del graphed
    return "ok"


@pytest.mark.gpu
def test_shared_experts_on_gpu_eager_and_graphed():
    on_every_gpu_count(_shared_on_gpu)


def _overlap_never_syncs(seed):
    """Shared experts (chunks 1 and 2) and the async halves read no device value on the host."""
    rank = dist.get_rank()
    sizes = gather_sizes(3 + 2 * rank)
    device, args, experts, mlp, cases = _gpu_problem(seed, sizes)
    for strategy, wfmt, fmt in cases[:3]:
        routed_w, shared_w = experts[wfmt]
        kw = dict(sizes=sizes, strategy=strategy, expert_input_format=fmt)

        def step():
            outs = [moe_forward(*args, routed_w, shared_experts=s, chunks=c, **kw) for s in (mlp, shared_w)
                    for c in (1, 2)]
            tokens, gids, gw, handle = dispatch(*args, async_op=True, **kw).wait()
            partial = experts_forward(tokens, gids, gw, routed_w,
                                      input_format=fmt if isinstance(tokens, torch.Tensor) else None)
            return outs + [combine(partial, handle, async_op=True).wait()]

        expected = step()  # warm-up: kernels compiled, communicators and buffers made
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), strategy
    return "ok"


@pytest.mark.gpu
def test_overlap_never_syncs():
    on_every_gpu_count(_overlap_never_syncs)


def _async_under_side_streams(seed):
    """The async halves on a real side stream: the dispatch waits for inputs made late on the caller's
    stream; inputs dropped at once keep their memory until the communication read them; wait() on another
    stream orders it after a communication stream held up by a sleep."""
    from moecomm.layer.asynchronous import communication_stream

    rank = dist.get_rank()
    sizes = gather_sizes(64 + 32 * rank)
    device, args, experts, _, cases = _gpu_problem(seed, sizes)
    x, ids, w = args
    for strategy, wfmt, fmt in cases:
        routed_w = experts[wfmt][0]
        gs = nvfp4_global_scale(8.0) if fmt == QuantFormat.NVFP4 else None
        kw = dict(sizes=sizes, strategy=strategy, global_scale=gs, expert_input_format=fmt)
        want = moe_forward(x, ids, w, routed_w, **kw)
        torch.cuda.synchronize()
        producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
        with torch.cuda.stream(producer):
            torch.cuda._sleep(20_000_000)  # the input is made late
            late = x * 1
            pending = dispatch(late, ids, w, async_op=True, **kw)
            del late
            junk = torch.full_like(x, float("nan"))  # may not take late's memory before the dispatch read it
        with torch.cuda.stream(consumer):
            tokens, gids, gw, handle = pending.wait()
            partial = experts_forward(tokens, gids, gw, routed_w,
                                      input_format=fmt if isinstance(tokens, torch.Tensor) else None,
                                      global_scale=kw["global_scale"] if fmt == QuantFormat.NVFP4 and
                                      isinstance(tokens, torch.Tensor) else None)
            with torch.cuda.stream(communication_stream(device)):
                torch.cuda._sleep(20_000_000)  # the combine finishes late
            done = combine(partial, handle, async_op=True)
            del partial
            junk2 = torch.full((handle.rows, HIDDEN), float("nan"), dtype=torch.bfloat16, device=device)
            got = done.wait().clone()  # ordered after the combine, or it reads a half-written result
        torch.cuda.synchronize()
        assert torch.equal(got, want), strategy
        del junk, junk2
    return "ok"


@pytest.mark.gpu
def test_async_halves_under_side_streams():
    on_every_gpu_count(_async_under_side_streams)
