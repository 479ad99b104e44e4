"""``moecomm bench moe``: one MoE layer step per dispatch strategy, split into quantize / dispatch / experts / combine.

Spawns N ranks (NCCL with N GPUs, else gloo CPU ranks with a scaled-down model). GPU shapes are
DeepSeek-V3/R1's MoE: hidden 7168, 256 routed experts, top-8 (grouped top-k, 8 groups, 4 chosen),
intermediate 2048, EP = DP = N.

Experts (``--experts``), the same for every strategy of a run:

- ``fp8`` (default on sm90): FP8 per-channel weights, FP8 per-token activations, native
  ``torch._scaled_grouped_mm`` -- what Hopper deployments run. Every strategy's experts consume FP8
  per-token tokens: ``allreduce`` and ``agrs`` gather bf16 and the experts quantize after the gather;
  ``agrs-fp8`` quantizes before it, in that format (half the bytes, the same results bit for bit).
- ``bf16``: bf16 weights; ``allreduce`` / ``agrs`` hand them bf16 tokens, the quantized strategies NVFP4 /
  FP8 per-128 tokens, which the experts dequantize in their permute step (docs/experts.md).

Stage times are measured one stage at a time (median over iterations, max over ranks): ``quantize`` is
the quantizer alone, ``dispatch`` the whole dispatch minus ``quantize``, ``experts`` the local experts on
the already-gathered tokens (no communication: the floor that overlapping communication aims at),
``combine`` the reduce-scatter (or all-reduce + slice); ``total`` is the whole step timed end to end.
``speedup`` is ``total(allreduce) / total`` for the same case. On CUDA, ``host`` columns give the host
time to issue one call in a loop of calls issued back to back (what an eager step costs the CPU), decode cases.

``--combine-formats bf16,int8,fp8`` also runs every strategy but ``allreduce`` with each quantized combine
(``moe_forward(..., combine_format=)``: int8 / FP8 partial outputs with an fp32 scale per 128 columns, summed in
float32 at each token's owner), shown as ``<strategy> + <format> combine``; ``wire bytes`` counts the combine in
its format.

``--graphs`` also replays the step in CUDA graphs (:class:`moecomm.layer.GraphedMoE`, bucket =
``max(sizes)``, ``sizes`` passed so no all-reduce): the decode cases as balanced / skewed / idle ranks
with the same total, and the padding tax: one live token per rank replayed in bucket 1 and in bucket 256.
It needs one GPU per rank; on a CPU it is refused (exit status 2).

``--shared-experts N`` measures the step with DeepSeek-V3's shared experts instead (one of intermediate
``N * 2048`` on the GPU shapes), overlapped against one after the other: :mod:`moecomm.bench.shared_experts`
(its own table; not with ``--graphs`` or ``--chunks``).
"""

from __future__ import annotations

