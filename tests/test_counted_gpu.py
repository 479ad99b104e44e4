"""GPU tests of the device-count mode (all marked gpu; skipped without CUDA).

- One CUDA graph per rank (:class:`CountedGraphedMoE`), captured once, replayed with live counts 0, 1, the
  buffer's rows, random, on every rank at once (balanced, skewed, idle, all idle, full), ranks holding
  different local buffer sizes: the replay equals the eager step and an exact oracle (every rank's experts
  recomputed locally on the padded layout and summed in float32 in rank order), with torch's sync debug mode
  "error" around every replay and eager step. At world size 1 and 2 over NCCL, and at world sizes 2-4 on ONE
  GPU: processes sharing cuda:0 over a gloo group with torch symmetric memory
  (``TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1``, multicast off), the ``symm`` transport's kernels.
- The comm-level kernels on real torch symmetric memory (one GPU, 3 processes) against their torch references,
  over several epochs, paired and unpaired.
- The op under ``torch.compile(mode="reduce-overhead")``: captured in the CUDA graph (no cudagraph skip).

On one GPU the processes' kernels are time-sliced, not concurrent: a flag round takes milliseconds, and every
launch is preceded by a host barrier (a rank never blocks on the device while a peer waits for it in a host
collective). Keep iteration counts small.
"""

import random

import pytest
import torch
import torch.distributed as dist

from moecomm import errors
from moecomm.comm import launch
from moecomm.layer import CountedGraphedMoE, moe_forward
from moecomm.moe import experts_forward, make_expert_weights, topk_softmax
from moecomm.quant import QuantFormat, nvfp4_global_scale

pytestmark = pytest.mark.gpu

HIDDEN, INTER, TOPK, M = 256, 64, 4, 12
STRATEGIES = [("agrs", None), ("agrs-nvfp4", QuantFormat.NVFP4), ("agrs-fp8", QuantFormat.FP8_GROUP),
              ("allreduce", None)]
