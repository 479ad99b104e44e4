"""Run a function on N ranks: processes over gloo on CPU, NCCL when N GPUs exist, or in place under torchrun.

The ranks are started with the ``spawn`` method, as ``torch.multiprocessing`` does: ``fn`` must be a
module-level function of an importable module, and a script that calls ``launch`` needs an
``if __name__ == "__main__":`` guard (examples/quickstart.py shows the shape).

``launch(fn, world_size, args)`` is what the tests, the benchmarks and the CLI use. Each rank runs
``fn(*args)`` after ``torch.distributed`` is initialised (``dist.get_rank()`` tells which rank it is);
the return values come back as a list indexed by rank. Arguments and results travel by value through
:func:`dumps` (pickle, with tensors of every dtype torch has carried as their bytes: plain pickle cannot
carry float8, float4, uint16-64, complex32, bits or sub-byte tensors). A rank's exception is re-raised in the caller
with that rank's traceback; a run that outlasts ``timeout`` seconds is killed and raises ``TimeoutError``.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` in the environment) ``launch`` initialises
from ``env://`` and runs ``fn`` in the current process only, returning ``[result of this rank]``; the
process group it made is destroyed after a barrier (one the caller made is left alone).
"""

from __future__ import annotations

import datetime
import inspect
import io
import math
import multiprocessing.util
import os
import pickle
import queue as queue_module
import socket
import sys
import time
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moecomm.comm.group import forget_groups, rank_device

__all__ = ["launch", "default_backend", "rank_device", "RankError", "dumps"]


class RankError(RuntimeError):
    """A rank raised; the message holds its rank and traceback."""


def default_backend(world_size: int) -> str:
    """``"nccl"`` when at least ``world_size`` CUDA devices are visible, else ``"gloo"``."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


class _Pickler(pickle.Pickler):
    """Pickle whose plain tensors travel as (bytes, dtype, shape, device): by value, in every dtype. Quantized
    and sparse tensors and tensor subclasses keep their own pickling (which handles them)."""

    def reducer_override(self, obj):
        if type(obj) is not torch.Tensor or obj.layout != torch.strided or obj.is_quantized:
            return NotImplemented
        t = obj.detach()
        data = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return _tensor_from_bytes, (data, t.dtype, tuple(t.shape), str(t.device), obj.requires_grad)


def _tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: tuple, device: str, requires_grad: bool):
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape).to(device).requires_grad_(requires_grad)


def dumps(obj) -> bytes:
    """A rank's result pickled for :func:`launch`: tensors by value, in any dtype (read back with
    ``pickle.loads``). The arguments travel the other way as torch.multiprocessing sends them (shared memory,
    CUDA IPC, queues by inheritance: the parent outlives the ranks), which handles every dtype too."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world_size: int, backend: str, init_method: str, timeout_s: float) -> None:
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    kwargs = {}
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )


def _check_importable(fn) -> None:
    """Spawned ranks import a function ``fn`` by its module and name: refuse one they cannot find (a callable
    object or a ``functools.partial`` is pickled as a whole: refuse it where that fails)."""
    if inspect.isfunction(fn) and "<" in fn.__qualname__:  # <lambda>, <locals>
        raise TypeError(f"launch: fn={fn!r} must be a module-level function: the spawned ranks import it by its "
                        "module and name, and a lambda or a nested function has none")
    if inspect.isfunction(fn) and fn.__module__ == "__main__" and not getattr(sys.modules["__main__"], "__file__", None):
        raise TypeError(f"launch: fn={fn!r} is defined in an interactive session, a notebook or python -c, which "
                        "the spawned ranks cannot import: define it in a file (a module, or a script with an "
                        "`if __name__ == \"__main__\":` guard)")
    try:  # by reference, as spawn sends it: cheap, and what cannot travel fails here, not in a rank
        pickle.dumps(fn)
    except Exception as e:  # noqa: BLE001 - pickle raises several types for this
        raise TypeError(f"launch: fn must be a module-level function (spawned ranks import it by name), got "
                        f"{fn!r}: {e}") from None


