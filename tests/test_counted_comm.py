"""Counted collectives (device token counts, moecomm.comm.counted) on the CPU: the ``padded`` transport on gloo
ranks and the ``symm`` Triton kernels under TRITON_INTERPRET=1 on spawned ranks that share CPU memory (each
maps every peer's buffer; the kernels address it through a table of this process's pointers), against the
torch references, over several epochs (what a CUDA-graph replay repeats), with idle ranks, full slots,
different local buffer sizes and bad counts."""

import random

import pytest
import torch
import torch.distributed as dist

from moecomm import errors
from moecomm.comm import launch
from moecomm.comm import _kernels_counted as kernels
from moecomm.comm.counted import (
    CountedWorkspace,
    all_gather_counted,
    all_gather_counted_ref,
    clamp_count,
    clamp_count_ref,
    counted_workspace,
    reduce_scatter_counted,
    reduce_scatter_counted_ref,
)
from moecomm.comm.counted_workspace import peer_layout
from moecomm.testing import error_of

M, ROW_BYTES, HIDDEN = 5, 48, 24
MASK = slice(16, 28)  # three int32 "topk_ids" columns


def _assert_gathered(got, want, counts, rows, mask_cols, what):
    """Live rows byte for byte; dead rows only in their mask columns (-1), the rest is unspecified."""
    for r, c in enumerate(counts):
        s = r * rows
        assert torch.equal(got[s : s + c], want[s : s + c]), (what, r)
        assert (got[s + c : s + rows, mask_cols] == 0xFF).all(), (what, "dead rows not masked", r)


def _draw(gen, rank, world, step):
    """This rank's local buffer rows, its count (sometimes out of range), its rows and a partial."""
    n = int(torch.randint(0, M + 1, (1,), generator=gen))  # local buffer sizes differ between ranks
    count = [0, n, int(torch.randint(0, n + 1, (1,), generator=gen)), n + 3, -2][(step + rank) % 5]
    send = torch.randint(0, 256, (n, ROW_BYTES), dtype=torch.uint8, generator=gen)
    partial = torch.randn(world * M, HIDDEN, generator=gen).bfloat16()
    return n, torch.tensor(count, dtype=torch.int32 if step % 2 else torch.int64), send, partial


def _run_steps(ws, seed, steps, paired):
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    flagged = []
    for step in range(steps):
        n, count, send, partial = _draw(gen, rank, world, step)
        if step % 3 == 0 and n:  # the caller writes the workspace's send rows in place: no copy
            ws.send[:n].copy_(send)
            send = ws.send[:n]
        want, want_counts = all_gather_counted_ref(send, count, M, mask_cols=MASK)
        dist.barrier()  # every rank launches after every rank finished its host work (no host wait on a peer)
        got, counts = all_gather_counted(send, count, ws, mask_cols=MASK, paired=paired)
        assert torch.equal(counts, want_counts), (step, counts, want_counts)
        _assert_gathered(got, want, want_counts.tolist(), M, MASK, f"step {step}")
        out = partial.new_full((n, HIDDEN), float("nan"))
        dist.barrier()
        reduce_scatter_counted(partial, count, ws, out=out, paired=paired)
        assert torch.equal(out, reduce_scatter_counted_ref(partial, count, M, rows=n)), step
        flagged.append(error_of(errors.check_errors))
    return flagged


def _symm_ranks(seed, buffers, steps):
    rank = dist.get_rank()
    ws = CountedWorkspace.from_peer_buffers(buffers, rank, max_tokens_per_rank=M, row_bytes=ROW_BYTES, hidden=HIDDEN,
                                            programs=2, max_spin=1 << 22)
    flagged = _run_steps(ws, seed, steps, paired=True)
    flagged += _run_steps(ws, seed + 1, 2, paired=False)  # standalone calls: trailing flag rounds
    epochs = ws._epochs[:, 0].tolist()
    return flagged, epochs


