"""CUDA graphs of the layer step: :class:`GraphedMoE`, one graph per token bucket, every rank replaying the
same bucket (its rows padded with masked slots).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Sequence

import torch
import torch.distributed as dist

from moecomm._modes import kept_state, refuse_grad
from moecomm.comm.checks import check_sizes
from moecomm.comm.group import rank_and_world
from moecomm.layer.shared import SharedExperts
from moecomm.layer.step import moe_forward
from moecomm.layer.strategy import Strategy
from moecomm.moe import ExpertWeights, ids_int32
from moecomm.quant import QuantFormat

__all__ = ["GraphedMoE"]


class GraphedMoE:
    """:func:`moe_forward` captured in one CUDA graph per token bucket; all ranks replay the same bucket.

    A graph fixes every tensor size and every collective's counts, so all ranks replay a graph of the
    same bucket: the smallest captured bucket that holds the largest live token count of any rank. Each
    rank's rows are padded to the bucket with masked slots (``topk_ids = -1``), which the experts skip:
    the padding costs its bytes on the wire and its rows in the permute, no expert work. With equal
    sizes the dispatch and the combine are the native equal-size collectives.

    Parameters
    ----------
    weights : ExpertWeights of this rank.
    hidden_size, topk : int
    buckets : list[int], tokens per rank to capture (e.g. ``[1, 2, 4, ..., 256]`` for decode).
    strategy, global_scale, expert_input_format, group, chunks, combine_format : as for :func:`moe_forward`;
        ``"auto"`` and ``chunks=None`` are resolved per bucket at capture time (from ``bucket * world_size``
        tokens).
    shared_experts : as for :func:`moe_forward`, captured with the step (the shared experts on the capturing
        stream during the dispatch on the communication stream); a callable must be capturable. They run on
        all the bucket's rows, padding included (row-local: the live rows' output does not depend on them).

    Raises
    ------
    ValueError
        At construction without CUDA (a CPU machine, CPU weights), or with weights or a global scale that
        require grad in grad mode. At call time, on every rank alike, when the largest live token count
        exceeds the largest captured bucket (instead of a hang or an overrun); on shape/dtype mismatches;
        ``hidden`` or ``topk_weights`` requiring grad while grad mode is on (a replay has no backward).

    Notes
    -----
    The graphs run on the weights' GPU (``weights.w13.device``), whatever the calling thread's current
    device; the statics are normal tensors (not inference tensors), so a construction under
    ``torch.inference_mode()`` serves later calls in any grad mode.
    """

    def __init__(self, weights: ExpertWeights, *, hidden_size: int, topk: int, buckets: Sequence[int],
                 strategy: Strategy | str = Strategy.AUTO, global_scale: torch.Tensor | None = None,
                 expert_input_format: QuantFormat | None = None, group: dist.ProcessGroup | None = None,
                 chunks: int | None = None, combine_format: str = "bf16",
                 shared_experts: SharedExperts | None = None):
        if not buckets or any(isinstance(b, bool) or int(b) != b or b < 1 for b in buckets):
            raise ValueError(f"buckets must be positive integers, got {buckets}")
        if not torch.cuda.is_available() or weights.w13.device.type != "cuda":
            raise ValueError("GraphedMoE captures CUDA graphs: it needs a CUDA device, CUDA expert weights and an "
                             "NCCL group (on a CPU, call moe_forward)")
        self.buckets = sorted(set(int(b) for b in buckets))
        self.group = group
        self.topk = topk
        self.rank, self.world_size = rank_and_world(group)
        # the weights' GPU: never the calling thread's current device (0 in a new thread)
        self.device = weights.w13.device
        refuse_grad("GraphedMoE", global_scale=global_scale,
                    **{f"weights.{f.name}": getattr(weights, f.name) for f in fields(weights)})
        self._graphs = {}
        # statics and graphs are kept between calls: normal tensors whatever the caller's grad mode
        with kept_state(), torch.cuda.device(self.device):
            for bucket in self.buckets:
                hidden = torch.zeros(bucket, hidden_size, dtype=torch.bfloat16, device=self.device)
                ids = torch.full((bucket, topk), -1, device=self.device, dtype=torch.int32)
                tw = torch.zeros(bucket, topk, dtype=torch.float32, device=self.device)

                def step(hidden=hidden, ids=ids, tw=tw, bucket=bucket):
                    return moe_forward(hidden, ids, tw, weights, sizes=[bucket] * self.world_size, strategy=strategy,
                                       global_scale=global_scale, expert_input_format=expert_input_format,
                                       group=group, chunks=chunks, combine_format=combine_format,
                                       shared_experts=shared_experts)

                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up: kernels compiled, communicators and buffers created
                    step()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = step()
                self._graphs[bucket] = (graph, hidden, ids, tw, out)
        self._live = dict.fromkeys(self.buckets, 0)  # rows of each bucket's static ids that are not -1

    def bucket_for(self, num_tokens: int, sizes: Sequence[int] | None = None) -> int:
        """The bucket all ranks replay: the smallest that holds ``max(sizes)``.

        With ``sizes`` (the same list on every rank, e.g. the engine's DP metadata or :func:`gather_sizes`)
        nothing is communicated and the host never waits. Without it, the maximum of ``num_tokens`` over the
        ranks is taken with one small all-reduce, read on the host (a sync; collective: call on every rank).
        """
        if sizes is not None:
            sizes = check_sizes(sizes, self.world_size)
            if sizes[self.rank] != num_tokens:
                raise ValueError(f"rank {self.rank}: {num_tokens} tokens but sizes[{self.rank}] = "
                                 f"{sizes[self.rank]}")
            most = max(sizes)
        else:
            n = torch.tensor([num_tokens], device=self.device)
            dist.all_reduce(n, op=dist.ReduceOp.MAX, group=self.group)
            most = int(n.item())
        for b in self.buckets:
            if b >= most:
                return b
        raise ValueError(f"a rank has {most} tokens, more than the largest captured bucket "
                         f"{self.buckets[-1]}: capture a larger bucket or run eagerly")

    def __call__(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                 sizes: Sequence[int] | None = None) -> torch.Tensor:
        """Replay on this rank's ``bf16 [n, hidden]`` tokens; returns ``bf16 [n, hidden]``.

        ``sizes``: every rank's token count, the same list on every rank; with it the replay never waits for
        the GPU (:meth:`bucket_for`). The result is a view of the graph's static output, overwritten by the
        next call.
        """
        refuse_grad("GraphedMoE", hidden=hidden, topk_weights=topk_weights)
        n = hidden.shape[0]
        if topk_ids.shape != (n, self.topk) or topk_weights.shape != (n, self.topk):
            raise ValueError(f"topk_ids {tuple(topk_ids.shape)} / topk_weights {tuple(topk_weights.shape)} "
                             f"must be [{n}, {self.topk}]")
        bucket = self.bucket_for(n, sizes)
        graph, s_hidden, s_ids, s_tw, out = self._graphs[bucket]
        s_hidden[:n].copy_(hidden)
        s_ids[:n].copy_(ids_int32(topk_ids))
        s_tw[:n].copy_(topk_weights)
        if self._live[bucket] > n:  # rows a larger call wrote: masked again (their hidden / weights are unread)
            s_ids[n : self._live[bucket]].fill_(-1)
        self._live[bucket] = n
        with torch.cuda.device(self.device):  # replay launches on the current device's current stream
            graph.replay()
        return out[:n]
