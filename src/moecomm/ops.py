"""moecomm's entry points as ``torch.library`` custom ops, for models compiled with ``torch.compile``.

Dynamo cannot trace ``torch.distributed`` calls, host-side size arithmetic and Triton launches without
graph breaks, and it bakes Python ints into the graph. Each public entry point therefore has an opaque
custom op in the ``moecomm`` namespace, registered beside the function it wraps, with a fake (meta)
implementation that gives the output shapes without running anything::

    moecomm::moe_forward(Tensor hidden, Tensor topk_ids, Tensor topk_weights, Tensor sizes,
        Tensor?[] experts, str activation, str weight_format, SymInt first_expert, SymInt num_experts,
        str strategy, Tensor? global_scale, float? global_scale_value, str? expert_input_format,
        str group_name, bool pack, str algorithm, bool validate, bool? allow_quantized,
        SymInt? chunks, str combine_format) -> Tensor      # shaped like hidden: [sizes[rank], H] bf16
                                                           # (moecomm.layer.step)
    moecomm::moe_forward_counted(Tensor hidden, Tensor topk_ids, Tensor topk_weights, Tensor num_tokens,
        SymInt max_tokens_per_rank, Tensor?[] experts, str activation, str weight_format, SymInt first_expert,
        SymInt num_experts, str strategy, Tensor? global_scale, float? global_scale_value,
        str? expert_input_format, str group_name, str algorithm, bool validate,
        bool? allow_quantized) -> Tensor                   # shaped like hidden: [n, H] bf16, device counts
                                                           # (moecomm.layer.counted)
    moecomm::quantize(Tensor x, str fmt, Tensor? global_scale, str backend) -> Tensor[]
                                                           # [data, scales] (+ the computed NVFP4 scale)
                                                           # (moecomm.quant.tensor)
    moecomm::all_gatherv(Tensor[] tensors, Tensor sizes, str group_name, str algorithm,
        bool validate) -> Tensor[]                         # each [sum(sizes), *trailing]
    moecomm::reduce_scatterv(Tensor tensor, Tensor sizes, str group_name, str algorithm,
        bool validate, str wire_format) -> Tensor          # [sizes[rank], *trailing]
                                                           # (moecomm.comm.collectives)

This module gathers the Python wrappers that call each op (the public functions call them only while
Dynamo traces them, or when ``sizes`` is a CPU tensor) and :func:`sizes_tensor`. ``sum(sizes)`` and
``sizes[rank]`` are not known while tracing: those fakes return a new data-dependent size
(``torch.library.get_ctx().new_dynamic_size()``); ``torch._check`` it against a known size where a model
needs one. ``moe_forward`` needs none: its output has ``hidden``'s shape.

**How sizes enter: a CPU int64 tensor** (:func:`sizes_tensor`): its values are read when the op runs and
never baked into a graph, so new sizes never recompile (:mod:`moecomm.comm._library`).

**CUDA graphs.** ``moe_forward``, ``all_gatherv`` and ``reduce_scatterv`` read ``sizes`` on the host when
they run, so a CUDA graph must never capture them. They carry the ``cudagraph_unsafe`` tag: under
``torch.compile(mode="reduce-overhead")`` Inductor splits the graph around them (graph partitions) and
captures only the parts between them. To replay a whole MoE layer, collectives included, from one CUDA
graph, use :class:`moecomm.layer.GraphedMoE`. ``quantize`` touches device memory only and may be
captured. ``moe_forward_counted`` (``moe_forward`` with ``num_tokens`` on the device) reads nothing on the
host: it has no ``cudagraph_unsafe`` tag, and ``mode="reduce-overhead"`` captures it with the model.

Not ops: ``dispatch`` / ``combine`` (the handle carries a layout that depends on the sizes' values;
compile ``moe_forward`` instead) and the format quantizers (``quantize_nvfp4`` ...; call
:func:`moecomm.quant.quantize`). Importing :mod:`moecomm` registers every op.
"""

from moecomm.comm.collectives import all_gatherv_op as all_gatherv
from moecomm.comm.collectives import reduce_scatterv_op as reduce_scatterv
from moecomm.comm.collectives import sizes_tensor
from moecomm.layer.counted import moe_forward_counted_op as moe_forward_counted
from moecomm.layer.step import EXPERT_TENSORS
from moecomm.layer.step import moe_forward_op as moe_forward
from moecomm.quant.tensor import quantize_op as quantize

__all__ = ["EXPERT_TENSORS", "sizes_tensor", "moe_forward", "moe_forward_counted", "quantize", "all_gatherv",
           "reduce_scatterv"]
