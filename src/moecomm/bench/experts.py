"""``moecomm bench experts``: one EP rank's expert compute against a bare grouped GEMM.

DeepSeek-V3/R1 shapes by default (H=7168, I=2048, 256 experts, top-8, EP 8 so 32 local experts on the
measured rank 0), tokens routed with :func:`moecomm.moe.grouped_topk` (``n_group=8``, ``topk_group=4``)
on random logits. Per token format (bf16 tokens with bf16 weights; NVFP4 tokens with bf16 weights;
FP8 per-token tokens with FP8 per-channel weights) and number of tokens T it reports the time of
:func:`moecomm.moe.experts_forward` (``backend="auto"``), the TFLOP/s of the GEMMs actually done
(``2 * M * H * (N13 + I)`` for the ``M`` local (token, expert) pairs), and the ratio to bare
``torch._grouped_mm`` in bf16 on already-permuted tokens with the same FLOPs. On CUDA both are also
timed replayed from a CUDA graph: no host launch overhead, the GPU time alone (decode runs graphs).
``--small`` runs small shapes, also on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from moecomm import quant
from moecomm._args import (
    add_output_arguments,
    choice_list,
    device_choice,
    int_list,
    positive_int,
)
from moecomm._output import print_table, write_json
from moecomm.bench.timing import capture, median_time
from moecomm.moe import WeightFormat, experts_forward, grouped_topk, make_expert_weights
from moecomm.quant import QuantFormat

SHAPES = {
    "deepseek-v3": dict(hidden=7168, inter=2048, experts=256, topk=8, ep=8, n_group=8, topk_group=4, tokens=[128, 1024, 4096, 16384]),
    "small": dict(hidden=256, inter=128, experts=16, topk=4, ep=2, n_group=4, topk_group=2, tokens=[16, 64, 256]),
}
# token format name -> (QuantFormat of the tokens or None for bf16, weight format, what runs)
FORMATS = {
    "bf16": (None, WeightFormat.BF16, "bf16 tokens and weights, bf16 grouped GEMMs"),
    "nvfp4": (QuantFormat.NVFP4, WeightFormat.BF16, "NVFP4 tokens dequantized while permuted, bf16 weights, GEMMs"),
    "fp8": (QuantFormat.FP8_TOKEN, WeightFormat.FP8_CHANNEL,
            "FP8 per-token tokens, FP8 per-channel weights, FP8 grouped GEMMs (bf16 GEMMs off CUDA sm90+)"),
}
COLUMNS = ["tokens", "weights", "T", "local rows M", "ms", "TFLOP/s", "bare ms", "ratio", "graphed ms", "graphed bare ms",
           "graphed ratio"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``moecomm bench experts``."""
    parser.add_argument("--small", action="store_true", help="small shapes (seconds on a CPU)")
    parser.add_argument("--tokens", type=int_list(), default=None,
                        help="values of T, comma-separated (default: 128,1024,4096,16384; --small 16,64,256)")
    parser.add_argument("--formats", type=choice_list(list(FORMATS)), default=list(FORMATS),
                        help=f"token formats, comma-separated (default all: {','.join(FORMATS)})")
    parser.add_argument("--iters", type=positive_int, default=None, help="timed calls (default 20 on CUDA, 5 on CPU)")
    parser.add_argument("--device", type=device_choice, default="auto",
                        help="cuda, cpu or auto (default): cuda where there is one")
    add_output_arguments(parser)


def _local_weights(shape: dict, fmt: WeightFormat, device: torch.device):
    """Rank 0's experts (only those are made) and their bf16 originals for the bare GEMM."""
    num_local = shape["experts"] // shape["ep"]
    h, i = shape["hidden"], shape["inter"]
    w13 = torch.randn(num_local, 2 * i, h, device=device, dtype=torch.bfloat16) * h**-0.5
    w2 = torch.randn(num_local, h, i, device=device, dtype=torch.bfloat16) * i**-0.5
    local = make_expert_weights(w13, w2, format=fmt)
    return dataclasses.replace(local, num_experts=shape["experts"]), w13, w2


def _route(shape: dict, t: int, device: torch.device):
    """The same routing for every format (seeded by T); the measured rank owns one of the 8 groups."""
    g = torch.Generator(device=device).manual_seed(t)
    logits = torch.randn(t, shape["experts"], device=device, generator=g)
    bias = 0.1 * torch.randn(shape["experts"], device=device, generator=g)
    return grouped_topk(
        logits, shape["topk"], e_score_correction_bias=bias, n_group=shape["n_group"],
        topk_group=shape["topk_group"], routed_scaling_factor=2.5,
    )


