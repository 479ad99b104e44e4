"""Where the host time of an eager decode step goes: cProfile of moe_forward at world size 1 on a GPU.

Usage: python scripts/profile_host.py [tokens]   (DeepSeek-V3 MoE shapes, FP8 experts, agrs and agrs-fp8)
Prints host microseconds per public call (loops of back-to-back calls) and the top functions by own time.
"""
import cProfile
import pstats
import sys

import torch

from moecomm.bench.timing import loop_time
from moecomm.comm import launch, rank_device
from moecomm.layer import combine, dispatch, moe_forward
from moecomm.moe import WeightFormat, experts_forward, grouped_topk, make_expert_weights
from moecomm.quant import QuantFormat, quantize

H, I, E, K = 7168, 2048, 256, 8


def main(n):
    dev = rank_device()
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = torch.randn(E, 2 * I, H, device=dev, generator=g, dtype=torch.bfloat16) * H**-0.5
    w2 = torch.randn(E, H, I, device=dev, generator=g, dtype=torch.bfloat16) * I**-0.5
    weights = make_expert_weights(w13, w2, format=WeightFormat.FP8_CHANNEL)
    del w13, w2
    x = torch.randn(n, H, device=dev).bfloat16()
    ids, tw = grouped_topk(torch.randn(n, E, device=dev), K, e_score_correction_bias=torch.zeros(E, device=dev),
                           n_group=8, topk_group=4)
    fmt = QuantFormat.FP8_TOKEN
    for strategy in ("agrs", "agrs-fp8"):
        kw = dict(sizes=[n], strategy=strategy, expert_input_format=fmt)
        tokens, gids, gtw, handle = dispatch(x, ids, tw, **kw)
        after = fmt if isinstance(tokens, torch.Tensor) else None
        partial = experts_forward(tokens, gids, gtw, weights, input_format=after)
        calls = {"quantize": lambda: quantize(x, fmt), "dispatch": lambda: dispatch(x, ids, tw, **kw),
                 "experts_forward": lambda: experts_forward(tokens, gids, gtw, weights, input_format=after),
                 "combine": lambda: combine(partial, handle), "moe_forward": lambda: moe_forward(x, ids, tw, weights, **kw)}
        for name, fn in calls.items():
            wall, host = loop_time(fn, dev)
            print(f"{strategy:9} {name:16} host {host * 1e6:7.1f} us   loop {wall * 1e6:7.1f} us per call", flush=True)
        step = calls["moe_forward"]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            step()
        prof.disable()
        torch.cuda.synchronize()
        print(f"--- {strategy}: cProfile of 50 eager steps, top 30 by own time")
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    launch(main, 1, (int(sys.argv[1]) if len(sys.argv) > 1 else 16,), timeout=600)
