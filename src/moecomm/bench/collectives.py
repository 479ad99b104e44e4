"""``moecomm bench collectives``: allgatherv / reducescatterv, every algorithm and ``auto``, beside torch's own.

For each payload, size pattern and rows per rank, every implementation is timed on all ranks, eagerly
(calls issued back to back as a serving loop issues them, timed with CUDA events around the loop: host
time shows where the host cannot keep up) and, on CUDA, graphed (one call captured in a CUDA graph and
replayed: device time only); each figure is the median of 3 loops, then the maximum over ranks. ``host``
is the host time to issue one call in those loops. ``vs best`` is the time over the fastest
implementation of the same case and mode: ``auto``'s goal is at most 1.03.

Payloads: ``bf16`` hidden rows (one tensor, 7168 bf16 per row); ``nvfp4-msg`` the packed NVFP4 dispatch
message (one uint8 tensor, 4096 B per row); ``nvfp4-4t`` the same bytes as four tensors (values, scales,
ids, weights) in one call. Reduce-scatter runs on bf16 rows, in each wire format of ``--wire-formats``
(payload ``bf16``, ``int8``, ``fp8``: the quantized reducescatterv, 7392 B per row on the wire, whose
implementations are its two transports ``auto`` (grouped send/recv) and ``symm``); ``vs bf16 wire`` is its
time over the fastest bf16 reducescatterv of the same case. Patterns: ``balanced`` (every rank
``rows``), ``skewed`` (the same total, growing with the rank), ``idle`` (rank 0 has none, the same total).

``nccl binding alone`` (balanced, one tensor, CUDA) is NCCL's all_gather through moecomm's binding with none of
moecomm's Python: the floor of the host time, left out of ``vs best``.

``--write-table PATH`` stores the fastest moecomm algorithm per (collective, world size, mode, pattern,
bytes) in the format of ``moecomm/data/collectives.json``, which ``algorithm="auto"`` reads.
"""

from __future__ import annotations

import argparse
import datetime
import json
from typing import Callable

import torch
import torch.distributed as dist

from moecomm._args import (
    add_output_arguments,
    add_progress_argument,
    choice_list,
    add_world_size_arguments,
    check_world_size,
    int_list,
    merge_path,
    positive_int,
)
from moecomm._output import device_name, print_table, write_json
from moecomm._progress import Progress, report
from moecomm.bench.timing import graph_time, loop_time
from moecomm.comm import all_gatherv, launch, rank_device, reduce_scatterv
from moecomm.comm.transport import all_gather_single, reduce_scatter_single
from moecomm.quant import reduce_row_bytes

BF16_HIDDEN = 7168
NVFP4_MSG = [(4096, torch.uint8)]  # bytes per row of the packed message (hidden 7168, top-8)
NVFP4_4T = [(3584, torch.uint8), (448, torch.uint8), (8, torch.int32), (8, torch.float32)]
PAYLOADS = {"bf16": [(BF16_HIDDEN, torch.bfloat16)], "nvfp4-msg": NVFP4_MSG, "nvfp4-4t": NVFP4_4T}
PAYLOAD_NOTES = ("bf16 = hidden rows, 7168 bf16 per row; nvfp4-msg = the packed NVFP4 dispatch message, one uint8 "
                 "tensor of 4096 B per row; nvfp4-4t = the same bytes as four tensors (values, scales, ids, "
                 "weights) in one call; reduce_scatterv runs on bf16 rows sent as bf16, or quantized to int8 / "
                 "fp8 with an fp32 scale per 128 (7392 B per row, wire_format=).")
IMPL_NOTES = ("impl: broadcast, padded, symm, allreduce = moecomm's algorithms (moecomm.comm), auto = "
              "its per-call choice; torch ... = torch.distributed's own calls (torch copy_ at world size 1); "
              "nccl binding alone = NCCL through moecomm's binding with none of its Python (a floor).")
PATTERNS = ("balanced", "skewed", "idle")
PATTERN_NOTES = ("Patterns, the same total rows in each: balanced = every rank the same rows; skewed = rows growing "
                 "with the rank (weights 1, 2, ..., N); idle = rank 0 has none, the others equal shares.")
