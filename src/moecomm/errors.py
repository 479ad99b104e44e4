"""Errors found on the device without a host sync, raised later by :func:`check_errors`.

The hot path (``dispatch``, ``experts_forward``, ``moe_forward``, a ``GraphedMoE`` replay) never reads a
device value on the host: a range check of ``topk_ids`` that raised at once would make the host wait
for the GPU on every layer. Instead, an expert id outside ``[-1, num_experts)`` (``-1`` is a masked
slot) is treated like another rank's expert, so it touches no memory and adds nothing, and the kernel
that sees it sets a flag in a small per-device error buffer, together with the smallest and largest
such id. :func:`check_errors` reads the buffers (one sync), clears them and raises ``ValueError``.
Call it where a sync is cheap: after a step, before returning results, or in tests. With
``validate=True`` the public calls check the ids on the host instead and raise at once.

The buffers are created on first use on a device, as normal tensors whatever the caller's grad mode (a
warm-up under ``torch.inference_mode()`` does not leave an inference tensor that later calls could not
update; ``moecomm._modes``); under CUDA-graph capture the kernels write to the buffer that existed at
capture time (warm up before capturing, which moecomm's graph paths do).

The counted collectives (:mod:`moecomm.comm.counted`) flag here too: a device token count outside
``[0, rows]`` (clamped on the device, so no buffer is overrun) and a symmetric-memory flag wait that
gave up (a peer that never arrived; the bounded spin turns a hang into this error).

This is the convention of torch's own deferred device asserts (``torch._assert_async``) without their
cost: a failed device assert kills the CUDA context; a flag leaves the process usable.
"""

from __future__ import annotations

import torch

from moecomm._modes import kept_state

__all__ = ["ID_OUT_OF_RANGE", "COUNT_OUT_OF_RANGE", "PEER_TIMEOUT", "check_errors", "error_buffer",
           "record_bad_ids", "record_bad_count", "check_ids"]

ID_OUT_OF_RANGE = 1  # bit 0: a topk_id outside [-1, num_experts) reached the experts
COUNT_OUT_OF_RANGE = 2  # bit 1: a device token count outside [0, rows] reached a counted collective (clamped)
PEER_TIMEOUT = 4  # bit 2: a symmetric-memory flag wait gave up: a peer never arrived (ranks made other calls?)
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_BUFFERS: dict[torch.device, torch.Tensor] = {}


def _clear(device: torch.device) -> torch.Tensor:
    """An error buffer with nothing flagged: no bits, empty [smallest, largest] bad-id and bad-count ranges."""
    return torch.tensor([0, _INT32_MAX, _INT32_MIN, _INT32_MAX, _INT32_MIN], dtype=torch.int32, device=device)


def error_buffer(device: torch.device) -> torch.Tensor:
    """int32 ``[5]`` on ``device``: ``[error bits, smallest bad id, largest bad id, smallest bad count,
    largest bad count]`` (created on first use)."""
    buf = _BUFFERS.get(device)
    if buf is None:
        with kept_state():
            buf = _BUFFERS[device] = _clear(device)
    return buf


def record_bad_ids(ids: torch.Tensor, num_experts: int) -> None:
    """Flag ids outside ``[-1, num_experts)`` in :func:`error_buffer` with torch ops (no sync).

    The CUDA path does the same inside the expert sort kernel (``moecomm.moe._kernels.plan``).
    """
    if ids.numel() == 0:
        return
    buf = error_buffer(ids.device)
    flat = ids.reshape(-1)
    bad = (flat < -1) | (flat >= num_experts)
    buf[0] |= bad.any().to(torch.int32) * ID_OUT_OF_RANGE
    buf[1] = torch.minimum(buf[1], torch.where(bad, flat, _INT32_MAX).amin().to(torch.int32))
    buf[2] = torch.maximum(buf[2], torch.where(bad, flat, _INT32_MIN).amax().to(torch.int32))