def test_symm_kernels_match_reference_over_epochs():
    """3 ranks, 4 paired steps then 2 unpaired: every kernel against its torch reference, epochs kept."""
    seed = random.randrange(1 << 30)
    nbytes = peer_layout(3, M, ROW_BYTES, HIDDEN, torch.bfloat16).nbytes
    buffers = [torch.zeros(nbytes, dtype=torch.uint8).share_memory_() for _ in range(3)]
    results = launch(_symm_ranks, 3, (seed, buffers, 4), backend="gloo", timeout=240)
    for rank, (flagged, epochs) in enumerate(results):
        assert epochs == [6, 6, 2, 2], (rank, epochs)  # 6 gathers, 6 reduces, 2 trailing rounds of each
        for step, message in enumerate(flagged):  # counts n + 3 and -2 were flagged (and clamped)
            bad = (step % 4 + rank) % 5 in (3, 4)
            assert (message is not None and "num_tokens outside [0, rows" in message) == bad, (rank, step, message)


def _padded_ranks(seed):
    ws = counted_workspace(None, torch.device("cpu"), max_tokens_per_rank=M, row_bytes=ROW_BYTES, hidden=HIDDEN)
    assert ws.transport.value == "padded"
    assert counted_workspace(None, torch.device("cpu"), max_tokens_per_rank=M, row_bytes=ROW_BYTES,
                             hidden=HIDDEN) is ws  # cached per group object and sizes
    flagged = _run_steps(ws, seed, 5, paired=False)
    rank = dist.get_rank()
    messages = {
        "M differs": error_of(lambda: counted_workspace(None, torch.device("cpu"), max_tokens_per_rank=4 + rank,
                                                        row_bytes=8, hidden=8)),
        "M bad on rank 1": error_of(lambda: counted_workspace(None, torch.device("cpu"),
                                                              max_tokens_per_rank=0 if rank == 1 else 3, row_bytes=8,
                                                              hidden=8)),
        "symm on CPU": error_of(lambda: counted_workspace(None, torch.device("cpu"), max_tokens_per_rank=3,
                                                          row_bytes=8, hidden=8, transport="symm")),
        "send too long": error_of(lambda: all_gather_counted(torch.zeros(M + 1, ROW_BYTES, dtype=torch.uint8),
                                                             torch.tensor(1), ws)),
        "count a float": error_of(lambda: all_gather_counted(ws.send, torch.tensor(1.0), ws)),
        "count an int": error_of(lambda: all_gather_counted(ws.send, 1, ws)),
        "mask cols odd": error_of(lambda: all_gather_counted(ws.send, torch.tensor(1), ws, mask_cols=slice(2, 6))),
        "partial rows": error_of(lambda: reduce_scatter_counted(torch.zeros(M, HIDDEN, dtype=torch.bfloat16),
                                                                torch.tensor(1), ws)),
        # not a workspace, a truthy string for paired (skips the symm trailing round), a partial with grad
        "workspace None": error_of(lambda: all_gather_counted(ws.send, torch.tensor(1), None)),
        "workspace a string": error_of(lambda: reduce_scatter_counted(ws.partial, torch.tensor(1), "ws")),
        "paired a string": error_of(lambda: all_gather_counted(ws.send, torch.tensor(1), ws, paired="no")),
        "partial requires grad": error_of(lambda: reduce_scatter_counted(
            torch.zeros(3 * M, HIDDEN, requires_grad=True).bfloat16(), torch.tensor(1), ws)),
        "device a number": error_of(lambda: counted_workspace(None, 0, max_tokens_per_rank=3, row_bytes=8, hidden=8)),
    }
    # a device given by name is the same workspace as the torch.device
    assert counted_workspace(None, "cpu", max_tokens_per_rank=M, row_bytes=ROW_BYTES, hidden=HIDDEN) is ws
    return flagged, messages


