"""A thin ctypes binding of NCCL for the hot path (private; :mod:`moecomm.comm.transport` uses it).

Why: a collective through ``torch.distributed``'s ProcessGroupNCCL costs about 46 us of host time per
call on an H200 host (work objects, events, watchdog bookkeeping; measured 2026-11-30, recorded in
docs/benchmarks.md), several times the device time of a decode-sized gather. Calling the
NCCL library that torch already loaded, through ctypes, costs a few microseconds. vLLM (``pynccl``)
and SGLang do the same for the same reason.

One :class:`Communicator` per process group object and device, created collectively on first use (the
unique id travels over the group itself) and cached. Calls are enqueued on the caller's current CUDA stream, so they
are ordered with the surrounding kernels and can be captured in CUDA graphs (NCCL >= 2.9); buffers
never leave that stream, so the caching allocator needs no ``record_stream``.

NCCL API: ``nccl.h`` of NCCL 2.x (``ncclGetUniqueId``, ``ncclCommInitRank``, ``ncclAllGather``,
``ncclBroadcast``, ``ncclReduce``, ``ncclReduceScatter``, ``ncclAllReduce``, ``ncclSend``, ``ncclRecv``
(NCCL >= 2.7), ``ncclGroupStart/End``).
"""

from __future__ import annotations

import ctypes
import os

import torch
import torch.distributed as dist

from moecomm.comm.group import ByGroup, per_group

__all__ = ["Communicator", "communicator", "available", "DISABLE_ENV"]

DISABLE_ENV = "MOECOMM_TORCH_NCCL"  # "1": use torch.distributed's ProcessGroupNCCL instead of this binding

_UINT8, _INT32, _FLOAT16, _FLOAT32, _BFLOAT16 = 1, 2, 6, 7, 9  # ncclDataType_t
_SUM = 0  # ncclRedOp_t
_REDUCE_TYPES = {torch.int32: _INT32, torch.float16: _FLOAT16, torch.float32: _FLOAT32, torch.bfloat16: _BFLOAT16}


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * 128)]


_lib = None
_load_error: str | None = None


def _library():
    """libnccl as loaded by torch (``libnccl.so.2``), with argument types declared; None if unavailable."""
    global _lib, _load_error
    if _lib is not None or _load_error is not None:
        return _lib
    try:
        lib = ctypes.CDLL(os.environ.get("MOECOMM_NCCL_LIBRARY", "libnccl.so.2"))
    except OSError as e:
        _load_error = str(e)
        return None
    p, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    signatures = {
        "ncclGetUniqueId": [ctypes.POINTER(_UniqueId)],
        "ncclCommInitRank": [ctypes.POINTER(p), i, _UniqueId, i],
        "ncclAllGather": [p, p, sz, i, p, p],
        "ncclBroadcast": [p, p, sz, i, i, p, p],
        "ncclReduce": [p, p, sz, i, i, i, p, p],
        "ncclReduceScatter": [p, p, sz, i, i, p, p],
        "ncclAllReduce": [p, p, sz, i, i, p, p],
        "ncclSend": [p, sz, i, i, p, p],
        "ncclRecv": [p, sz, i, i, p, p],
        "ncclGroupStart": [],
        "ncclGroupEnd": [],
    }
    for name, args in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    lib.ncclGetErrorString.argtypes, lib.ncclGetErrorString.restype = [ctypes.c_int], ctypes.c_char_p
    _lib = lib
    return lib


def available() -> bool:
    """Whether this binding can be used: CUDA, libnccl loadable, not switched off by ``MOECOMM_TORCH_NCCL=1``."""
    return torch.cuda.is_available() and os.environ.get(DISABLE_ENV, "0") != "1" and _library() is not None


def _check(result: int, what: str) -> None:
    if result != 0:
        raise RuntimeError(f"NCCL {what} failed: {_lib.ncclGetErrorString(result).decode()} (ncclResult_t {result})")


