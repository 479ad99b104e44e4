"""all_gatherv / reduce_scatterv on 2-4 gloo ranks (and NCCL, marked gpu), against torch cat / sum references.

Every rank builds every rank's inputs from a shared seed, so each can compute the unsharded reference
locally. Inputs are fresh random draws each run (the seed is in the failure message).
"""

import random
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from moecomm import all_gatherv, check_consistency, reduce_scatterv
from moecomm.comm import (
    VALIDATE_ENV,
    Algorithm,
    RankError,
    all_gatherv_ref,
    all_reduce,
    choose_algorithm,
    gather_sizes,
    launch,
    rank_device,
    reduce_scatterv_ref,
    size_pattern,
)
from moecomm.testing import (
    assert_close,
    assert_raised_on_every_rank,
    error_of,
    on_every_gpu_count,
)

# (trailing shape, dtype) of the tensors gathered together in one call; None is a hole in the list.
GATHER_SPECS = [
    ((64,), torch.bfloat16),  # hidden rows
    ((36,), torch.uint8),  # quantized payload
    None,
    ((8,), torch.int32),  # topk_ids
    ((8,), torch.float32),  # topk_weights
    ((8, 16), torch.float16),  # trailing dims
    ((32,), torch.float8_e4m3fn),
    ((16,), torch.float4_e2m1fn_x2),
    ((3,), torch.int64),
]
REDUCE_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _rand(shape, dtype, gen):
    if dtype.is_floating_point and dtype.itemsize >= 2:
        return torch.randn(shape, generator=gen).to(dtype)
    if dtype.itemsize == 1:  # uint8, fp8, fp4x2: random bytes, NaN encodings included
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).view(dtype)
    return torch.randint(-(1 << 20), 1 << 20, shape, generator=gen, dtype=dtype)


def _rank_inputs(seed, r, n, specs):
    gen = torch.Generator().manual_seed(seed * 1000 + r)
    return [None if s is None else _rand((n, *s[0]), s[1], gen) for s in specs]


def _noncontiguous(t):
    """The same values as ``t`` in a non-contiguous (column-major) layout."""
    nc = t.transpose(0, -1).contiguous().transpose(0, -1)
    assert not nc.is_contiguous() or t.shape[0] <= 1
    return nc


def _gather_case(seed, sizes, noncontig, use_out, algorithm="auto"):
    rank, device = dist.get_rank(), rank_device()
    per_rank = [_rank_inputs(seed, r, n, GATHER_SPECS) for r, n in enumerate(sizes)]
    mine = [None if t is None else (_noncontiguous(t) if noncontig else t).to(device)
            for t in per_rank[rank]]
    out = None
    if use_out:  # poisoned outputs: every byte must be written
        out = [None if t is None else _rand((sum(sizes), *t.shape[1:]), t.dtype, torch.Generator()).to(device)
               for t in per_rank[rank]]
    got = all_gatherv(mine, sizes, out=out, algorithm=algorithm)
    if use_out:
        assert all(g is o for g, o in zip(got, out))
    for i, spec in enumerate(GATHER_SPECS):
        if spec is None:
            assert got[i] is None
            continue
        expected = torch.cat([per_rank[r][i] for r in range(len(sizes))])
        assert got[i].dtype == expected.dtype and got[i].shape == expected.shape, (i, got[i].shape)
        assert torch.equal(got[i].cpu().view(torch.uint8), expected.view(torch.uint8)), f"{algorithm}: tensor {i} differs"


def _reduce_case(seed, sizes, dtype, use_out, algorithm="auto"):
    rank, device = dist.get_rank(), rank_device()
    total = sum(sizes)
    inputs = [torch.randn((total, 5, 3), generator=torch.Generator().manual_seed(seed + r)).to(dtype)
              for r in range(len(sizes))]
    expected = torch.stack([t.double() for t in inputs]).sum(0)
    start = sum(sizes[:rank])
    expected = expected[start : start + sizes[rank]]
    out = torch.full((sizes[rank], 5, 3), float("nan"), dtype=dtype, device=device) if use_out else None
    got = reduce_scatterv(inputs[rank].to(device), sizes, out=out, algorithm=algorithm)
    assert got.dtype == dtype and (not use_out or got is out)
    assert_close(got.cpu().double(), expected, rel=REDUCE_TOL[dtype], name=f"reduce_scatterv {algorithm} {dtype}")
    assert_close(reduce_scatterv_ref(inputs[rank].to(device), sizes).cpu().double(), expected,
                 rel=REDUCE_TOL[dtype], name="reduce_scatterv_ref")