def _worker(rank, world_size, backend, init_method, timeout_s, fn, args, queue) -> None:
    try:
        # Keep CPU ranks from oversubscribing the machine's few cores.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        _init(rank, world_size, backend, init_method, timeout_s)
        # Bytes: tensors travel by value, not as shared-memory handles that die with this process before
        # the parent unpickles them.
        queue.put((rank, True, dumps(fn(*args))))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Leave without the interpreter's teardown: torch's C++ destructors at exit can abort a rank
    # ("terminate called without an active exception") after its result has been sent. First run what a
    # spawned process runs when its target returns (multiprocessing's finalizers: e.g. Inductor's compile
    # workers shut down there, else the resource tracker reports their semaphores as leaked).
    multiprocessing.util._exit_function()
    queue.close()
    queue.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _died(rank: int, exitcode: int) -> str:
    """Why a rank ended without a result. Once ``_worker`` runs, a rank leaves through ``os._exit(0)`` or a
    signal, so exit code 1 comes from outside it: in practice from starting the rank (unpickling ``fn`` or
    ``args``, importing the caller's script)."""
    message = f"rank {rank} exited (code {exitcode}) without returning a result"
    if exitcode == 1:
        message += (": it failed before running fn (its traceback is on stderr), e.g. a script that calls launch "
                    'without an `if __name__ == "__main__":` guard, or fn or args the rank cannot import')
    return message


def launch(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    backend: str | None = None,
    timeout: float = 300.0,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` ranks and return the per-rank results.

    Parameters
    ----------
    fn : callable
        A module-level (picklable) function. It runs after ``dist.init_process_group``; on NCCL the
        rank's current CUDA device is already set.
    world_size : int
        Number of ranks (>= 1). Ignored under torchrun, where ``WORLD_SIZE`` rules.
    args : sequence
        Positional arguments for ``fn``; must be picklable (tensors of any dtype travel by value, as
        :func:`dumps` carries them).
    backend : {"nccl", "gloo", None}
        ``None`` picks :func:`default_backend`.
    timeout : float
        Seconds for the whole run (and for each collective). Past it the ranks are killed.

    Returns
    -------
    list
        ``fn``'s return value for each rank, indexed by rank (one entry under torchrun): any picklable
        value, tensors of every dtype (FP8, float4, ...) and ``QuantizedTensor`` included, by value.

    Raises
    ------
    RankError
        A rank raised or died; the message names first a rank that died without a result (a signal,
        ``os.abort``), if any, then the first rank that reported a failure, with its traceback (the
        other ranks are then stopped: they may wait in a collective).
    TimeoutError
        The ranks did not all finish within ``timeout`` seconds (e.g. a hang in a collective).
    ValueError
        ``world_size`` not a positive int, ``timeout`` not a positive number, an unknown backend, or
        too few GPUs for NCCL; raised before any process starts.
    TypeError
        ``args`` not a tuple or list, ``fn`` a function the spawned ranks cannot import (not callable, a
        lambda, a nested function, one defined in an interactive session, a notebook or ``python -c``);
        raised before any process starts.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not isinstance(args, (tuple, list)):  # a string would be split into its characters
        raise TypeError(f"args must be a tuple or list of fn's positional arguments, got {type(args).__name__}")
    if not callable(fn):
        raise TypeError(f"fn must be a module-level function, got {fn!r}")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
        backend = backend or default_backend(world)
        if dist.is_initialized():
            return [fn(*args)]
        _init(int(os.environ["RANK"]), world, backend, "env://", timeout)
        result = fn(*args)
        # A process group left to interpreter exit can abort ("terminate called without an active
        # exception") while a peer is still closing its connections: wait for every rank, then free it.
        # (After a rank raises, torchrun stops the others.)
        dist.barrier()
        forget_groups()  # moecomm's caches would keep the group alive past its destruction
        dist.destroy_process_group()
        return [result]

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    _check_importable(fn)
    backend = backend or default_backend(world_size)
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"nccl needs {world_size} GPUs, {torch.cuda.device_count()} visible")

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world_size, backend, init_method, timeout, fn, tuple(args), queue),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(results))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f} s (hang?)")
            try:
                rank, ok, payload = queue.get(timeout=min(remaining, 1.0))
            except queue_module.Empty:  # a rank that ended without reporting (crash, os._exit)?
                dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode is not None]
                if not dead:
                    continue
                try:  # a result sent just before the exit may still be in the pipe
                    rank, ok, payload = queue.get(timeout=1.0)
                except queue_module.Empty:
                    raise RankError(_died(dead[0], procs[dead[0]].exitcode)) from None
            results[rank] = (ok, payload)
            if not ok:
                # One failure is enough: the other ranks may be blocked in a collective.
                break
    finally:
        failed = sorted(r for r, (ok, _) in results.items() if not ok)
        for p in procs:
            p.join(timeout=5 if not failed else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if failed:
        # A rank that died without reporting (a signal, os.abort) is usually why its peers raised.
        dead = [f"{_died(r, p.exitcode)}; "
                for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0, -9)]
        raise RankError(f"{''.join(dead[:1])}rank {failed[0]} of {world_size} raised:\n{results[failed[0]][1]}")
    return [pickle.loads(results[r][1]) for r in range(world_size)]
