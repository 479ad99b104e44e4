"""``moecomm bench counted``: the device-count mode's one CUDA graph per rank
(:class:`moecomm.layer.CountedGraphedMoE`).

Spawns N ranks: NCCL, one GPU each; or with ``--one-gpu`` N processes on cuda:0 over gloo, the ``symm``
transport on torch symmetric memory shared across the processes (``TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES=1``,
multicast off; set here before the ranks start). Shapes and experts as ``moecomm bench moe`` (DeepSeek-V3's
MoE, or ``--small``). Per strategy and transport the step is captured ONCE per rank with
``max_tokens_per_rank = --max-tokens``, then replayed on decode cases (tokens per rank from ``--tokens`` as
balanced / skewed / idle ranks with the same total, cases past ``M`` left out):

- ``replay == eager``: the replay's output equals the eager device-count step's, bit for bit, on every rank.
- ``host call``: host time per call of the graph object in a loop of calls (three input copies, the count
  written on the device, one replay); ``host replay``: :meth:`CountedGraphedMoE.replay` alone (an engine that
  writes the static buffers in place). The target is at most 20 us per call.
- ``step``: time per replayed step (CUDA events around one call, after a host barrier; the slowest rank).
  On one GPU the ranks' kernels are time-sliced, so it measures context switches, not the step: n/a there.
- NCCL with at least 2 ranks: ``bucket`` = the same step in :class:`moecomm.layer.GraphedMoE` (one graph per
  power-of-two bucket up to ``M``, every rank padded to the bucket of ``max(sizes)``, sizes passed: no sync).
- ``wire bytes``: message and combine rows that cross between ranks per step, each counted once: ``padded``
  every rank's whole slot (``world_size * M`` rows), ``symm`` the live rows (``sum(sizes)``), bucket graphs
  ``world_size * bucket`` rows; times :func:`moecomm.layer.wire_bytes_per_token`.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from moecomm._args import (
    UsageError,
    add_output_arguments,
    add_world_size_arguments,
    check_world_size,
    choice_list,
    int_list,
    positive_int,
)
from moecomm._output import device_name, print_table, write_json
from moecomm.bench.collectives import PATTERN_NOTES, pattern_sizes
from moecomm.bench.moe import DEEPSEEK_V3, SMALL, VARIANTS, _weights
from moecomm.bench.timing import loop_time, median_time
from moecomm.comm import launch
from moecomm.comm.counted import counted_workspace
from moecomm.layer import CountedGraphedMoE, GraphedMoE, Strategy, message_layout, moe_forward, wire_bytes_per_token
from moecomm.layer.strategy import wire_format
from moecomm.moe import grouped_topk
from moecomm.quant import QuantFormat, nvfp4_global_scale

ONE_GPU_ENV = {"TORCH_SYMM_MEM_ALLOW_OVERLAPPING_DEVICES": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
TRANSPORTS = ("auto", "padded", "symm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``moecomm bench counted``."""
    add_world_size_arguments(p, default=None, default_help="all GPUs; with --one-gpu 2")
    p.add_argument("--one-gpu", action="store_true",
                   help="run every rank on cuda:0 (gloo + torch symmetric memory across processes, symm transport); "
                        "with --small beyond 2 ranks (each rank draws the whole model's weights first)")
    p.add_argument("--max-tokens", type=positive_int, default=256, metavar="M",
                   help="max_tokens_per_rank, the static slot of every rank (default 256)")
    p.add_argument("--tokens", type=int_list(), default=[1, 16, 64, 256],
                   help="decode tokens per rank, comma-separated (default 1,16,64,256; cases past M are left out)")
    p.add_argument("--transport", type=choice_list(TRANSPORTS), default=None,
                   help="transports, comma-separated from auto, padded, symm (default auto; symm with --one-gpu)")
    p.add_argument("--small", action="store_true", help="scaled-down model")
    p.add_argument("--experts", choices=("fp8", "bf16"), default=None,
                   help="expert weights and kernels (default: fp8 on sm90+, else bf16)")
    p.add_argument("--iters", type=positive_int, default=20, help="timed calls per measurement (default 20)")
    add_output_arguments(p)


