"""A 2-layer MoE transformer served as SGLang, vLLM and TensorRT-LLM serve DeepSeek-style models: attention
data-parallel (each rank runs its own requests), experts expert-parallel (each rank holds E / world_size of
them), the MoE step through moecomm. Built only from moecomm's public API; docs/integration.md walks through it.

    python examples/integration.py                      # 3 ranks: gloo on CPU, NCCL with 3 GPUs; the last one idle
    python examples/integration.py --world-size 4
    torchrun --nproc-per-node 3 examples/integration.py

Every rank holds every layer's dense weights (attention, norms, router) and its share of the experts. A
scheduler (here: a fixed assignment every rank computes alike) gives each rank its requests, and the last
rank none: an idle DP rank still takes part in every MoE step, with zero rows, because its experts serve the
other ranks' tokens. ``sizes`` (tokens per rank) comes from that shared metadata, as an engine's DP metadata
gives it; ``gather_sizes`` would give the same list with one small all-gather. The experts consume NVFP4
with a static per-layer global scale calibrated on other prompts, so ``strategy="auto"`` may quantize before
the all-gather; what it picked and why is printed (``explain_strategy``).

The result is checked against an independent reference: the same model in float32 in one process, written
without moecomm (NVFP4 fake-quantized from docs/formats.md, every expert a dense loop). A token whose top-k
experts differ between the bf16 model and the float32 reference (a near-tie of two router logits that bf16
rounding flips) is counted, not compared; all other tokens must agree to bf16 and NVFP4 precision.
"""

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moecomm.comm import gather_sizes, launch, rank_device
from moecomm.layer import explain_strategy, moe_forward
from moecomm.moe import make_expert_weights, topk_softmax
from moecomm.quant import QuantFormat, nvfp4_global_scale

HIDDEN, HEADS, INTER, EXPERTS_PER_RANK, TOPK, LAYERS = 128, 4, 64, 2, 2, 2
REQUESTS = [5, 3, 8, 1, 6, 4, 7]  # prompt lengths of the requests of this step
CALIBRATION = [9, 7, 12]  # prompt lengths of the calibration set (other prompts)


def make_weights(num_experts: int) -> list[dict]:
    """Every layer's weights, fp32, drawn from one seed: the same on every rank (an engine loads them)."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, fan_in):
        return torch.randn(*shape, generator=gen) / fan_in**0.5

    return [{"attn_norm": 1 + 0.1 * randn(HIDDEN, fan_in=1), "wqkv": randn(3 * HIDDEN, HIDDEN, fan_in=HIDDEN),
             "wo": randn(HIDDEN, HIDDEN, fan_in=HIDDEN), "ffn_norm": 1 + 0.1 * randn(HIDDEN, fan_in=1),
             "router": randn(num_experts, HIDDEN, fan_in=HIDDEN),
             "w13": randn(num_experts, 2 * INTER, HIDDEN, fan_in=HIDDEN),  # [E, 2I, H]: gate; up
             "w2": randn(num_experts, HIDDEN, INTER, fan_in=INTER)} for _ in range(LAYERS)]


def prompts(lengths: list[int], seed: int) -> list[torch.Tensor]:
    """Each request's embedded prompt, fp32 ``[length, HIDDEN]``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, HIDDEN, generator=gen) for n in lengths]


def schedule(num_requests: int, world: int) -> list[list[int]]:
    """The requests of each DP rank: round robin over all ranks but the last, which stays idle."""
    busy = max(world - 1, 1)
    return [[i for i in range(num_requests) if i % busy == r] if r < busy else [] for r in range(world)]


# ----------------------------------------------------------------------------------------------------
# The served model: bf16, on this rank's requests; the MoE step over all ranks with moecomm


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * weight).to(x.dtype)