def test_padded_transport_on_gloo():
    seed = random.randrange(1 << 30)
    results = launch(_padded_ranks, 3, (seed,), backend="gloo", timeout=120)
    for rank, (flagged, messages) in enumerate(results):
        assert [m is not None for m in flagged] == [(s + rank) % 5 in (3, 4) for s in range(5)], (rank, flagged)
        for case, message in messages.items():
            assert message is not None, (rank, case)
        assert "ranks disagree on max_tokens_per_rank: rank 0: 4, rank 1: 5, rank 2: 6" in messages["M differs"]
        assert "rank 1: max_tokens_per_rank must be an int >= 1, got 0" in messages["M bad on rank 1"]
        assert "transport 'symm' needs CUDA" in messages["symm on CPU"]
        assert "send must be torch.uint8 [<= 5, 48]" in messages["send too long"]
        assert messages["count an int"].startswith("TypeError")
        assert messages["workspace None"].startswith("TypeError") and "CountedWorkspace" in messages["workspace None"]
        assert "got str" in messages["workspace a string"] and "paired must be a bool, got 'no'" in messages[
            "paired a string"]
        assert "partial requires grad" in messages["partial requires grad"]
        assert "device must be a torch.device or its name, got 0" in messages["device a number"]


def test_clamp_kernel_matches_reference():
    """The padded path's clamp kernel (interpreted) against its torch reference: counts, flags, masked rows."""
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    for value in (-7, 0, 3, 6, 9, 2**40):
        send = torch.randint(-5, 5, (6, 8), dtype=torch.int32, generator=gen)
        count = torch.tensor(value, dtype=torch.int64)
        got_send, got = send.clone(), torch.empty(1, dtype=torch.int32)
        kernels.clamp_count(count, 6, got, got_send, (2, 5))
        got_error = error_of(errors.check_errors)
        want_send, want = send.clone(), torch.empty(1, dtype=torch.int32)
        clamp_count_ref(count, 6, want, want_send, (2, 5))
        want_error = error_of(errors.check_errors)
        assert torch.equal(got, want) and torch.equal(got_send, want_send), value
        assert got_error == want_error, (got_error, want_error)
        assert (got_error is None) == (0 <= value <= 6), value
    assert clamp_count(torch.tensor([4]), 2).tolist() == [2]
    assert clamp_count(torch.tensor(2**40), 2).tolist() == [2]
    with pytest.raises(ValueError, match=r"values in \[4, 2147483647\]\); it was clamped"):  # saturated int32
        errors.check_errors()


def test_a_peer_that_never_arrives_is_flagged_not_a_hang():
    """Rank 0 of 2 gathers alone: its bounded spin gives up, flags PEER_TIMEOUT and returns."""
    nbytes = peer_layout(2, M, ROW_BYTES, HIDDEN, torch.bfloat16).nbytes
    buffers = [torch.zeros(nbytes, dtype=torch.uint8) for _ in range(2)]
    ws = CountedWorkspace.from_peer_buffers(buffers, 0, max_tokens_per_rank=M, row_bytes=ROW_BYTES, hidden=HIDDEN,
                                            programs=1, max_spin=20)
    all_gather_counted(ws.send[:2], torch.tensor(2), ws, paired=True)
    with pytest.raises(ValueError, match="flag wait .* gave up"):
        errors.check_errors()
    assert ws._epochs[kernels.GATHER].tolist() == [1]  # it still counts: the next call is epoch 2


@pytest.mark.parametrize("argv, message", [
    (["bench", "counted", "--max-tokens", "0"], "argument --max-tokens: must be at least 1, got 0"),
    (["bench", "counted", "--transport", "nccl"], "argument --transport: unknown 'nccl'; choose from auto, padded"),
    (["bench", "counted", "--tokens", "4,0"], "argument --tokens: every value must be at least 1, got 0"),
] + ([] if torch.cuda.is_available() else [
    (["bench", "counted"], "bench counted replays CUDA graphs: it needs a CUDA device")]))
def test_bench_counted_refuses_bad_arguments(capsys, argv, message):
    """``moecomm bench counted``: exit status 2 and one line naming the problem, before any rank starts."""
    from moecomm.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("moecomm bench counted: error: ") and message in last, err
