"""Collectives whose row counts live on the device: :func:`all_gather_counted` and :func:`reduce_scatter_counted`.

The host never learns how many rows a rank has, so one CUDA graph serves every step whatever the token counts.
**The padded layout**: every rank owns a static slot of ``M = max_tokens_per_rank`` rows; rank ``r``'s rows
sit at ``[r * M, r * M + count_r)`` of the gathered ``[W * M, row_bytes]`` buffer, where ``count_r`` is rank
``r``'s live count, an int32 scalar on the device (CPU for gloo). Rows of a rank past its count are *dead*:
their bytes are unspecified except the columns ``mask_cols`` (the message's ``topk_ids``), which read
``0xFF`` (int32 ``-1``, a masked slot), so the experts skip them at no GEMM cost. The reducescatter returns
this rank's ``[n, H]`` rows (``n <= M``) summed over ranks; rows at or past its count are zero. The only
thing ranks agree on is ``M``, checked once, collectively, when the :class:`CountedWorkspace` is created.

**Transports** (one per workspace, the same on every rank; ``"auto"``: ``symm`` where torch symmetric memory
works on CUDA over an NCCL group on one host, else ``padded``):

- ``padded``: every rank sends its whole slot with the native equal-size all-gather (its dead rows' ids set
  to -1 on the device first) plus a 4-byte all-gather of its count, in one NCCL group; the combine is the
  equal-size reduce-scatter of ``[W * M, H]``. Through moecomm's NCCL binding or gloo; any interconnect,
  capturable in a CUDA graph, nothing read on the host. Sums: NCCL's (in the partial's dtype), gloo's
  (float32 in rank order).
- ``symm``: each rank's send rows and partial output live in a buffer every peer maps (torch symmetric
  memory). One Triton kernel publishes this rank's count into every peer's flag words, waits for every
  peer's, and pulls every peer's LIVE rows into the gathered buffer: an idle rank sends nothing. The combine
  kernel pulls this rank's rows of every peer's partial and sums them in float32 in rank order (the gloo
  order: the same bits as the host-list path on gloo), rounded once. Unicast loads, stores and atomics
  only; no multimem / NVLS (:mod:`moecomm.comm._kernels_counted`).

**Reusing the symm buffers without a flag round per call.** A rank overwrites its send rows (the next
gather's producer, e.g. the quantizer) only after its reduce-scatter kernel returned, and that kernel
returns only after every peer published its reduce flag, which each peer does at the start of ITS
reduce-scatter, after its gather kernel (the last reader of our send rows) finished. Likewise a rank
overwrites its partial (the experts) only after its next gather kernel returned, which waits for every
peer's next gather flag, published after that peer's reduce-scatter (the last reader of our partial)
finished. Flag slots are safe for the same reason: a peer publishes round ``X`` of epoch ``e + 1`` only
after round ``Y`` of epoch ``e``, which every rank published only after reading round ``X`` of epoch ``e``.
So a gather followed by a reduce-scatter on the same workspace (a layer step) needs no extra round:
``paired=True``. A call that is not followed by the other collective (a standalone gather, two gathers in a
row) adds a trailing flag round (one tiny kernel) before returning, so that no rank rewrites a buffer a
slower peer still reads: the default, ``paired=False``.

Each kernel has a torch reference here (:func:`clamp_count_ref`, :func:`all_gather_counted_ref`,
:func:`reduce_scatter_counted_ref`); the tests compare them under ``TRITON_INTERPRET=1`` with several ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moecomm import errors
from moecomm._modes import refuse_grad
from moecomm.comm import _kernels_counted as kernels
from moecomm.comm.counted_workspace import (
    CountedWorkspace,
    Transport,
    counted_workspace,
)
from moecomm.comm.group import rank_and_world

__all__ = [
    "Transport",
    "CountedWorkspace",
    "counted_workspace",
    "all_gather_counted",
    "reduce_scatter_counted",
    "clamp_count",
    "clamp_count_ref",
    "all_gather_counted_ref",
    "reduce_scatter_counted_ref",
]


# ----------------------------------------------------------------------------------------------------
# Checks at the door


def _check_call(ws, paired, what: str) -> None:
    if not isinstance(ws, CountedWorkspace):
        raise TypeError(f"{what}: workspace must be a CountedWorkspace (from counted_workspace), got "
                        f"{type(ws).__name__}")
    if not isinstance(paired, bool):
        raise TypeError(f"rank {ws.rank}: {what}: paired must be a bool, got {paired!r}")


def _check_count(num_tokens, ws: CountedWorkspace, what: str) -> None:
    if not isinstance(num_tokens, torch.Tensor):
        raise TypeError(f"rank {ws.rank}: {what}: num_tokens must be a one-element int32/int64 tensor on "
                        f"{ws.device}, got {type(num_tokens).__name__}")
    if num_tokens.numel() != 1 or num_tokens.dtype not in (torch.int32, torch.int64) or num_tokens.device != ws.device:
        raise ValueError(f"rank {ws.rank}: {what}: num_tokens must be a one-element int32/int64 tensor on {ws.device} "
                         f"(read on the device, never on the host), got {num_tokens.dtype} {tuple(num_tokens.shape)} "
                         f"on {num_tokens.device}")


def _check_rows(t, name: str, cols: int, dtype, ws: CountedWorkspace, what: str, max_rows: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"rank {ws.rank}: {what}: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 2 or t.shape[1] != cols or t.dtype != dtype or t.shape[0] > max_rows or t.device != ws.device:
        raise ValueError(f"rank {ws.rank}: {what}: {name} must be {dtype} [<= {max_rows}, {cols}] on {ws.device}, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"rank {ws.rank}: {what}: {name} must be contiguous")


def _mask_words(mask_cols, row_bytes: int, rank: int) -> tuple[int, int]:
    if mask_cols is None:
        return 0, 0
    if not isinstance(mask_cols, slice) or mask_cols.step not in (None, 1):
        raise TypeError(f"rank {rank}: mask_cols must be a slice of byte columns, got {mask_cols!r}")
    lo, hi, _ = mask_cols.indices(row_bytes)
    if lo % 4 or hi % 4 or hi < lo:
        raise ValueError(f"rank {rank}: mask_cols {mask_cols} must cover whole int32 columns of a {row_bytes}-byte row")
    return lo // 4, hi // 4


def _is_view_of(t: torch.Tensor, base: torch.Tensor) -> bool:
    return t.data_ptr() == base.data_ptr() and t.stride() == base.stride()


# ----------------------------------------------------------------------------------------------------
# The collectives


def clamp_count(num_tokens: torch.Tensor, limit: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``num_tokens`` clamped to ``[0, limit]`` on its device, as ``int32 [1]`` (``out`` if given); a value
    outside is flagged in :mod:`moecomm.errors` (``check_errors()`` reports it). No host read. A Triton kernel
    on CUDA, :func:`clamp_count_ref` elsewhere."""
    if out is None:
        out = torch.empty(1, dtype=torch.int32, device=num_tokens.device)
    if num_tokens.is_cuda:
        kernels.clamp_count(num_tokens, limit, out)
    else:
        clamp_count_ref(num_tokens, limit, out)
    return out