def _size_patterns(world, rng):
    return [
        [rng.choice([0, 1, 2, 5, 17]) for _ in range(world)],  # random, zeros likely
        [rng.randint(0, 40) for _ in range(world)],
        [0] * world,  # all idle
        [0] * (world - 1) + [23],  # one rank holds everything
        [6] * world,  # equal sizes: the native path
        [0] + [rng.randint(1, 9) for _ in range(world - 1)],  # an idle rank
    ]


def _algorithms(op):
    """Every explicit algorithm of ``op`` on this backend (symm needs CUDA)."""
    algos = ["broadcast", "padded"] + (["allreduce"] if op == "reduce_scatterv" else [])
    return algos + (["symm"] if dist.get_backend() == "nccl" else [])


def _battery(seed):
    world = dist.get_world_size()
    rng = random.Random(seed)
    for sizes in _size_patterns(world, rng):
        # Every rank draws the same patterns from the shared seed, so sizes agree.
        for noncontig, use_out in [(False, False), (True, False), (False, True)]:
            _gather_case(seed, sizes, noncontig, use_out)
        for algorithm in _algorithms("all_gatherv"):
            _gather_case(seed, sizes, False, True, algorithm)
        for dtype in REDUCE_TOL:
            _reduce_case(seed, sizes, dtype, use_out=dtype == torch.bfloat16)
            for algorithm in _algorithms("reduce_scatterv"):
                _reduce_case(seed, sizes, dtype, True, algorithm)
        # single tensor in, single tensor out; the padded reference agrees
        t = _rank_inputs(seed, dist.get_rank(), sizes[dist.get_rank()], [((4,), torch.float32)])[0]
        t = t.to(rank_device())
        single = all_gatherv(t, sizes)
        assert isinstance(single, torch.Tensor) and torch.equal(single, all_gatherv_ref(t, sizes))
        assert gather_sizes(sizes[dist.get_rank()]) == sizes
    return "ok"


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_gloo_battery(world_size):
    seed = random.randrange(1 << 30)
    assert launch(_battery, world_size, (seed,), backend="gloo", timeout=240) == ["ok"] * world_size, seed


# ---------------------------------------------------------------------------------------------------
# Errors: raised before any communication, on every rank
# ---------------------------------------------------------------------------------------------------