import argparse
import datetime
import json
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moecomm._args import (
    UsageError,
    add_output_arguments,
    add_progress_argument,
    add_world_size_arguments,
    choice_list,
    check_world_size,
    int_list,
    merge_path,
    nonnegative_int,
    positive_int,
)
from moecomm._output import device_name, print_table, write_json
from moecomm._progress import Progress, report
from moecomm.bench import shared_experts as shared_bench
from moecomm.bench.collectives import PATTERN_NOTES, pattern_sizes
from moecomm.bench.timing import loop_time, median_time
from moecomm.comm import launch, rank_device
from moecomm.layer import (
    GraphedMoE,
    Strategy,
    combine,
    dispatch,
    moe_forward,
    wire_bytes_per_token,
)
from moecomm.moe import WeightFormat, experts_forward, grouped_topk, make_expert_weights
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
# experts -> [(name, strategy, the format the tokens travel in, the format the experts consume, pack)]
VARIANTS = {
    "fp8": [
        ("allreduce", Strategy.ALLREDUCE, None, QuantFormat.FP8_TOKEN, True),
        ("agrs", Strategy.AGRS, None, QuantFormat.FP8_TOKEN, True),
        ("agrs-fp8", Strategy.AGRS_FP8, QuantFormat.FP8_TOKEN, QuantFormat.FP8_TOKEN, True),
    ],
    "bf16": [
        ("allreduce", Strategy.ALLREDUCE, None, None, True),
        ("agrs", Strategy.AGRS, None, None, True),
        ("agrs-nvfp4", Strategy.AGRS_NVFP4, QuantFormat.NVFP4, QuantFormat.NVFP4, True),
        ("agrs-nvfp4/unpacked", Strategy.AGRS_NVFP4, QuantFormat.NVFP4, QuantFormat.NVFP4, False),
        ("agrs-fp8", Strategy.AGRS_FP8, QuantFormat.FP8_GROUP, QuantFormat.FP8_GROUP, True),
    ],
}
VARIANT_NOTES = {
    "allreduce": "pad to all tokens + all-reduce, all-reduce + slice (the classic DP gather)",
    "agrs": "bf16 allgatherv + reducescatterv",
    "agrs-nvfp4": "NVFP4 tokens in one packed message",
    "agrs-nvfp4/unpacked": "NVFP4 values, scales, ids, weights as four tensors",
    "agrs-fp8": "FP8 tokens in one packed message, in the experts' FP8 flavour",
}
EXPERT_NOTES = {
    "fp8": "FP8 per-channel weights, FP8 grouped GEMMs on FP8 per-token tokens (every strategy)",
    "bf16": "bf16 weights and GEMMs; allreduce and agrs hand them bf16 tokens, the others their quantized tokens",
}
PAD_TAX_BUCKET = 256
COMBINE_FORMATS = ("bf16", "int8", "fp8")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``moecomm bench moe``."""
    add_world_size_arguments(p, default=None, default_help="all GPUs, else 4 CPU ranks")
    p.add_argument("--small", action="store_true", help="scaled-down model (default on CPU)")
    p.add_argument("--experts", choices=("fp8", "bf16"), default=None,
                   help="expert weights and kernels (default: fp8 on sm90+, else bf16)")
    p.add_argument("--prefill", type=int_list(), default=None,
                   help="tokens per rank in the prefill regime, comma-separated (GPU 4096,8192; CPU 256)")
    p.add_argument("--decode", type=int_list(), default=None,
                   help="tokens per rank in the decode regime, comma-separated (GPU 1,16,64,256; CPU 1,16)")
    p.add_argument("--iters", type=positive_int, default=10,
                   help="timed calls per stage (median, then max over ranks; default 10)")
    p.add_argument("--graphs", action="store_true",
                   help="CUDA: also replay the decode step in CUDA graphs (skew table and padding tax)")
    p.add_argument("--chunks", type=int_list(minimum=0), default=None,
                   help="prefill: also time the step pipelined in these chunk counts, comma-separated, 0 = the "
                        "automatic choice (default on CUDA: 2,4,0; on CPU 2)")
    p.add_argument("--combine-formats", type=choice_list(COMBINE_FORMATS), default=["bf16"],
                   help="comma-separated combine formats: bf16 (default), int8, fp8; each quantized one adds a run of "
                        "every strategy but allreduce")
    p.add_argument("--sm-carveout", type=nonnegative_int, default=0,
                   help="SMs the expert GEMMs leave to communication while chunks overlap (default 0)")
    p.add_argument("--shared-experts", type=nonnegative_int, default=0, metavar="N",
                   help="time the step with N shared experts (DeepSeek-V3: 1) overlapped vs sequential instead "
                        "(its own table; not with --graphs or --chunks)")
    add_output_arguments(p, plot=True)
    p.add_argument("--write-crossover", metavar="PATH", type=merge_path("sources", "min_total_tokens"), default=None,
                   help="merge the measured auto crossover into this table (moecomm/data/crossover.json format)")
    add_progress_argument(p)


def _cases(world: int, prefill: list[int], decode: list[int]) -> list[tuple[str, str, list[int]]]:
    """(regime, pattern, sizes): balanced, skewed and idle (same total) when there are several ranks."""
    cases = []
    for regime, counts in [("prefill", prefill), ("decode", decode)]:
        for n in counts:
            for pattern in ("balanced", "skewed", "idle") if world > 1 else ("balanced",):
                sizes = pattern_sizes(pattern, n, world)
                if (regime, sizes) not in [(c[0], c[2]) for c in cases]:  # tiny counts repeat
                    cases.append((regime, pattern, sizes))
    return cases


def _weights(shape: Shape, experts: str, device):
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator(device=device).manual_seed(1234)  # the same weights on every rank
    w13 = torch.randn(shape.experts, 2 * shape.inter, shape.hidden, device=device, generator=gen,
                      dtype=torch.bfloat16) * shape.hidden**-0.5
    w2 = torch.randn(shape.experts, shape.hidden, shape.inter, device=device, generator=gen,
                     dtype=torch.bfloat16) * shape.inter**-0.5
    fmt = WeightFormat.FP8_CHANNEL if experts == "fp8" else WeightFormat.BF16
    weights = make_expert_weights(w13, w2, ep_size=world, ep_rank=rank, format=fmt)
    bias = torch.randn(shape.experts, device=device, generator=gen) * 0.1
    return weights, bias


def _graphed(weights, shape, sizes, bucket, x, ids, tw, kw, combine_format, device, iters) -> float:
    """Seconds per graphed step: bucket ``bucket``, this rank's live rows ``x``; ``sizes`` passed (no sync)."""
    graphed = GraphedMoE(weights, hidden_size=shape.hidden, topk=shape.topk, buckets=[bucket],
                         strategy=kw["strategy"], global_scale=kw["global_scale"],
                         expert_input_format=kw["expert_input_format"], combine_format=combine_format)
    t = median_time(lambda i: graphed(x, ids, tw, sizes=sizes), device, iters=iters, barrier=dist.barrier)
    del graphed
    return t


