"""``moecomm bench moe``: one MoE layer step per dispatch strategy, split into quantize / dispatch / experts / combine.

Spawns N ranks (NCCL with N GPUs, else gloo CPU ranks with a scaled-down model). GPU shapes are
DeepSeek-V3/R1's MoE: hidden 7168, 256 routed experts, top-8 (grouped top-k, 8 groups, 4 chosen),
intermediate 2048, EP = DP = N. Every strategy runs the same bf16 experts; quantized strategies hand
them NVFP4 / FP8 tokens, which they dequantize in the permute step (docs/experts.md).

Stage times are measured one stage at a time (median over iterations, max over ranks): ``quantize`` is
the quantizer alone, ``dispatch`` the whole dispatch minus ``quantize``, ``experts`` the local experts
on the gathered tokens, ``combine`` the reduce-scatter (or all-reduce + slice); ``total`` is the whole
step timed end to end. ``speedup`` is ``total(allreduce) / total`` for the same case.
"""

from __future__ import annotations

import argparse
import datetime
import json
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moecomm.bench.collectives import pattern_sizes
from moecomm.bench.timing import device_name, int_list, median_time, print_table, write_json
from moecomm.dispatch import GraphedMoE, Strategy, combine, dispatch, moe_forward, wire_bytes_per_token
from moecomm.launch import launch, rank_device
from moecomm.moe import experts_forward, grouped_topk, make_expert_weights
from moecomm.quant import QuantFormat, nvfp4_global_scale, quantize


@dataclass(frozen=True)
class Shape:
    hidden: int
    inter: int
    experts: int
    topk: int
    n_group: int
    topk_group: int