class Communicator:
    """An NCCL communicator over the ranks of ``group`` on this rank's current CUDA device.

    Every method enqueues on the current stream of the tensors' device and takes contiguous tensors;
    the caller guarantees that all ranks call the same methods with matching sizes (as with NCCL).
    """

    def __init__(self, group: dist.ProcessGroup | None, device: torch.device):
        lib = _library()
        if lib is None:
            raise RuntimeError(f"libnccl could not be loaded: {_load_error}")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        uid = _UniqueId()
        if rank == 0:
            _check(lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        raw = torch.frombuffer(bytearray(bytes(uid.internal)), dtype=torch.uint8).to(device)
        dist.broadcast(raw, group=group, group_src=0)
        ctypes.memmove(uid.internal, bytes(raw.cpu().tolist()), 128)
        self.comm = ctypes.c_void_p()
        with torch.cuda.device(device):
            _check(lib.ncclCommInitRank(ctypes.byref(self.comm), world, uid, rank), "ncclCommInitRank")
        self.device, self.rank, self.world_size = device, rank, world
        self._lib = lib

    def _stream(self) -> int:
        return torch._C._cuda_getCurrentRawStream(self.device.index)  # no Stream object: a few us less per call

    def group_start(self) -> None:
        _check(self._lib.ncclGroupStart(), "ncclGroupStart")

    def group_end(self) -> None:
        _check(self._lib.ncclGroupEnd(), "ncclGroupEnd")

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        """``out`` (``world_size`` x the bytes of ``inp``) = every rank's ``inp``, as bytes."""
        _check(self._lib.ncclAllGather(inp.data_ptr(), out.data_ptr(), inp.nbytes, _UINT8, self.comm,
                                       self._stream()), "ncclAllGather")

    def broadcast(self, out: torch.Tensor, inp: torch.Tensor | None, root: int) -> None:
        """``out`` = root's ``inp`` (as bytes; ``inp`` is read on the root only, ``None`` elsewhere)."""
        src = out if inp is None else inp
        _check(self._lib.ncclBroadcast(src.data_ptr(), out.data_ptr(), out.nbytes, _UINT8, root, self.comm,
                                       self._stream()), "ncclBroadcast")

    def reduce(self, out: torch.Tensor | None, inp: torch.Tensor, root: int) -> None:
        """On ``root``: ``out`` = the sum of every rank's ``inp`` (``out`` unused elsewhere)."""
        dst = inp if out is None else out
        _check(self._lib.ncclReduce(inp.data_ptr(), dst.data_ptr(), inp.numel(), _REDUCE_TYPES[inp.dtype], _SUM,
                                    root, self.comm, self._stream()), "ncclReduce")

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        """``out`` = rank ``r``'s equal share of the sum over ranks of ``inp`` (``inp`` = ``world_size`` x ``out``)."""
        _check(self._lib.ncclReduceScatter(inp.data_ptr(), out.data_ptr(), out.numel(), _REDUCE_TYPES[inp.dtype],
                                           _SUM, self.comm, self._stream()), "ncclReduceScatter")

    def all_reduce(self, buf: torch.Tensor) -> None:
        """``buf`` = the sum over ranks of ``buf``, in place."""
        _check(self._lib.ncclAllReduce(buf.data_ptr(), buf.data_ptr(), buf.numel(), _REDUCE_TYPES[buf.dtype], _SUM,
                                       self.comm, self._stream()), "ncclAllReduce")

    def exchange(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> None:
        """One NCCL group of ``ncclSend`` (each ``(tensor, peer)`` of ``sends``) and ``ncclRecv`` (each
        ``(tensor, peer)`` of ``recvs``), as bytes; a peer may be this rank (NCCL copies locally, overlapped
        with the transfers). Every send must meet the peer's receive of the same byte count."""
        stream = self._stream()
        self.group_start()
        try:
            for t, peer in sends:
                _check(self._lib.ncclSend(t.data_ptr(), t.nbytes, _UINT8, peer, self.comm, stream), "ncclSend")
            for t, peer in recvs:
                _check(self._lib.ncclRecv(t.data_ptr(), t.nbytes, _UINT8, peer, self.comm, stream), "ncclRecv")
        finally:
            self.group_end()


_COMMS = ByGroup()  # group -> {device index: Communicator} (moecomm.comm.group)


def communicator(group: dist.ProcessGroup | None, device: torch.device) -> Communicator:
    """The cached :class:`Communicator` of ``group`` on ``device``; created (collectively) on first use.

    Cached per group object, not per group name: a group re-initialised under a reused name, with new rank
    numbers, gets a communicator of its own ranks. (A freed group's communicator is dropped without
    ``ncclCommDestroy``, which would have to be ordered with the peers; its NCCL resources stay allocated.)
    The first call on a group must not be inside CUDA-graph capture (it talks to the other ranks);
    warm up once before capturing, as Triton kernels need anyway.
    """
    mine = per_group(_COMMS, group)
    comm = mine.get(device.index)
    if comm is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("moecomm: the NCCL communicator of this group is created on first use, which "
                               "cannot happen during CUDA-graph capture: run the step once before capturing")
        comm = mine[device.index] = Communicator(group, device)
    return comm
