"""``moecomm bench quant``: time the quantizers and dequantizers against the device's copy bandwidth.

Timing table: per operation, format and token count M (hidden K), median time per call, GB/s counting
bytes read plus bytes written (quantize: the input, then payload + scales; dequantize: payload + scales,
then the bf16 / ``--dtype`` result; dequantize-sum: ``P`` pieces of payload + scales, then one result),
and that bandwidth as a fraction of a device-to-device copy measured in the same run
(``fraction_of_copy`` in the JSON). ``dequantize-sum`` is the owner's half of the quantized combine
(:func:`moecomm.quant.dequantize_sum`: the ``P = world_size`` pieces of ``int8-group`` / ``fp8-group``
partials dequantized and summed in fp32, rounded once), for each ``--pieces``; ``quantize`` of those two
formats is the other half. On CUDA each timed sample replays a CUDA
graph of one call per rotating input set (inputs rotate so that large shapes do not measure L2), so
the time excludes Python launch overhead; ``--no-graph`` times eager calls instead. The torch
dequantizers cannot be captured: time them with ``--backend torch --no-graph``.

``--accuracy``: relative round-trip error ``||x - deq(q(x))|| / ||x||`` per format for Gaussian,
Student-t (3 dof) and outlier-channel inputs (the table in docs/accuracy.md). The bytes do not depend on
the device (kernels and references are bit-identical), so this runs anywhere.

Examples::

    moecomm bench quant                                  # CUDA: K=7168, M in {1,...,16384}, both ops
    moecomm bench quant --ops dequantize --formats nvfp4,fp8-group
    moecomm bench quant --device cpu --tokens 1,16,128   # torch references on the CPU
    moecomm bench quant --accuracy --device cpu --json acc.json
    moecomm bench quant --ops quantize,dequantize-sum --formats int8-group,fp8-group --pieces 2,4,8   # the combine
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable

import torch

from moecomm import quant as Q
from moecomm._args import (
    UsageError,
    add_output_arguments,
    choice_list,
    device_choice,
    int_list,
    nonnegative_int,
    positive_int,
)
from moecomm._output import device_name, print_table, write_json
from moecomm.bench.timing import copy_bandwidth, median_time
from moecomm.quant.reduce import partial_views

VARIANTS = {  # name -> what it is (the tables' captions)
    "nvfp4": "e2m1 values, an e4m3 scale per 16 and an fp32 global scale, scales in row order",
    "nvfp4-swizzled": "the same, scales in the 128x4 swizzled layout FP4 GEMMs read",
    "mxfp4": "e2m1 values, a power-of-two (e8m0) scale per 32 rounded down (OCP)",
    "mxfp4-up": "the same, scales rounded up (never clips)",
    "fp8-token": "e4m3 values, an fp32 scale per token",
    "fp8-group": "e4m3 values, an fp32 scale per 128 (DeepSeek-V3)",
    "fp8-group-ue8m0": "the same, power-of-two scales",
    "int8-group": "int8 values, an fp32 scale per 128 (the int8 combine)",
}
OPS = ("quantize", "dequantize", "dequantize-sum")
# Variants with a Triton dequantize kernel (MXFP4 dequantizes in torch only); ue8m0 scales decode like others.
DEQUANT_VARIANTS = ("nvfp4", "nvfp4-swizzled", "fp8-token", "fp8-group", "int8-group")
SUM_VARIANTS = {"int8-group": "int8", "fp8-group": "fp8"}  # dequantize-sum: the combine formats
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_L2_BYTES = 60 << 20  # H200; rotating input sets cover >= 4x this


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``moecomm bench quant``."""
    p.add_argument("--device", type=device_choice, default="auto",
                   help="cuda, cpu or auto (default): cuda where there is one")
    p.add_argument("--hidden", type=positive_int, default=7168, metavar="K",
                   help="elements per token, a multiple of 128 (default 7168)")
    p.add_argument("--tokens", type=int_list(), default=None, help="token counts M, comma-separated (default: "
                   "1,16,128,1024,4096,16384 on CUDA, 1,16,128 on CPU)")  # fmt: skip
    p.add_argument("--formats", type=choice_list(VARIANTS), default=list(VARIANTS),
                   help=f"comma-separated (default all: {','.join(VARIANTS)})")
    p.add_argument("--ops", type=choice_list(list(OPS)), default=["quantize", "dequantize"],
                   help="comma-separated: quantize, dequantize, dequantize-sum (default the first two; dequantize "
                        f"times {', '.join(DEQUANT_VARIANTS)} only, dequantize-sum {', '.join(SUM_VARIANTS)})")
    p.add_argument("--pieces", type=int_list(), default=[2, 4, 8],
                   help="dequantize-sum: pieces summed (the world size), comma-separated (default 2,4,8)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16",
                   help="quantize input / dequantize output dtype (default bf16)")
    p.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto",
                   help="the Triton kernels, the torch references, or auto (default): Triton on CUDA")
    p.add_argument("--iters", type=positive_int, default=None, help="timed samples (default 50 CUDA, 5 CPU)")
    p.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed calls first (default 3)")
    p.add_argument("--no-graph", action="store_true", help="CUDA: time eager calls, not graph replays")
    p.add_argument("--accuracy", action="store_true", help="print the accuracy table instead of timings")
    p.add_argument("--rows", type=positive_int, default=256, help="--accuracy: rows per input distribution")
    p.add_argument("--seed", type=int, default=0, help="--accuracy: seed of the inputs (default 0)")
    add_output_arguments(p)


