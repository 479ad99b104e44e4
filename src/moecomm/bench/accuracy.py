"""``moecomm bench accuracy``: what each combine format costs in accuracy, on a DeepSeek-V3 MoE layer.

Per world size (gloo CPU ranks: the quantized combine gives the same bits on GPUs), every rank runs one MoE layer step
through the library: ``dispatch`` (bf16 tokens, strategy ``agrs``), its experts (``experts_forward``, bf16
weights and GEMMs, SiLU-gated), then ``combine`` once per combine format (``bf16``, ``int8``, ``fp8``) on the
same partial outputs. Shapes are DeepSeek-V3's (hidden 7168, intermediate 2048, top-8 of routed experts with
grouped top-k: 8 groups, 4 chosen) with fewer experts (``--experts``, default 32 = 4 per group instead of 32)
so that the CPU holds and computes them; every token still runs 8 full-size experts, and at world size 8 a
group is one rank's experts, as with 256 experts on 8 ranks. The same tokens, routing and weights at every
world size (``--tokens`` in all, split evenly).

Errors (relative L2 over all tokens' outputs, float64):

- ``vs fp64 layer``: the layer output against the layer computed in float64 from the same bf16 inputs and
  weights (each rank's experts in float64, summed over ranks in float64): the end-to-end error, bf16 expert
  arithmetic included.
- ``vs exact combine``: against the float64 sum of the ranks' bf16 partial outputs: the combine's own error.
- ``other channels``: ``vs fp64 layer`` over the columns that are not outlier channels (what the ordinary
  channels pay for sharing a group's scale with an outlier).

Activations (``--activations``): ``gaussian`` (tokens N(0, 1), weights N(0, 1/fan-in)); ``outliers`` (8 input
channels x50 as in LLM hidden states, and 8 output channels of every expert's down projection x20, so the
partial outputs carry outlier channels, as the MoE outputs that build massive activations do); ``massive``
(the same with the 8 output channels x300: a 128-column group holding one is ~100 times its other
elements' size, the regime where an integer grid loses its small elements).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moecomm._args import (
    UsageError,
    add_output_arguments,
    check_world_size,
    choice_list,
    int_list,
    positive_int,
)
from moecomm._output import device_name, print_table, write_json
from moecomm.comm import launch
from moecomm.layer import combine, dispatch
from moecomm.moe import experts_forward, grouped_topk, make_expert_weights
from moecomm.quant import reduce_row_bytes

FORMATS = ("bf16", "int8", "fp8")
ACTIVATIONS = ("gaussian", "outliers", "massive")
OUTPUT_OUTLIER = {"gaussian": 1.0, "outliers": 20.0, "massive": 300.0}  # the outlier output channels' factor
OUTLIER_CHANNELS = 8


@dataclasses.dataclass(frozen=True)
class Setup:
    hidden: int
    inter: int
    experts: int
    topk: int
    n_group: int
    topk_group: int
    tokens: int  # in all, over the ranks
    seed: int


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``moecomm bench accuracy``."""
    p.add_argument("--world-sizes", type=int_list(minimum=2), default=[2, 4, 8],
                   help="world sizes to measure, comma-separated (default 2,4,8)")
    p.add_argument("--tokens", type=positive_int, default=256, help="tokens in all, split evenly (default 256)")
    p.add_argument("--experts", type=positive_int, default=32,
                   help="routed experts, a multiple of 8 groups and of every world size (default 32; DeepSeek-V3 256)")
    p.add_argument("--hidden", type=positive_int, default=7168, help="hidden size, a multiple of 128 (default 7168)")
    p.add_argument("--inter", type=positive_int, default=2048, help="expert intermediate size (default 2048)")
    p.add_argument("--formats", type=choice_list(FORMATS), default=list(FORMATS),
                   help="comma-separated combine formats (default bf16,int8,fp8)")
    p.add_argument("--activations", type=choice_list(ACTIVATIONS), default=list(ACTIVATIONS),
                   help="comma-separated activation sets (default gaussian,outliers,massive)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, tokens and routing (default 0)")
    p.add_argument("--force", action="store_true", help="run more CPU ranks than the machine's cores")
    add_output_arguments(p)


