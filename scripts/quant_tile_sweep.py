"""Tile sweep of the quantization kernels on a GPU (one-off tuning aid; prints a table).

Sets the module-level tile constants of ``moecomm._quant_triton`` and times each quantizer at
M = 16384, K = 7168 (bf16 in) against the measured copy bandwidth. Run: PYTHONPATH=src python3 scripts/quant_tile_sweep.py
"""

import itertools

import torch

from moecomm import _quant_triton as K
from moecomm import quant as Q
from moecomm.bench.timing import copy_bandwidth, median_time, print_table

device = torch.device("cuda")
m, k = 16384, 7168
xs = [torch.randn(m, k, device=device).to(torch.bfloat16) for _ in range(3)]  # rotate: 3 x 235 MB, past L2
gs = Q.nvfp4_global_scale(torch.tensor(6.0, device=device))
bw = copy_bandwidth(device)
formats = {  # name -> (fn, bytes written per element)
    "nvfp4": (lambda x: Q.quantize_nvfp4(x, gs), 0.5 + 1 / 16),
    "fp8-group": (lambda x: Q.quantize_fp8(x), 1 + 4 / 128),
    "fp8-token": (lambda x: Q.quantize_fp8(x, group_size=None), 1),
}
rows = []
for tile, cols, warps in itertools.product([2048, 4096, 8192], [512, 1024], [4, 8]):
    K._GPU_TILE, K._GPU_MAX_COLS, K._GPU_WARPS = tile, cols, warps
    for name, (fn, out_b) in formats.items():
        t = median_time(lambda i: fn(xs[i % 3]), device, warmup=3, iters=20)
        rows.append([tile, cols, warps, name, t * 1e6, m * k * (2 + out_b) / t / bw])
print_table(f"quantizer tiles, M={m} K={k} bf16, copy {bw / 1e9:.0f} GB/s", ["tile", "max cols", "warps", "format",
            "time (us)", "fraction of copy"], rows)