ONE_GPU_ENV = {"TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def _weights(seed, world, device):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(4 * world, 2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5
    w2 = torch.randn(4 * world, HIDDEN, INTER, generator=gen) / INTER**0.5
    return [make_expert_weights(w13.to(device), w2.to(device), ep_size=world, ep_rank=p) for p in range(world)]


def _inputs(seed, step, r, rows, world, device):
    """Rank r's token buffer at ``step`` (every rank can draw every rank's)."""
    gen = torch.Generator().manual_seed(seed * 7919 + 31 * step + r)
    x = torch.randn(rows, HIDDEN, generator=gen).bfloat16()
    ids, w = topk_softmax(torch.randn(rows, 4 * world, generator=gen), TOPK)
    ids = torch.where(torch.rand(rows, TOPK, generator=gen) < 0.2, -1, ids)
    return x.to(device), ids.to(torch.int32).to(device), w.to(device)


def _oracle(experts, bufs, counts, rank, rows, strategy, fmt, gs):
    """This rank's rows of the layer step, recomputed locally: every rank's live rows in the padded layout (dead
    rows: ids -1), every rank's experts on it, this rank's slot summed in float32 in rank order and rounded once
    (the symm combine's and gloo's order; NCCL's bf16 sum of two ranks rounds the same). Quantizing before the
    gather equals the experts quantizing after it (moecomm.layer.strategy), so the experts take bf16 + fmt."""
    world = len(bufs)
    device = bufs[0][0].device
    x = torch.zeros(world * M, HIDDEN, dtype=torch.bfloat16, device=device)
    ids = torch.full((world * M, TOPK), -1, dtype=torch.int32, device=device)
    w = torch.zeros(world * M, TOPK, device=device)
    for p, ((xp, idp, wp), c) in enumerate(zip(bufs, counts)):
        x[p * M : p * M + c], ids[p * M : p * M + c], w[p * M : p * M + c] = xp[:c], idp[:c], wp[:c]
    kw = dict(input_format=fmt, global_scale=gs if fmt == QuantFormat.NVFP4 else None)
    parts = [experts_forward(x, ids, w, e, **kw)[rank * M : rank * M + rows] for e in experts]
    acc = parts[0].float()
    for part in parts[1:]:
        acc += part
    acc[counts[rank]:] = 0
    return acc.bfloat16()


def _cases(world, rows, rng):
    """Per step, every rank's live count (within its own buffer rows)."""
    return [[rows[r] for r in range(world)],  # full buffers (M on the ranks that hold M rows)
            [0] * world,  # all idle
            [0] + [rng.randint(1, rows[r]) for r in range(1, world)],  # rank 0 idle
            [1] * world,
            [rng.randint(0, rows[r]) for r in range(world)],  # random, skewed
            [rows[r] // (r + 1) for r in range(world)]]


def _no_sync(fn):
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _one_graph(seed, transport, one_gpu):
    """Every strategy: one graph per rank, replayed with new counts on every rank; == eager == the oracle."""
    if one_gpu:
        torch.cuda.set_device(0)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    experts = _weights(seed, world, device)
    rows = [M - 2 * (r % 2) for r in range(world)]  # ranks hold different buffer sizes
    rng = random.Random(seed)
    gs = nvfp4_global_scale(torch.tensor(6.0, device=device))
    nccl = dist.get_backend() == "nccl"
    for strategy, fmt in STRATEGIES if nccl else STRATEGIES[:3]:  # allreduce needs NCCL (not gloo on CUDA)
        kw = dict(strategy=strategy, global_scale=gs if fmt == QuantFormat.NVFP4 else None,
                  expert_input_format=fmt, algorithm=transport)
        graphed = CountedGraphedMoE(experts[rank], hidden_size=HIDDEN, topk=TOPK, max_tokens_per_rank=M,
                                    rows=rows[rank], **kw)
        for step, counts in enumerate(_cases(world, rows, rng)):
            bufs = [_inputs(seed, step, r, rows[r], world, device) for r in range(world)]
            x, ids, w = bufs[rank]
            c = counts[rank]
            count = torch.tensor(c, dtype=torch.int32, device=device)
            by_count = step % 2 == 1  # half the steps pass the whole buffer and a device count
            dist.barrier()
            if by_count:
                got = _no_sync(lambda: graphed(x, ids, w, num_tokens=count).clone())
            else:
                got = _no_sync(lambda: graphed(x[:c], ids[:c], w[:c]).clone())
            dist.barrier()
            eager = _no_sync(lambda: moe_forward(x, ids, w, experts[rank], num_tokens=count, max_tokens_per_rank=M,
                                                 **kw))
            want = _oracle(experts, bufs, counts, rank, rows[rank], strategy, fmt, gs)
            t = rows[rank] if by_count else c
            assert torch.equal(got, eager[:t]), (strategy, step, counts)
            assert torch.equal(eager, want), (strategy, step, counts, (eager.float() - want.float()).abs().max())
    torch.cuda.synchronize()
    errors.check_errors()
    return "ok"


@pytest.mark.parametrize("transport", ["auto", "padded"])
def test_one_graph_per_rank_nccl(transport):
    """World size 1, and 2 when two GPUs exist (auto: symm over NVLink)."""
    seed = random.randrange(1 << 30)
    for ws in sorted({1, min(2, torch.cuda.device_count())}):
        assert launch(_one_graph, ws, (seed, transport, False), backend="nccl", timeout=600) == ["ok"] * ws, (ws, seed)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_one_graph_per_rank_symm_on_one_gpu(world_size, monkeypatch):
    """The symm transport with world_size processes on cuda:0 (torch symmetric memory across processes)."""
    for k, v in ONE_GPU_ENV.items():
        monkeypatch.setenv(k, v)  # inherited by the spawned ranks
    seed = random.randrange(1 << 30)
    assert launch(_one_graph, world_size, (seed, "symm", True), backend="gloo",
                  timeout=600) == ["ok"] * world_size, seed


def _comm_kernels(seed):
    """all_gather_counted / reduce_scatter_counted on real symmetric memory vs their torch references (run on
    CPU copies over gloo), paired and unpaired, idle ranks, bad counts, several epochs."""
    from moecomm.comm.counted import (
        all_gather_counted,
        all_gather_counted_ref,
        counted_workspace,
        reduce_scatter_counted,
        reduce_scatter_counted_ref,
    )

    torch.cuda.set_device(0)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", 0)
    rows, row_bytes, hidden, mask = 6, 64, 40, slice(32, 48)
    ws = counted_workspace(None, device, max_tokens_per_rank=rows, row_bytes=row_bytes, hidden=hidden,
                           transport="symm")
    assert ws.transport.value == "symm"
    gen = torch.Generator().manual_seed(seed + rank)
    for step in range(8):
        paired = step < 5
        n = int(torch.randint(0, rows + 1, (1,), generator=gen))
        c = [0, n, n // 2, n + 4, -1][(step + rank) % 5]
        send = torch.randint(0, 256, (n, row_bytes), dtype=torch.uint8, generator=gen)
        partial = torch.randn(world * rows, hidden, generator=gen).bfloat16()
        count = torch.tensor(c, dtype=torch.int32)
        want, want_counts = all_gather_counted_ref(send, count, rows, mask_cols=mask)
        want_out = reduce_scatter_counted_ref(partial, count, rows, rows=n)
        dist.barrier()
        got, counts = all_gather_counted(send.to(device), count.to(device), ws, mask_cols=mask, paired=paired)
        out = reduce_scatter_counted(partial.to(device), count.to(device), ws,
                                     out=torch.full((n, hidden), float("nan"), dtype=torch.bfloat16, device=device),
                                     paired=paired)
        got, counts, out = got.cpu(), counts.cpu(), out.cpu()
        assert torch.equal(counts, want_counts), (step, counts, want_counts)
        for r, k in enumerate(want_counts.tolist()):
            assert torch.equal(got[r * rows : r * rows + k], want[r * rows : r * rows + k]), (step, r)
            assert (got[r * rows + k : (r + 1) * rows, mask] == 0xFF).all(), (step, r)
        assert torch.equal(out, want_out), step
    try:
        errors.check_errors()
    except ValueError as e:
        assert "num_tokens outside" in str(e) and "gave up" not in str(e), str(e)
    return "ok"


def test_symm_kernels_on_torch_symmetric_memory(monkeypatch):
    for k, v in ONE_GPU_ENV.items():
        monkeypatch.setenv(k, v)
    assert launch(_comm_kernels, 3, (random.randrange(1 << 30),), backend="gloo", timeout=600) == ["ok"] * 3


def _reduce_overhead(seed):
    """The counted op under torch.compile(mode="reduce-overhead"): recorded INTO the CUDA graph (its
    implementation runs while a graph is being captured, then never again: replays), no cudagraph skip,
    results equal eager for every count."""
    from torch._dynamo.utils import counters

    from moecomm.layer import counted

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    experts = _weights(seed, world, device)
    gs = nvfp4_global_scale(torch.tensor(6.0, device=device))
    calls = []
    real = counted.moe_forward_counted

    def spy(*args, **kwargs):
        calls.append(torch.cuda.is_current_stream_capturing())
        return real(*args, **kwargs)

    def block(x, ids, w, count):
        y = moe_forward(x * 2, ids, w, experts[rank], num_tokens=count, max_tokens_per_rank=M, strategy="agrs-nvfp4",
                        global_scale=gs, expert_input_format=QuantFormat.NVFP4)
        return y + 1

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(block, mode="reduce-overhead", fullgraph=True)
    x, ids, w = _inputs(seed, 0, rank, M, world, device)
    # one eager step first, as an engine's warm-up: the workspace (made collectively, kept between steps) must
    # not be allocated inside cudagraph trees' memory pool, which tracks only the graph's outputs
    block(x, ids, w, torch.tensor(M, dtype=torch.int32, device=device))
    counted.moe_forward_counted = spy  # the op's implementation calls it by this name
    try:
        for step, c in enumerate([M, 0, 1, 5 + rank, 3, M]):
            count = torch.tensor(c, dtype=torch.int32, device=device)
            torch.compiler.cudagraph_mark_step_begin()
            got = compiled(x, ids, w, count).clone()
            eager = block(x, ids, w, count)
            assert torch.equal(got, eager), (step, c)
    finally:
        counted.moe_forward_counted = real
    # the op's implementation ran once while recorded into the graph, at most twice outside (cudagraph trees'
    # warm-up runs), then never again: the other steps were replays (the eager reference does not pass the spy)
    assert calls.count(True) == 1 and len(calls) <= 3, calls
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    return "ok"


def test_reduce_overhead_captures_the_counted_op():
    seed = random.randrange(1 << 30)
    for ws in sorted({1, min(2, torch.cuda.device_count())}):
        assert launch(_reduce_overhead, ws, (seed,), backend="nccl", timeout=300) == ["ok"] * ws, (ws, seed)



def _no_creation_while_capturing(seed):
    """The first call with a new max_tokens_per_rank inside a capture raises a clear error (buffers are created
    collectively, once, before capturing) and leaves the process usable."""
    device = torch.device("cuda", torch.cuda.current_device())
    experts = _weights(seed, 1, device)
    x, ids, w = _inputs(seed, 0, 0, 3, 1, device)
    count = torch.tensor(2, dtype=torch.int32, device=device)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot happen during CUDA-graph capture"):
        with torch.cuda.graph(graph):
            moe_forward(x, ids, w, experts[0], num_tokens=count, max_tokens_per_rank=5, strategy="agrs")
    out = moe_forward(x, ids, w, experts[0], num_tokens=count, max_tokens_per_rank=5, strategy="agrs")
    assert out.shape == (3, HIDDEN) and not out[2:].any()
    return "ok"


def test_workspace_is_not_created_during_capture():
    assert launch(_no_creation_while_capturing, 1, (random.randrange(1 << 30),), backend="nccl",
                  timeout=300) == ["ok"]


def _replay_refuses(seed):
    """CountedGraphedMoE's replay refuses what a copy into its statics would cast, broadcast or read on the host,
    and a valid call after the refusals still equals the eager step."""
    device = torch.device("cuda", torch.cuda.current_device())
    experts = _weights(seed, 1, device)
    graphed = CountedGraphedMoE(experts[0], hidden_size=HIDDEN, topk=TOPK, max_tokens_per_rank=M, strategy="agrs")
    x, ids, w = _inputs(seed, 0, 0, 5, 1, device)
    messages = []
    for args in [(x.float(), ids, w), (x[:, :1], ids, w), (x, ids.float(), w), (x.cpu(), ids, w)]:
        with pytest.raises(ValueError) as e:
            graphed(*args)
        messages.append(str(e.value))
    with pytest.raises(TypeError, match="num_tokens"):
        graphed(x, ids, w, num_tokens=3)
    count = torch.tensor(3, dtype=torch.int32, device=device)
    want = moe_forward(x, ids, w, experts[0], num_tokens=count, max_tokens_per_rank=M, strategy="agrs")
    assert torch.equal(graphed(x, ids, w, num_tokens=count), want)
    return messages


def test_counted_graph_replay_refuses_bad_inputs():
    (messages,) = launch(_replay_refuses, 1, (random.randrange(1 << 30),), backend="nccl", timeout=300)
    assert [m.split(" must be")[0] for m in messages] == ["CountedGraphedMoE: hidden"] * 2 + [
        "CountedGraphedMoE: topk_ids", "CountedGraphedMoE: hidden"], messages
