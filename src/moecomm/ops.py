"""moecomm's entry points as ``torch.library`` custom ops, for models compiled with ``torch.compile``.

Dynamo cannot trace ``torch.distributed`` calls, host-side size arithmetic and Triton launches without
graph breaks, and it bakes Python ints into the graph. Each public entry point therefore has an opaque
custom op in the ``moecomm`` namespace, with a fake (meta) implementation that gives the output shapes
without running anything:

=================================================================================  ======================
op                                                                                  output rows (fake)
=================================================================================  ======================
``moecomm::moe_forward(Tensor hidden, Tensor topk_ids, Tensor topk_weights,          ``hidden.shape[0]``
Tensor sizes, Tensor?[] experts, str activation, str weight_format,
SymInt first_expert, SymInt num_experts, str strategy, Tensor? global_scale,
float? global_scale_value, str? expert_input_format, str group_name, bool pack,
str algorithm, bool validate, bool? allow_quantized, SymInt? chunks) -> Tensor``
``moecomm::quantize(Tensor x, str fmt, Tensor? global_scale, str backend)            ``x.shape[0]``
-> Tensor[]``
``moecomm::all_gatherv(Tensor[] tensors, Tensor sizes, str group_name,                ``sum(sizes)``: a new
str algorithm, bool validate) -> Tensor[]``                                          data-dependent size
``moecomm::reduce_scatterv(Tensor tensor, Tensor sizes, str group_name,               ``sizes[rank]``: a new
str algorithm, bool validate) -> Tensor``                                            data-dependent size
=================================================================================  ======================

Arguments that are not tensors, numbers or strings are flattened: :class:`moecomm.moe.ExpertWeights` into
its tensors (``experts``, in the order of :data:`EXPERT_TENSORS`) plus ``activation``, ``weight_format``,
``first_expert``, ``num_experts``; enums into their string values; a process group into its
``group_name`` (``""``: the default group), resolved at run time with
``torch.distributed.distributed_c10d._resolve_process_group``; a Python-number NVFP4 global scale into
``global_scale_value``. Each op's real implementation rebuilds the arguments and calls the public
Python function, so compiled and eager calls run the same code and give the same bytes.

**How sizes enter: a CPU int64 tensor.** Per-rank token counts change every step. A Python list of ints
would be baked into the graph as constants and guarded on, so every new list recompiles (or, once
Dynamo marks them dynamic, every size that becomes 0 or 1 does). A tensor's *values* are never guarded
on: the graph takes ``sizes`` as an input and the op reads it with ``tolist()`` when it runs. The tensor
lives on the CPU so that this read is a memory load, not a GPU sync (the same host-side ints the eager
API takes). Make it with :func:`sizes_tensor` (or ``torch.tensor(sizes)``) each step.

**Eager calls keep their host time.** The public functions (:func:`moecomm.dispatch.moe_forward`,
:func:`moecomm.quant.quantize`, :func:`moecomm.collectives.all_gatherv`,
:func:`moecomm.collectives.reduce_scatterv`) stay the API. They call these ops only while Dynamo traces
them (``torch.compiler.is_compiling()``) or when ``sizes`` is given as a tensor; an eager call with a
list of sizes never passes through the dispatcher (whose custom-op overhead is tens of microseconds),
it pays one ``is_compiling()`` check (a fraction of a microsecond). This module is imported on first
use, so ``import moecomm`` registers nothing; import ``moecomm.ops`` before loading a compiled artifact.

**CUDA graphs.** ``moe_forward``, ``all_gatherv`` and ``reduce_scatterv`` read ``sizes`` on the host
when they run, so a CUDA graph must never capture them (a replay would reuse the sizes of the capture).
They carry the ``cudagraph_unsafe`` tag: under ``torch.compile(mode="reduce-overhead")`` Inductor splits
the graph around them (graph partitions, the default) and captures the dense parts only, or skips CUDA
graphs for the whole graph without partitions. To replay the whole layer, collectives included, from
one CUDA graph, use :class:`moecomm.dispatch.GraphedMoE` (fixed token buckets, padded with masked slots).
``quantize`` touches only device memory and is capturable.

Not ops: ``dispatch`` / ``combine`` (their handle carries a size-dependent layout; compile
``moe_forward`` instead, or call them outside the compiled region) and the format quantizers
(``quantize_nvfp4`` ...; call :func:`moecomm.quant.quantize`).
"""

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "EXPERT_TENSORS",
    "sizes_tensor",
    "moe_forward",
    "quantize",
    "all_gatherv",
    "reduce_scatterv",
]

# The tensor fields of ExpertWeights, in the order of moe_forward's ``experts`` list
EXPERT_TENSORS = ("w13", "w2", "w13_scale", "w2_scale", "w13_global_scale", "w2_global_scale", "b13", "b2")
# (data dtype, scale dtype, elements per data byte or element, elements per scale; None: one per row)
_QUANT_LAYOUT = {
    "nvfp4": (torch.uint8, torch.float8_e4m3fn, 2, 16),
    "mxfp4": (torch.uint8, torch.uint8, 2, 32),
    "fp8-group": (torch.float8_e4m3fn, torch.float32, 1, 128),
    "fp8-token": (torch.float8_e4m3fn, torch.float32, 1, None),
}


