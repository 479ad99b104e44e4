"""Triton kernels of the counted collectives (private; :mod:`moecomm.comm.counted` holds their torch references
and the callers).

* :func:`clamp_count` -- clamp this rank's device token count to ``[0, limit]``, flag a bad one in
  :mod:`moecomm.errors`, and (``padded``) write ``-1`` into the id columns of the dead send rows.
* :func:`gather` -- ``symm``: publish this rank's count, wait for every peer's, pull every peer's live rows
  into the gathered buffer and mask the dead rows' ids; one launch.
* :func:`reduce` -- ``symm``: publish "my partial is ready", wait for every peer, sum this rank's rows of every
  peer's partial in float32 in rank order; one launch.
* :func:`done` -- ``symm``: a trailing flag round (one program) for calls that are not paired.

**Peer memory.** Every rank owns one buffer that every peer can address (torch symmetric memory in
production, shared CPU memory under the interpreter, CUDA IPC in tests): ``int64 flags [ROUNDS][W]`` at
``flag_off`` (8-byte words), the send rows ``[M, row_bytes]`` at ``send_off``, the partial output
``[W * M, H]`` at ``partial_off`` (elements). ``table`` is an int64 ``[W]`` device tensor of the peers'
base addresses as THIS process maps them; kernels cast an entry to a pointer (``.to(tl.pointer_type(..))``).
Only unicast loads, stores and atomics: no multimem / NVLS.

**Flag rounds.** Program 0 of rank ``r`` writes the word ``(epoch << 32) | count`` into slot ``[round][r]`` of
EVERY rank (itself included) with a release exchange at system scope; EVERY program then polls its own
``[round][0..W)`` with acquire loads (``atomic_add(p, 0)``) until each word carries this epoch (compared on its
low 32 bits, so the counter may wrap), then a CTA barrier orders the later loads behind the acquire. No
program waits on another program of its own launch (no co-residency assumption; the interpreter runs them one
after another). The epoch is a device counter per (round, program), ``E[pid] + 1``, stored back at the end:
no host argument changes between calls, so a CUDA-graph replay keeps counting, and every rank makes the same
sequence of calls, so the epochs agree. A word is written by one source rank only, and no slot is reset. The
spin is bounded (``max_spin`` polls): past it the kernel sets :data:`moecomm.errors.PEER_TIMEOUT`, treats
the peer as idle and finishes instead of hanging the GPU.

Why the buffers can be reused without a second flag round per call is argued in :mod:`moecomm.comm.counted`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moecomm import errors
from moecomm._device import device_guard

__all__ = ["ROUNDS", "GATHER", "REDUCE", "GATHER_DONE", "REDUCE_DONE", "clamp_count", "gather", "reduce", "done"]

ROUNDS = 4  # flag rounds, each its own [W] slots and epoch counters
GATHER, REDUCE, GATHER_DONE, REDUCE_DONE = range(ROUNDS)
_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}  # partial dtypes of _reduce_kernel


@triton.jit
def _clamped(count_ptr, limit, err_ptr, COUNT_BIT: tl.constexpr):
    """The count at ``count_ptr`` (int32 or int64) clamped to ``[0, limit]``, as int64; a value outside is
    recorded in ``err`` (bit ``COUNT_BIT``, its saturated int32 value widening ``[err[3], err[4]]``)."""
    raw = tl.load(count_ptr).to(tl.int64)
    if (raw < 0) | (raw > limit):
        r32 = tl.minimum(tl.maximum(raw, -2147483648), 2147483647).to(tl.int32)
        tl.atomic_or(err_ptr, COUNT_BIT)
        tl.atomic_min(err_ptr + 3, r32)
        tl.atomic_max(err_ptr + 4, r32)
    return tl.minimum(tl.maximum(raw, 0), limit)


@triton.jit
def _publish(table_ptr, slot, msg, W: tl.constexpr):
    """Word ``slot`` (int64 index into every rank's buffer) of every rank := ``msg``, release, system scope."""
    for p in tl.static_range(W):
        base = tl.load(table_ptr + p).to(tl.pointer_type(tl.int64))
        tl.atomic_xchg(base + slot, msg, sem="release", scope="sys")


@triton.jit
def _wait(table_ptr, first_slot, rank, epoch, own, max_spin, W: tl.constexpr, WP: tl.constexpr):
    """Poll this rank's words ``first_slot + p`` (every peer ``p != rank``) until each carries ``epoch``; returns
    every rank's count (int64 ``[WP]``: ``own`` for this rank, 0 past W and for a peer that timed out) and how
    many peers timed out. This rank's own word is never awaited: no program waits on its own launch."""
    mine = tl.load(table_ptr + rank).to(tl.pointer_type(tl.int64)) + first_slot
    want = (epoch << 32) >> 32  # the sign-extended low 32 bits of the epoch, as (word >> 32) gives them
    peers = tl.arange(0, WP)
    counts = tl.where(peers == rank, own, 0).to(tl.int64)
    missing = 0
    for p in tl.static_range(W):
        peer = p != rank
        v = tl.atomic_add(mine + p, 0, sem="acquire", scope="sys")
        n = 0
        while ((v >> 32) != want) & (n < max_spin) & peer:
            v = tl.atomic_add(mine + p, 0, sem="acquire", scope="sys")
            n += 1
        ok = (v >> 32) == want
        counts = tl.where((peers == p) & peer, tl.where(ok, v & 2147483647, 0), counts)
        missing += tl.where(ok | (p == rank), 0, 1)
    tl.debug_barrier()  # the acquire of one thread orders the whole program's later loads
    return counts, missing


@triton.jit
def _clamp_kernel(count_ptr, out_ptr, err_ptr, send_ptr, limit, rows, row_words, mask_lo, mask_n,
                  MASK: tl.constexpr, ROWS_BLOCK: tl.constexpr, MASK_BLOCK: tl.constexpr, COUNT_BIT: tl.constexpr):
    c = _clamped(count_ptr, limit, err_ptr, COUNT_BIT)
    tl.store(out_ptr, c.to(tl.int32))
    if MASK:
        cols = tl.arange(0, MASK_BLOCK)
        for r0 in range(0, rows, ROWS_BLOCK):
            r = r0 + tl.arange(0, ROWS_BLOCK)
            dead = (r >= c) & (r < rows)
            ptrs = send_ptr + r.to(tl.int64)[:, None] * row_words + mask_lo + cols[None, :]
            tl.store(ptrs, -1, mask=dead[:, None] & (cols < mask_n)[None, :])


def clamp_count(count: torch.Tensor, limit: int, out: torch.Tensor, send: torch.Tensor | None = None,
                mask_words: tuple[int, int] = (0, 0)) -> None:
    """``out`` (int32 ``[1]``) := ``count`` clamped to ``[0, limit]``, a bad count flagged; with ``send``
    (int32 ``[M, row_words]`` view of the send rows) also ``send[c:, lo:hi] = -1`` for ``mask_words = (lo, hi)``."""
    lo, hi = mask_words
    target = out if send is None else send
    with device_guard(out.device):
        _clamp_kernel[(1,)](count, out, errors.error_buffer(out.device), target, limit,
                            0 if send is None else send.shape[0], 0 if send is None else send.shape[1], lo, hi - lo,
                            MASK=send is not None and hi > lo, ROWS_BLOCK=64,
                            MASK_BLOCK=triton.next_power_of_2(max(hi - lo, 1)), COUNT_BIT=errors.COUNT_OUT_OF_RANGE)


@triton.jit
def _flag_round(table_ptr, count_ptr, epoch_ptr, err_ptr, limit, max_spin, rank, flag_slot, W: tl.constexpr,
                WP: tl.constexpr, COUNT_BIT: tl.constexpr, TIMEOUT_BIT: tl.constexpr):
    """One flag round of a program: this rank's clamped count published with the next epoch (program 0),
    every peer's awaited (a bounded wait: a timeout sets its bit). Returns ``(epoch, own count, counts [WP])``."""
    pid = tl.program_id(0)
    epoch = tl.load(epoch_ptr + pid) + 1
    c = _clamped(count_ptr, limit, err_ptr, COUNT_BIT)  # every program flags a bad count alike: same bits
    if pid == 0:
        _publish(table_ptr, flag_slot + rank, (epoch << 32) | c, W)
    counts, missing = _wait(table_ptr, flag_slot, rank, epoch, c, max_spin, W, WP)
    if missing > 0:
        tl.atomic_or(err_ptr, TIMEOUT_BIT)
    return epoch, c, counts


@triton.jit
def _gather_kernel(
    table_ptr, gathered64_ptr, gathered32_ptr, counts_ptr, count_ptr, epoch_ptr, err_ptr,
    limit, max_spin, rank, flag_slot, send_off, rows, row_words, mask_lo, mask_n,
    W: tl.constexpr, WP: tl.constexpr, BLOCK: tl.constexpr, MASK_BLOCK: tl.constexpr,
    COUNT_BIT: tl.constexpr, TIMEOUT_BIT: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    epoch, c, counts = _flag_round(table_ptr, count_ptr, epoch_ptr, err_ptr, limit, max_spin, rank, flag_slot, W, WP,
                                   COUNT_BIT, TIMEOUT_BIT)
    peers = tl.arange(0, WP)
    if pid == 0:
        tl.store(counts_ptr + peers, counts.to(tl.int32), mask=peers < W)
    ends = tl.cumsum(counts, 0)
    starts = ends - counts
    chunks = tl.cdiv(row_words, BLOCK)
    cols = tl.arange(0, BLOCK)
    zero = tl.full([], 0, tl.int64)  # loop indices as int64 tensors (the interpreter hands out Python ints)
    # live rows: the j-th live row overall is row i of peer p; (row, chunk) pairs spread over the programs
    for t in range(pid, tl.sum(counts).to(tl.int32) * chunks, nprog):
        j = (zero + t) // chunks
        w = (t - j * chunks) * BLOCK + cols
        p = tl.sum((ends <= j).to(tl.int32))
        i = j - tl.sum(tl.where(peers == p, starts, 0))
        src = tl.load(table_ptr + p).to(tl.pointer_type(tl.int64)) + send_off + i * row_words
        dst = gathered64_ptr + (p * rows + i) * row_words
        tl.store(dst + w, tl.load(src + w, mask=w < row_words, cache_modifier=".cg"), mask=w < row_words)
    # dead rows: their topk_ids become -1 (masked slots); their other bytes are left as they are
    mcols = tl.arange(0, MASK_BLOCK)
    for t in range(pid, W * rows, nprog):
        row = zero + t
        p = row // rows
        # the row's test as a block comparison: block & scalar bool is int32 in Triton 3.9's interpreter
        dead = (mcols + (row - p * rows)) >= (mcols + tl.sum(tl.where(peers == p, counts, 0)))
        tl.store(gathered32_ptr + row * (2 * row_words) + mask_lo + mcols, -1, mask=(mcols < mask_n) & dead)
    tl.store(epoch_ptr + pid, epoch)


def gather(table, gathered, counts, count, epochs, limit, max_spin, rank, flag_slot, send_off, mask_words) -> None:
    """``symm`` allgather of every rank's live rows (module docstring). ``gathered`` uint8 ``[W * M, row_bytes]``
    (``row_bytes`` a multiple of 8), ``counts`` int32 ``[W]`` out, ``count`` this rank's count (one element),
    ``epochs`` int64 ``[G]`` (G = the fixed grid), ``limit`` this rank's send rows, ``flag_slot`` / ``send_off``
    in 8-byte words, ``mask_words`` int32 columns ``(lo, hi)`` that dead rows carry as -1."""
    world, rows, row_words = table.numel(), gathered.shape[0] // table.numel(), gathered.shape[1] // 8
    lo, hi = mask_words
    with device_guard(gathered.device):
        _gather_kernel[(epochs.numel(),)](
            table, gathered.view(torch.int64), gathered.view(torch.int32), counts, count, epochs,
            errors.error_buffer(gathered.device), limit, max_spin, rank, flag_slot, send_off, rows, row_words, lo,
            hi - lo, W=world, WP=triton.next_power_of_2(world), BLOCK=min(512, triton.next_power_of_2(row_words)),
            MASK_BLOCK=triton.next_power_of_2(max(hi - lo, 1)), COUNT_BIT=errors.COUNT_OUT_OF_RANGE,
            TIMEOUT_BIT=errors.PEER_TIMEOUT,
        )


@triton.jit
def _load_f32(base, offset, mask, KIND: tl.constexpr):
    """float32 values at element ``offset`` of the partial at address ``base`` (bf16 through its bits: exact,
    and the interpreter has no bf16 pointers)."""
    if KIND == 0:
        bits = tl.load(base.to(tl.pointer_type(tl.uint16)) + offset, mask=mask, other=0, cache_modifier=".cg")
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif KIND == 1:
        return tl.load(base.to(tl.pointer_type(tl.float16)) + offset, mask=mask, other=0.0,
                       cache_modifier=".cg").to(tl.float32)
    else:
        return tl.load(base.to(tl.pointer_type(tl.float32)) + offset, mask=mask, other=0.0, cache_modifier=".cg")


@triton.jit
def _bf16_bits(x):
    """float32 -> bf16 bits, round to nearest even (the interpreter's own conversion does not round so)."""
    b = x.to(tl.uint32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, r).to(tl.uint16)


@triton.jit
def _reduce_kernel(
    table_ptr, out_ptr, count_ptr, epoch_ptr, err_ptr,
    limit, max_spin, rank, flag_slot, partial_off, rows, hidden, n_out,
    W: tl.constexpr, WP: tl.constexpr, BLOCK: tl.constexpr, KIND: tl.constexpr,
    COUNT_BIT: tl.constexpr, TIMEOUT_BIT: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    epoch, c, _ = _flag_round(table_ptr, count_ptr, epoch_ptr, err_ptr, limit, max_spin, rank, flag_slot, W, WP,
                              COUNT_BIT, TIMEOUT_BIT)
    chunks = tl.cdiv(hidden, BLOCK)
    cols = tl.arange(0, BLOCK)
    zero = tl.full([], 0, tl.int64)  # loop indices as int64 tensors (the interpreter hands out Python ints)
    for t in range(pid, n_out * chunks, nprog):
        i = (zero + t) // chunks
        h = (t - i * chunks) * BLOCK + cols
        live = (h < hidden) & ((h - h + i) < c)  # dead rows load nothing, are written as zeros (block test, as above)
        offset = partial_off + (rank * rows + i) * hidden + h
        # float32, in rank order, starting from rank 0's value: the gloo sum's order and rounding
        acc = _load_f32(tl.load(table_ptr), offset, live, KIND)
        for p in tl.static_range(1, W):
            acc += _load_f32(tl.load(table_ptr + p), offset, live, KIND)
        dst = out_ptr + i * hidden + h
        if KIND == 0:
            tl.store(dst, _bf16_bits(acc), mask=h < hidden)
        else:
            tl.store(dst, acc, mask=h < hidden)
    tl.store(epoch_ptr + pid, epoch)


def reduce(table, out, count, epochs, limit, max_spin, rank, flag_slot, partial_off, rows) -> None:
    """``symm`` reducescatter: ``out [n, H]`` rows below this rank's clamped count = the float32 sum in rank
    order of rows ``rank * rows + i`` of every rank's partial (element offset ``partial_off``, ``out``'s dtype),
    rounded once; rows past the count = 0. ``flag_slot`` in 8-byte words."""
    n, hidden = out.shape
    bits = out.view(torch.uint16) if out.dtype == torch.bfloat16 else out
    with device_guard(out.device):
        _reduce_kernel[(epochs.numel(),)](
            table, bits, count, epochs, errors.error_buffer(out.device), limit, max_spin, rank, flag_slot,
            partial_off, rows, hidden, n, W=table.numel(), WP=triton.next_power_of_2(table.numel()),
            BLOCK=min(1024, triton.next_power_of_2(hidden)), KIND=_KIND[out.dtype],
            COUNT_BIT=errors.COUNT_OUT_OF_RANGE, TIMEOUT_BIT=errors.PEER_TIMEOUT,
        )


@triton.jit
def _done_kernel(table_ptr, epoch_ptr, err_ptr, max_spin, rank, flag_slot,
                 W: tl.constexpr, WP: tl.constexpr, TIMEOUT_BIT: tl.constexpr):
    epoch = tl.load(epoch_ptr) + 1
    _publish(table_ptr, flag_slot + rank, epoch << 32, W)
    _, missing = _wait(table_ptr, flag_slot, rank, epoch, 0, max_spin, W, WP)
    if missing > 0:
        tl.atomic_or(err_ptr, TIMEOUT_BIT)
    tl.store(epoch_ptr, epoch)


def done(table, epochs, max_spin, rank, flag_slot) -> None:
    """A trailing flag round: returns (on the device) once every rank has finished the call before it."""
    with device_guard(epochs.device):
        _done_kernel[(1,)](table, epochs, errors.error_buffer(epochs.device), max_spin, rank, flag_slot,
                           W=table.numel(), WP=triton.next_power_of_2(table.numel()), TIMEOUT_BIT=errors.PEER_TIMEOUT)