GATHER_ALGOS = ("broadcast", "padded", "symm", "auto")
REDUCE_ALGOS = ("broadcast", "padded", "symm", "allreduce", "auto")
QUANTIZED_REDUCE_ALGOS = ("auto", "symm")  # the quantized reducescatterv's transports
WIRE_FORMATS = ("bf16", "int8", "fp8")
FLOOR = "nccl binding alone"  # NCCL's own host time through moecomm's binding: a floor, not an alternative


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``moecomm bench collectives``."""
    add_world_size_arguments(p, default=None, default_help="all GPUs, else 4 CPU ranks")
    p.add_argument("--rows", type=int_list(), default=None,
                   help="rows per rank, comma-separated (default: 1,16,128,1024,4096,16384 on GPU, 1,16,256 on CPU)")
    p.add_argument("--iters", type=positive_int, default=20,
                   help="timed calls per point (median, then max over ranks; default 20)")
    p.add_argument("--wire-formats", type=choice_list(WIRE_FORMATS), default=["bf16"],
                   help="reduce_scatterv wire formats, comma-separated: bf16 (default), int8, fp8 (the quantized "
                        "reducescatterv)")
    add_output_arguments(p)
    p.add_argument("--write-table", metavar="PATH", type=merge_path("sources", "tables"), default=None,
                   help="merge the measured fastest algorithms into this table (moecomm/data/collectives.json format)")
    add_progress_argument(p)


def pattern_sizes(pattern: str, rows: int, world: int) -> list[int]:
    """Rows per rank with ``rows * world`` in all: ``balanced`` every rank ``rows``; ``skewed`` growing with
    the rank (weights 1..world); ``idle`` rank 0 none and the others equal shares (balanced at world size 1)."""
    if pattern == "balanced" or world == 1:
        return [rows] * world
    total = rows * world
    weights = [r + 1 for r in range(world)] if pattern == "skewed" else [0] + [1] * (world - 1)
    sizes = [total * w // sum(weights) for w in weights]
    sizes[-1] += total - sum(sizes)
    return sizes


def _rand(rows: int, width: int, dtype: torch.dtype, device) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(rows, width, device=device).to(dtype)
    return torch.randint(0, 127, (rows, width), device=device).to(dtype)


def _gather_impls(payload: str, sizes: list[int], device) -> dict[str, Callable | None]:
    """name -> a call (None where the backend lacks it) for one allgatherv of ``payload``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    total, pad = sum(sizes), max(sizes)
    nccl = dist.get_backend() == "nccl"
    xs = [_rand(sizes[rank], w, dt, device) for w, dt in PAYLOADS[payload]]
    outs = [torch.empty(total, w, dtype=dt, device=device) for w, dt in PAYLOADS[payload]]
    arg = xs[0] if len(xs) == 1 else xs
    out = outs[0] if len(outs) == 1 else outs
    impls: dict[str, Callable | None] = {
        a: (None if a == "symm" and not nccl else (lambda a=a: all_gatherv(arg, sizes, out=out, algorithm=a)))
        for a in GATHER_ALGOS
    }
    if world == 1:
        impls["torch copy_"] = lambda: [o.copy_(x) for o, x in zip(outs, xs)]
    elif nccl and len(xs) == 1 and len(set(sizes)) == 1:
        from moecomm.comm import _nccl

        if _nccl.available():  # the floor: NCCL itself through the binding, none of moecomm's Python
            comm = _nccl.communicator(None, device)
            impls[FLOOR] = lambda: comm.all_gather(outs[0], xs[0])
    if len(xs) == 1:
        x, o = xs[0], outs[0]
        padded_in, padded_out = x.new_zeros((pad, x.shape[1])), x.new_empty((pad * world, x.shape[1]))
        impls["torch padded all_gather"] = lambda: (padded_in[: x.shape[0]].copy_(x),
                                                    all_gather_single(padded_out, padded_in))
        uneven = len(set(sizes)) > 1
        impls["torch list all_gather"] = None if not nccl and uneven else (
            lambda: dist.all_gather(list(o.split(sizes)), x))
    return impls