def _quantizer(variant: str, backend: str, gs: torch.Tensor) -> Callable[[torch.Tensor, Any], Any]:
    if variant.startswith("nvfp4"):
        swizzled = variant.endswith("swizzled")
        return lambda x, out: Q.quantize_nvfp4(x, gs, swizzled=swizzled, out=out, backend=backend)
    if variant.startswith("mxfp4"):
        rounding = "up" if variant.endswith("up") else "floor"
        return lambda x, out: Q.quantize_mxfp4(x, scale_rounding=rounding, out=out, backend=backend)
    if variant == "int8-group":
        return lambda x, out: Q.quantize_int8(x, out=out, backend=backend)
    group = None if variant == "fp8-token" else Q.FP8_GROUP
    ue8m0 = variant.endswith("ue8m0")
    return lambda x, out: Q.quantize_fp8(x, group_size=group, ue8m0=ue8m0, out=out, backend=backend)


def _dequantize(variant: str, outputs, gs: torch.Tensor, dtype=torch.float32, backend: str = "auto") -> torch.Tensor:
    if variant.startswith("nvfp4"):
        return Q.dequantize_nvfp4(*outputs, gs, swizzled=variant.endswith("swizzled"), dtype=dtype, backend=backend)
    if variant.startswith("mxfp4"):
        return Q.dequantize_mxfp4(*outputs, dtype=dtype)
    if variant == "int8-group":
        return Q.dequantize_int8(*outputs, dtype=dtype, backend=backend)
    return Q.dequantize_fp8(*outputs, dtype=dtype, backend=backend)


_FORMATS = {
    "nvfp4": Q.QuantFormat.NVFP4,
    "nvfp4-swizzled": Q.QuantFormat.NVFP4,
    "mxfp4": Q.QuantFormat.MXFP4,
    "mxfp4-up": Q.QuantFormat.MXFP4,
    "fp8-token": Q.QuantFormat.FP8_TOKEN,
    "fp8-group": Q.QuantFormat.FP8_GROUP,
    "fp8-group-ue8m0": Q.QuantFormat.FP8_GROUP,
    "int8-group": None,  # not a dispatch format: moecomm.quant.int8
}


