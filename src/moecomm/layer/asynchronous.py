"""moecomm's communication stream, and work that runs on it while the caller's stream computes.

One side stream per device (:func:`communication_stream`), created with high priority so that its
collective kernels get SMs ahead of the compute kernels queued beside them (DeepEP's ``comm_stream`` is a
high-priority pool stream for the same reason). Every collective moecomm runs off the caller's stream runs
on it, in the order the host issues them, so the ranks' NCCL calls stay in the same order on one stream.

:func:`launch` runs a piece of communication there and returns a :class:`Pending` at once; its
:meth:`Pending.wait` makes the caller's current stream wait for the result (a CUDA event: no host sync).
:func:`dispatch(..., async_op=True) <moecomm.layer.exchange.dispatch>` and
:func:`combine(..., async_op=True) <moecomm.layer.exchange.combine>` are built on it, for engines that
overlap the attention of one micro-batch with the MoE communication of another (SGLang's two-batch
overlap, vLLM's dual-batch overlap; ``examples/two_microbatches.py``).

Allocator safety (the rule of ``torch.Tensor.record_stream``): the inputs, made on the caller's stream
and read on the communication stream, are recorded there, so the caching allocator does not hand their
memory to another tensor before the communication has read them, even when the caller drops them at
once; the results, made on the communication stream, are recorded on the stream that waits for them.

On a CPU (gloo) nothing is asynchronous: :func:`launch` runs the work at once and :meth:`Pending.wait` only
returns the result, the same values.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterable

import torch

from moecomm.quant import QuantizedTensor

__all__ = ["CARVEOUT_ENV", "Pending", "communication_stream", "launch", "leaving_sms", "tensors_in"]

CARVEOUT_ENV = "MOECOMM_OVERLAP_SM_CARVEOUT"  # SMs the compute leaves free while communication overlaps (default 0)

_STREAMS: dict = {}


def communication_stream(device: torch.device) -> torch.cuda.Stream:
    """moecomm's communication stream on CUDA ``device`` (one per device, high priority, made once)."""
    stream = _STREAMS.get(device)
    if stream is None:
        stream = _STREAMS[device] = torch.cuda.Stream(device, priority=-1)
    return stream


def tensors_in(value: Any) -> Iterable[torch.Tensor]:
    """The tensors in ``value``: a tensor, a :class:`~moecomm.quant.QuantizedTensor` (data, scales, global
    scale) or a tuple / list of those and other objects (which hold none)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, QuantizedTensor):
        yield from (t for t in (value.data, value.scales, value.global_scale) if isinstance(t, torch.Tensor))
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from tensors_in(v)


def _record(value: Any, stream: torch.cuda.Stream) -> None:
    for t in tensors_in(value):
        if t.is_cuda:
            t.record_stream(stream)


class Pending:
    """The result of communication launched on moecomm's communication stream (:func:`launch`).

    :meth:`wait` returns the result once the caller's current stream is ordered after it. Read the result
    only through :meth:`wait`: before it, the communication may still be writing it. Under CUDA-graph
    capture, call :meth:`wait` before the capture ends (the capture must join the communication stream).
    """

    __slots__ = ("_result", "_done", "_device")

    def __init__(self, result: Any, done: torch.cuda.Event | None, device: torch.device):
        self._result, self._done, self._device = result, done, device

    def wait(self) -> Any:
        """Make the current CUDA stream wait for the communication (``Stream.wait_event``: no host sync),
        record the result's tensors on that stream for the allocator, and return the result. On a CPU the
        result is returned as is. May be called more than once, from any stream of the device."""
        if self._done is not None:
            stream = torch.cuda.current_stream(self._device)
            stream.wait_event(self._done)
            _record(self._result, stream)
        return self._result


def launch(work: Callable[[], Any], inputs: tuple, device: torch.device) -> Pending:
    """Run ``work()`` on moecomm's communication stream of ``device``, ordered after everything the caller's
    current stream has queued, and return a :class:`Pending` at once.

    ``inputs``: what ``work`` reads that the caller's stream made (tensors, QuantizedTensors, tuples of
    them); they are recorded on the communication stream. On a CPU device ``work()`` runs now.
    """
    if device.type != "cuda":
        return Pending(work(), None, device)
    caller = torch.cuda.current_stream(device)
    comm = communication_stream(device)
    comm.wait_stream(caller)
    _record(inputs, comm)
    with torch.cuda.stream(comm):
        result = work()
        done = torch.cuda.Event()
        done.record(comm)
    return Pending(result, done, device)


@contextlib.contextmanager
def leaving_sms():
    """While compute overlaps communication: torch's GEMMs leave ``MOECOMM_OVERLAP_SM_CARVEOUT`` SMs to the
    communication kernels (torch's experimental SM carveout, which its grouped GEMMs honour); 0 or unset
    changes nothing."""
    carveout = int(os.environ.get(CARVEOUT_ENV, "0"))
    if not carveout:
        yield
        return
    previous = torch._C._get_sm_carveout_experimental()
    torch._C._set_sm_carveout_experimental(carveout)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(previous)