def _reduce_impls(sizes: list[int], device, wire_format: str = "bf16") -> dict[str, Callable | None]:
    rank, world = dist.get_rank(), dist.get_world_size()
    total, pad = sum(sizes), max(sizes)
    nccl = dist.get_backend() == "nccl"
    full = _rand(total, BF16_HIDDEN, torch.bfloat16, device)
    own = torch.empty(sizes[rank], BF16_HIDDEN, dtype=torch.bfloat16, device=device)
    algos = REDUCE_ALGOS if wire_format == "bf16" else QUANTIZED_REDUCE_ALGOS
    impls: dict[str, Callable | None] = {
        a: (None if a == "symm" and not nccl else (
            lambda a=a: reduce_scatterv(full, sizes, out=own, algorithm=a, wire_format=wire_format)))
        for a in algos
    }
    if wire_format != "bf16":
        return impls
    full_padded = _rand(pad * world, BF16_HIDDEN, torch.bfloat16, device)
    own_padded = torch.empty(pad, BF16_HIDDEN, dtype=torch.bfloat16, device=device)
    work = full.clone()
    start = sum(sizes[:rank])
    impls["torch padded reduce_scatter"] = None if not nccl else (
        lambda: reduce_scatter_single(own_padded, full_padded))
    impls["torch all_reduce + slice"] = lambda: (work.copy_(full), dist.all_reduce(work),
                                                 own.copy_(work[start : start + sizes[rank]]))
    return impls


def _max_over_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _rank_main(rows_list: list[int], iters: int, wire_formats: tuple[str, ...] = ("bf16",),
               progress=None) -> list[dict]:
    """Every case on this rank; rank 0 returns the results (the maximum over ranks) and reports progress to
    ``progress`` (:class:`moecomm._progress.Progress`'s queue, or None)."""
    rank, world, device = dist.get_rank(), dist.get_world_size(), rank_device()
    cuda = device.type == "cuda"
    results = []
    cases = [("all_gatherv", p) for p in PAYLOADS] + [("reduce_scatterv", f) for f in wire_formats]
    patterns = PATTERNS if world > 1 else ("balanced",)
    report(progress, "add", "cases", f"collectives, world size {world}", len(cases) * len(patterns) * len(rows_list))
    for op, payload in cases:
        row_bytes = (sum(w * dt.itemsize for w, dt in PAYLOADS[payload]) if op == "all_gatherv"
                     else reduce_row_bytes(payload, BF16_HIDDEN))
        for pattern in patterns:
            for rows in rows_list:
                report(progress, "update", "cases", info=f"{op} {payload} {pattern} {rows} rows")
                sizes = pattern_sizes(pattern, rows, world)
                impls = (_gather_impls(payload, sizes, device) if op == "all_gatherv"
                         else _reduce_impls(sizes, device, payload))
                for name, fn in impls.items():
                    eager = graphed = host = float("nan")
                    if fn is not None:
                        eager, host = loop_time(fn, device, iters=iters, barrier=dist.barrier)
                        if cuda:
                            graphed = graph_time(fn, device, iters, dist.barrier)
                    eager, graphed, host = _max_over_ranks([eager, graphed, host], device)
                    results.append({"op": op, "payload": payload, "pattern": pattern, "rows_per_rank": rows,
                                    "sizes": sizes, "impl": name, "bytes_all_ranks": sum(sizes) * row_bytes,
                                    "eager_s": eager, "graphed_s": graphed, "host_s": host})
                del impls
                if cuda:
                    torch.cuda.empty_cache()
                report(progress, "update", "cases", advance=1)
    return results if rank == 0 else []


def _fastest(rows: list[dict], mode: str) -> float:
    """The fastest time of ``mode`` among ``rows`` (the floor left out); NaN where none ran."""
    times = [r[f"{mode}_s"] for r in rows if r[f"{mode}_s"] == r[f"{mode}_s"] and r["impl"] != FLOOR]
    return min(times) if times else float("nan")