def clamp_count_ref(num_tokens: torch.Tensor, limit: int, out: torch.Tensor, send: torch.Tensor | None = None,
                    mask_words: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Torch reference of the clamp kernel: ``out`` (int32 ``[1]``) = ``num_tokens`` clamped to ``[0, limit]``
    (flagged by :func:`moecomm.errors.record_bad_count`); with ``send`` (int32 ``[M, words]``) the words
    ``[lo, hi)`` of its rows at or past the clamped count are set to -1."""
    errors.record_bad_count(num_tokens, limit)
    out.copy_(num_tokens.reshape(1).clamp(0, limit))
    lo, hi = mask_words
    if send is not None and hi > lo:
        dead = torch.arange(send.shape[0], device=send.device) >= out
        send[:, lo:hi].masked_fill_(dead[:, None], -1)
    return out


def all_gather_counted(send: torch.Tensor, num_tokens: torch.Tensor, workspace: CountedWorkspace, *,
                       mask_cols: slice | None = None, paired: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather every rank's live rows into the padded layout; the counts never reach the host.

    Parameters
    ----------
    send : Tensor
        ``uint8 [n, row_bytes]``, ``n <= M``: this rank's rows, of which the first ``num_tokens`` are live.
        ``workspace.send[:n]`` (written in place by the caller, e.g. the quantizer) is used without a copy.
    num_tokens : Tensor
        This rank's live count: a one-element int32/int64 tensor on the workspace's device. Clamped to
        ``[0, n]`` on the device; a value outside is flagged (:func:`moecomm.errors.check_errors`), never read
        past ``send``.
    workspace : CountedWorkspace
        The same on every rank (:func:`counted_workspace`).
    mask_cols : slice, optional
        Byte columns (whole int32 words) that every dead row of the result reads as ``-1``: the ``topk_ids``
        of a message row.
    paired : bool
        True when the next call on this workspace is a :func:`reduce_scatter_counted` and ``workspace.send`` is
        not written before it (a layer step): ``symm`` then skips its trailing flag round (module docstring).

    Returns
    -------
    gathered : Tensor
        ``uint8 [W * M, row_bytes]`` (``workspace.gathered``, rewritten by the next call): rank ``r``'s live rows
        at ``[r * M, r * M + counts[r])``; dead rows as the module docstring says.
    counts : Tensor
        ``int32 [W]`` on the device (``workspace.counts``): every rank's clamped count.

    Raises
    ------
    TypeError, ValueError
        Before any communication: a ``workspace`` that is not a :class:`CountedWorkspace`, ``paired`` not a
        bool, a ``send`` that is not ``uint8 [<= M, row_bytes]`` contiguous on the workspace's device, a
        ``num_tokens`` that is not a one-element integer tensor there, a bad ``mask_cols``, a workspace without
        a gather (``row_bytes`` 0).
    """
    ws = workspace
    _check_call(ws, paired, "all_gather_counted")
    _check_count(num_tokens, ws, "all_gather_counted")
    _check_rows(send, "send", ws.row_bytes, torch.uint8, ws, "all_gather_counted", ws.rows)
    if ws.row_bytes == 0:
        raise ValueError(f"rank {ws.rank}: all_gather_counted: this workspace was created with row_bytes = 0")
    mask = _mask_words(mask_cols, ws.row_bytes, ws.rank)
    n = send.shape[0]
    if not _is_view_of(send, ws.send):
        ws.send[:n].copy_(send)
    if ws.transport == Transport.SYMM:
        kernels.gather(ws._table, ws.gathered, ws.counts, num_tokens, ws._epochs[kernels.GATHER], n, ws._max_spin,
                       ws.rank, ws._flag_slot + kernels.GATHER * ws.world_size, ws._send_words, mask)
        if not paired:
            _trailing_round(ws, kernels.GATHER_DONE)
        return ws.gathered, ws.counts
    send32 = ws.send.view(torch.int32)
    if ws.device.type == "cuda":
        kernels.clamp_count(num_tokens, n, ws._count, send32, mask)
    else:
        clamp_count_ref(num_tokens, n, ws._count, send32, mask)
    if ws.world_size > 1:
        comm = ws._comm()
        comm.group_start()
        try:
            comm.all_gather(ws.gathered, ws.send)
            comm.all_gather(ws.counts, ws._count)
        finally:
            comm.group_end()
    return ws.gathered, ws.counts


def reduce_scatter_counted(partial: torch.Tensor, num_tokens: torch.Tensor, workspace: CountedWorkspace, *,
                           out: torch.Tensor | None = None, paired: bool = False) -> torch.Tensor:
    """Sum ``partial`` over ranks and return this rank's slot: the combine of the padded layout.

    Parameters
    ----------
    partial : Tensor
        ``[W * M, hidden]`` of the workspace's dtype, the same layout on every rank (rank ``r``'s rows at
        ``r * M``). ``workspace.partial`` (the experts' ``out=``) is used without a copy.
    num_tokens : Tensor
        This rank's live count (one-element int32/int64 on the workspace's device), clamped to ``[0, n]``
        and flagged as in :func:`all_gather_counted`.
    workspace : CountedWorkspace
    out : Tensor, optional
        ``[n, hidden]`` contiguous, ``n <= M``, the workspace's dtype; default a new ``[M, hidden]``.
    paired : bool
        True when the next call on this workspace is an :func:`all_gather_counted` and ``workspace.partial`` is
        not written before it (a layer step): ``symm`` then skips its trailing flag round.

    Returns
    -------
    Tensor
        ``out``: row ``i < count`` = the sum over ranks of ``partial[rank * M + i]``; rows ``i >= count`` are 0.
        ``symm`` and gloo sum in float32 in rank order and round once; NCCL (``padded``) sums in the dtype.

    Raises
    ------
    TypeError, ValueError
        Before any communication: the workspace, ``paired``, shapes, dtypes, devices or layouts as above; a
        workspace without a reducescatter (``hidden`` 0); ``partial`` or ``out`` that requires grad while grad
        mode is on (inference only).
    """
    ws = workspace
    what = "reduce_scatter_counted"
    _check_call(ws, paired, what)
    _check_count(num_tokens, ws, what)
    _check_rows(partial, "partial", ws.hidden, ws.dtype, ws, what, ws.world_size * ws.rows)
    refuse_grad(f"rank {ws.rank}: {what}", partial=partial, out=out)
    if partial.shape[0] != ws.world_size * ws.rows or ws.hidden == 0:
        raise ValueError(f"rank {ws.rank}: {what}: partial must have W * M = {ws.world_size * ws.rows} rows of "
                         f"{ws.hidden} (> 0) values, got {tuple(partial.shape)}")
    if out is None:
        out = torch.empty((ws.rows, ws.hidden), dtype=ws.dtype, device=ws.device)
    _check_rows(out, "out", ws.hidden, ws.dtype, ws, what, ws.rows)
    n = out.shape[0]
    if not _is_view_of(partial, ws.partial):
        ws.partial.copy_(partial)
    if ws.transport == Transport.SYMM:
        kernels.reduce(ws._table, out, num_tokens, ws._epochs[kernels.REDUCE], n, ws._max_spin, ws.rank,
                       ws._flag_slot + kernels.REDUCE * ws.world_size, ws._partial_elems, ws.rows)
        if not paired:
            _trailing_round(ws, kernels.REDUCE_DONE)
        return out
    count = clamp_count(num_tokens, n, ws._reduce_count)
    if ws.world_size == 1:
        full = ws.partial
    else:
        full = out if n == ws.rows else ws._scratch
        ws._comm().reduce_scatter(full, ws.partial)
    if full is not out:
        out.copy_(full[:n])
    return out.masked_fill_(ws._rows_index[:n, None] >= count, 0)


def _trailing_round(ws: CountedWorkspace, round_: int) -> None:
    kernels.done(ws._table, ws._epochs[round_, :1], ws._max_spin, ws.rank, ws._flag_slot + round_ * ws.world_size)


# ----------------------------------------------------------------------------------------------------
# References: plain torch.distributed on the gathered tensors


def all_gather_counted_ref(send: torch.Tensor, num_tokens: torch.Tensor, max_tokens_per_rank: int, group=None,
                           mask_cols: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`all_gather_counted`: this rank's live rows padded to ``M`` with zero rows (their
    ``mask_cols`` -1), a list ``all_gather`` of the slots and of the clamped counts, concatenated. Dead rows are
    zero here (unspecified bytes in the real thing: compare live rows and ``mask_cols``). Reads the count on
    the host (a reference)."""
    _, world = rank_and_world(group)
    n = min(max(int(num_tokens.reshape(-1)[0]), 0), send.shape[0])
    slot = send.new_zeros((max_tokens_per_rank, send.shape[1]))
    slot[:n] = send[:n]
    if mask_cols is not None:
        slot[n:, mask_cols] = 0xFF
    slots = [torch.empty_like(slot) for _ in range(world)]
    dist.all_gather(slots, slot, group=group)
    counts = [torch.empty(1, dtype=torch.int32, device=send.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([n], dtype=torch.int32, device=send.device), group=group)
    return torch.cat(slots), torch.cat(counts)


def reduce_scatter_counted_ref(partial: torch.Tensor, num_tokens: torch.Tensor, max_tokens_per_rank: int,
                               group=None, rows: int | None = None) -> torch.Tensor:
    """Reference of :func:`reduce_scatter_counted`: every rank's ``partial`` gathered, this rank's slot summed in
    float32 in rank order and rounded once, rows at or past the clamped count zeroed; ``[rows or M, hidden]``.
    Reads the count on the host (a reference)."""
    rank, world = rank_and_world(group)
    rows = max_tokens_per_rank if rows is None else rows
    n = min(max(int(num_tokens.reshape(-1)[0]), 0), rows)
    parts = [torch.empty_like(partial) for _ in range(world)]
    dist.all_gather(parts, partial.contiguous(), group=group)
    start = rank * max_tokens_per_rank
    acc = parts[0][start : start + rows].float()
    for p in parts[1:]:
        acc += p[start : start + rows]
    acc[n:] = 0
    return acc.to(partial.dtype)