def _variants(experts: str, combine_formats: list[str]):
    """``(name, strategy, wire format, consumed format, pack, combine format)`` per run: every variant with a bf16
    combine, then each strategy but allreduce with each quantized combine format."""
    runs = []
    for name, strategy, wire, consumed, pack in VARIANTS[experts]:
        for fmt in combine_formats:
            if fmt == "bf16" or (strategy != Strategy.ALLREDUCE and pack):  # the combine is the same unpacked
                runs.append((name if fmt == "bf16" else f"{name} + {fmt} combine", strategy, wire, consumed, pack, fmt))
    return runs


def _rank_main(shape: Shape, experts: str, cases, iters: int, graphs: bool, chunk_list: list[int],
               sm_carveout: int, combine_formats: tuple[str, ...] = ("bf16",), shared_count: int = 0,
               progress=None) -> list[dict]:
    """Every case and strategy on this rank; rank 0 returns the results (the maximum over ranks) and reports
    progress to ``progress`` (:class:`moecomm._progress.Progress`'s queue, or None)."""
    import os

    from moecomm.layer import CARVEOUT_ENV

    os.environ[CARVEOUT_ENV] = str(sm_carveout)
    rank, world, device = dist.get_rank(), dist.get_world_size(), rank_device()
    cuda = device.type == "cuda"
    weights, bias = _weights(shape, experts, device)
    shared = shared_bench.make_shared_weights(shape.hidden, shape.inter, shared_count, experts, device) \
        if shared_count else None
    gs = nvfp4_global_scale(torch.tensor(4.0 * 5, device=device))  # static: calibrated amax of ~5 sigma
    barrier = dist.barrier
    results = []
    pad_tax = [("padding", "live 1, bucket 1", [1] * world, 1),
               ("padding", f"live 1, bucket {PAD_TAX_BUCKET}", [1] * world, PAD_TAX_BUCKET)] if graphs and cuda else []
    variants = _variants(experts, list(combine_formats))
    report(progress, "add", "steps", f"MoE layer step, world size {world}", (len(cases) + len(pad_tax)) * len(variants))
    for regime, pattern, sizes in cases + [(r, p, s) for r, p, s, _ in pad_tax]:
        bucket = next((b for r, p, s, b in pad_tax if (r, p, s) == (regime, pattern, sizes)), max(max(sizes), 1))
        n = sizes[rank]
        x = torch.randn(n, shape.hidden, device=device).to(torch.bfloat16)
        ids, tw = grouped_topk(torch.randn(n, shape.experts, device=device), shape.topk,
                               e_score_correction_bias=bias, n_group=shape.n_group, topk_group=shape.topk_group)
        for name, strategy, wire, consumed, pack, fmt in variants:
            report(progress, "update", "steps", info=f"{regime} {pattern} {sizes} {name}")
            nvfp4 = QuantFormat.NVFP4 in (wire, consumed)  # the global scale is refused where no NVFP4 is used
            kw = dict(sizes=sizes, strategy=strategy, global_scale=gs if nvfp4 else None, expert_input_format=consumed,
                      pack=pack)
            t = dict.fromkeys(("quantize", "dispatch", "experts", "combine", "total", "graphed", "host_quantize",
                               "host_dispatch", "host_combine", "host_total"), float("nan"))
            for c in chunk_list if regime == "prefill" and pack else ():
                ckw = dict(kw, chunks=c or None, combine_format=fmt)
                t[f"chunks_{c}"] = median_time(lambda i: moe_forward(x, ids, tw, weights, **ckw), device,
                                               iters=iters, barrier=barrier)
            if shared is not None:
                t = shared_bench.time_shared(x, ids, tw, weights, shared, kw, device, iters, cuda and regime == "decode")
            elif regime != "padding":
                qkw = dict(global_scale=gs) if wire == QuantFormat.NVFP4 else {}
                quant_call = (lambda: quantize(x, wire, **qkw)) if wire is not None else None
                t["quantize"] = 0.0 if wire is None else median_time(lambda i: quant_call(), device, iters=iters,
                                                                      barrier=barrier)
                t["dispatch"] = median_time(lambda i: dispatch(x, ids, tw, **kw), device, iters=iters,
                                            barrier=barrier) - t["quantize"]
                tokens, gids, gtw, handle = dispatch(x, ids, tw, **kw)
                after = consumed if isinstance(tokens, torch.Tensor) else None
                ekw = dict(input_format=after, global_scale=gs if after == QuantFormat.NVFP4 else None)
                t["experts"] = median_time(lambda i: experts_forward(tokens, gids, gtw, weights, **ekw), device,
                                           iters=iters, barrier=barrier)
                partial = experts_forward(tokens, gids, gtw, weights, **ekw)
                # allreduce sums in place (as moe_forward does); repeated sums only grow the values
                t["combine"] = median_time(lambda i: combine(partial, handle, combine_format=fmt), device, iters=iters,
                                           barrier=barrier)
                step = lambda: moe_forward(x, ids, tw, weights, **kw, combine_format=fmt)  # noqa: E731
                t["total"] = median_time(lambda i: step(), device, iters=iters, barrier=barrier)
                if cuda and regime == "decode":
                    if quant_call is not None:
                        t["host_quantize"] = loop_time(quant_call, device, barrier=barrier)[1]
                    t["host_dispatch"] = loop_time(lambda: dispatch(x, ids, tw, **kw), device, barrier=barrier)[1]
                    t["host_combine"] = loop_time(lambda: combine(partial, handle, combine_format=fmt), device,
                                                  barrier=barrier)[1]
                    t["host_total"] = loop_time(step, device, barrier=barrier)[1]
            if graphs and cuda and regime != "prefill" and pack:
                t["graphed"] = _graphed(weights, shape, sizes, bucket, x, ids, tw, kw, fmt, device, iters)
            worst = torch.tensor([t[k] for k in sorted(t)], device=device, dtype=torch.float64)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            t = dict(zip(sorted(t), worst.tolist()))
            per_token = wire_bytes_per_token(strategy, shape.hidden, shape.topk, wire, combine_format=fmt)
            results.append({"regime": regime, "pattern": pattern, "sizes": sizes, "bucket": bucket,
                            "strategy": name, "combine_format": fmt, "seconds": t, "wire_bytes_per_token": per_token,
                            "wire_bytes_all_tokens": per_token * sum(sizes)})
            report(progress, "update", "steps", advance=1)
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
            if strategy not in points[c] or points[c][strategy] >= points[c]["agrs"]:
                break
            threshold = c
        if any(strategy in p for p in points.values()):
            out[strategy] = threshold
    return out