DEEPSEEK_V3 = Shape(hidden=7168, inter=2048, experts=256, topk=8, n_group=8, topk_group=4)
SMALL = Shape(hidden=256, inter=128, experts=16, topk=4, n_group=4, topk_group=2)
# (name, strategy, format the tokens travel in, pack)
VARIANTS = [
    ("allreduce", Strategy.ALLREDUCE, None, True),
    ("agrs", Strategy.AGRS, None, True),
    ("agrs-nvfp4", Strategy.AGRS_NVFP4, QuantFormat.NVFP4, True),
    ("agrs-nvfp4/unpacked", Strategy.AGRS_NVFP4, QuantFormat.NVFP4, False),
    ("agrs-fp8", Strategy.AGRS_FP8, QuantFormat.FP8_GROUP, True),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world-size", type=int, default=None, help="ranks (default: all GPUs, else 4 CPU ranks)")
    p.add_argument("--small", action="store_true", help="scaled-down model (default on CPU)")
    p.add_argument("--prefill", type=int, default=None, help="tokens per rank in the prefill regime (GPU 4096)")
    p.add_argument("--decode", type=int_list, default=None,
                   help="tokens per rank in the decode regime, comma-separated (GPU 1,16,64,256; CPU 1,16)")
    p.add_argument("--iters", type=int, default=10, help="timed calls per stage (median, then max over ranks)")
    p.add_argument("--graphs", action="store_true",
                   help="CUDA: also time the decode step replayed as a CUDA graph (GraphedMoE), without launch overhead")
    p.add_argument("--json", default=None, help="write the numbers to this path")
    p.add_argument("--plot", default=None, help="write a PNG of the stage times to this path")
    p.add_argument("--write-crossover", default=None,
                   help="write the measured auto crossover (data/crossover.json format) to this path")


def _cases(world: int, prefill: int, decode: list[int]) -> list[tuple[str, str, list[int]]]:
    """(regime, pattern, sizes): balanced and skewed, plus one idle rank when there are several ranks."""
    cases = []
    for regime, counts in [("prefill", [prefill]), ("decode", decode)]:
        for n in counts:
            patterns = ["balanced"] if world == 1 else ["balanced", "skewed", "idle"]
            for pattern in patterns:
                if pattern == "idle":
                    sizes = [0] + [n * world // (world - 1)] * (world - 1)
                else:
                    sizes = pattern_sizes(pattern, n, world)
                if (regime, sizes) not in [(c[0], c[2]) for c in cases]:  # tiny counts repeat
                    cases.append((regime, pattern, sizes))
    return cases


def _graphed_total(weights, shape: Shape, sizes, x, ids, tw, strategy, gs, fmt, device, iters) -> float:
    """Seconds per step of the step replayed as a CUDA graph (bucket = max(sizes)); includes the bucket's
    max-over-ranks all-reduce."""
    graphed = GraphedMoE(weights, hidden_size=shape.hidden, topk=shape.topk, buckets=[max(max(sizes), 1)],
                         strategy=strategy, global_scale=gs, expert_input_format=fmt)
    t = median_time(lambda i: graphed(x, ids, tw), device, iters=iters, barrier=dist.barrier)
    del graphed
    return t


def _rank_main(shape: Shape, cases, iters: int, graphs: bool = False) -> list[dict]:
    rank, world, device = dist.get_rank(), dist.get_world_size(), rank_device()
    gen = torch.Generator(device=device).manual_seed(1234)  # the same weights on every rank
    w13 = torch.randn(shape.experts, 2 * shape.inter, shape.hidden, device=device, generator=gen,
                      dtype=torch.bfloat16) * shape.hidden**-0.5
    w2 = torch.randn(shape.experts, shape.hidden, shape.inter, device=device, generator=gen,
                     dtype=torch.bfloat16) * shape.inter**-0.5
    weights = make_expert_weights(w13, w2, ep_size=world, ep_rank=rank)
    del w13, w2
    bias = torch.randn(shape.experts, device=device, generator=gen) * 0.1
    gs = nvfp4_global_scale(torch.tensor(4.0 * 5, device=device))  # static: calibrated amax of ~5 sigma
    barrier = dist.barrier
    results = []
    for regime, pattern, sizes in cases:
        n = sizes[rank]
        x = torch.randn(n, shape.hidden, device=device).to(torch.bfloat16)
        ids, tw = grouped_topk(torch.randn(n, shape.experts, device=device), shape.topk,
                               e_score_correction_bias=bias, n_group=shape.n_group, topk_group=shape.topk_group)
        for name, strategy, fmt, pack in VARIANTS:
            kw = dict(sizes=sizes, strategy=strategy, global_scale=gs, expert_input_format=fmt, pack=pack)
            t = {}
            t["quantize"] = 0.0 if fmt is None else median_time(
                lambda i: quantize(x, fmt, global_scale=gs if fmt == QuantFormat.NVFP4 else None),
                device, iters=iters, barrier=barrier)
            t["dispatch"] = median_time(lambda i: dispatch(x, ids, tw, **kw), device, iters=iters,
                                        barrier=barrier) - t["quantize"]
            tokens, gids, gtw, handle = dispatch(x, ids, tw, **kw)
            t["experts"] = median_time(lambda i: experts_forward(tokens, gids, gtw, weights), device,
                                       iters=iters, barrier=barrier)
            partial = experts_forward(tokens, gids, gtw, weights)
            # allreduce sums in place (as moe_forward does); repeated sums only grow the values
            t["combine"] = median_time(lambda i: combine(partial, handle), device, iters=iters, barrier=barrier)
            t["total"] = median_time(lambda i: moe_forward(x, ids, tw, weights, **kw), device, iters=iters,
                                     barrier=barrier)
            t["total_graphed"] = float("nan")
            if graphs and regime == "decode" and pack and device.type == "cuda":
                t["total_graphed"] = _graphed_total(weights, shape, sizes, x, ids, tw, strategy, gs, fmt, device, iters)
            worst = torch.tensor([t[k] for k in sorted(t)], device=device, dtype=torch.float64)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            t = dict(zip(sorted(t), worst.tolist()))
            per_token = wire_bytes_per_token(strategy, shape.hidden, shape.topk, fmt)
            results.append({"regime": regime, "pattern": pattern, "sizes": sizes, "strategy": name,
                            "seconds": t, "wire_bytes_per_token": per_token,
                            "wire_bytes_per_rank": per_token * sum(sizes)})
    return results if rank == 0 else []


def crossover(results: list[dict]) -> dict[str, int | None]:
    """Per quantized strategy: the smallest total token count from which it beats ``agrs`` at every measured
    larger count (balanced cases), or None if it does not beat ``agrs`` at the largest count."""
    out = {}
    for strategy in ("agrs-nvfp4", "agrs-fp8"):
        points = {}
        for r in results:
            if r["pattern"] == "balanced" and r["strategy"] in (strategy, "agrs"):
                points.setdefault(sum(r["sizes"]), {})[r["strategy"]] = r["seconds"]["total"]
        threshold = None
        for c in sorted(points, reverse=True):
            if points[c][strategy] >= points[c]["agrs"]:
                break
            threshold = c
        out[strategy] = threshold
    return out


def write_crossover(path: str, world: int, cross: dict, source: str) -> None:
    """Merge this world size's crossover into ``path`` (the format of ``moecomm/data/crossover.json``)."""
    try:
        with open(path) as f:
            table = json.load(f)
    except FileNotFoundError:
        table = {"sources": {}, "min_total_tokens": {"default": {"agrs-nvfp4": 0, "agrs-fp8": 0}}}
    table["min_total_tokens"][str(world)] = cross
    table["sources"][str(world)] = source
    with open(path, "w") as f:
        json.dump(table, f, indent=1)


def _plot(results: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["regime"], r["pattern"], tuple(r["sizes"])) for r in results},
                   key=lambda c: (c[0] != "prefill", sum(c[2]), c[1]))
    fig, axes = plt.subplots(1, len(cases), figsize=(3.2 * len(cases), 4), squeeze=False)
    stages = ["quantize", "dispatch", "experts", "combine"]
    for ax, case in zip(axes[0], cases):
        rows = [r for r in results if (r["regime"], r["pattern"], tuple(r["sizes"])) == case]
        bottom = [0.0] * len(rows)
        for stage in stages:
            vals = [r["seconds"][stage] * 1e3 for r in rows]
            ax.bar(range(len(rows)), vals, bottom=bottom, label=stage)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(range(len(rows)), [r["strategy"] for r in rows], rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{case[0]} {case[1]}\nsizes {list(case[2])}", fontsize=8)
        ax.set_ylabel("ms (stages timed separately)", fontsize=7)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args: argparse.Namespace) -> int:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world = args.world_size or (gpus if gpus else 4)
    on_gpu = gpus >= world
    small = args.small or not on_gpu
    shape = SMALL if small else DEEPSEEK_V3
    prefill = args.prefill or (4096 if not small else 256)
    decode = args.decode or ([1, 16, 64, 256] if not small else [1, 16])
    results = launch(_rank_main, world, (shape, _cases(world, prefill, decode), args.iters, args.graphs),
                     timeout=3600)[0]
    base = {(r["regime"], r["pattern"], tuple(r["sizes"])): r["seconds"]["total"]
            for r in results if r["strategy"] == "allreduce"}
    rows = []
    for r in results:
        s = r["seconds"]
        r["speedup_vs_allreduce"] = base[(r["regime"], r["pattern"], tuple(r["sizes"]))] / s["total"]
        rows.append([r["regime"], r["pattern"], str(r["sizes"]), r["strategy"], s["quantize"] * 1e6,
                     s["dispatch"] * 1e6, s["experts"] * 1e6, s["combine"] * 1e6, s["total"] * 1e6,
                     s["total_graphed"] * 1e6,
                     r["wire_bytes_per_rank"], r["speedup_vs_allreduce"]])
    device = torch.device("cuda" if on_gpu else "cpu")
    title = (f"MoE layer step, world size {world}, {device_name(device)}: hidden {shape.hidden}, intermediate "
             f"{shape.inter}, {shape.experts} experts, top-{shape.topk}")
    columns = ["regime", "pattern", "sizes", "strategy", "quantize (us)", "dispatch (us)", "experts (us)",
               "combine (us)", "total (us)", "graphed (us)", "wire bytes", "speedup vs allreduce"]
    if not args.graphs:
        columns.remove("graphed (us)")
        rows = [row[:9] + row[10:] for row in rows]
    print_table(title, columns, rows, caption="Stages are timed one at a time; total is the whole step timed end to "
                "end. Wire bytes: dispatch + combine messages of all tokens (allreduce moves them on every rank).")
    cross = crossover(results)
    if args.write_crossover:
        print(f"crossover measured in this run (min total tokens where the quantized path beats agrs): {cross}")
    if args.json:
        write_json(args.json, device, {"world_size": world, "shape": shape.__dict__, "results": results,
                                       "crossover": cross})
    if args.plot:
        _plot(results, args.plot, title)
    if args.write_crossover:
        write_crossover(args.write_crossover, world, cross, f"moecomm bench moe --world-size {world}, "
                        f"{device_name(device)}, {datetime.date.today()}")
    return 0