def _written_bytes(variant: str, m: int, k: int) -> int:
    """Bytes of the quantized ``[m, k]``: payload + scales (swizzled scales include their padding); what a
    quantizer writes and a dequantizer reads."""
    if variant == "int8-group":
        return m * Q.reduce_row_bytes("int8", k)
    payload, scales = Q.row_bytes(_FORMATS[variant], k)
    if variant == "nvfp4-swizzled":
        return m * payload + (-(-m // 128) * 128) * (-(-(k // 16) // 4) * 4)
    return m * (payload + scales)


def _sets(in_bytes: int, device: torch.device) -> int:
    """Rotating input sets: enough to cover 4x the L2 on CUDA (at most 16), one on the CPU."""
    return max(1, min(16, math.ceil(4 * _L2_BYTES / max(in_bytes, 1)))) if device.type == "cuda" else 1


def _time_variant(op, variant, m, k, dtype, device, backend, iters, warmup, graph, pieces=1) -> float:
    """Median seconds per call; each sample replays a graph of one call per rotating input set (>= 4x L2)."""
    if op == "dequantize-sum":
        return _time_calls(_dequantize_sum_calls(variant, pieces, m, k, dtype, device, backend), device, iters,
                           warmup, graph)
    xs = [torch.randn(m, k, device=device).to(dtype) for _ in range(_sets(m * k * dtype.itemsize, device))]
    gs = Q.nvfp4_global_scale(xs[0].float().abs().amax())
    quantize = _quantizer(variant, backend, gs)
    outs = [quantize(x, None) for x in xs]  # allocates the outputs once, compiles the kernel
    if op == "quantize":
        calls = [lambda x=x, out=out: quantize(x, out) for x, out in zip(xs, outs)]
    else:
        calls = [lambda out=out: _dequantize(variant, out, gs, dtype, backend) for out in outs]
    return _time_calls(calls, device, iters, warmup, graph)


def _dequantize_sum_calls(variant, pieces, m, k, dtype, device, backend) -> list:
    """One dequantize-sum per rotating set of ``pieces`` quantized partials ``[pieces, m, k]`` (the layout a
    combine receives) into a preallocated ``[m, k]`` result."""
    fmt = SUM_VARIANTS[variant]
    row_bytes = Q.reduce_row_bytes(fmt, k)
    calls = []
    for _ in range(_sets(pieces * m * row_bytes, device)):
        buf = torch.empty((pieces * m, row_bytes), dtype=torch.uint8, device=device)
        views = partial_views(buf, Q.ReduceFormat(fmt), k)
        Q.quantize_partials(torch.randn(pieces * m, k, device=device).bfloat16(), fmt, out=views)
        data, scales = partial_views(buf.view(pieces, m, row_bytes), Q.ReduceFormat(fmt), k)
        out = torch.empty((m, k), dtype=dtype, device=device)
        calls.append(lambda d=data, s=scales, o=out: Q.dequantize_sum(d, s, dtype=dtype, out=o, backend=backend))
    return calls


def _time_calls(calls: list, device, iters: int, warmup: int, graph: bool) -> float:
    """Median seconds per call of ``calls`` (one per rotating set); on CUDA with ``graph`` a sample replays one
    graph of all of them."""
    sets = len(calls)
    for call in calls:
        call()  # compiles
    if device.type == "cuda" and graph:
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for call in calls:
                call()
        return median_time(lambda i: g.replay(), device, warmup=warmup, iters=iters) / sets
    return median_time(lambda i: calls[i % sets](), device, warmup=warmup, iters=iters)


def run_timing(args, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    tokens = args.tokens if args.tokens is not None else ([1, 16, 128, 1024, 4096, 16384] if cuda else [1, 16, 128])
    iters = args.iters if args.iters is not None else (50 if cuda else 5)
    dtype = _DTYPES[args.dtype]
    k = args.hidden
    copy_bw = copy_bandwidth(device)
    rows, records = [], []
    for op in args.ops:
        for variant in args.formats:
            if (op == "dequantize" and variant not in DEQUANT_VARIANTS) or (
                    op == "dequantize-sum" and variant not in SUM_VARIANTS):
                continue
            for pieces in args.pieces if op == "dequantize-sum" else [1]:
                for m in tokens:
                    t = _time_variant(op, variant, m, k, dtype, device, args.backend, iters, args.warmup,
                                      not args.no_graph, pieces)  # fmt: skip
                    nbytes = m * k * dtype.itemsize + pieces * _written_bytes(variant, m, k)
                    bw = nbytes / t
                    name = op if op != "dequantize-sum" else f"{op} x{pieces}"
                    rows.append([name, variant, m, t * 1e6, bw / 1e9, bw / copy_bw])
                    records.append({"op": op, "format": variant, "pieces": pieces, "tokens": m, "hidden": k,
                                    "time_us": t * 1e6, "bytes_read_written": nbytes, "gbps_read_written": bw / 1e9,
                                    "fraction_of_copy": bw / copy_bw})
    title = (
        f"{args.dtype} [M, {k}] on {device_name(device)} ({args.backend}, "
        f"{'eager' if args.no_graph or not cuda else 'CUDA graph'}); copy bandwidth {copy_bw / 1e9:.0f} GB/s"
    )
    print_table(title, ["op", "format", "M", "time (us)", "GB/s (read+write)", "fraction of copy"], rows, keys=3,
                caption=f"{_notes(args.formats)}. time: median per call; GB/s: bytes read plus bytes written per "
                        "second (quantize: the input, then values and scales; dequantize: values and scales, then "
                        "the result; dequantize-sum xP: P pieces of values and scales, then one result); fraction of "
                        "copy: that over a device-to-device copy's.")
    return {"copy_bandwidth_gbps": copy_bw / 1e9, "dtype": args.dtype, "backend": args.backend, "timing": records}


def accuracy_inputs(m: int, k: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gaussian, Student-t with 3 degrees of freedom, and Gaussian with 8 outlier channels (x50).

    Returns the inputs (CPU, float32) and the boolean ``[k]`` mask of the outlier channels.
    """
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(m, k, generator=g)
    chi2 = sum(torch.randn(m, k, generator=g) ** 2 for _ in range(3))
    student = torch.randn(m, k, generator=g) / torch.sqrt(chi2 / 3)
    outlier = torch.randn(m, k, generator=g)
    channels = torch.zeros(k, dtype=torch.bool)
    channels[torch.randperm(k, generator=g)[:8]] = True
    outlier[:, channels] *= 50.0
    return {"gaussian": gauss, "student-t3": student, "outlier-channels": outlier}, channels


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def run_accuracy(args, device: torch.device) -> dict:
    dtype = _DTYPES[args.dtype]
    k = args.hidden
    raw, channels = accuracy_inputs(args.rows, k, args.seed)
    inputs = {name: x.to(device=device, dtype=dtype) for name, x in raw.items()}
    columns = [*inputs, "outlier-channels (other channels)"]
    rows, records = [], []
    for variant in args.formats:
        if variant == "nvfp4-swizzled":  # the same values as nvfp4
            continue
        bits = 8 * _written_bytes(variant, args.rows, k) / (args.rows * k)
        errors = {}
        for name, x in inputs.items():
            gs = Q.nvfp4_global_scale(x.float().abs().amax())
            deq = _dequantize(variant, _quantizer(variant, args.backend, gs)(x, None), gs).cpu()
            errors[name] = _rel(deq, x.cpu())
            if name == "outlier-channels":  # the ordinary channels pay for the outliers' scale
                errors[columns[-1]] = _rel(deq[:, ~channels], x.cpu()[:, ~channels])
        rows.append([variant, bits, *errors.values()])
        records.append({"format": variant, "bits_per_element": bits, "relative_error": errors})
    title = f"relative error ||x - deq(q(x))|| / ||x||, {args.dtype} [{args.rows}, {k}]"
    print_table(title, ["format", "bits/element", *columns], rows,
                caption=f"{_notes(r[0] for r in rows)}. Inputs: gaussian N(0, 1); student-t3 Student-t with 3 "
                        "degrees of freedom; outlier-channels gaussian with 8 channels times 50, and its error on "
                        "the other channels alone. bits/element include the scales.")
    return {"dtype": args.dtype, "rows": args.rows, "hidden": k, "accuracy": records}


def _notes(variants) -> str:
    return "; ".join(f"{v} = {VARIANTS[v]}" for v in variants)


def run(args) -> int:
    """``moecomm bench quant``: the timing table, or with ``--accuracy`` the accuracy table."""
    if args.hidden % 128:
        raise UsageError(f"--hidden {args.hidden} must be a multiple of 128 (the FP8 group)")
    if "dequantize-sum" in args.ops and args.dtype == "fp16" and not args.accuracy:
        raise UsageError("--ops dequantize-sum writes bf16 or fp32: use --dtype bf16 or fp32")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    payload = run_accuracy(args, device) if args.accuracy else run_timing(args, device)
    if args.json is not None:
        write_json(args.json, device, payload)
    return 0
