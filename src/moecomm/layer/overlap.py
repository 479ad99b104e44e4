"""The layer step on moecomm's communication stream: :func:`pipelined`, which
:func:`moecomm.layer.step.moe_forward` runs for ``chunks > 1`` (TensorRT-LLM's chunked MoE: the
communication of one chunk overlapping the experts of another) and with shared experts (the shared experts
on the caller's stream during the dispatch, :mod:`moecomm.layer.shared`).

Where chunks do not pay, and why. Chunking can only pay where the communication takes long enough to hide
behind the experts AND the experts lose little by running on fewer rows at a time. At DeepSeek-V3 prefill
shapes (4096 and 8192 tokens per rank, FP8 experts) on 2 H200s it lost: the step took 1.23-1.46x the time
of one chunk with 2 chunks and more with 4 (docs/benchmarks.md, runs G and H), because every chunk
re-reads all local experts' weights (128 experts, 5.6 GB of FP8 weights per rank, about 1.2 ms at the copy
bandwidth) and halves the rows per grouped GEMM, which costs more than the 0.5-0.9 ms of communication
there is to hide (in decode the weight reads dominate the step even more). The default
(``chunks=None``) therefore picks 1 unless a measured entry in ``data/crossover.json`` says otherwise; the
overlap that can pay gives the communication other work instead: shared experts (``shared_experts``) or
another micro-batch (``dispatch`` / ``combine`` with ``async_op=True``).
"""

from __future__ import annotations

import torch

from moecomm.layer.asynchronous import communication_stream, leaving_sms, tensors_in
from moecomm.layer.exchange import combine
from moecomm.layer.shared import SharedOutput

__all__ = ["pipelined"]


def pipelined(send, compute, hidden, topk_ids, topk_weights, sizes: list[int], rank: int, chunks: int,
              algorithm, shared=None, combine_format="bf16") -> torch.Tensor:
    """:func:`moe_forward` in ``chunks`` pieces (1 or more), the communication overlapping the experts and the
    shared experts (``shared``: ``hidden -> bf16 [n, H]`` or None) on CUDA; every combine in ``combine_format``.

    Streams (``main`` = the caller's stream, ``comm`` = moecomm's communication stream,
    :func:`~moecomm.layer.asynchronous.communication_stream`): every dispatch runs on ``comm`` in chunk
    order; the shared experts run on ``main`` while the first dispatch is in flight; the experts of chunk
    ``c`` run on ``main`` after the dispatch of ``c``; the combine of ``c`` runs on ``comm`` after those
    experts and writes this rank's rows of ``c`` into the output; ``main`` waits for ``comm``, then adds
    the shared output. Tensors made on one stream and used on the other are recorded there
    (``Tensor.record_stream``), so the caching allocator never reuses their memory while the other stream
    may still read it. While overlapping, the GEMMs may leave SMs to the communication kernels
    (``MOECOMM_OVERLAP_SM_CARVEOUT``). On a CPU the chunks run one after another, then the shared experts.
    """
    n = hidden.shape[0]
    bounds = [[s * c // chunks for c in range(chunks + 1)] for s in sizes]
    pieces = [([b[c + 1] - b[c] for b in bounds], slice(bounds[rank][c], bounds[rank][c + 1])) for c in range(chunks)]
    out = hidden.new_empty((n, hidden.shape[1]))
    if not hidden.is_cuda:
        for chunk_sizes, rows in pieces:
            tokens, ids, tw, handle = send(hidden[rows], topk_ids[rows], topk_weights[rows], chunk_sizes)
            combine(compute(tokens, ids, tw), handle, out=out[rows], algorithm=algorithm, combine_format=combine_format)
        return SharedOutput(shared, hidden).add_to(out)
    main = torch.cuda.current_stream(hidden.device)
    comm = communication_stream(hidden.device)
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
    with leaving_sms():
        extra = SharedOutput(shared, hidden)
    for (_, rows), ((tokens, ids, tw, handle), done) in zip(pieces, sent):
        main.wait_event(done)
        for t in tensors_in((tokens, ids, tw)):
            t.record_stream(main)
        with leaving_sms():
            partial = compute(tokens, ids, tw)
        partial.record_stream(comm)
        comm.wait_stream(main)
        with torch.cuda.stream(comm):
            combine(partial, handle, out=out[rows], algorithm=algorithm, combine_format=combine_format)
    main.wait_stream(comm)
    return extra.add_to(out)
