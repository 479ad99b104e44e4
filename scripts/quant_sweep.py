"""GPU sweep of the quantize / dequantize kernels, for one device call (a tuning aid; prints tables).

1. Correctness: every kernel against the CPU reference (bytes; dequantize: values, NaNs as one value) at
   M = 512, K = 7168 with special values, for each layout setting it is timed with.
2. Timing (``moecomm.bench.quant``'s graphed, rotating-input timer) of tile / lane settings at M = 16384,
   then every variant at the chosen settings for ``--tokens``, beside a ``--baseline`` kernel module (the
   kernels before a change) and the torch dequantize path; fractions of the copy measured in this run.

``--ncu`` instead runs each kernel once (for ``ncu --kernel-name regex:_kernel``) at M = 16384.

    PYTHONPATH=src python scripts/quant_sweep.py --json out.json --baseline before/_quant_triton_before.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import torch

import moecomm
from moecomm import _quant_triton as K
from moecomm import quant as Q
from moecomm.bench import quant as B
from moecomm.bench.timing import copy_bandwidth, print_table

DEVICE = torch.device(os.environ.get("QUANT_SWEEP_DEVICE", "cuda"))  # "cpu" (interpreter): a dry run
KH = 7168
# (name, op, bench variant)
ITEMS = [("nvfp4", "quantize", "nvfp4"), ("nvfp4-swizzled", "quantize", "nvfp4-swizzled"),
         ("mxfp4", "quantize", "mxfp4"), ("fp8-token", "quantize", "fp8-token"),
         ("fp8-group", "quantize", "fp8-group"), ("fp8-group-ue8m0", "quantize", "fp8-group-ue8m0"),
         ("deq-nvfp4", "dequantize", "nvfp4"), ("deq-fp8-token", "dequantize", "fp8-token"),
         ("deq-fp8-group", "dequantize", "fp8-group")]  # fmt: skip
SETTINGS = {  # module constant -> values tried (first: the default)
    "tile": [(4096, 4), (2048, 4), (8192, 8)],
    "_NVFP4_J": [1, 2],
    "_MXFP4_J": [2, 1, 4],
    "_FP8_J": [4, 2],
}
USES = {"_NVFP4_J": ("nvfp4",), "_MXFP4_J": ("mxfp4",), "_FP8_J": ("fp8-group",)}


def set_consts(**kw):
    for key, v in kw.items():
        if key == "tile":
            K._GPU_TILE, K._GPU_WARPS = v
        else:
            setattr(K, key, v)


def special_input(m, k=KH, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp2(torch.randint(-30, 20, (m, k // 16), generator=g).float()
                                                   ).repeat_interleave(16, 1)  # fmt: skip
    x[0, :4] = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0])
    x[1, :32] = 0.0
    return x.to(torch.bfloat16)


def check(name, op, variant) -> str:
    """'ok' or a description of the first difference: kernel on the GPU vs reference on the CPU."""
    x = special_input(512, seed=len(name))
    gs = Q.nvfp4_global_scale(x[1:].float().abs().amax())
    ref = B._quantizer(variant, "torch", gs)(x, None)
    if op == "quantize":
        got = B._quantizer(variant, "triton", gs.to(DEVICE))(x.to(DEVICE), None)
        for a, b in zip(got, ref):
            a, b = a.view(torch.uint8).cpu(), b.view(torch.uint8).cpu()
            if not torch.equal(a, b):
                return f"{int((a != b).sum())} bytes differ"
        return "ok"
    for dtype in (torch.bfloat16, torch.float32):
        want = B._dequantize(variant, ref, gs, dtype, "torch")
        got = B._dequantize(variant, tuple(t.to(DEVICE) for t in ref), gs.to(DEVICE), dtype, "triton").cpu()
        nw, ng = torch.isnan(want), torch.isnan(got.float())
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
        bad = ((got.view(bits) != want.view(bits)) & ~nw) | (nw != ng)
        if bad.any():
            return f"{dtype}: {int(bad.sum())} values differ"
    return "ok"


def timed(op, variant, m, backend="triton") -> float:
    return B._time_variant(op, variant, m, KH, torch.bfloat16, DEVICE, backend, 30, 3, True)


def nbytes(variant, m):
    return m * KH * 2 + B._written_bytes(variant, m, KH)


def load_module(path):
    spec = importlib.util.spec_from_file_location("quant_triton_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    p.add_argument("--baseline", help="path of the kernel module before the change (quantize only)")
    p.add_argument("--tokens", default="1,16,128,4096,16384")
    p.add_argument("--settings-tokens", type=int, default=16384, help="M of the settings sweep")
    p.add_argument("--ncu", action="store_true", help="run each kernel once at M=16384 (under ncu)")
    p.add_argument("--items", default=",".join(i[0] for i in ITEMS))
    args = p.parse_args()
    items = [i for i in ITEMS if i[0] in args.items.split(",")]
    if args.baseline:
        before = load_module(args.baseline)
    if args.ncu:
        if args.baseline:
            moecomm._quant_triton = before
        x = special_input(args.settings_tokens).to(DEVICE)
        gs = Q.nvfp4_global_scale(x[1:].float().abs().amax())  # row 0 holds Inf and NaN
        for name, op, variant in items:
            out = B._quantizer(variant, "triton", gs)(x, None)
            if op == "dequantize":
                B._dequantize(variant, out, gs, torch.bfloat16, "triton")
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            print("ran", name, flush=True)
        return 0

    t0 = time.time()
    copy_bw = copy_bandwidth(DEVICE)
    result = {"copy_bandwidth_gbps": copy_bw / 1e9, "checks": [], "settings": [], "timing": []}
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s", flush=True)

    # 1 + 2a: each setting, checked then timed at M = 16384
    rows = []
    for key, values in SETTINGS.items():
        for v in values:
            for name, op, variant in items:
                if key != "tile" and name not in USES[key]:
                    continue
                if key == "tile" and name not in ("nvfp4", "fp8-group", "deq-nvfp4"):
                    continue
                set_consts(**{key: v})
                status = check(name, op, variant)
                t = timed(op, variant, args.settings_tokens)
                frac = nbytes(variant, args.settings_tokens) / t / copy_bw
                rows.append([key, str(v), name, status, t * 1e6, frac])
                result["settings"].append({"setting": key, "value": v, "item": name, "check": status,
                                           "time_us": t * 1e6, "fraction_of_copy": frac})  # fmt: skip
                print(rows[-1], f"{time.time() - t0:.0f}s", flush=True)
            set_consts(**{key: values[0]})
    print_table(f"settings at M={args.settings_tokens} (first value of each = default)", ["setting", "value", "item", "check",
                "time (us)", "fraction of copy"], rows)  # fmt: skip

    # 1 + 2b: every item at the defaults, all token counts, beside the baseline / torch
    rows = []
    tokens = [int(t) for t in args.tokens.split(",")]
    for name, op, variant in items:
        status = check(name, op, variant)
        result["checks"].append({"item": name, "check": status})
        for m in tokens:
            t = timed(op, variant, m)
            if op == "quantize" and args.baseline:
                moecomm._quant_triton = before
                tb = timed(op, variant, m)
                moecomm._quant_triton = K
            else:
                tb = timed(op, variant, m, "torch") if op == "dequantize" else float("nan")
            f, fb = nbytes(variant, m) / t / copy_bw, nbytes(variant, m) / tb / copy_bw
            rows.append([name, status, m, t * 1e6, f, tb * 1e6, fb])
            result["timing"].append({"item": name, "tokens": m, "hidden": KH, "time_us": t * 1e6,
                                     "fraction_of_copy": f, "before_time_us": tb * 1e6,
                                     "before_fraction_of_copy": fb})  # fmt: skip
        print(f"{name} done {time.time() - t0:.0f}s", flush=True)
    print_table(f"defaults vs before (quantize: --baseline kernels; dequantize: torch), copy {copy_bw / 1e9:.0f} GB/s",
                ["item", "check", "M", "time (us)", "fraction", "before (us)", "before fraction"], rows)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
