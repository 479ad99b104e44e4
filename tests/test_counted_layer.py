"""The device-count mode of moe_forward (num_tokens on the device, max_tokens_per_rank) on 2-4 gloo ranks: bit for
bit the host-list path for balanced, skewed and idle distributions, full slots and ranks with different local
buffer sizes, every strategy; bad counts clamped and flagged; no host read; errors on every rank."""

import random

import pytest
import torch
import torch.distributed as dist

from moecomm import errors
from moecomm.comm import launch
from moecomm.layer import moe_forward
from moecomm.moe import make_expert_weights, topk_softmax
from moecomm.quant import QuantFormat, nvfp4_global_scale
from moecomm.testing import error_of

HIDDEN, INTER, TOPK, M = 128, 32, 3, 6
STRATEGIES = [("allreduce", None), ("agrs", None), ("agrs", QuantFormat.NVFP4), ("agrs-nvfp4", QuantFormat.NVFP4),
              ("agrs-fp8", QuantFormat.FP8_GROUP), ("agrs-fp8", QuantFormat.FP8_TOKEN)]


def _distributions(world, rng):
    """Per case: (live count, local buffer rows, count passed) per rank. Buffers differ between ranks."""
    def case(counts, extra=lambda r: rng.randint(0, 2)):
        rows = [min(M, c + extra(r)) for r, c in enumerate(counts)]
        return [(c, n, c) for c, n in zip(counts, rows)]

    return {
        "balanced": case([4] * world),
        "skewed": case([1 + (r * 5) // max(world - 1, 1) for r in range(world)]),
        "idle": case([0] + [rng.randint(1, M) for _ in range(world - 1)]),
        "all idle": case([0] * world),
        "M reached": case([M] * (world - 1) + [2], extra=lambda r: M),
        # a count above the buffer (and above M) and one below 0: clamped to [0, rows], flagged
        "bad counts": [(min(M, 3), min(M, 3), M + 5) if r == 0 else (0, 2, -3) if r == 1 else (2, 4, 2)
                       for r in range(world)],
    }


def _rank_inputs(gen, rows, num_experts):
    """A buffer of ``rows`` tokens; the caller keeps the live prefix. Dead rows get NaN, huge values and ids
    out of range: if any of it were read, results or check_errors would show it."""
    x = torch.randn(rows, HIDDEN, generator=gen).bfloat16()
    x[:, 3] *= 8
    ids, w = topk_softmax(torch.randn(rows, num_experts, generator=gen), TOPK)
    masked = torch.rand(rows, TOPK, generator=gen) < 0.2
    return x, torch.where(masked, -1, ids), w


def _poison(x, ids, w, live):
    x, ids, w = x.clone(), ids.clone(), w.clone()
    x[live:] = float("nan")
    x[live:, :2] = 3e38
    ids[live:] = 10**6
    w[live:] = float("inf")
    return x, ids, w


def _no_host_reads(allowed: torch.Tensor):
    """Patch every way a Python caller reads a tensor's value on the host so that it raises, except on
    ``allowed``'s storage (a CPU global scale, which the quantizer checks on the host; a CUDA one it never
    reads); returns an undo function."""
    names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def guard(name):
        def read(t, *args, **kwargs):
            if t.untyped_storage().data_ptr() != allowed.untyped_storage().data_ptr():
                raise AssertionError(f"Tensor.{name} read a value on the host")
            return saved[name](t, *args, **kwargs)
        return read

    for n in names:
        setattr(torch.Tensor, n, guard(n))
    return lambda: [setattr(torch.Tensor, n, f) for n, f in saved.items()]


def _bit_for_bit(seed):
    rank, world = dist.get_rank(), dist.get_world_size()
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed + rank)
    num_experts = 4 * world
    wgen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * INTER, HIDDEN, generator=wgen) / HIDDEN**0.5
    w2 = torch.randn(num_experts, HIDDEN, INTER, generator=wgen) / INTER**0.5
    mine = make_expert_weights(w13, w2, ep_size=world, ep_rank=rank)
    gs = nvfp4_global_scale(torch.tensor(40.0))
    failures = []
    for i, (name, case) in enumerate(_distributions(world, rng).items()):
        live, rows, passed = case[rank]
        sizes = [c[0] for c in case]
        x, ids, w = _rank_inputs(gen, rows, num_experts)
        poisoned = _poison(x, ids, w, live)
        count = torch.tensor(passed, dtype=torch.int32 if rank % 2 else torch.int64)
        for strategy, fmt in STRATEGIES:
            kw = dict(strategy=strategy, global_scale=gs if fmt == QuantFormat.NVFP4 else None, expert_input_format=fmt)
            want = moe_forward(x[:live], ids[:live], w[:live], mine, sizes=sizes, **kw)
            undo = _no_host_reads(gs) if i else lambda: None  # the first case creates the workspaces (collective)
            try:
                got = moe_forward(*poisoned, mine, num_tokens=count, max_tokens_per_rank=M, **kw)
            finally:
                undo()
            if got.shape != (rows, HIDDEN) or not torch.equal(got[:live], want) or got[live:].any():
                failures.append((name, strategy, fmt))
        flagged = error_of(errors.check_errors)
        if (flagged is not None) != (name == "bad counts" and rank < 2):
            failures.append((name, "check_errors", flagged))
        elif flagged is not None:
            assert "num_tokens outside [0, rows" in flagged and "clamped" in flagged, flagged
    return failures


