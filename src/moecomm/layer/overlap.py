"""The layer step in chunks, the communication of one chunk overlapping the experts of another (TensorRT-LLM's
chunked MoE): :func:`pipelined`, which :func:`moecomm.layer.step.moe_forward` runs for ``chunks > 1``.

Where it pays: only where the communication takes long enough to hide behind the experts AND the experts
lose little by running on fewer rows at a time. At DeepSeek-V3 prefill shapes on 2 H200s it did not pay
(1.23-1.46x slower than one chunk, docs/benchmarks.md runs G and H): every chunk re-reads all local
experts' weights and halves the rows per GEMM. The default (``chunks=None``) picks 1 unless a measured
entry in ``data/crossover.json`` says otherwise.
"""

from __future__ import annotations

import os

import torch

from moecomm.layer.exchange import combine
from moecomm.quant import QuantizedTensor

__all__ = ["pipelined", "CARVEOUT_ENV"]

_COMM_STREAMS: dict = {}
CARVEOUT_ENV = "MOECOMM_OVERLAP_SM_CARVEOUT"  # SMs the expert GEMMs leave free while chunks overlap (default 0)


def _gathered_tensors(tokens, ids, tw) -> list[torch.Tensor]:
    return ([tokens.data, tokens.scales] if isinstance(tokens, QuantizedTensor) else [tokens]) + [ids, tw]


def pipelined(send, compute, hidden, topk_ids, topk_weights, sizes: list[int], rank: int, chunks: int,
               algorithm, combine_format="bf16") -> torch.Tensor:
    """:func:`moe_forward` in ``chunks`` pieces, the communication overlapping the experts on CUDA.

    Streams (``main`` = the caller's stream, ``comm`` = one side stream per device): every dispatch runs on
    ``comm`` in chunk order; the experts of chunk ``c`` run on ``main`` after the dispatch of ``c``; the
    combine of ``c`` runs on ``comm`` after those experts and writes this rank's rows of ``c`` into the
    output; ``main`` waits for ``comm`` before returning. Tensors made on one stream and used on the other
    are recorded there (``Tensor.record_stream``), so the caching allocator never reuses their memory while
    the other stream may still read it. While overlapping, the expert GEMMs may leave SMs to the
    communication kernels (``MOECOMM_OVERLAP_SM_CARVEOUT``, torch's experimental SM carveout, which its
    grouped GEMMs honour). On a CPU the chunks run one after another.
    """
    n = hidden.shape[0]
    bounds = [[s * c // chunks for c in range(chunks + 1)] for s in sizes]
    pieces = [([b[c + 1] - b[c] for b in bounds], slice(bounds[rank][c], bounds[rank][c + 1])) for c in range(chunks)]
    out = hidden.new_empty((n, hidden.shape[1]))
    if not hidden.is_cuda:
        for chunk_sizes, rows in pieces:
            tokens, ids, tw, handle = send(hidden[rows], topk_ids[rows], topk_weights[rows], chunk_sizes)
            combine(compute(tokens, ids, tw), handle, out=out[rows], algorithm=algorithm, combine_format=combine_format)
        return out
    main = torch.cuda.current_stream(hidden.device)
    comm = _COMM_STREAMS.get(hidden.device)
    if comm is None:
        comm = _COMM_STREAMS[hidden.device] = torch.cuda.Stream(hidden.device)
    comm.wait_stream(main)
    for t in (hidden, topk_ids, topk_weights, out):
        t.record_stream(comm)
    sent = []
    with torch.cuda.stream(comm):
        for chunk_sizes, rows in pieces:
            gathered = send(hidden[rows], topk_ids[rows], topk_weights[rows], chunk_sizes)
            done = torch.cuda.Event()
            done.record(comm)
            sent.append((gathered, done))
    carveout = int(os.environ.get(CARVEOUT_ENV, "0"))
    previous = torch._C._get_sm_carveout_experimental()
    for (_, rows), ((tokens, ids, tw, handle), done) in zip(pieces, sent):
        main.wait_event(done)
        for t in _gathered_tensors(tokens, ids, tw):
            t.record_stream(main)
        torch._C._set_sm_carveout_experimental(carveout or previous)
        try:
            partial = compute(tokens, ids, tw)
        finally:
            torch._C._set_sm_carveout_experimental(previous)
        partial.record_stream(comm)
        comm.wait_stream(main)
        with torch.cuda.stream(comm):
            combine(partial, handle, out=out[rows], algorithm=algorithm, combine_format=combine_format)
    main.wait_stream(comm)
    return out