def sizes_tensor(sizes: Sequence[int]) -> Tensor:
    """``sizes`` (rows per rank) as the CPU ``int64 [world_size]`` tensor the compiled entry points take.

    Passing this tensor (rather than the list) to a compiled model keeps the values out of the graph:
    no recompilation when they change (module docstring).
    """
    return torch.tensor(list(sizes), dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------
# Flattening: enums -> strings, groups -> names, CPU size tensors -> lists
# ----------------------------------------------------------------------------------------------------


def _value(choice) -> Optional[str]:
    """An enum member's string value (the string itself for a string, None for None)."""
    return getattr(choice, "value", choice)


def _group_name(group) -> str:
    return "" if group is None else group.group_name


def _group(name: str):
    """The process group of ``name`` (None, the default group, for ``""``)."""
    if not name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def _as_sizes(sizes) -> Tensor:
    """``sizes`` as the CPU integer tensor of the ops (a list becomes a constant of the graph)."""
    if isinstance(sizes, Tensor):
        if sizes.device.type != "cpu" or sizes.dtype not in (torch.int32, torch.int64) or sizes.dim() != 1:
            raise TypeError(f"sizes as a tensor must be a 1-D CPU int64 (or int32) tensor, got {sizes.dtype} "
                            f"{tuple(sizes.shape)} on {sizes.device} (a CUDA tensor would need a host sync)")
        return sizes
    return torch.tensor(list(sizes), dtype=torch.int64)


def _sizes_list(sizes: Tensor) -> list[int]:
    return sizes.tolist()


# ----------------------------------------------------------------------------------------------------
# moe_forward
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("moecomm::moe_forward", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def _moe_forward_op(
    hidden: Tensor,
    topk_ids: Tensor,
    topk_weights: Tensor,
    sizes: Tensor,
    experts: Sequence[Optional[Tensor]],
    activation: str,
    weight_format: str,
    first_expert: int,
    num_experts: int,
    strategy: str,
    global_scale: Optional[Tensor],
    global_scale_value: Optional[float],
    expert_input_format: Optional[str],
    group_name: str,
    pack: bool,
    algorithm: str,
    validate: bool,
    allow_quantized: Optional[bool],
    chunks: Optional[int],
) -> Tensor:
    from moecomm import dispatch
    from moecomm.moe import Activation, ExpertWeights, WeightFormat

    weights = ExpertWeights(**dict(zip(EXPERT_TENSORS, experts)), activation=Activation(activation),
                            format=WeightFormat(weight_format), first_expert=first_expert, num_experts=num_experts)
    out = dispatch.moe_forward(
        hidden, topk_ids, topk_weights, weights, sizes=_sizes_list(sizes), strategy=strategy,
        global_scale=global_scale if global_scale is not None else global_scale_value,
        expert_input_format=expert_input_format, group=_group(group_name), pack=pack, algorithm=algorithm,
        validate=validate, allow_quantized=allow_quantized, chunks=chunks)
    return out


@_moe_forward_op.register_fake
def _(hidden, topk_ids, topk_weights, sizes, *args):
    if hidden.dim() != 2:
        raise ValueError(f"moe_forward: hidden must be [tokens, hidden], got shape {tuple(hidden.shape)}")
    return hidden.new_empty(hidden.shape)


def moe_forward(hidden, topk_ids, topk_weights, weights, *, sizes, strategy="auto", global_scale=None,
                expert_input_format=None, group=None, pack=True, algorithm="auto", validate=False,
                allow_quantized=None, chunks=None) -> Tensor:
    """:func:`moecomm.dispatch.moe_forward` through the ``moecomm::moe_forward`` op (same arguments; ``sizes``
    a list or a CPU int tensor). Output ``bf16 [sizes[rank], hidden]``, shaped like ``hidden``."""
    gs_tensor = global_scale if isinstance(global_scale, Tensor) else None
    gs_value = None if global_scale is None or gs_tensor is not None else float(global_scale)
    return torch.ops.moecomm.moe_forward(
        hidden, topk_ids, topk_weights, _as_sizes(sizes), [getattr(weights, f) for f in EXPERT_TENSORS],
        _value(weights.activation), _value(weights.format), weights.first_expert, weights.num_experts,
        _value(strategy), gs_tensor, gs_value, _value(expert_input_format), _group_name(group), pack,
        _value(algorithm), validate, allow_quantized, chunks)


# ----------------------------------------------------------------------------------------------------
# quantize
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("moecomm::quantize", mutates_args=())
def _quantize_op(x: Tensor, fmt: str, global_scale: Optional[Tensor], backend: str) -> list[Tensor]:
    from moecomm import quant

    q = quant.quantize(x, fmt, global_scale=global_scale, backend=backend)
    return [q.data, q.scales] + ([q.global_scale] if global_scale is None and q.global_scale is not None else [])


@_quantize_op.register_fake
def _(x, fmt, global_scale, backend):
    from moecomm.quant import QuantFormat

    fmt = QuantFormat(fmt).value  # raises ValueError naming the formats
    if x.dim() != 2:
        raise ValueError(f"quantize: x must be 2-D [num_tokens, hidden], got shape {tuple(x.shape)}")
    data_dtype, scale_dtype, per_byte, block = _QUANT_LAYOUT[fmt]
    m, k = x.shape
    if block is not None and k % block:
        raise ValueError(f"quantize: hidden = {k} must be a multiple of the block size {block} for {fmt}")
    outs = [x.new_empty((m, k // per_byte), dtype=data_dtype),
            x.new_empty((m, 1 if block is None else k // block), dtype=scale_dtype)]
    if fmt == "nvfp4" and global_scale is None:
        outs.append(x.new_empty((), dtype=torch.float32))
    return outs


def quantize(x, fmt, *, global_scale=None, out=None, backend="auto"):
    """:func:`moecomm.quant.quantize` through the ``moecomm::quantize`` op (same arguments and result).

    The op returns ``[data, scales]``, plus the fp32 0-dim global scale it computed for NVFP4 without
    ``global_scale``; a Python-number global scale becomes a constant fp32 tensor of the graph. With
    ``out``, the op's results are copied into it.
    """
    from moecomm.quant import QuantFormat, QuantizedTensor

    fmt = _value(fmt)
    gs = None
    if global_scale is not None:
        gs = (global_scale.detach().reshape(()).to(device=x.device, dtype=torch.float32)
              if isinstance(global_scale, Tensor)
              else torch.tensor(float(global_scale), dtype=torch.float32, device=x.device))
    outs = torch.ops.moecomm.quantize(x, fmt, gs, _value(backend))
    data, scales = outs[0], outs[1]
    if len(outs) == 3:
        gs = outs[2]
    if out is not None:
        out[0].copy_(data)
        out[1].copy_(scales)
        data, scales = out[0], out[1]
    return QuantizedTensor(QuantFormat(fmt), data, scales, gs)


# ----------------------------------------------------------------------------------------------------
# all_gatherv / reduce_scatterv
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("moecomm::all_gatherv", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def _all_gatherv_op(tensors: Sequence[Tensor], sizes: Tensor, group_name: str, algorithm: str,
                    validate: bool) -> list[Tensor]:
    from moecomm import collectives

    return collectives.all_gatherv(list(tensors), _sizes_list(sizes), _group(group_name), algorithm=algorithm,
                                   validate=validate)


@_all_gatherv_op.register_fake
def _(tensors, sizes, group_name, algorithm, validate):
    rows = torch.library.get_ctx().new_dynamic_size()  # sum(sizes): known only when the op runs
    return [t.new_empty((rows, *t.shape[1:])) for t in tensors]


def all_gatherv(tensors, sizes, group=None, *, out=None, validate=False, algorithm="auto"):
    """:func:`moecomm.collectives.all_gatherv` through the ``moecomm::all_gatherv`` op (same arguments and
    result structure). Under ``torch.compile`` the outputs' row count ``sum(sizes)`` is a data-dependent
    size (``torch._check`` it against a known size where the model needs one); with ``out``, the results
    are copied into it."""
    single = isinstance(tensors, Tensor)
    items = [tensors] if single else list(tensors)
    present = [t for t in items if t is not None]
    gathered = iter(torch.ops.moecomm.all_gatherv(present, _as_sizes(sizes), _group_name(group), _value(algorithm),
                                                  validate))
    results = [None if t is None else next(gathered) for t in items]
    if out is not None:
        outs = [out] if single else list(out)
        for o, r in zip(outs, results):
            if o is not None:
                o.copy_(r)
        results = outs
    if single:
        return results[0]
    return tuple(results) if isinstance(tensors, tuple) else results


@torch.library.custom_op("moecomm::reduce_scatterv", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def _reduce_scatterv_op(tensor: Tensor, sizes: Tensor, group_name: str, algorithm: str, validate: bool) -> Tensor:
    from moecomm import collectives

    return collectives.reduce_scatterv(tensor, _sizes_list(sizes), _group(group_name), algorithm=algorithm,
                                       validate=validate)


@_reduce_scatterv_op.register_fake
def _(tensor, sizes, group_name, algorithm, validate):
    rows = torch.library.get_ctx().new_dynamic_size()  # sizes[rank]: known only when the op runs
    return tensor.new_empty((rows, *tensor.shape[1:]))


def reduce_scatterv(tensor, sizes, group=None, *, out=None, validate=False, algorithm="auto"):
    """:func:`moecomm.collectives.reduce_scatterv` through the ``moecomm::reduce_scatterv`` op (same
    arguments). Under ``torch.compile`` the result's row count ``sizes[rank]`` is a data-dependent size;
    with ``out``, the result is copied into it."""
    result = torch.ops.moecomm.reduce_scatterv(tensor, _as_sizes(sizes), _group_name(group), _value(algorithm),
                                               validate)
    return result if out is None else out.copy_(result)
