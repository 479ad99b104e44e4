"""Two micro-batches: the attention of one runs while the MoE communication of the other is in flight.

    python examples/two_microbatches.py [WORLD_SIZE]    # default 2 CPU ranks over gloo (NCCL with enough GPUs)

SGLang's two-batch overlap and vLLM's dual-batch overlap split a step's tokens into two micro-batches, A
and B, and interleave their layers so that the communication of one hides behind the compute of the
other. ``dispatch(..., async_op=True)`` and ``combine(..., async_op=True)`` return at once; the collective
runs on moecomm's communication stream, and ``wait()`` on what they return makes the compute stream wait
for it (a CUDA event, no host sync). One layer of the schedule below (attention, then an EP MoE):

    compute stream (the caller's)       communication stream (moecomm's)
    attention(B)                        dispatch(A)
    experts(A)                          dispatch(B)
    experts(B)                          combine(A)
    next layer's attention(A)           combine(B)

Every rank issues the collectives in the same order (dispatch A, dispatch B, combine A, combine B per
layer). The result equals running the micro-batches one after the other through ``moe_forward``, bit for
bit: the script checks it on every rank. On a CPU the same calls run synchronously, in the same order.
"""

import sys

import torch
import torch.distributed as dist

from moecomm.comm import gather_sizes, launch, rank_device
from moecomm.layer import combine, dispatch, moe_forward
from moecomm.moe import experts_forward, make_expert_weights, topk_softmax

HIDDEN, INTER, EXPERTS_PER_RANK, TOPK, LAYERS = 128, 64, 4, 2, 2
STRATEGY = "agrs"  # bf16 allgatherv + reducescatterv; any strategy works the same way


class Layer:
    """One decoder layer: single-head causal self-attention over a micro-batch, then an EP MoE (this rank's
    experts). The same weights on every rank (seeded)."""

    def __init__(self, index: int, rank: int, world: int, device: torch.device):
        gen = torch.Generator().manual_seed(100 + index)
        experts = EXPERTS_PER_RANK * world
        self.wqkv = (torch.randn(3 * HIDDEN, HIDDEN, generator=gen) / HIDDEN**0.5).to(device)
        self.wo = (torch.randn(HIDDEN, HIDDEN, generator=gen) / HIDDEN**0.5).to(device)
        self.router = torch.randn(experts, HIDDEN, generator=gen).to(device)
        w13 = torch.randn(experts, 2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5
        w2 = torch.randn(experts, HIDDEN, INTER, generator=gen) / INTER**0.5
        self.experts = make_expert_weights(w13.to(device), w2.to(device), ep_size=world, ep_rank=rank)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """``x + attention(x)``, bf16 ``[n, H]`` (float32 math)."""
        q, k, v = (x.float() @ self.wqkv.T).chunk(3, dim=-1)
        scores = (q @ k.T) / HIDDEN**0.5
        causal = torch.ones_like(scores, dtype=torch.bool).tril()
        a = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1) @ v
        return (x.float() + a @ self.wo.T).bfloat16()

    def route(self, h: torch.Tensor):
        return topk_softmax(h.float() @ self.router.T, TOPK)


def residual(h: torch.Tensor, moe_out: torch.Tensor) -> torch.Tensor:
    return (h.float() + moe_out.float()).bfloat16()


def one_after_the_other(layers, x, sizes):
    """The reference: one micro-batch through all layers, ``moe_forward`` per layer."""
    for layer in layers:
        h = layer.attention(x)
        x = residual(h, moe_forward(h, *layer.route(h), layer.experts, sizes=sizes, strategy=STRATEGY))
    return x


def overlapped(layers, xa, xb, sizes_a, sizes_b):
    """Both micro-batches through all layers, the communication of one overlapping the compute of the other."""

    def dispatch_async(layer, h, sizes):
        return dispatch(h, *layer.route(h), sizes=sizes, strategy=STRATEGY, async_op=True)

    def experts_then_combine(layer, pending):
        tokens, topk_ids, topk_weights, handle = pending.wait()  # the compute stream waits for the dispatch
        return combine(experts_forward(tokens, topk_ids, topk_weights, layer.experts), handle, async_op=True)

    ha = layers[0].attention(xa)
    dispatch_a = dispatch_async(layers[0], ha, sizes_a)
    for i, layer in enumerate(layers):
        hb = layer.attention(xb)  # B's attention while A's dispatch is in flight
        dispatch_b = dispatch_async(layer, hb, sizes_b)
        combine_a = experts_then_combine(layer, dispatch_a)  # A's experts while B's dispatch is in flight
        combine_b = experts_then_combine(layer, dispatch_b)  # B's experts while A's combine is in flight
        xa = residual(ha, combine_a.wait())
        if i + 1 < len(layers):  # A's next attention while B's combine is in flight
            ha = layers[i + 1].attention(xa)
            dispatch_a = dispatch_async(layers[i + 1], ha, sizes_a)
        xb = residual(hb, combine_b.wait())
    return xa, xb


def step() -> bool:
    """Runs on every rank (a module-level function: ranks are spawned processes)."""
    rank, world, device = dist.get_rank(), dist.get_world_size(), rank_device()
    layers = [Layer(i, rank, world, device) for i in range(LAYERS)]
    gen = torch.Generator().manual_seed(rank)
    tokens = 7 - 3 * rank if rank < 3 else 2 + rank  # 7, 4, 1, 5, 6, ...: rank 2 has one token, all in A
    x = torch.randn(tokens, HIDDEN, generator=gen).bfloat16().to(device)
    xa, xb = x[: (tokens + 1) // 2], x[(tokens + 1) // 2 :]  # the two micro-batches of this rank
    sizes_a, sizes_b = gather_sizes(xa.shape[0]), gather_sizes(xb.shape[0])  # or the engine's DP metadata

    got_a, got_b = overlapped(layers, xa, xb, sizes_a, sizes_b)
    want_a, want_b = one_after_the_other(layers, xa, sizes_a), one_after_the_other(layers, xb, sizes_b)
    same = torch.equal(got_a, want_a) and torch.equal(got_b, want_b)
    if rank == 0:
        print(f"{world} ranks, micro-batch A sizes {sizes_a}, B sizes {sizes_b}: overlapped "
              f"{'equals' if same else 'DIFFERS FROM'} one after the other, bit for bit")
    return same


if __name__ == "__main__":  # needed: launch spawns processes that import this file
    world_size = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    results = launch(step, world_size)
    assert all(results), results
    print("ok")
