"""Process groups that are re-initialised, and calls from threads.

6. After ``destroy_process_group`` torch reuses group names and a fault-tolerant engine may rebuild its
   groups with new rank numbers. Every per-group cache of moecomm is keyed by the group object: after a
   re-init with the ranks swapped, the collectives and the layer step give the reference values again, and
   the NCCL communicator and symmetric-memory caches (exercised with stand-ins on the CPU) make new entries
   for the new group instead of returning the old group's (built with the old rank numbers).
7. A new Python thread's current CUDA device is 0 whatever its rank's: moecomm takes a rank's device from the
   group or the tensors, never from the thread (the GPU tests run both on 2 GPUs).
"""

import random
import threading
import types

import pytest
import torch
import torch.distributed as dist

from moecomm.comm import _nccl, all_gatherv, gather_sizes, group, launch, rank_device, reduce_scatterv, symm
from moecomm.comm.launch import _free_port
from moecomm.layer import GraphedMoE, moe_forward
from moecomm.moe import experts_forward_ref, make_expert_weights, topk_softmax
from moecomm.testing import assert_close

HIDDEN, INTER, EXPERTS = 64, 32, 4
TOL = 2e-2


def _rows(seed, rank, n, dtype=torch.bfloat16):
    return torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(seed + 101 * rank)).to(dtype)


def _step(seed, sizes, device, grp=None):
    """all_gatherv, reduce_scatterv, gather_sizes and moe_forward on ``grp``; each vs its reference."""
    rank, world = dist.get_rank(grp), dist.get_world_size(grp)
    xs = [_rows(seed, r, n).to(device) for r, n in enumerate(sizes)]
    every = torch.cat(xs)
    got = all_gatherv([xs[rank], None], sizes, grp, algorithm="broadcast")  # broadcast: one root per rank
    assert torch.equal(got[0], every) and got[1] is None, (rank, sizes)
    start = sum(sizes[:rank])
    partial = torch.stack([_rows(seed + 7, r, sum(sizes), torch.float32) for r in range(world)]).to(device)
    mine = reduce_scatterv(partial[rank], sizes, grp, algorithm="broadcast")
    assert torch.equal(mine, partial.sum(0)[start : start + sizes[rank]]), (rank, sizes)
    assert gather_sizes(sizes[rank], grp) == list(sizes)
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, generator=gen) / INTER**0.5
    ids, tw = topk_softmax(torch.randn(sum(sizes), EXPERTS, generator=gen), 2)
    weights = make_expert_weights(w13.to(device), w2.to(device), ep_size=world, ep_rank=rank)
    rows = slice(start, start + sizes[rank])
    out = moe_forward(xs[rank], ids[rows].to(device), tw[rows].to(device), weights, sizes=sizes, group=grp,
                      strategy="agrs", algorithm="broadcast")
    ref = experts_forward_ref(every.cpu(), ids, tw, make_expert_weights(w13, w2))[rows]
    assert_close(out.float().cpu(), ref, rel=TOL, name=f"moe_forward rank {rank} {sizes}")


def _reinit_swapped(seed, port, backend):
    """Run, destroy the groups, re-initialise with the ranks swapped (rank r becomes world - 1 - r, as a
    fault-tolerant engine renumbers; each process keeps its GPU), run again: the world group and a subgroup
    reuse their names."""
    first, world, device = dist.get_rank(), dist.get_world_size(), rank_device()
    sub = dist.new_group(list(range(world)))
    names = (dist.group.WORLD.group_name, sub.group_name)
    for grp in (None, sub):
        _step(seed, [3, 1], rank_device(grp), grp)
    dist.destroy_process_group()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=world - 1 - first,
                            world_size=world, **({"device_id": device} if backend == "nccl" else {}))
    assert rank_device() == device
    sub = dist.new_group(list(range(world)))
    assert (dist.group.WORLD.group_name, sub.group_name) == names, "torch reused the names: the case to test"
    for grp in (None, sub):
        _step(seed + 1, [0, 5], rank_device(grp), grp)
        _step(seed + 2, [2, 4], rank_device(grp), grp)
    return "ok"


def test_collectives_after_a_reinit_with_swapped_ranks():
    seed = random.randrange(1 << 30)
    assert launch(_reinit_swapped, 2, (seed, _free_port(), "gloo"), backend="gloo", timeout=240) == ["ok", "ok"], seed


class _Recorder:
    """Stands in for an NCCL communicator / a symmetric-memory buffer: records the rank it was built for."""

    def __init__(self, grp, device, capacity=1 << 20):
        self.rank, self.capacity = dist.get_rank(grp), capacity


def _caches_follow_the_group(port):
    first, world = dist.get_rank(), dist.get_world_size()
    cpu = torch.device("cpu")
    torch.cuda.is_current_stream_capturing = lambda: False  # a CPU build has no CUDA streams
    _nccl.Communicator, symm._SymmBuffer = _Recorder, _Recorder
    before = (_nccl.communicator(None, cpu), symm.symm_buffer(None, cpu, 64))
    assert [c.rank for c in before] == [first, first]
    assert _nccl.communicator(None, cpu) is before[0] and symm.symm_buffer(None, cpu, 64) is before[1]  # cached
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=world - 1 - first,
                            world_size=world)
    after = (_nccl.communicator(None, cpu), symm.symm_buffer(None, cpu, 64))
    assert [c.rank for c in after] == [world - 1 - first] * 2, "a cache returned the old group's entry"
    assert group.rank_and_world(None) == (world - 1 - first, world)
    return "ok"