def _error_cases():
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.randn(rank + 1, 4)
    sizes = [r + 1 for r in range(world)]
    results = {
        # Every rank sees these locally: no validate needed.
        "sizes too short": error_of(lambda: all_gatherv(x, sizes[:-1])),
        "negative size": error_of(lambda: all_gatherv(x, [-1] + sizes[1:])),
        "non-integer size": error_of(lambda: all_gatherv(x, [1.5] + sizes[1:])),
        "float tensor sizes": error_of(lambda: all_gatherv(x, torch.tensor(sizes, dtype=torch.float32))),
        "rs rows": error_of(lambda: reduce_scatterv(torch.randn(sum(sizes) + 1, 4), sizes)),
        "rs dtype": error_of(lambda: reduce_scatterv(torch.ones(sum(sizes), 4, dtype=torch.int32), sizes)),
        "rs out shape": error_of(lambda: reduce_scatterv(torch.randn(sum(sizes), 4), sizes,
                                                          out=torch.empty(rank + 2, 4))),
        "out dtype": error_of(lambda: all_gatherv(x, sizes, out=torch.empty(sum(sizes), 4, dtype=torch.half))),
        "not a tensor": error_of(lambda: all_gatherv([x, "ids"], sizes)),
        "all_reduce of a list": error_of(lambda: all_reduce([x])),
        "out of ints": error_of(lambda: all_gatherv(x, sizes, out=[3])),
        # out and the input overlap other than in place (the input is out's rows of this rank): the broadcast
        # algorithm read rows it had already written (reduce_scatterv: a wrong sum; all_gatherv: torch's
        # RuntimeError in the middle of the collective)
        "gather input inside out elsewhere": error_of(lambda: _aliased_gather(x, sizes, rank, 0 if rank else 1)),
        "reduce out inside the input elsewhere": error_of(lambda: _aliased_reduce(sizes, rank, 0 if rank else 1)),
        # Only one rank is wrong or ranks disagree: validate=True makes every rank raise.
        "rows on rank 1 only": error_of(
            lambda: all_gatherv(torch.randn(99 if rank == 1 else rank + 1, 4), sizes, validate=True)),
        "sizes disagree": error_of(
            lambda: all_gatherv(x, sizes if rank else [1] + [s + 1 for s in sizes[1:]], validate=True)),
        "dtype disagrees": error_of(lambda: all_gatherv(x.double() if rank == 0 else x, sizes, validate=True)),
        "trailing disagrees": error_of(
            lambda: all_gatherv(torch.randn(rank + 1, 5 if rank == 2 else 4), sizes, validate=True)),
        "None disagrees": error_of(lambda: all_gatherv([x, None if rank else x], sizes, validate=True)),
        "rs rows one rank": error_of(
            lambda: reduce_scatterv(torch.randn(sum(sizes) + (rank == 0), 4), sizes, validate=True)),
    }
    # The group is still usable after all those errors: no half-started collective.
    check_consistency(x, sizes)
    assert all_gatherv(x, sizes).shape == (sum(sizes), 4)
    # in place (the input is out's rows of this rank) is fine, for every algorithm and wire format
    start = sum(sizes[:rank])
    for algorithm in ("broadcast", "padded"):
        assert torch.equal(_aliased_gather(x, sizes, rank, start, algorithm), all_gatherv(x, sizes))
    g = torch.Generator().manual_seed(7 + rank)
    t = torch.randn(sum(sizes), 128, generator=g).bfloat16()
    for wire_format in ("bf16", "int8"):
        want = reduce_scatterv(t, sizes, wire_format=wire_format, algorithm="broadcast")
        inplace = t.clone()
        got = reduce_scatterv(inplace, sizes, out=inplace[start : start + sizes[rank]], wire_format=wire_format,
                              algorithm="broadcast")
        assert torch.equal(got, want), wire_format
    return results


def _aliased_gather(x, sizes, rank, at, algorithm="auto"):
    buf = torch.zeros(sum(sizes), *x.shape[1:], dtype=x.dtype)
    buf[at : at + sizes[rank]] = x
    return all_gatherv(buf[at : at + sizes[rank]], sizes, out=buf, algorithm=algorithm)


def _aliased_reduce(sizes, rank, at):
    t = torch.randn(sum(sizes), 4)
    return reduce_scatterv(t, sizes, out=t[at : at + sizes[rank]], algorithm="broadcast")


def test_errors_raise_on_every_rank():
    results = launch(_error_cases, 3, backend="gloo", timeout=120)
    assert_raised_on_every_rank(results)
    assert "out[0] is a int" in results[0]["out of ints"]
    assert "rank 1" in results[0]["rows on rank 1 only"] and "99 rows" in results[0]["rows on rank 1 only"]
    assert "disagree on sizes" in results[2]["sizes disagree"]
    assert "len(sizes) = 2" in results[0]["sizes too short"]
    for case in ("gather input inside out elsewhere", "reduce out inside the input elsewhere"):
        assert "overlap" in results[2][case] and "rank 2" in results[2][case], results[2][case]