def _outlier_channels(hidden: int, seed: int) -> torch.Tensor:
    return torch.randperm(hidden, generator=torch.Generator().manual_seed(seed + 7))[:OUTLIER_CHANNELS]


def _weights(setup: Setup, activations: str, first: int, count: int):
    """Experts ``[first, first + count)``: ``w13 [count, 2I, H]``, ``w2 [count, H, I]`` bf16, one seed per expert (so
    every world size sees the same experts)."""
    w13, w2 = [], []
    channels = _outlier_channels(setup.hidden, setup.seed)
    for e in range(first, first + count):
        gen = torch.Generator().manual_seed(setup.seed * 100_003 + e)
        w13.append((torch.randn(2 * setup.inter, setup.hidden, generator=gen) * setup.hidden**-0.5).bfloat16())
        down = torch.randn(setup.hidden, setup.inter, generator=gen) * setup.inter**-0.5
        down[channels] *= OUTPUT_OUTLIER[activations]
        w2.append(down.bfloat16())
    return torch.stack(w13), torch.stack(w2)


def _tokens(setup: Setup, activations: str):
    """All tokens ``bf16 [tokens, H]`` and their routing (DeepSeek-V3 grouped top-k with a correction bias)."""
    gen = torch.Generator().manual_seed(setup.seed)
    x = torch.randn(setup.tokens, setup.hidden, generator=gen)
    if activations != "gaussian":
        x[:, _outlier_channels(setup.hidden, setup.seed)] *= 50
    logits = torch.randn(setup.tokens, setup.experts, generator=gen)
    bias = torch.randn(setup.experts, generator=gen) * 0.1
    ids, w = grouped_topk(logits, setup.topk, e_score_correction_bias=bias, n_group=setup.n_group,
                          topk_group=setup.topk_group, routed_scaling_factor=2.5)
    return x.bfloat16(), ids, w


def _partial_fp64(x, ids, w, w13, w2, first):
    """This rank's experts in float64: ``sum_k w[t, k] * expert_{ids[t, k]}(x[t])`` over its experts."""
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    xd = x.double()
    for local in range(w13.shape[0]):
        rows, slots = (ids == first + local).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        gate, up = (xd[rows] @ w13[local].double().t()).chunk(2, dim=1)
        y = (F.silu(gate) * up) @ w2[local].double().t()
        out.index_add_(0, rows, y * w[rows, slots].double().unsqueeze(1))
    return out


def _rank_main(setup: Setup, activations: list[str], formats: list[str]) -> list[dict]:
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = setup.tokens // world
    sizes = [per_rank] * world
    num_local = setup.experts // world
    first = rank * num_local
    results = []
    for act in activations:
        x, ids, w = _tokens(setup, act)
        w13, w2 = _weights(setup, act, first, num_local)
        local = make_expert_weights(w13, w2)  # this rank's experts, placed in the EP split below
        local = dataclasses.replace(local, first_expert=first, num_experts=setup.experts)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        tokens, gids, gw, handle = dispatch(x[mine], ids[mine], w[mine], sizes=sizes, strategy="agrs")
        partial = experts_forward(tokens, gids, gw, local)
        exact_layer = _partial_fp64(x, ids, w, w13, w2, first)
        exact_combine = partial.double()
        for t in (exact_layer, exact_combine):  # float64 sums over ranks (order does not matter at this precision)
            dist.all_reduce(t)
        other = torch.ones(setup.hidden, dtype=torch.bool)
        if act != "gaussian":
            other[_outlier_channels(setup.hidden, setup.seed)] = False
        for fmt in formats:
            out = combine(partial, handle, combine_format=fmt).double()
            sums = torch.tensor([
                (out - exact_layer[mine]).square().sum(), exact_layer[mine].square().sum(),
                (out - exact_combine[mine]).square().sum(), exact_combine[mine].square().sum(),
                (out - exact_layer[mine])[:, other].square().sum(), exact_layer[mine][:, other].square().sum(),
            ], dtype=torch.float64)
            dist.all_reduce(sums)
            results.append({
                "world_size": world, "activations": act, "combine_format": fmt,
                "combine_bytes_per_token": reduce_row_bytes(fmt, setup.hidden),
                "rel_l2_vs_fp64_layer": (sums[0] / sums[1]).sqrt().item(),
                "rel_l2_vs_exact_combine": (sums[2] / sums[3]).sqrt().item(),
                "rel_l2_other_channels": (sums[4] / sums[5]).sqrt().item(),
            })
    return results if rank == 0 else []