@pytest.mark.parametrize("world_size", [2, 4])
def test_device_counts_equal_host_sizes_bit_for_bit(world_size):
    seed = random.randrange(1 << 30)
    results = launch(_bit_for_bit, world_size, (seed,), backend="gloo", timeout=300)
    assert results == [[]] * world_size, (seed, results)


def _errors():
    rank, world = dist.get_rank(), dist.get_world_size()
    w13 = torch.randn(4 * world, 2 * INTER, HIDDEN) / HIDDEN**0.5
    w2 = torch.randn(4 * world, HIDDEN, INTER) / INTER**0.5
    mine = make_expert_weights(w13, w2, ep_size=world, ep_rank=rank)
    x, ids, w = _rank_inputs(torch.Generator().manual_seed(rank), 4, 4 * world)
    one = torch.tensor(1, dtype=torch.int32)

    def step(*args, **kw):
        return lambda: moe_forward(*(args or (x, ids, w)), mine, **{"strategy": "agrs", **kw})

    return {
        "sizes and num_tokens": error_of(step(sizes=[4] * world, num_tokens=one, max_tokens_per_rank=4)),
        "num_tokens without M": error_of(step(num_tokens=one)),
        "neither": error_of(step()),
        "count an int": error_of(step(num_tokens=1, max_tokens_per_rank=4)),
        "count two elements": error_of(step(num_tokens=torch.ones(2, dtype=torch.int32), max_tokens_per_rank=4)),
        "count a float": error_of(step(num_tokens=torch.tensor(1.0), max_tokens_per_rank=4)),
        "buffer above M": error_of(step(num_tokens=one, max_tokens_per_rank=3)),
        "unpacked": error_of(step(num_tokens=one, max_tokens_per_rank=4, pack=False)),
        "chunks": error_of(step(num_tokens=one, max_tokens_per_rank=4, chunks=2)),
        "broadcast": error_of(step(num_tokens=one, max_tokens_per_rank=4, algorithm="broadcast")),
        # every rank raises: first call with these sizes, M differs between ranks (agrs and allreduce alike)
        "M differs": error_of(step(num_tokens=one, max_tokens_per_rank=5 + rank)),
        "M differs, allreduce": error_of(step(num_tokens=one, max_tokens_per_rank=7 + rank, strategy="allreduce")),
        "validate: fine": error_of(step(num_tokens=torch.tensor(2), max_tokens_per_rank=4, validate=True)),
        # validation reads the count and ids on the host and raises on every rank
        "validate: count too big on rank 1": error_of(step(num_tokens=torch.tensor(9 if rank == 1 else 2),
                                                           max_tokens_per_rank=4, validate=True)),
        # not run in this mode: refused inside the checks, so that validation raises on every rank
        "validate: shared experts on rank 1": error_of(step(num_tokens=one, max_tokens_per_rank=4, validate=True,
                                                            shared_experts=(lambda h: h) if rank == 1 else None)),
        "validate: int8 combine on rank 2": error_of(step(num_tokens=one, max_tokens_per_rank=4, validate=True,
                                                          combine_format="int8" if rank == 2 else "bf16")),
        "validate: bad combine format on rank 0": error_of(step(num_tokens=one, max_tokens_per_rank=4, validate=True,
                                                                combine_format="int4" if rank == 0 else "bf16")),
    }