def _bare(w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor, num_local: int):
    """The two bf16 grouped GEMMs on already-permuted rows (a closure), and the number of rows M."""
    local = ids[ids < num_local].long()  # rank 0 owns experts [0, num_local)
    offs = torch.bincount(local, minlength=num_local).cumsum(0).to(torch.int32)
    m = local.numel()
    x = torch.randn(m, w13.shape[2], device=w13.device, dtype=torch.bfloat16)
    # the second GEMM gets real activations (their values change the GPU's clock, so the time, a little)
    gate, up = torch._grouped_mm(x, w13.transpose(1, 2), offs=offs).float().chunk(2, dim=-1)
    a = (torch.nn.functional.silu(gate) * up).to(torch.bfloat16)

    def fn():
        torch._grouped_mm(x, w13.transpose(1, 2), offs=offs)
        torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)

    return fn, m


def _times(fn, device: torch.device, iters: int) -> tuple[float, float]:
    """Median seconds of ``fn()`` run eagerly and replayed from a CUDA graph (NaN on a CPU)."""
    eager = median_time(lambda i: fn(), device, iters=iters)
    if device.type != "cuda":
        return eager, float("nan")
    graph = capture(fn)
    return eager, median_time(lambda i: graph.replay(), device, iters=iters)


def _tokens(x: torch.Tensor, fmt: QuantFormat | None):
    if fmt is None:
        return x
    gs = quant.nvfp4_global_scale(x.abs().amax().float()) if fmt is QuantFormat.NVFP4 else None
    return quant.quantize(x, fmt, global_scale=gs)


def run(args: argparse.Namespace) -> int:
    """``moecomm bench experts``: the table, and the JSON with ``--json``."""
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    name = "small" if args.small else "deepseek-v3"
    shape = SHAPES[name]
    iters = args.iters if args.iters is not None else (20 if cuda else 5)
    torch.manual_seed(0)
    rows, records = [], []
    for fname in args.formats:
        token_fmt, weight_fmt, _ = FORMATS[fname]
        weights, w13, w2 = _local_weights(shape, weight_fmt, device)
        for t in shape["tokens"] if args.tokens is None else args.tokens:
            ids, topk_w = _route(shape, t, device)
            tokens = _tokens(torch.randn(t, shape["hidden"], device=device, dtype=torch.bfloat16), token_fmt)
            out = torch.empty(t, shape["hidden"], device=device, dtype=torch.bfloat16)
            step = lambda: experts_forward(tokens, ids, topk_w, weights, out=out)  # noqa: E731
            bare_step, m = _bare(w13, w2, ids, weights.num_local)
            sec, graphed = _times(step, device, iters)
            bare, bare_graphed = _times(bare_step, device, iters)
            flops = 2 * m * shape["hidden"] * (w13.shape[1] + w2.shape[2])
            rec = dict(token_format=fname, weight_format=weight_fmt.value, tokens=t, local_rows=m, seconds=sec,
                       tflops=flops / sec / 1e12, bare_seconds=bare, ratio_vs_bare=sec / bare,
                       graphed_seconds=graphed, graphed_bare_seconds=bare_graphed,
                       graphed_ratio_vs_bare=graphed / bare_graphed)
            records.append(rec)
            rows.append([fname, weight_fmt.value, t, m, sec * 1e3, rec["tflops"], bare * 1e3, rec["ratio_vs_bare"],
                         graphed * 1e3, bare_graphed * 1e3, rec["graphed_ratio_vs_bare"]])
        del weights, w13, w2
    title = (f"experts_forward, {name}: hidden {shape['hidden']}, intermediate {shape['inter']}, "
             f"{shape['experts']} experts, top-{shape['topk']}; rank 0 of EP {shape['ep']} "
             f"({shape['experts'] // shape['ep']} local experts)")
    notes = "; ".join(f"{f} = {FORMATS[f][2]}" for f in args.formats)
    print_table(title, COLUMNS, rows, keys=3,
                caption=f"{notes}. T: tokens of all ranks; local rows M: (token, expert) pairs of this rank's "
                        "experts; ms: experts_forward, eager; bare: two bare bf16 torch._grouped_mm on already "
                        "permuted rows, the same M; ratio = ms / bare ms; graphed: replayed from a CUDA graph "
                        "(GPU time only, n/a on a CPU).")
    if args.json is not None:
        write_json(args.json, device, {"shape": {"name": name, **shape}, "results": records})
    return 0