def _add_ratios(results: list[dict]) -> None:
    """``<mode>_vs_best``: each time over the fastest implementation of its case; ``<mode>_vs_bf16_wire``: a
    quantized reducescatterv's time over the fastest bf16 one of the same case (NaN for the others)."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r["op"], r["payload"], r["pattern"], r["rows_per_rank"]), []).append(r)
    for r in results:
        quantized = r["op"] == "reduce_scatterv" and r["payload"] != "bf16"
        bf16 = groups.get(("reduce_scatterv", "bf16", r["pattern"], r["rows_per_rank"]), [])
        for mode in ("eager", "graphed"):
            r[f"{mode}_vs_best"] = r[f"{mode}_s"] / _fastest(groups[(r["op"], r["payload"], r["pattern"],
                                                                     r["rows_per_rank"])], mode)
            r[f"{mode}_vs_bf16_wire"] = r[f"{mode}_s"] / _fastest(bf16, mode) if quantized else float("nan")


def table_entries(results: list[dict], world: int) -> dict:
    """``op -> mode -> pattern -> [[bytes, fastest moecomm algorithm], ...]`` from one run."""
    algos = {"all_gatherv": GATHER_ALGOS, "reduce_scatterv": REDUCE_ALGOS}
    best: dict = {}
    for r in results:
        if (r["impl"] not in algos[r["op"]] or r["impl"] == "auto" or r["payload"] == "nvfp4-4t"
                or (r["op"] == "reduce_scatterv" and r["payload"] != "bf16")):  # auto chooses for bf16 rows
            continue
        for mode in ("eager", "graphed"):
            t = r[f"{mode}_s"]
            if t != t:
                continue
            key = (r["op"], mode, r["pattern"], r["bytes_all_ranks"])
            if key not in best or t < best[key][0]:
                best[key] = (t, r["impl"])
    table: dict = {}
    for (op, mode, pattern, nbytes), (_, algo) in sorted(best.items()):
        table.setdefault(op, {}).setdefault(mode, {}).setdefault(pattern, []).append([nbytes, algo])
    return table


def write_table(path: str, world: int, entries: dict, source: str) -> None:
    """Merge this world size's entries into ``path`` (the format of ``moecomm/data/collectives.json``)."""
    try:
        with open(path) as f:
            table = json.load(f)
    except FileNotFoundError:
        table = {"sources": {}, "tables": {}}
    for op, modes in entries.items():
        table["tables"].setdefault(op, {})[str(world)] = modes
    table["sources"][str(world)] = source
    with open(path, "w") as f:
        json.dump(table, f, indent=1)


def run(args: argparse.Namespace) -> int:
    """``moecomm bench collectives``: the table, the JSON with ``--json``, the table of fastest algorithms with
    ``--write-table``."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world = args.world_size if args.world_size is not None else (gpus or 4)
    on_gpu = gpus >= world
    check_world_size(world, gpu=on_gpu, force=args.force)
    rows_list = args.rows if args.rows is not None else ([1, 16, 128, 1024, 4096, 16384] if on_gpu else [1, 16, 256])
    with Progress(not args.no_progress) as bars:
        results = launch(_rank_main, world, (rows_list, args.iters, tuple(args.wire_formats), bars.queue),
                         timeout=3600)[0]
    _add_ratios(results)
    device = torch.device("cuda" if on_gpu else "cpu")
    rows = [[r["op"], r["payload"], r["pattern"], str(r["sizes"]), r["impl"], r["bytes_all_ranks"], r["eager_s"] * 1e6,
             r["eager_vs_best"], r["eager_vs_bf16_wire"], r["graphed_s"] * 1e6, r["graphed_vs_best"],
             r["graphed_vs_bf16_wire"], r["host_s"] * 1e6] for r in results]
    print_table(f"collectives, world size {world}, {device_name(device)}",
                ["op", "payload", "pattern", "sizes", "impl", "bytes (all ranks)", "eager (us)", "vs best",
                 "vs bf16 wire", "graphed (us)", "vs best", "vs bf16 wire", "host (us)"], rows, keys=5,
                caption=f"Payloads: {PAYLOAD_NOTES} {IMPL_NOTES} sizes: rows of each rank. eager: calls issued back to "
                        "back, timed with events around the loop (host time shows where the host is slower than the "
                        "GPU); graphed: one call replayed in a CUDA graph (device time); vs best: over the fastest "
                        "implementation of the case; vs bf16 wire: a quantized reduce_scatterv over the fastest bf16 "
                        "one of the case; host: host time to issue one call; n/a: not run there. "
                        f"{PATTERN_NOTES}")
    if args.json is not None:
        write_json(args.json, device, {"world_size": world, "results": results})
    if args.write_table is not None:
        write_table(args.write_table, world, table_entries(results, world),
                    f"moecomm bench collectives --world-size {world}, {device_name(device)}, {datetime.date.today()}")
    return 0
