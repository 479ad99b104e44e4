"""The demo's oracle: the original fp32 model in one process, its NVFP4 calibration, the exact MoE
reference, and how a distributed run is compared with the oracle (:func:`compare`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from moecomm.demo.moefied import MoEPlan

__all__ = ["Oracle", "run_oracle", "run_moe_reference", "compare"]


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
    from moecomm.demo.minilm import MiniLM, load_tokenizer, tokenize
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
    from moecomm.demo.minilm import MiniLM, load_tokenizer, moe_ffn_ref, moefy, tokenize

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
