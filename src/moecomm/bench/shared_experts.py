"""``moecomm bench moe --shared-experts N``: the MoE step with shared experts, overlapped against one after
the other.

The shared experts are DeepSeek-V3's: one MLP of intermediate ``N * intermediate`` (V3: N = 1, 2048), on
every token of the rank, stored like the routed experts (FP8 per channel with ``--experts fp8``, bf16
with ``--experts bf16``) and consuming the same ``expert_input_format``. Every strategy runs the same
routed and shared experts; per case (sizes) and strategy, in the same run:

- ``routed only``: ``moe_forward`` without shared experts;
- ``shared only``: the shared experts alone on this rank's rows
  (:func:`moecomm.layer.shared.shared_output`, what the step runs);
- ``sequential``: ``moe_forward``, then the shared experts, then their sum, one after the other on one
  stream: the baseline, as SGLang's DP-attention path runs them;
- ``overlapped``: ``moe_forward(..., shared_experts=...)``: the shared experts on the caller's stream while
  the dispatch runs on moecomm's communication stream.

The ratios: ``overlapped / sequential`` (world size 1: goal <= 1.02), ``overlapped / (routed + shared)``
(goal <= 1.03 for ``agrs`` / ``agrs-fp8`` at world size 2, prefill), and the speedup of the overlapped
step over ``allreduce`` run sequentially (goal >= 1.08). Times are medians, maximum over ranks; on CUDA
the decode cases also give the host time per call of both steps (calls issued back to back).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from moecomm._output import device_name, print_table, write_json
from moecomm.bench.timing import loop_time, median_time
from moecomm.layer import moe_forward
from moecomm.layer.shared import shared_output
from moecomm.moe import ExpertWeights, WeightFormat, make_expert_weights

__all__ = ["KEYS", "make_shared_weights", "time_shared", "report"]

KEYS = ("routed", "shared", "sequential", "overlapped", "host_sequential", "host_overlapped")


def make_shared_weights(hidden: int, inter: int, count: int, experts: str, device: torch.device) -> ExpertWeights:
    """DeepSeek's shared experts as one expert of intermediate ``count * inter`` (the same on every rank):
    FP8 per-channel weights for ``experts == "fp8"``, else bf16."""
    gen = torch.Generator(device=device).manual_seed(4321)
    size = count * inter
    w13 = torch.randn(1, 2 * size, hidden, device=device, generator=gen, dtype=torch.bfloat16) * hidden**-0.5
    w2 = torch.randn(1, hidden, size, device=device, generator=gen, dtype=torch.bfloat16) * size**-0.5
    fmt = WeightFormat.FP8_CHANNEL if experts == "fp8" else WeightFormat.BF16
    return make_expert_weights(w13, w2, format=fmt)


def time_shared(x, ids, tw, weights, shared: ExpertWeights, kw: dict, device: torch.device, iters: int,
                host: bool) -> dict[str, float]:
    """This rank's seconds of the four steps (module docstring) and, with ``host``, the host time per call of
    the sequential and the overlapped step (NaN otherwise). ``kw``: ``moe_forward``'s keyword arguments."""
    barrier = dist.barrier
    alone: Callable[[], torch.Tensor] = lambda: shared_output(  # noqa: E731
        shared, x, rank=dist.get_rank(), expert_input_format=kw["expert_input_format"],
        global_scale=kw["global_scale"])
    steps = {
        "routed": lambda: moe_forward(x, ids, tw, weights, **kw),
        "shared": alone,
        "sequential": lambda: moe_forward(x, ids, tw, weights, **kw).add_(alone()),
        "overlapped": lambda: moe_forward(x, ids, tw, weights, shared_experts=shared, **kw),
    }
    t = {name: median_time(lambda i, f=f: f(), device, iters=iters, barrier=barrier) for name, f in steps.items()}
    for name in ("sequential", "overlapped"):
        t[f"host_{name}"] = loop_time(steps[name], device, barrier=barrier)[1] if host else float("nan")
    return t


def report(results: list[dict], *, world: int, device: torch.device, experts: str, shape, count: int,
           json_path: str | None) -> int:
    """Print the table of a ``--shared-experts`` run (rank 0's ``results``) and write its JSON."""
    base = {(r["regime"], tuple(r["sizes"])): r["seconds"]["sequential"] for r in results
            if r["strategy"] == "allreduce"}
    rows = []
    for r in results:
        s = r["seconds"]
        r["overlapped_vs_sequential"] = s["overlapped"] / s["sequential"]
        r["overlapped_vs_routed_plus_shared"] = s["overlapped"] / (s["routed"] + s["shared"])
        # no allreduce run (--combine-formats without bf16): n/a
        r["speedup_vs_allreduce_sequential"] = base.get((r["regime"], tuple(r["sizes"])), float("nan")) / s["overlapped"]
        rows.append([r["regime"], r["pattern"], str(r["sizes"]), r["strategy"]]
                    + [s[k] * 1e6 for k in ("routed", "shared", "sequential", "overlapped")]
                    + [r["overlapped_vs_sequential"], r["overlapped_vs_routed_plus_shared"],
                       r["speedup_vs_allreduce_sequential"], s["host_sequential"] * 1e6, s["host_overlapped"] * 1e6])
    title = (f"MoE layer step with {count} shared expert(s) (intermediate {count * shape.inter}), world size "
             f"{world}, {device_name(device)}: {experts} experts, hidden {shape.hidden}, intermediate "
             f"{shape.inter}, {shape.experts} routed experts, top-{shape.topk}")
    print_table(title, ["regime", "pattern", "sizes", "strategy", "routed only (us)", "shared only (us)",
                        "sequential (us)", "overlapped (us)", "overlapped / sequential",
                        "overlapped / (routed + shared)", "speedup vs allreduce sequential",
                        "host sequential (us)", "host overlapped (us)"], rows,
                caption="routed only = moe_forward without shared experts; shared only = the shared experts alone "
                        "on the rank's rows; sequential = moe_forward, then the shared experts, then the sum, on "
                        "one stream (SGLang's DP path); overlapped = moe_forward(shared_experts=...), the shared "
                        "experts during the dispatch. Medians, max over ranks; host = host time per call issued "
                        "back to back (CUDA, decode); n/a: not measured.")
    if json_path is not None:
        write_json(json_path, device, {"world_size": world, "expert_weights": experts, "shape": shape.__dict__,
                                       "shared_experts": count, "shared_intermediate": count * shape.inter,
                                       "results": results})
    return 0
