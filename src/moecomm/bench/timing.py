"""The one timing helper shared by all benchmarks (tables and JSON: :mod:`moecomm._output`).

``median_time`` warms up, then times ``iters`` calls and returns the median in seconds: CUDA events on a
GPU (the work is asynchronous), ``time.perf_counter`` around a synchronised call on the CPU. Inputs that
fit in L2 measure the cache: callers rotate among several input sets (``fn`` receives the iteration
index) or size inputs well past the 60 MB L2 of an H200.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

__all__ = ["median_time", "capture", "graph_time", "loop_time", "copy_bandwidth"]


def median_time(
    fn: Callable[[int], Any],
    device: torch.device,
    *,
    warmup: int = 5,
    iters: int = 20,
    barrier: Callable[[], None] | None = None,
) -> float:
    """Median wall time of ``fn(i)`` in seconds over ``iters`` calls, after ``warmup`` calls.

    ``barrier`` (e.g. ``dist.barrier``) runs before each timed call so that ranks start together;
    on CUDA its time is outside the events.
    """
    for i in range(warmup):
        fn(i)
    times = []
    cuda = device.type == "cuda"
    for i in range(iters):
        if barrier is not None:
            barrier()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        else:
            t0 = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def capture(fn: Callable[[], Any]) -> torch.cuda.CUDAGraph:
    """``fn`` run once on a side stream (kernels compiled, buffers and communicators made), then captured
    in a CUDA graph, which is returned."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def graph_time(fn: Callable, device, iters: int, barrier: Callable[[], None] | None = None) -> float:
    """Seconds per replay of ``fn`` captured in one CUDA graph (device time). ``barrier`` (e.g.
    ``dist.barrier``) makes the ranks start the timed replays together."""
    graph = capture(fn)
    graph.replay()
    torch.cuda.synchronize()
    if barrier is not None:
        barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3 / iters


def loop_time(fn: Callable[[], Any], device: torch.device, *, iters: int = 20, repeats: int = 3,
              barrier: Callable[[], None] | None = None) -> tuple[float, float]:
    """``(seconds per call, host seconds per call)`` of ``iters`` calls issued back to back, as a serving loop
    issues them: the first is timed with CUDA events around the loop (device time, or the host's when it
    cannot keep the GPU busy), the second with the host clock around the issuing alone. Medians over
    ``repeats`` loops, after 3 warm-up calls; ``barrier`` starts the ranks' loops together."""
    for _ in range(3):
        fn()
    cuda = device.type == "cuda"
    walls, hosts = [], []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        if barrier is not None:
            barrier()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        t1 = time.perf_counter()
        if cuda:
            end.record()
            end.synchronize()
            walls.append(start.elapsed_time(end) * 1e-3 / iters)
        else:
            walls.append((t1 - t0) / iters)
        hosts.append((t1 - t0) / iters)
    return statistics.median(walls), statistics.median(hosts)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    if device.type != "cuda":
        nbytes = min(nbytes, 1 << 26)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    t = median_time(lambda i: dst.copy_(src), device, warmup=3, iters=10)
    return 2 * nbytes / t
