"""``moecomm bench collectives``: allgatherv / reducescatterv against the native collectives, nccl-tests style.

For each payload (bf16 hidden rows, NVFP4-sized uint8 rows), size pattern (balanced, skewed) and rows
per rank, every implementation is timed on all ranks (median over iterations, then the max over ranks).
Columns follow nccl-tests: ``bytes`` is the gathered (or reduced) tensor's size, ``algbw = bytes / time``
and ``busbw = algbw * (N-1)/N`` (``2(N-1)/N`` for all-reduce). A value of ``n/a`` marks an
implementation the backend lacks (gloo has no uneven list all_gather and no reduce_scatter).
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.distributed as dist

from moecomm.bench.timing import device_name, int_list, median_time, print_table, write_json
from moecomm.collectives import all_gather_single, all_gatherv, reduce_scatter_single, reduce_scatterv
from moecomm.launch import launch, rank_device

PAYLOADS = {"bf16": (torch.bfloat16, 7168), "nvfp4": (torch.uint8, 4032)}  # (dtype, elements per row)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world-size", type=int, default=None, help="ranks (default: all GPUs, else 4 CPU ranks)")
    p.add_argument("--rows", type=int_list, default=None,
                   help="rows per rank, comma-separated (default: 1,16,128,1024,4096,16384 on GPU, 1,16,256 on CPU)")
    p.add_argument("--iters", type=int, default=20, help="timed calls per point (median, then max over ranks)")
    p.add_argument("--json", default=None, help="write the numbers to this path")


def pattern_sizes(pattern: str, rows: int, world: int) -> list[int]:
    """Rows per rank: ``balanced`` gives every rank ``rows``; ``skewed`` keeps the total but grows with the rank."""
    if pattern == "balanced":
        return [rows] * world
    weights = [r + 1 for r in range(world)]
    sizes = [rows * world * w // sum(weights) for w in weights]
    sizes[-1] += rows * world - sum(sizes)
    return sizes


def _impls(x: torch.Tensor, sizes: list[int], hidden: int) -> dict[str, tuple[str, Callable | None, int]]:
    """name -> (kind, fn or None if unsupported, bytes) for one input ``x`` of this rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    total, pad = sum(sizes), max(sizes)
    gloo = dist.get_backend() == "gloo"
    gathered = x.new_empty((total, hidden))
    padded_in = x.new_zeros((pad, hidden))
    padded_out = x.new_empty((pad * world, hidden))
    parts = list(gathered.split(sizes))
    uneven = len(set(sizes)) > 1
    elem = x.element_size()
    impls = {
        "allgatherv": ("gather", lambda: all_gatherv(x, sizes, out=gathered), total * hidden * elem),
        "padded all_gather (equal size)": (
            "gather",
            lambda: (padded_in[: x.shape[0]].copy_(x), all_gather_single(padded_out, padded_in)),
            pad * world * hidden * elem,
        ),
        "list all_gather": ("gather", None if gloo and uneven else lambda: dist.all_gather(parts, x),
                            total * hidden * elem),
    }
    if x.dtype == torch.uint8:
        return impls
    full = torch.randn((total, hidden), device=x.device).to(x.dtype)
    full_padded = x.new_zeros((pad * world, hidden))
    own = x.new_empty((sizes[rank], hidden))
    own_padded = x.new_empty((pad, hidden))
    start = sum(sizes[:rank])
    work = full.clone()
    impls.update({
        "reducescatterv": ("reduce", lambda: reduce_scatterv(full, sizes, out=own), total * hidden * elem),
        "padded reduce_scatter (equal size)": (
            "reduce",
            None if gloo else lambda: reduce_scatter_single(own_padded, full_padded),
            pad * world * hidden * elem,
        ),
        "all_reduce + slice": (
            "allreduce",
            lambda: (work.copy_(full), dist.all_reduce(work), own.copy_(work[start : start + sizes[rank]])),
            total * hidden * elem,
        ),
    })
    return impls


def _rank_main(rows_list: list[int], iters: int) -> list[dict]:
    rank, world, device = dist.get_rank(), dist.get_world_size(), rank_device()
    results = []
    for payload, (dtype, hidden) in PAYLOADS.items():
        for pattern in ("balanced", "skewed"):
            for rows in rows_list:
                sizes = pattern_sizes(pattern, rows, world)
                if dtype == torch.uint8:
                    x = torch.randint(0, 256, (sizes[rank], hidden), dtype=dtype, device=device)
                else:
                    x = torch.randn((sizes[rank], hidden), device=device).to(dtype)
                for name, (kind, fn, nbytes) in _impls(x, sizes, hidden).items():
                    t = float("nan")
                    if fn is not None:
                        t = median_time(lambda i: fn(), device, iters=iters, barrier=dist.barrier)
                        tt = torch.tensor([t], device=device, dtype=torch.float64)
                        dist.all_reduce(tt, op=dist.ReduceOp.MAX)
                        t = tt.item()
                    factor = {"gather": (world - 1) / world, "reduce": (world - 1) / world,
                              "allreduce": 2 * (world - 1) / world}[kind]
                    results.append({"payload": payload, "pattern": pattern, "rows_per_rank": rows,
                                    "sizes": sizes, "impl": name, "bytes": nbytes, "seconds": t,
                                    "algbw_GBps": nbytes / t / 1e9, "busbw_GBps": nbytes / t / 1e9 * factor})
    return results if rank == 0 else []


def run(args: argparse.Namespace) -> int:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world = args.world_size or (gpus if gpus else 4)
    on_gpu = gpus >= world
    rows_list = args.rows or ([1, 16, 128, 1024, 4096, 16384] if on_gpu else [1, 16, 256])
    results = launch(_rank_main, world, (rows_list, args.iters), timeout=3600)[0]
    device = torch.device("cuda" if on_gpu else "cpu")
    rows = []
    for r in results:
        nan = r["seconds"] != r["seconds"]
        rows.append([r["payload"], r["pattern"], r["rows_per_rank"], r["impl"], r["bytes"],
                     "n/a" if nan else r["seconds"] * 1e6, "n/a" if nan else r["algbw_GBps"],
                     "n/a" if nan else r["busbw_GBps"]])
    print_table(f"collectives, world size {world}, {device_name(device)}",
                ["payload", "pattern", "rows/rank", "impl", "bytes", "time (us)", "algbw (GB/s)", "busbw (GB/s)"],
                rows)
    if args.json:
        write_json(args.json, device, {"world_size": world, "results": results})
    return 0