def _cases(world: int, tokens: list[int], m: int) -> list[tuple[str, list[int]]]:
    cases = []
    for n in tokens:
        for pattern in ("balanced", "skewed", "idle") if world > 1 else ("balanced",):
            sizes = pattern_sizes(pattern, n, world)
            if max(sizes) <= m and (pattern, sizes) not in cases and sizes not in [s for _, s in cases]:
                cases.append((pattern, sizes))
    return cases


def _max_over_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _transport_of(strategy, consumed, shape, m: int, transport: str, device) -> str:
    """The transport the layer's workspace resolved to (a cache lookup: the graph's warm-up created it)."""
    if strategy == Strategy.ALLREDUCE:
        return "padded"  # the padded all-reduce
    row_bytes = message_layout(wire_format(strategy, consumed), shape.hidden, shape.topk).row_bytes
    return counted_workspace(None, device, max_tokens_per_rank=m, row_bytes=row_bytes, hidden=shape.hidden,
                             transport=transport).transport.value


def _rank_main(shape, experts: str, m: int, cases, transports, iters: int, one_gpu: bool) -> list[dict]:
    if one_gpu:
        torch.cuda.set_device(0)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device())
    weights, bias = _weights(shape, experts, device)
    gs = nvfp4_global_scale(torch.tensor(4.0 * 5, device=device))
    nccl = dist.get_backend() == "nccl"
    results = []
    for name, strategy, wire, consumed, pack in VARIANTS[experts]:
        if not pack or (strategy.value == "allreduce" and not nccl):
            continue
        nvfp4 = QuantFormat.NVFP4 in (wire, consumed)  # the global scale is refused where no NVFP4 is used
        kw = dict(strategy=strategy, global_scale=gs if nvfp4 else None, expert_input_format=consumed)
        buckets = [b for b in (2**i for i in range(m.bit_length())) if b <= m] + ([m] if m & (m - 1) else [])
        bucketed = GraphedMoE(weights, hidden_size=shape.hidden, topk=shape.topk, buckets=buckets, **kw) \
            if nccl and world > 1 else None
        per_token = wire_bytes_per_token(strategy, shape.hidden, shape.topk, wire)
        for transport in transports:
            graphed = CountedGraphedMoE(weights, hidden_size=shape.hidden, topk=shape.topk, max_tokens_per_rank=m,
                                        algorithm=transport, **kw)
            resolved = _transport_of(strategy, consumed, shape, m, transport, device)
            for pattern, sizes in cases:
                n = sizes[rank]
                x = torch.randn(n, shape.hidden, device=device).to(torch.bfloat16)
                ids, tw = grouped_topk(torch.randn(n, shape.experts, device=device), shape.topk,
                                       e_score_correction_bias=bias, n_group=shape.n_group,
                                       topk_group=shape.topk_group)
                dist.barrier()
                got = graphed(x, ids, tw).clone()
                dist.barrier()
                count = torch.full((), n, dtype=torch.int32, device=device)
                eager = moe_forward(x, ids, tw, weights, num_tokens=count, max_tokens_per_rank=m, algorithm=transport,
                                    **kw)
                same = float(torch.equal(got, eager))
                # the host-list path: the same bits where its sums are formed alike (NCCL, 2 ranks: one bf16 add)
                host_list = float(torch.equal(got, moe_forward(x, ids, tw, weights, sizes=sizes, **kw))) if nccl \
                    else float("nan")
                host_call = loop_time(lambda: graphed(x, ids, tw), device, iters=iters, barrier=dist.barrier)[1]
                host_replay = loop_time(graphed.replay, device, iters=iters, barrier=dist.barrier)[1]
                step = float("nan") if one_gpu else median_time(lambda i: graphed(x, ids, tw), device, iters=iters,
                                                                 barrier=dist.barrier)
                bucket = next((b for b in buckets if b >= max(max(sizes), 1)), m)
                bucket_step = float("nan") if bucketed is None else median_time(
                    lambda i: bucketed(x, ids, tw, sizes=sizes), device, iters=iters, barrier=dist.barrier)
                worst = _max_over_ranks([-same, -host_list, host_call, host_replay, step, bucket_step], device)
                rows = sum(sizes) if resolved == "symm" else world * m
                results.append({"pattern": pattern, "sizes": sizes, "strategy": name, "transport": resolved,
                                "max_tokens_per_rank": m, "bucket": bucket, "replay_equals_eager": worst[0] == -1.0,
                                "equals_host_list": None if not nccl else worst[1] == -1.0,
                                "seconds": dict(zip(("host_call", "host_replay", "step", "bucket_step"), worst[2:])),
                                "wire_bytes": per_token * rows, "bucket_wire_bytes": per_token * world * bucket})
    return results if rank == 0 else []


