"""One EP MoE layer step with DP attention on N ranks: quantize to NVFP4 before the all-gather.

    python examples/quickstart.py                               # 2 ranks: gloo on CPU, NCCL with 2 GPUs
    torchrun --nproc-per-node 3 examples/quickstart.py          # any number of ranks, started by torchrun

Each rank holds a different number of tokens. ``moe_forward`` quantizes them to NVFP4 with the layer's
static global scale, gathers every rank's tokens (allgatherv), runs this rank's experts on all of them
and returns this rank's rows of the sum over all experts (reducescatterv). The result is compared with
the same MoE computed in one process, and with the bf16 ``agrs`` strategy (bit-identical, since these
experts quantize their input to NVFP4 anyway). Every rank checks its rows; rank 0 prints its error, then ``ok``.
"""

import torch
import torch.distributed as dist

from moecomm.comm import gather_sizes, launch, rank_device
from moecomm.layer import moe_forward, wire_bytes_per_token
from moecomm.moe import experts_forward_ref, make_expert_weights, topk_softmax
from moecomm.quant import QuantFormat, nvfp4_global_scale

HIDDEN, INTER, EXPERTS_PER_RANK, TOPK = 256, 128, 4, 2


def layer_step() -> tuple[int, float]:
    """Runs on every rank (a module-level function: ranks are spawned processes); returns (rank, error)."""
    rank, world, device = dist.get_rank(), dist.get_world_size(), rank_device()
    num_experts = EXPERTS_PER_RANK * world  # the experts must be a multiple of the world size (EP over all ranks)
    # The layer's weights are the same on every rank; each rank keeps EXPERTS_PER_RANK of them.
    gen = torch.Generator().manual_seed(0)
    w13 = torch.randn(num_experts, 2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5  # [E, 2I, H]: gate; up
    w2 = torch.randn(num_experts, HIDDEN, INTER, generator=gen) / INTER**0.5  # [E, H, I]
    experts = make_expert_weights(w13.to(device), w2.to(device), ep_size=world, ep_rank=rank)
    global_scale = nvfp4_global_scale(4.0)  # static per layer: 448 * 6 / calibrated amax

    # This rank's tokens after attention, a different count on every rank, and its router's logits (seeded:
    # the same numbers every run).
    gen = torch.Generator().manual_seed(rank)
    hidden = torch.randn(3 + 5 * rank, HIDDEN, generator=gen).bfloat16().to(device)
    logits = torch.randn(hidden.shape[0], num_experts, generator=gen).to(device)
    topk_ids, topk_weights = topk_softmax(logits, TOPK)
    sizes = gather_sizes(hidden.shape[0])  # tokens of every rank, e.g. [3, 8]

    out = moe_forward(hidden, topk_ids, topk_weights, experts, sizes=sizes, strategy="agrs-nvfp4",
                      global_scale=global_scale, expert_input_format=QuantFormat.NVFP4)
    bf16_wire = moe_forward(hidden, topk_ids, topk_weights, experts, sizes=sizes, strategy="agrs",
                            global_scale=global_scale, expert_input_format=QuantFormat.NVFP4)
    assert torch.equal(out, bf16_wire), "quantizing before the gather must equal quantizing after it"

    # The same layer in one process, on this rank's tokens (routing is per token, so rows suffice).
    everything = make_expert_weights(w13.to(device), w2.to(device))
    ref = experts_forward_ref(hidden, topk_ids, topk_weights, everything, input_format=QuantFormat.NVFP4,
                              global_scale=global_scale.to(device))
    error = ((out.float() - ref).norm() / ref.norm()).item()
    assert error < 2e-2, (rank, error)
    if rank == 0:
        nvfp4, bf16 = (wire_bytes_per_token(s, HIDDEN, TOPK) for s in ("agrs-nvfp4", "agrs"))
        print(f"sizes {sizes}: relative error vs one process {error:.2e}; "
              f"bytes per token {nvfp4} (NVFP4) vs {bf16} (bf16)")
    return rank, error


if __name__ == "__main__":  # needed: launch spawns processes that import this file
    # Spawned: every rank's (rank, error), after all passed. Under torchrun: this process's rank only,
    # returned after every rank has finished its step (launch ends with a barrier).
    results = launch(layer_step, world_size=2)
    if results[0][0] == 0:
        print("ok")