def attention(x: torch.Tensor, wqkv: torch.Tensor, wo: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Causal multi-head self-attention of each request on its own tokens (``x`` holds them one after another)."""
    outs = []
    for seq in x.split(lengths):
        q, k, v = (seq @ wqkv.T).view(len(seq), 3, HEADS, HIDDEN // HEADS).permute(1, 2, 0, 3)
        outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(len(seq), HIDDEN))
    return torch.cat(outs) @ wo.T if outs else x.new_zeros(0, HIDDEN)


class Model:
    """The layers as a DP-attention / EP-MoE engine runs them on one rank.

    The MoE step takes and returns bf16, as in an engine; the dense parts run in float32 here (an engine
    runs them in bf16 too), so that the check against the reference sees the MoE step's own rounding.
    """

    def __init__(self, weights: list[dict], global_scales: list[torch.Tensor], rank: int, world: int, device):
        self.layers = []
        for w, gs in zip(weights, global_scales):
            layer = {k: w[k].to(device) for k in ("attn_norm", "wqkv", "wo", "ffn_norm", "router")}
            # this rank's share of the experts: E / world_size of them (bf16 weights), ep_size = world size
            layer["experts"] = make_expert_weights(w["w13"].to(device), w["w2"].to(device), ep_size=world,
                                                   ep_rank=rank)
            layer["global_scale"] = gs.to(device)  # static per layer, the same on every rank
            self.layers.append(layer)

    def forward(self, x: torch.Tensor, lengths: list[int], sizes: list[int]) -> tuple[torch.Tensor, list]:
        """``x`` ``[sizes[rank], HIDDEN]``: this rank's requests' tokens one after another; returns the
        output and the experts each token was routed to, per layer. Every rank calls it every step, also
        with no token."""
        routed = []
        for layer in self.layers:
            x = x + attention(rms_norm(x, layer["attn_norm"]), layer["wqkv"], layer["wo"], lengths)
            h = rms_norm(x, layer["ffn_norm"])
            topk_ids, topk_weights = topk_softmax(h @ layer["router"].T, TOPK)  # int32, fp32 [n, TOPK]
            y = moe_forward(h.bfloat16(), topk_ids, topk_weights, layer["experts"], sizes=sizes, strategy="auto",
                            global_scale=layer["global_scale"], expert_input_format=QuantFormat.NVFP4)
            x = x + y.float()
            routed.append(topk_ids)
        return x, routed


# ----------------------------------------------------------------------------------------------------
# The independent reference: the same model in float32, one process, no moecomm


def nvfp4_fake_quant(x: torch.Tensor, global_scale: float) -> torch.Tensor:
    """``x`` through NVFP4 and back, from docs/formats.md: blocks of 16, e4m3 block scales, e2m1 elements.
    (Nearest e2m1 value, ties to the smaller one: ties to even differ only on exact ties.)"""
    blocks = x.reshape(x.shape[0], -1, 16)
    scale = (global_scale * blocks.abs().amax(-1, keepdim=True) / 6).to(torch.float8_e4m3fn).float()
    y = torch.where(scale > 0, blocks * global_scale / scale, torch.zeros_like(blocks))
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    e2m1 = grid[(y.abs().clamp(max=6)[..., None] - grid).abs().argmin(-1)] * y.sign()
    return (e2m1 * scale / global_scale).reshape(x.shape)


def reference(weights: list[dict], global_scales: list[float], seqs: list[torch.Tensor], calibrate=False):
    """All requests in float32: ``(outputs, routed experts per layer)``; with ``calibrate``, the MoE input's
    amax per layer instead (what fixes the static NVFP4 global scales)."""
    x, lengths = torch.cat(seqs), [len(s) for s in seqs]
    routed, amax = [], []
    for i, w in enumerate(weights):
        x = x + attention(rms_norm(x, w["attn_norm"]), w["wqkv"], w["wo"], lengths)
        h = rms_norm(x, w["ffn_norm"])
        amax.append(h.abs().max())
        logits = h @ w["router"].T
        top, ids = logits.topk(TOPK, dim=-1)
        probs = top.softmax(-1)  # softmax over all experts, renormalised over the top k: the same
        hq = h if calibrate else nvfp4_fake_quant(h.bfloat16().float(), global_scales[i])  # moe_forward takes bf16
        out = torch.zeros_like(h)
        for e in range(w["w13"].shape[0]):
            gate, up = (hq @ w["w13"][e].T).chunk(2, dim=-1)
            expert = (F.silu(gate) * up) @ w["w2"][e].T
            out += expert * (probs * (ids == e)).sum(-1, keepdim=True)
        x = x + out
        routed.append(ids)
    return amax if calibrate else (x, routed)


# ----------------------------------------------------------------------------------------------------


def serve() -> dict:
    """Runs on every rank: one step of the requests, checked against the reference."""
    rank, world, device = dist.get_rank(), dist.get_world_size(), rank_device()
    weights = make_weights(EXPERTS_PER_RANK * world)  # the experts: a multiple of the world size
    # Calibration (offline, once): the MoE input's amax per layer on other prompts -> static global scales
    global_scales = [nvfp4_global_scale(a) for a in reference(weights, [], prompts(CALIBRATION, 1), True)]
    model = Model(weights, global_scales, rank, world, device)

    seqs = prompts(REQUESTS, 2)
    mine = schedule(len(seqs), world)
    sizes = [sum(len(seqs[i]) for i in reqs) for reqs in mine]  # the engine's DP metadata: no communication
    assert sizes == gather_sizes(sum(len(seqs[i]) for i in mine[rank]))  # what one all-gather would say
    lengths = [len(seqs[i]) for i in mine[rank]]
    x = torch.cat([seqs[i] for i in mine[rank]] or [torch.zeros(0, HIDDEN)]).to(device)
    with torch.no_grad():
        out, routed = model.forward(x, lengths, sizes)

    ref, ref_routed = reference(weights, [float(g) for g in global_scales], seqs)
    rows = torch.cat([torch.arange(sum(REQUESTS[:i]), sum(REQUESTS[: i + 1])) for i in mine[rank]] or
                     [torch.zeros(0, dtype=torch.long)])
    same = torch.ones(len(rows), dtype=torch.bool)
    for ids, ref_ids in zip(routed, ref_routed):
        same &= (ids.cpu().long().sort(-1).values == ref_ids[rows].sort(-1).values).all(-1)
    got, want = out.float().cpu()[same], ref[rows][same]
    # per rank: squared error, squared norm, tokens compared, tokens routed differently; summed over ranks
    stats = torch.tensor([(got - want).pow(2).sum(), want.pow(2).sum(), same.sum(), (~same).sum()],
                         dtype=torch.float64, device=device)
    dist.all_reduce(stats)
    error, compared, flipped = (stats[0] / stats[1]).sqrt().item(), int(stats[2]), int(stats[3])
    assert error < 2.5e-2 and flipped <= 0.1 * sum(sizes), (error, flipped)  # without NVFP4 in the reference: 6e-2
    if rank == 0:
        choice = explain_strategy(QuantFormat.NVFP4, sum(sizes), world_size=world)
        print(f"world size {world}, sizes {sizes} (rank {world - 1} idle)" if world > 1 else f"sizes {sizes}")
        print(f"strategy 'auto' -> {choice.strategy}: {choice.reason}")
        print(f"vs the float32 reference: relative error {error:.2e} over {compared} tokens; "
              f"{flipped} routed to other experts (router near-ties)")
        print("ok")
    return {"sizes": sizes, "error": error, "compared": compared, "flipped": flipped}


if __name__ == "__main__":  # needed: launch spawns processes that import this file
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=3, help="ranks (default 3; under torchrun: WORLD_SIZE)")
    launch(serve, parser.parse_args().world_size)