def run(args: argparse.Namespace) -> int:
    """``moecomm bench counted``: the tables, and the JSON where asked."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not gpus:
        raise UsageError("bench counted replays CUDA graphs: it needs a CUDA device")
    world = args.world_size if args.world_size is not None else (2 if args.one_gpu else gpus)
    check_world_size(1 if args.one_gpu else world, gpu=True, force=args.force)
    m = args.max_tokens
    transports = args.transport or (["symm"] if args.one_gpu else ["auto"])
    if args.one_gpu:
        if any(t != "symm" for t in transports) and world > 1:
            raise UsageError("--one-gpu runs the symm transport only (NCCL refuses two ranks on one GPU)")
        os.environ.update(ONE_GPU_ENV)  # inherited by the spawned ranks
    shape = SMALL if args.small else DEEPSEEK_V3
    experts = args.experts or ("fp8" if torch.cuda.get_device_capability() >= (9, 0) else "bf16")
    cases = _cases(world, args.tokens, m)
    results = launch(_rank_main, world, (shape, experts, m, cases, transports, args.iters, args.one_gpu),
                     backend="gloo" if args.one_gpu else "nccl", timeout=3600)[0]
    device = torch.device("cuda")
    where = f"{world} ranks on one GPU" if args.one_gpu else f"world size {world}"
    yes = {True: "yes", False: "NO", None: "n/a"}
    rows = [[r["pattern"], str(r["sizes"]), r["strategy"], r["transport"], yes[r["replay_equals_eager"]],
             yes[r["equals_host_list"]],
             r["seconds"]["host_call"] * 1e6, r["seconds"]["host_replay"] * 1e6, r["seconds"]["step"] * 1e6,
             r["seconds"]["bucket_step"] * 1e6, r["bucket"], r["wire_bytes"], r["bucket_wire_bytes"]] for r in results]
    print_table(f"one CUDA graph per rank (CountedGraphedMoE, max_tokens_per_rank {m}), {where}, "
                f"{device_name(device)}: {experts} experts, hidden {shape.hidden}, top-{shape.topk}",
                ["pattern", "sizes", "strategy", "transport", "replay == eager", "== host list", "host call (us)",
                 "host replay (us)",
                 "step (us)", "bucket step (us)", "bucket", "wire bytes", "bucket wire bytes"], rows,
                caption="replay == eager: bit for bit on every rank; == host list: the replay equals moe_forward with "
                        "sizes (NCCL; expected where the sums are formed alike: 2 ranks, docs/device-counts.md); "
                        "host call = graph object call (copies + count + replay), host replay = replay alone, both in "
                        "loops of calls; step = one replayed step (slowest rank; n/a on one GPU, where ranks are "
                        "time-sliced); bucket = GraphedMoE, every rank padded to the bucket (NCCL, 2+ ranks). wire "
                        "bytes: rows crossing between ranks per step (dispatch + combine), each counted once. "
                        + PATTERN_NOTES)
    if args.json is not None:
        write_json(args.json, device, {"world_size": world, "one_gpu": args.one_gpu, "expert_weights": experts,
                                       "shape": shape.__dict__, "max_tokens_per_rank": m, "results": results})
    return 0