def test_choose_algorithm_reads_the_measured_table(monkeypatch):
    import moecomm.comm.algorithms as c

    assert size_pattern([4, 4]) == "balanced" and size_pattern([0, 4]) == "idle" and size_pattern([1, 4]) == "skewed"
    assert size_pattern([0, 0]) == "balanced"
    # Without a measured table: the native equal-size collective for equal sizes, else a broadcast per root.
    monkeypatch.setattr(c, "_TABLES", {})
    monkeypatch.setattr(c.json, "load", lambda f: {"tables": {}})
    c._choose.cache_clear()
    assert choose_algorithm("all_gatherv", [8, 8], 100) == Algorithm.PADDED
    assert choose_algorithm("reduce_scatterv", [0, 8], 100) == Algorithm.BROADCAST
    # A table: per pattern, the nearest measured byte count on a log scale wins; graphed has its own.
    table = {"tables": {"all_gatherv": {"2": {
        "eager": {"skewed": [[1000, "broadcast"], [1_000_000, "padded"], [100_000_000, "symm"]]},
        "graphed": {"skewed": [[1000, "symm"]]},
    }}}}
    monkeypatch.setattr(c, "_TABLES", {})
    monkeypatch.setattr(c.json, "load", lambda f: table)
    c._choose.cache_clear()
    for total_bytes, expected in [(1, "broadcast"), (31_000, "broadcast"), (32_000, "padded"),
                                  (9_000_000, "padded"), (11_000_000, "symm"), (10**12, "symm")]:
        assert choose_algorithm("all_gatherv", [1, 2], total_bytes // 3) == Algorithm(expected), total_bytes
    assert choose_algorithm("all_gatherv", [1, 2], 10, capturing=True) == Algorithm.SYMM
    assert choose_algorithm("all_gatherv", [2, 2], 10**6) == Algorithm.PADDED  # no balanced points: default
    assert choose_algorithm("all_gatherv", [1, 2, 3], 10) == Algorithm.BROADCAST  # no world size 3
    c._choose.cache_clear()  # the next test reads the real table


def _membership_and_env():
    rank = dist.get_rank()
    pair = dist.new_group([0, 1])  # every rank takes part in creating it; rank 2 is not a member
    x = torch.randn(2, 4)
    results = {}
    if rank == 2:
        results["not a member: all_gatherv"] = error_of(lambda: all_gatherv(x, [2, 2], group=pair))
        results["not a member: reduce_scatterv"] = error_of(lambda: reduce_scatterv(x, [1, 1], group=pair))
        results["not a member: gather_sizes"] = error_of(lambda: gather_sizes(2, group=pair))
    else:
        assert torch.equal(all_gatherv(x, [2, 2], group=pair, algorithm="broadcast"),
                           all_gatherv_ref(x, [2, 2], group=pair))
    # MOECOMM_VALIDATE=1: ranks that disagree on sizes raise on every rank without validate=True
    import os

    os.environ[VALIDATE_ENV] = "1"
    try:
        sizes = [2, 2, 2] if rank else [2, 2, 3]
        results["env validate"] = error_of(lambda: all_gatherv(x, sizes))
        results["env validate rs"] = error_of(lambda: reduce_scatterv(torch.randn(6, 4), [2, 3, 1] if rank else [2, 2, 2]))
    finally:
        del os.environ[VALIDATE_ENV]
    results["symm on gloo"] = error_of(lambda: all_gatherv(x, [2, 2, 2], algorithm="symm"))
    results["allreduce gather"] = error_of(lambda: all_gatherv(x, [2, 2, 2], algorithm="allreduce"))
    results["unknown algorithm"] = error_of(lambda: all_gatherv(x, [2, 2, 2], algorithm="ring"))
    return results


def test_non_members_and_environment_validation():
    results = launch(_membership_and_env, 3, backend="gloo", timeout=120)
    assert "not a member" in results[2]["not a member: all_gatherv"]
    assert "not a member" in results[2]["not a member: reduce_scatterv"]
    assert "not a member" in results[2]["not a member: gather_sizes"]
    for r in range(3):
        assert "disagree on sizes" in results[r]["env validate"], results[r]
        assert "disagree on sizes" in results[r]["env validate rs"]
        assert "symm" in results[r]["symm on gloo"] and "reduce_scatterv only" in results[r]["allreduce gather"]
        assert "'ring' is not a valid Algorithm" in results[r]["unknown algorithm"]


# ---------------------------------------------------------------------------------------------------
# launch: failures and hangs reach the caller
# ---------------------------------------------------------------------------------------------------


def _fail_on_rank_1():
    if dist.get_rank() == 1:
        raise KeyError("boom on rank 1")
    dist.barrier()  # rank 0 would wait forever for rank 1


def _hang():
    if dist.get_rank() == 0:
        time.sleep(60)
    dist.barrier()


def _big_tensor():
    return torch.full((1000, 100), float(dist.get_rank()))


def test_launch_returns_tensors_by_value():
    # CPU tensors must outlive the rank that made them (no shared-memory handles)
    results = launch(_big_tensor, 2, backend="gloo", timeout=60)
    assert [float(t.mean()) for t in results] == [0.0, 1.0]


def _exit_silently():
    import os

    if dist.get_rank() == 1:
        os._exit(0)
    return "ok"


def test_launch_rejects_bad_arguments_and_silent_exits():
    for world_size in (2.0, True, 0):
        with pytest.raises(ValueError, match="world_size"):
            launch(_big_tensor, world_size)
    for timeout in (0, -5, None, float("inf")):
        with pytest.raises(ValueError, match="timeout"):
            launch(_big_tensor, 2, timeout=timeout)
    # before any process starts: a string would be split into characters, a lambda cannot reach a spawned rank
    for args in ("ab", 5, {"a": 1}, None):
        with pytest.raises(TypeError, match=f"args must be a tuple or list of fn.s positional arguments, got {type(args).__name__}"):
            launch(_big_tensor, 1, args, backend="gloo")
    for fn in (5, lambda: 1):
        with pytest.raises(TypeError, match="must be a module-level function"):
            launch(fn, 1, backend="gloo")
    with pytest.raises(RankError, match="rank 1 exited .* without returning a result"):
        launch(_exit_silently, 2, backend="gloo", timeout=60)


def test_launch_refuses_a_function_the_ranks_cannot_import():
    """Spawned ranks import ``fn`` by module and name: a lambda, a nested function or one of ``python -c`` (or
    of a notebook) raises TypeError before any process starts, instead of a PicklingError or a dead rank."""

    def nested():
        return 1

    for fn in (lambda: 1, nested):
        with pytest.raises(TypeError, match="module-level function"):
            launch(fn, 2, backend="gloo", timeout=60)
    with pytest.raises(TypeError, match="fn must be a module-level function, got 42"):
        launch(42, 2, backend="gloo", timeout=60)
    code = "from moecomm.comm import launch\ndef f():\n    return 1\nlaunch(f, 2, backend='gloo', timeout=60)\n"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("TypeError: launch: fn=<function f"), run.stderr[-2000:]
    assert "python -c" in run.stderr


def test_a_script_without_the_main_guard_is_told_why_its_ranks_died(tmp_path):
    """Without ``if __name__ == "__main__":`` each spawned rank re-runs the script and dies while starting; the
    caller's error says so instead of only "exited (code 1) without returning a result"."""
    script = tmp_path / "no_guard.py"
    script.write_text("import torch.distributed as dist\nfrom moecomm.comm import launch\n\n\ndef rank():\n"
                      "    return dist.get_rank()\n\n\nprint(launch(rank, 2, backend='gloo', timeout=60))\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("moecomm.comm.launch.RankError: rank ") and "before running fn" in last, last
    assert 'if __name__ == "__main__":' in last, last


def _abort_on_rank_1():
    import os

    if dist.get_rank() == 1:
        os.abort()
    dist.barrier()  # rank 0 then fails on the closed connection: the message names rank 1 first


def test_launch_reports_failure_and_timeout():
    with pytest.raises(RankError, match="(?s)rank 1 of 2.*boom on rank 1"):
        launch(_fail_on_rank_1, 2, backend="gloo", timeout=60)
    with pytest.raises(RankError, match=r"^rank 1 exited \(code -6\) without returning a result"):
        launch(_abort_on_rank_1, 2, backend="gloo", timeout=60)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        launch(_hang, 2, backend="gloo", timeout=20)
    assert time.monotonic() - t0 < 40


# ---------------------------------------------------------------------------------------------------
# NCCL (marked gpu): the battery on every visible GPU, and CUDA-graph capture + replay
# ---------------------------------------------------------------------------------------------------


def _graph_case(seed):
    rank, world, device = dist.get_rank(), dist.get_world_size(), rank_device()
    sizes = [3 + 2 * r for r in range(world)] if world > 1 else [5]
    total = sum(sizes)
    hidden = torch.empty(sizes[rank], 256, dtype=torch.bfloat16, device=device)
    ids = torch.empty(sizes[rank], 8, dtype=torch.int32, device=device)
    partial = torch.empty(total, 256, dtype=torch.bfloat16, device=device)
    g_out = [torch.empty(total, 256, dtype=torch.bfloat16, device=device),
             torch.empty(total, 8, dtype=torch.int32, device=device)]
    rs_out = torch.empty(sizes[rank], 256, dtype=torch.bfloat16, device=device)
    # warm up on a side stream (NCCL communicators and the allocator) before capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        all_gatherv([hidden, ids], sizes, out=g_out)
        reduce_scatterv(partial, sizes, out=rs_out)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        all_gatherv([hidden, ids], sizes, out=g_out)
        reduce_scatterv(partial, sizes, out=rs_out)
    for step in range(3):
        gen = torch.Generator().manual_seed(seed + step)
        all_h = [torch.randn(n, 256, generator=gen).bfloat16() for n in sizes]
        all_i = [torch.randint(0, 256, (n, 8), generator=gen, dtype=torch.int32) for n in sizes]
        all_p = [torch.randn(total, 256, generator=gen).bfloat16() for _ in sizes]
        hidden.copy_(all_h[rank])
        ids.copy_(all_i[rank])
        partial.copy_(all_p[rank])
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(g_out[0].cpu(), torch.cat(all_h)) and torch.equal(g_out[1].cpu(), torch.cat(all_i))
        start = sum(sizes[:rank])
        expected = torch.stack([p.double() for p in all_p]).sum(0)[start : start + sizes[rank]]
        assert_close(rs_out.cpu().double(), expected, rel=REDUCE_TOL[torch.bfloat16], name="graph reduce_scatterv")
    return "ok"


@pytest.mark.gpu
def test_nccl_battery_and_graph():
    on_every_gpu_count(_battery)
    on_every_gpu_count(_graph_case)


def _validate_covers_out_and_types():
    rank = dist.get_rank()
    x = torch.randn(2 + rank, 4)
    sizes = [2, 3, 4]
    results = {
        "bad out on rank 1": error_of(lambda: all_gatherv(
            x, sizes, out=torch.empty(9, 5 if rank == 1 else 4), validate=True)),
        "a list to reduce_scatterv on rank 2": error_of(lambda: reduce_scatterv(
            [torch.ones(9, 4)] if rank == 2 else torch.ones(9, 4), sizes, validate=True)),
        "gather_sizes: float on rank 0": error_of(lambda: gather_sizes(2.7 if rank == 0 else 3)),
        "gather_sizes: negative on rank 2": error_of(lambda: gather_sizes(-1 if rank == 2 else 3)),
        "sizes as a dict": error_of(lambda: all_gatherv(x, {0: 2, 1: 3, 2: 4})),
        "unknown op": error_of(lambda: check_consistency(x, sizes, op="allgatherv")),
    }
    # numpy integers are integers
    import numpy as np

    assert all_gatherv(x, [np.int64(n) for n in sizes]).shape == (9, 4)
    return results


def test_validate_covers_out_and_types():
    results = launch(_validate_covers_out_and_types, 3, backend="gloo", timeout=120)
    assert_raised_on_every_rank(results)
    assert "rank 1" in results[0]["bad out on rank 1"]
    assert "[0]" in results[1]["gather_sizes: float on rank 0"]