def test_nccl_and_symmetric_memory_caches_follow_the_group_object():
    assert launch(_caches_follow_the_group, 2, (_free_port(),), backend="gloo", timeout=120) == ["ok", "ok"]


def _stale_workspace():
    from moecomm.comm.counted import all_gather_counted, counted_workspace
    from moecomm.testing import error_of

    ws = counted_workspace(None, torch.device("cpu"), max_tokens_per_rank=2, row_bytes=8, hidden=0)
    group.forget_groups()
    dist.destroy_process_group()
    return error_of(lambda: all_gather_counted(ws.send, torch.tensor(1), ws))


def test_a_workspace_of_a_destroyed_group_raises_a_clear_error():
    """Used after destroy_process_group, a counted workspace names the missing group (it was 'cannot create weak
    reference to NoneType')."""
    for message in launch(_stale_workspace, 2, backend="gloo", timeout=60):
        assert message.startswith("ValueError: no default process group") and "destroyed" in message, message


def test_group_caches_hold_groups_weakly_and_by_identity():
    class Group:  # stands in for a ProcessGroup: weakly referable, hashed by identity
        pass

    cache = group.ByGroup()
    old = Group()
    assert cache.set(old, "old") == "old" and cache.get(old) == "old"
    assert cache.get(Group()) is None and cache.get(-100) is None  # another group; torch's NON_GROUP_MEMBER
    del old  # freed: its entry goes, and an object at the same address does not find it
    assert cache._entries == {}
    new = Group()
    assert cache.get(new) is None and group.per_group(cache, new) == {}
    group.per_group(cache, new)["cuda:0"] = "comm"
    assert group.per_group(cache, new) == {"cuda:0": "comm"}


def test_rank_device_comes_from_the_group_never_from_the_thread(monkeypatch):
    def thread_state():
        raise AssertionError("rank_device read the thread's current CUDA device")

    monkeypatch.setattr(torch.cuda, "current_device", thread_state)
    monkeypatch.setattr(group.dist, "get_backend", lambda g=None: "nccl")
    monkeypatch.setattr(group.dist, "get_rank", lambda g=None: 5)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    bound = types.SimpleNamespace(bound_device_id=torch.device("cuda", 3))
    unbound = types.SimpleNamespace(bound_device_id=None)
    world = types.SimpleNamespace(WORLD=unbound)
    monkeypatch.setattr(group.dist, "group", world)
    assert group.rank_device(bound) == torch.device("cuda", 3)  # init_process_group(device_id=cuda:3)
    assert group.rank_device(unbound) == torch.device("cuda", 1)  # torch's guess: rank 5 % 4 GPUs
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert group.rank_device(unbound) == torch.device("cuda", 2)
    assert group.rank_device(bound) == torch.device("cuda", 3)
    world.WORLD = types.SimpleNamespace(bound_device_id=torch.device("cuda", 0))
    assert group.rank_device(unbound) == torch.device("cuda", 0)  # a subgroup of a bound world group


# ----------------------------------------------------------------------------------------------------
# GPU: the same on NCCL (2 GPUs), and calls from a thread whose current device is 0


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_nccl_after_a_reinit_with_swapped_ranks():
    seed = random.randrange(1 << 30)
    assert launch(_reinit_swapped, 2, (seed, _free_port(), "nccl"), backend="nccl", timeout=300) == ["ok", "ok"], seed


def _in_a_thread(seed):
    """Every call of a step from a new thread (current device 0 on every rank) vs the same calls on the main
    thread: the same values, on this rank's GPU."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank)
    results, errors = {}, []

    def run(where):
        try:
            assert where == "main" or torch.cuda.current_device() == 0, "a new thread starts on device 0"
            assert rank_device() == device
            sizes = gather_sizes(2 + rank)
            _step(seed, sizes, device)
            gen = torch.Generator().manual_seed(seed)
            w13 = (torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5).to(device)
            w2 = (torch.randn(EXPERTS, HIDDEN, INTER, generator=gen) / INTER**0.5).to(device)
            graphed = GraphedMoE(make_expert_weights(w13, w2, ep_size=world, ep_rank=rank), hidden_size=HIDDEN,
                                 topk=2, buckets=[4], strategy="agrs")
            assert graphed.device == device
            ids, tw = topk_softmax(torch.randn(3, EXPERTS, generator=gen).to(device), 2)
            out = graphed(_rows(seed, rank, 3).to(device), ids, tw, sizes=[3] * world)
            assert out.device == device
            results[where] = out.clone()
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(f"{where}: {e!r}")

    run("main")
    worker = threading.Thread(target=run, args=("thread",))
    worker.start()
    worker.join()
    assert not errors, errors
    assert torch.equal(results["main"], results["thread"])
    return "ok"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_calls_from_a_thread_use_the_ranks_device():
    seed = random.randrange(1 << 30)
    assert launch(_in_a_thread, 2, (seed,), backend="nccl", timeout=300) == ["ok", "ok"], seed