def write_crossover(path: str, world: int, cross: dict, source: str) -> None:
    """Merge this world size's crossover into ``path`` (the format of ``moecomm/data/crossover.json``)."""
    try:
        with open(path) as f:
            table = json.load(f)
    except FileNotFoundError:
        table = {"sources": {}, "min_total_tokens": {"default": {"agrs-nvfp4": 0, "agrs-fp8": 0}}}
    table["min_total_tokens"].setdefault(str(world), {}).update(cross)
    table["sources"][str(world)] = source
    with open(path, "w") as f:
        json.dump(table, f, indent=1)


def _plot(results: list[dict], path: str, title: str) -> None:
    """A PNG of the main table: per case a panel of stacked stage times (us) per strategy, with a black tick at
    the step timed end to end. Panels in the table's order: a row per regime and total token count and a
    column per pattern (a cell stays empty where a pattern repeats another's sizes), or with one pattern
    (world size 1) three panels a row; the legend below the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases, lines = [], []  # (regime, pattern, sizes); (regime, total tokens)
    for r in results:
        if r["regime"] == "padding":
            continue
        case, line = (r["regime"], r["pattern"], tuple(r["sizes"])), (r["regime"], sum(r["sizes"]))
        cases += [case] if case not in cases else []
        lines += [line] if line not in lines else []
    patterns = [p for p in ("balanced", "skewed", "idle") if any(c[1] == p for c in cases)]
    if len(patterns) > 1:
        cell = {c: (lines.index((c[0], sum(c[2]))), patterns.index(c[1])) for c in cases}
    else:
        cell = {c: divmod(i, 3) for i, c in enumerate(cases)}
    nrows, ncols = max(r for r, _ in cell.values()) + 1, max(c for _, c in cell.values()) + 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 2.9 * nrows + 0.9), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
        if len(patterns) > 1:
            ax.text(0.5, 0.5, "the same sizes as another\npattern of this row", ha="center", va="center",
                    fontsize=9, color="grey", transform=ax.transAxes)
    stages, total = ["quantize", "dispatch", "experts", "combine"], "total (the whole step, timed end to end)"
    for regime, pattern, sizes in cases:
        ax = axes[cell[regime, pattern, sizes]]
        ax.axis("on")
        for text in ax.texts:
            text.remove()
        rows = [r for r in results if (r["regime"], r["pattern"], tuple(r["sizes"])) == (regime, pattern, sizes)]
        x = range(len(rows))
        bottom = [0.0] * len(rows)
        for stage in stages:
            vals = [r["seconds"][stage] * 1e6 for r in rows]
            ax.bar(x, vals, bottom=bottom, width=0.7, label=stage)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.plot(x, [r["seconds"]["total"] * 1e6 for r in rows], "k_", markersize=28, markeredgewidth=2, label=total)
        ax.set_xticks(x, [r["strategy"].replace("/", "/\n") for r in rows], fontsize=8)
        ax.set_title(f"{regime}, {pattern}: sizes {list(sizes)}", fontsize=10)
        ax.set_ylabel("us", fontsize=9)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    handles, labels = next(ax for ax in axes.flat if ax.axison).get_legend_handles_labels()
    order = [labels.index(name) for name in [*stages, total]]  # the stages bottom up, then the total
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="outside lower center",
               ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """``moecomm bench moe``: the tables, and the JSON, plot and crossover table where asked."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    world = args.world_size if args.world_size is not None else (gpus or 4)
    on_gpu = gpus >= world
    check_world_size(world, gpu=on_gpu, force=args.force)
    if args.graphs and not on_gpu:
        raise UsageError(f"--graphs replays CUDA graphs: it needs one GPU per rank ({world} ranks, {gpus} GPUs)")
    small = args.small or not on_gpu
    shape = SMALL if small else DEEPSEEK_V3
    experts = args.experts
    if experts is None:
        experts = "fp8" if on_gpu and torch.cuda.get_device_capability() >= (9, 0) else "bf16"
    prefill = args.prefill if args.prefill is not None else ([256] if small else [4096, 8192])
    decode = args.decode if args.decode is not None else ([1, 16] if small else [1, 16, 64, 256])
    chunk_list = args.chunks if args.chunks is not None else ([2, 4, 0] if on_gpu else [2])
    if args.shared_experts and (args.graphs or args.chunks is not None or args.plot or args.write_crossover):
        raise UsageError("--shared-experts has its own table: measure --graphs, --chunks, --plot and "
                         "--write-crossover in another run")
    chunk_list = [] if args.shared_experts else chunk_list
    with Progress(not args.no_progress) as bars:
        results = launch(_rank_main, world, (shape, experts, _cases(world, prefill, decode), args.iters, args.graphs,
                                             chunk_list, args.sm_carveout, tuple(args.combine_formats),
                                             args.shared_experts, bars.queue), timeout=3600)[0]
    if args.shared_experts:
        return shared_bench.report(results, world=world, device=torch.device("cuda" if on_gpu else "cpu"),
                                   experts=experts, shape=shape, count=args.shared_experts, json_path=args.json)
    base = {(r["regime"], r["pattern"], tuple(r["sizes"])): r["seconds"] for r in results
            if r["strategy"] == "allreduce"}
    rows = []
    nan = {"total": float("nan"), "graphed": float("nan")}  # no allreduce run: --combine-formats without bf16
    for r in results:
        s, b = r["seconds"], base.get((r["regime"], r["pattern"], tuple(r["sizes"])), nan)
        r["speedup_vs_allreduce"] = b["total"] / s["total"]
        r["graphed_speedup_vs_allreduce"] = b["graphed"] / s["graphed"]
        if r["regime"] == "padding":
            continue
        rows.append([r["regime"], r["pattern"], str(r["sizes"]), r["strategy"], s["quantize"] * 1e6,
                     s["dispatch"] * 1e6, s["experts"] * 1e6, s["combine"] * 1e6, s["total"] * 1e6,
                     s["total"] / s["experts"], r["speedup_vs_allreduce"], s["host_dispatch"] * 1e6,
                     s["host_combine"] * 1e6, s["host_total"] * 1e6, r["wire_bytes_all_tokens"]])
    device = torch.device("cuda" if on_gpu else "cpu")
    title = (f"MoE layer step, world size {world}, {device_name(device)}: {experts} expert weights, hidden "
             f"{shape.hidden}, intermediate {shape.inter}, {shape.experts} experts, top-{shape.topk}")
    notes = (f"{experts} experts = {EXPERT_NOTES[experts]}. Strategies: "
             + "; ".join(f"{v[0]} = {VARIANT_NOTES[v[0]]}" for v in VARIANTS[experts])
             + ". sizes: tokens of each rank. " + PATTERN_NOTES)
    print_table(title, ["regime", "pattern", "sizes", "strategy", "quantize (us)", "dispatch (us)", "experts (us)",
                        "combine (us)", "total (us)", "total / experts", "speedup vs allreduce", "host dispatch (us)",
                        "host combine (us)", "host step (us)", "wire bytes (all tokens)"], rows, keys=4,
                caption=f"{notes} Stages timed one at a time: quantize = the quantizer alone; dispatch = the rest "
                        "of the dispatch; experts = the local experts on the gathered tokens, no communication; "
                        "combine = the reduce-scatter (or all-reduce + slice); total = the whole step end to end; "
                        "host = host time to issue one call in a loop of calls (CUDA, decode); n/a: not measured.")
    if args.graphs and on_gpu:
        graphed = [[r["regime"], r["pattern"], str(r["sizes"]), r["bucket"], r["strategy"], r["seconds"]["graphed"] * 1e6,
                    r["graphed_speedup_vs_allreduce"]] for r in results if r["seconds"]["graphed"] == r["seconds"]["graphed"]]
        print_table(f"graphed step (GraphedMoE, sizes passed), world size {world}",
                    ["regime", "pattern", "sizes", "bucket", "strategy", "graphed (us)", "speedup vs allreduce"],
                    graphed, keys=5, caption=f"{notes} One CUDA-graph replay per step, every rank padded to the bucket with "
                    f"masked slots. padding = one live token per rank replayed in bucket 1 and in bucket "
                    f"{PAD_TAX_BUCKET}.")
    overlap = []
    for r in results:
        s = r["seconds"]
        if any(k.startswith("chunks_") for k in s):
            timed = {1: s["total"], **{int(k.split("_")[1]): v for k, v in s.items() if k.startswith("chunks_")}}
            overlap.append([str(r["sizes"]), r["strategy"], s["experts"] * 1e6] +
                           [timed.get(c, float("nan")) * 1e6 for c in [1] + chunk_list] +
                           [min(timed.values()) / s["experts"], timed.get(0, float("nan")) / s["total"]])
    if overlap:
        print_table(f"prefill pipelined in chunks (sm carveout {args.sm_carveout}), world size {world}",
                    ["sizes", "strategy", "experts only (us)"] + [f"chunks={c or 'auto'} (us)" for c in [1] + chunk_list]
                    + ["best / experts only", "auto / chunks=1"], overlap, keys=2,
                    caption=f"{notes} experts only: the same experts on the already-gathered tokens (no "
                            "communication), the floor that overlapping communication aims at; chunks=c: the step "
                            "pipelined in c chunks (auto: the count moe_forward picks).")
    cross = crossover([r for r in results if r["regime"] != "padding"])
    if args.write_crossover is not None:
        print(f"crossover measured in this run (min total tokens where the quantized path beats agrs): {cross}")
    if args.json is not None:
        write_json(args.json, device, {"world_size": world, "expert_weights": experts, "shape": shape.__dict__,
                                       "results": results, "crossover_min_total_tokens": cross})
    if args.plot is not None:
        _plot(results, args.plot, title)
    if args.write_crossover is not None:
        write_crossover(args.write_crossover, world, cross, f"moecomm bench moe --world-size {world} --experts "
                        f"{experts}, {device_name(device)}, {datetime.date.today()}")
    return 0
