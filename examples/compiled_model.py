"""A model with an EP MoE layer, compiled with ``torch.compile(fullgraph=True)``, serving steps on 2 ranks.

    python examples/compiled_model.py                           # 2 CPU ranks over gloo (NCCL when 2 GPUs are visible)
    torchrun --nproc-per-node 2 examples/compiled_model.py      # the same 2 ranks, started by torchrun

``moe_forward`` enters the compiled graph as the custom op ``moecomm::moe_forward`` (:mod:`moecomm.ops`),
so the graph does not break. Every step has other token counts: ``sizes`` goes in as a CPU int64 tensor
(``sizes_tensor``), whose values the op reads when it runs, so a new list does not recompile; the token
dimension of the input is marked unbacked, so one graph serves every count, 0 and 1 included.
tests/test_compile.py runs ``serve`` and this file's ``MoEBlock`` for every strategy.
"""

import os

import torch
import torch.distributed as dist
from torch._dynamo.decorators import mark_unbacked
from torch._dynamo.utils import counters

from moecomm.comm import gather_sizes, launch, rank_device
from moecomm.layer import moe_forward
from moecomm.moe import make_expert_weights
from moecomm.ops import sizes_tensor
from moecomm.quant import QuantFormat, nvfp4_global_scale

HIDDEN, INTER, EXPERTS, TOPK = 128, 64, 8, 2


class MoEBlock(torch.nn.Module):
    """``down(moe(up(x)))``: a bf16 linear, a top-k routed MoE layer over the ranks, a bf16 linear.

    ``experts``: this rank's :class:`moecomm.moe.ExpertWeights`; the other arguments as for ``moe_forward``
    (``global_scale``: the layer's static NVFP4 scale, a tensor kept as a buffer). The dense weights are
    drawn from ``seed``, so every rank holds the same.
    """

    def __init__(self, experts, *, strategy="auto", global_scale=None, expert_input_format=None, seed=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # seeded (on the CPU), the caller's random state untouched
            torch.manual_seed(seed)
            self.up = torch.nn.Linear(HIDDEN, HIDDEN, bias=False, dtype=torch.bfloat16)
            self.router = torch.nn.Linear(HIDDEN, EXPERTS, bias=False, dtype=torch.bfloat16)
            self.down = torch.nn.Linear(HIDDEN, HIDDEN, bias=False, dtype=torch.bfloat16)
        self.experts, self.strategy, self.expert_input_format = experts, strategy, expert_input_format
        self.register_buffer("global_scale", global_scale)
        self.to(experts.w13.device)

    def route(self, h):
        """Mixtral routing: the top-k router logits, softmax over those k (``ids`` int64, ``weights`` fp32).

        The softmax runs in float64 and rounds to fp32, so that Inductor's generated exp and eager's give
        the same weights (in fp32 they differ in the last bit) and compiled outputs match eager bit for bit.
        """
        logits, ids = torch.topk(self.router(h).float(), TOPK)
        return ids, logits.double().softmax(dim=-1).float()

    def forward(self, x, sizes, live=None):
        """``x`` ``bf16 [sizes[rank], HIDDEN]``; ``sizes`` a CPU int64 tensor (compiled) or a list. ``live``:
        optional bool ``[rows]``; rows where it is False (bucket padding) route to no expert (ids -1)."""
        h = self.up(x)
        ids, weights = self.route(h)
        if live is not None:
            ids = torch.where(live[:, None], ids, -1)
        y = moe_forward(h, ids, weights, self.experts, sizes=sizes, strategy=self.strategy,
                        global_scale=self.global_scale, expert_input_format=self.expert_input_format)
        return self.down(y)


def serve() -> str:
    """Runs on every rank: three steps of different token counts through one compiled graph."""
    rank, world, device = dist.get_rank(), dist.get_world_size(), rank_device()
    if world != 2:
        raise ValueError(f"the steps below give the token counts of 2 ranks, not of {world}")
    gen = torch.Generator().manual_seed(0)  # the same layer on every rank; each keeps EXPERTS / world experts
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, generator=gen) / INTER**0.5
    experts = make_expert_weights(w13.to(device), w2.to(device), ep_size=world, ep_rank=rank)
    model = MoEBlock(experts, strategy="agrs-nvfp4", global_scale=nvfp4_global_scale(4.0),
                     expert_input_format=QuantFormat.NVFP4)
    compiled = torch.compile(model, fullgraph=True)
    for step, tokens in enumerate([(3, 5), (0, 7), (6, 1)]):  # this step's tokens on rank 0, rank 1, ...
        n = tokens[rank]
        x = torch.randn(n, HIDDEN, generator=torch.Generator().manual_seed(10 * step + rank)).bfloat16().to(device)
        mark_unbacked(x, 0)  # the token count is any size, 0 and 1 included: no recompile per count
        sizes = gather_sizes(n)  # or the engine's DP metadata
        with torch.no_grad():
            out = compiled(x, sizes_tensor(sizes))  # a tensor: new values, same graph
            assert torch.equal(out, model(x, sizes)), "compiled and eager differ"
    assert counters["stats"]["unique_graphs"] == 1, "compiled more than once"
    return "ok"


if __name__ == "__main__":  # needed: launch spawns processes that import this file
    results = launch(serve, 2)  # spawned: both ranks' results; under torchrun: this process's only
    assert results and all(r == "ok" for r in results), results
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank's process gets here: print once
        print("ok")