def record_bad_count(count: torch.Tensor, limit: int) -> None:
    """Flag a token count (a one-element integer tensor) outside ``[0, limit]`` in :func:`error_buffer` with
    torch ops (no sync); values past int32 are recorded saturated. The CUDA counted collectives do the same
    inside their kernels (``moecomm.comm._kernels_counted``)."""
    buf = error_buffer(count.device)
    c = count.reshape(()).to(torch.int64)
    bad = (c < 0) | (c > limit)
    c32 = c.clamp(_INT32_MIN, _INT32_MAX).to(torch.int32)
    buf[0] |= bad.to(torch.int32) * COUNT_OUT_OF_RANGE
    buf[3] = torch.minimum(buf[3], torch.where(bad, c32, _INT32_MAX))
    buf[4] = torch.maximum(buf[4], torch.where(bad, c32, _INT32_MIN))


def check_ids(ids: torch.Tensor, num_experts: int, rank: int | None = None) -> None:
    """Raise ``ValueError`` now unless every id is in ``[-1, num_experts)`` (reads min and max: one sync)."""
    if ids.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()
    if lo < -1 or hi >= num_experts:
        where = "" if rank is None else f"rank {rank}: "
        raise ValueError(f"{where}topk_ids must be in [0, {num_experts}) or -1 (a masked slot), got values in "
                         f"[{lo}, {hi}]")


def check_errors(*, group=None, every_rank: bool = False) -> None:
    """Raise ``ValueError`` if a device kernel of this process flagged an error since the last check.

    Reads and clears the error buffers of every device this process used (a host sync).

    Parameters
    ----------
    group : ProcessGroup, optional
        With ``every_rank``: the ranks that check together (default: the world).
    every_rank : bool
        Exchange the result over ``group`` so that every rank raises when any rank saw an error (a
        collective: call it on every rank of the group).

    Raises
    ------
    ValueError
        ``"rank R: topk_ids outside [-1, num_experts) reached the experts (values in [lo, hi]) ..."``.
        int64 ids outside the int32 range appear as -2147483648. ``"... num_tokens outside [0, rows] ..."``
        for a device token count of the counted path that was clamped; ``"... flag wait ... gave up"`` when a
        symmetric-memory wait timed out (:mod:`moecomm.comm.counted`).
    """
    import torch.distributed as dist

    messages = []
    for device, buf in _BUFFERS.items():
        bits, lo, hi, count_lo, count_hi = buf.tolist()
        if bits:
            buf.copy_(_clear(device))
        if bits & ID_OUT_OF_RANGE:
            messages.append(f"topk_ids outside [-1, num_experts) reached the experts on {device} (values in "
                            f"[{lo}, {hi}]); they were skipped like another rank's experts")
        if bits & COUNT_OUT_OF_RANGE:
            messages.append(f"num_tokens outside [0, rows of the local buffer] reached a counted collective on "
                            f"{device} (values in [{count_lo}, {count_hi}]); it was clamped to that range")
        if bits & PEER_TIMEOUT:
            messages.append(f"a symmetric-memory flag wait on {device} gave up after MOECOMM_SYMM_MAX_SPIN polls: a "
                            f"peer never arrived (ranks made different calls, or one died); that step's results "
                            f"are wrong")
    rank = dist.get_rank(group) if dist.is_initialized() else None
    error = ValueError(f"rank {rank}: " + "; ".join(messages) if rank is not None else "; ".join(messages))
    if every_rank:
        _raise_on_every_rank(error if messages else None, group)
    elif messages:
        raise error


def _raise_on_every_rank(error: ValueError | None, group) -> None:
    """Exchange ``error`` (or None) over ``group`` and raise on every rank when any rank had one."""
    import torch.distributed as dist

    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, None if error is None else str(error), group=group)
    bad = [m for m in everyone if m]
    if bad:
        raise ValueError(f"check_errors: errors on {len(bad)} rank(s): " + "; ".join(bad))