def test_bad_arguments_raise_on_every_rank():
    results = launch(_errors, 3, backend="gloo", timeout=120)
    for rank, r in enumerate(results):
        assert r.pop("validate: fine") is None, r
        for case, message in r.items():
            assert message is not None, (rank, case)
        for case in ("sizes and num_tokens", "num_tokens without M", "neither", "count an int"):
            assert r[case].startswith("TypeError"), (case, r[case])
        assert "either sizes= (every rank's token count, a host list) or num_tokens=" in r["neither"]
        assert "one-element int32/int64 tensor" in r["count two elements"]
        assert "[n <= max_tokens_per_rank = 3, hidden]" in r["buffer above M"]
        assert "one packed message" in r["unpacked"] and "chunks None or 1" in r["chunks"]
        assert "'broadcast' is not a valid Transport" in r["broadcast"]
        assert "ranks disagree on max_tokens_per_rank: rank 0: 5, rank 1: 6, rank 2: 7" in r["M differs"]
        assert "ranks disagree on max_tokens_per_rank: rank 0: 7, rank 1: 8" in r["M differs, allreduce"]
        assert "rank 1: num_tokens = 9 is outside [0, 4]" in r["validate: count too big on rank 1"]
        assert "rank 1: the device-count mode runs no shared_experts" in r["validate: shared experts on rank 1"]
        assert "rank 2: the device-count mode runs no quantized combine_format" in r["validate: int8 combine on rank 2"]
        assert "rank 0: combine_format: 'int4' is not a valid" in r["validate: bad combine format on rank 0"]


def _compiled(seed):
    """torch.compile(fullgraph=True) through the op moecomm::moe_forward_counted: the same bits as eager, one
    compilation for every count (values of an input tensor), no graph break."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(4 * world, 2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5
    w2 = torch.randn(4 * world, HIDDEN, INTER, generator=gen) / INTER**0.5
    mine = make_expert_weights(w13, w2, ep_size=world, ep_rank=rank)
    gs = nvfp4_global_scale(torch.tensor(40.0))

    def block(x, ids, w, count):
        y = moe_forward(x * 2, ids, w, mine, num_tokens=count, max_tokens_per_rank=M, strategy="agrs-nvfp4",
                        global_scale=gs, expert_input_format=QuantFormat.NVFP4)
        return y + 1

    counters.clear()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, backend=counter, fullgraph=True)
    x, ids, w = _rank_inputs(torch.Generator().manual_seed(seed + rank), M, 4 * world)
    for step, count in enumerate([M, 0, 1 + rank, 3]):
        c = torch.tensor(count, dtype=torch.int32)
        got, eager = compiled(x, ids, w, c), block(x, ids, w, c)
        assert torch.equal(got, eager), (step, count)
    assert counter.frame_count == 1, counter.frame_count
    assert not counters["graph_break"], dict(counters["graph_break"])
    return "ok"


def test_compiled_counted_op_never_recompiles():
    assert launch(_compiled, 2, (random.randrange(1 << 30),), backend="gloo", timeout=240) == ["ok", "ok"]


def test_counted_graph_replay_checks_its_inputs():
    """CountedGraphedMoE's door (a CPU stand-in for its CUDA statics): a copy into the statics would cast fp32
    tokens or float ids, broadcast a [t, 1] buffer and read a Python int count; each is refused, naming it."""
    from moecomm.layer import CountedGraphedMoE
    from moecomm.layer.counted_graphs import check_replay

    statics = torch.zeros(M, HIDDEN, dtype=torch.bfloat16)
    x, ids, w = _rank_inputs(torch.Generator().manual_seed(random.randrange(1 << 30)), 3, 8)
    check_replay(x, ids, w, torch.tensor(2, dtype=torch.int32), statics, TOPK)  # fine
    check_replay(x[:0], ids[:0].long(), w[:0], None, statics, TOPK)
    bad = {
        "hidden": [(x.float(), ids, w, None), (x[:, :1], ids, w, None), (x[0], ids, w, None), (x.tolist(), ids, w, None)],
        "topk_ids": [(x, ids.float(), w, None), (x, ids[:, :1], w, None)],
        "topk_weights": [(x, ids, w.double(), None), (x, ids, w.to("meta"), None)],
        "num_tokens": [(x, ids, w, 2), (x, ids, w, torch.tensor(2.0)), (x, ids, w, torch.tensor([1, 2]))],
        "the same rows": [(x, ids[:2], w[:2], None), (torch.zeros(M + 1, HIDDEN, dtype=torch.bfloat16),
                                                     torch.zeros(M + 1, TOPK, dtype=torch.int32),
                                                     torch.zeros(M + 1, TOPK), None)],
    }
    for name, cases in bad.items():
        for args in cases:
            with pytest.raises((TypeError, ValueError), match=name):
                check_replay(*args, statics, TOPK)
    with pytest.raises(TypeError, match="weights must be moecomm.moe.ExpertWeights, got NoneType"):
        CountedGraphedMoE(None, hidden_size=HIDDEN, topk=TOPK, max_tokens_per_rank=M)
    if not torch.cuda.is_available():
        mine = make_expert_weights(torch.randn(2, 2 * INTER, HIDDEN), torch.randn(2, HIDDEN, INTER))
        with pytest.raises(ValueError, match="needs a CUDA device and CUDA expert weights"):
            CountedGraphedMoE(mine, hidden_size=HIDDEN, topk=TOPK, max_tokens_per_rank=M)