def _check(args, setup: Setup) -> None:
    if setup.hidden % 128:
        raise UsageError(f"--hidden {setup.hidden} must be a multiple of 128 (the combine formats' group)")
    for ws in args.world_sizes:
        if setup.experts % ws or setup.experts % setup.n_group or setup.tokens % ws:
            raise UsageError(f"--experts {setup.experts} must be a multiple of {setup.n_group} groups and of every "
                             f"world size, and --tokens {setup.tokens} of every world size (world size {ws})")
    if setup.experts // setup.n_group * setup.topk_group < setup.topk:
        raise UsageError(f"--experts {setup.experts}: {setup.topk_group} groups of {setup.experts // setup.n_group} "
                         f"experts hold fewer than top-{setup.topk}")


def run(args: argparse.Namespace) -> int:
    """``moecomm bench accuracy``: the table, and the JSON with ``--json``."""
    setup = Setup(hidden=args.hidden, inter=args.inter, experts=args.experts, topk=8, n_group=8, topk_group=4,
                  tokens=args.tokens, seed=args.seed)
    _check(args, setup)
    weight_bytes = 6 * setup.hidden * setup.inter * setup.experts  # bf16 w13 + w2 of all experts
    for ws in args.world_sizes:  # each rank: its experts in bf16, one expert in float64 at a time, torch itself
        check_world_size(ws, gpu=False, force=args.force, bytes_per_rank=(1 << 30) + 2 * weight_bytes // ws)
    results = []
    for ws in args.world_sizes:
        results += launch(_rank_main, ws, (setup, args.activations, args.formats), backend="gloo", timeout=3600)[0]
    base = {(r["world_size"], r["activations"]): r for r in results if r["combine_format"] == "bf16"}
    rows = []
    for r in results:
        b = base.get((r["world_size"], r["activations"]))
        r["vs_bf16_combine"] = r["rel_l2_vs_fp64_layer"] / b["rel_l2_vs_fp64_layer"] if b else float("nan")
        rows.append([r["activations"], r["world_size"], r["combine_format"], r["combine_bytes_per_token"],
                     r["rel_l2_vs_fp64_layer"], r["vs_bf16_combine"], r["rel_l2_vs_exact_combine"],
                     r["rel_l2_other_channels"]])
    device = torch.device("cpu")
    print_table(f"combine formats on one MoE layer: hidden {setup.hidden}, intermediate {setup.inter}, {setup.experts} "
                f"experts top-{setup.topk} (grouped: {setup.n_group} groups, {setup.topk_group} chosen), "
                f"{setup.tokens} tokens, {device_name(device)}",
                ["activations", "world size", "combine", "combine B/token", "rel L2 vs fp64 layer", "vs bf16 combine",
                 "rel L2 vs exact combine", "other channels"], rows,
                caption="rel L2 vs fp64 layer: the layer output against the layer in float64 (same bf16 inputs and "
                        "weights); vs bf16 combine: that error over the bf16 combine's; rel L2 vs exact combine: "
                        "against the float64 sum of the ranks' bf16 partial outputs (the combine's own error); other "
                        "channels: vs fp64 layer without the 8 outlier channels. bf16 here sums in fp32 and rounds "
                        "once (gloo); NCCL sums bf16 in bf16 (no better).")
    if args.json is not None:
        write_json(args.json, device, {"setup": dataclasses.asdict(setup), "results": results})
    return 0
