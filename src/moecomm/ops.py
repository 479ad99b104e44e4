"""moecomm's entry points as ``torch.library`` custom ops, for models compiled with ``torch.compile``.

Dynamo cannot trace ``torch.distributed`` calls, host-side size arithmetic and Triton launches without
graph breaks, and it bakes Python ints into the graph. Each public entry point therefore has an opaque
custom op in the ``moecomm`` namespace, with a fake (meta) implementation that gives the output shapes
without running anything::

    moecomm::moe_forward(Tensor hidden, Tensor topk_ids, Tensor topk_weights, Tensor sizes,
        Tensor?[] experts, str activation, str weight_format, SymInt first_expert, SymInt num_experts,
        str strategy, Tensor? global_scale, float? global_scale_value, str? expert_input_format,
        str group_name, bool pack, str algorithm, bool validate, bool? allow_quantized,
        SymInt? chunks) -> Tensor                          # shaped like hidden: [sizes[rank], H] bf16
    moecomm::quantize(Tensor x, str fmt, Tensor? global_scale, str backend) -> Tensor[]
                                                           # [data, scales] (+ the computed NVFP4 scale)
    moecomm::all_gatherv(Tensor[] tensors, Tensor sizes, str group_name, str algorithm,
        bool validate) -> Tensor[]                         # each [sum(sizes), *trailing]
    moecomm::reduce_scatterv(Tensor tensor, Tensor sizes, str group_name, str algorithm,
        bool validate) -> Tensor                           # [sizes[rank], *trailing]

``sum(sizes)`` and ``sizes[rank]`` are not known while tracing: those fakes return a new data-dependent
size (``torch.library.get_ctx().new_dynamic_size()``); ``torch._check`` it against a known size where a
model needs one. ``moe_forward`` needs none: its output has ``hidden``'s shape.

Arguments that are not tensors, numbers or strings are flattened: :class:`moecomm.moe.ExpertWeights` into
its tensors (``experts``, in the order of :data:`EXPERT_TENSORS`) plus ``activation``, ``weight_format``,
``first_expert``, ``num_experts``; enums into their string values; a process group into its
``group_name`` (``""``: the default group), resolved when the op runs with
``torch.distributed.distributed_c10d._resolve_process_group``; a Python-number NVFP4 global scale into
``global_scale_value``. Each op's implementation rebuilds the arguments and calls the eager Python
function, so compiled and eager calls run the same code and give the same bytes.

**How sizes enter: a CPU int64 tensor.** Per-rank token counts change every step. A Python list of ints
is baked into the graph as constants and guarded on, so a new list recompiles (and once Dynamo makes the
ints symbolic, values it specialises, such as 0 and 1, still can). A tensor's *values* are never guarded
on: the graph takes ``sizes`` as an input and the op reads it with ``tolist()`` when it runs. The tensor
lives on the CPU so that this read is a host memory load, not a GPU sync, exactly the host-side ints the
eager API takes. Make it with :func:`sizes_tensor` (or ``torch.tensor(sizes)``) each step.

**Eager calls keep their host time.** The public functions (:func:`moecomm.dispatch.moe_forward`,
:func:`moecomm.quant.quantize`, :func:`moecomm.collectives.all_gatherv`,
:func:`moecomm.collectives.reduce_scatterv`) stay the API. They call these ops only while Dynamo traces
them (``torch.compiler.is_compiling()``) or, for the collectives and ``moe_forward``, when ``sizes`` is a
tensor. An eager call with a list never passes through the dispatcher (about 10 us more per call on a CPU
core); it pays one ``is_compiling()`` check (0.1 us). This module is imported on the first compiled or
tensor-sizes call, so ``import moecomm`` registers nothing; import ``moecomm.ops`` before loading a
compiled artifact in a fresh process.

**CUDA graphs.** ``moe_forward``, ``all_gatherv`` and ``reduce_scatterv`` read ``sizes`` on the host when
they run, so a CUDA graph must never capture them (a replay would reuse the sizes of the capture). They
carry the ``cudagraph_unsafe`` tag: under ``torch.compile(mode="reduce-overhead")`` Inductor splits the
graph around them (graph partitions, torch's default) and captures only the parts between them, or
without partitions skips CUDA graphs for the whole graph. To replay a whole MoE layer, collectives
included, from one CUDA graph, use :class:`moecomm.dispatch.GraphedMoE` (fixed token buckets, padded with
masked slots). ``quantize`` touches device memory only and may be captured.

Not ops: ``dispatch`` / ``combine`` (the handle carries a layout that depends on the sizes' values;
compile ``moe_forward`` instead, or call them outside the compiled region) and the format quantizers
(``quantize_nvfp4`` ...; call :func:`moecomm.quant.quantize`).
"""

from typing import Optional, Sequence

import torch
import torch.distributed as dist
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
    """Rows per rank as the tensor the compiled entry points take: CPU ``int64 [world_size]``.

    Pass it (instead of the list) to a compiled model each step: its values stay out of the graph, so new
    sizes never recompile (module docstring). Building it is a host-side copy of a few ints.

    Parameters
    ----------
    sizes : list[int]
        Rows of every rank (e.g. :func:`moecomm.collectives.gather_sizes`), the same list on every rank.

    Returns
    -------
    Tensor
        ``int64 [len(sizes)]`` on the CPU.
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
    """``sizes`` as the CPU integer tensor of the ops (under compile, a list becomes a constant of the graph,
    guarded on); ``TypeError`` for a tensor of another kind."""
    if isinstance(sizes, Tensor):
        if sizes.device.type != "cpu" or sizes.dtype not in (torch.int32, torch.int64) or sizes.dim() != 1:
            raise TypeError(f"sizes as a tensor must be a 1-D CPU int64 (or int32) tensor, got {sizes.dtype} "
                            f"{tuple(sizes.shape)} on {sizes.device} (a CUDA tensor would need a host sync)")
        return sizes
    return torch.tensor(list(sizes), dtype=torch.int64)


def _rows(sizes, pick) -> int | None:
    """``pick(sizes as a list)`` where the sizes are known on the host, None while tracing (data-dependent)."""
    if torch.compiler.is_compiling():
        return None
    return pick(sizes.tolist() if isinstance(sizes, Tensor) else list(sizes))


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
        hidden, topk_ids, topk_weights, weights, sizes=sizes.tolist(), strategy=strategy,
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
    """:func:`moecomm.dispatch.moe_forward` as the op ``moecomm::moe_forward``: one EP MoE layer step.

    What ``moecomm.dispatch.moe_forward`` calls under ``torch.compile`` or for a tensor ``sizes``.

    Parameters
    ----------
    hidden, topk_ids, topk_weights, weights :
        As for :func:`moecomm.dispatch.moe_forward`: ``bf16 [sizes[rank], H]``, ``int32/int64 [sizes[rank],
        topk]`` (-1: masked slot), ``float32 [sizes[rank], topk]``, this rank's ``ExpertWeights``.
    sizes : Tensor or list[int]
        Rows per rank: a CPU ``int64 [world_size]`` tensor (:func:`sizes_tensor`; read when the op runs,
        never baked into a graph) or a list (a constant of the graph).
    strategy, global_scale, expert_input_format, group, pack, algorithm, validate, allow_quantized, chunks :
        As for :func:`moecomm.dispatch.moe_forward`; enums may be given as their strings.

    Returns
    -------
    Tensor
        ``bf16 [sizes[rank], H]``, shaped like ``hidden`` (also in the fake: no data-dependent size).

    Raises
    ------
    TypeError
        ``sizes`` is a tensor that is not a 1-D CPU int32/int64 tensor.
    ValueError
        ``hidden`` not 2-D (in the fake, while tracing); when the op runs, everything
        :func:`moecomm.dispatch.moe_forward` raises.
    """
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
    if global_scale is not None and fmt != "nvfp4":
        raise ValueError(f"quantize: global_scale applies to NVFP4 only, not {fmt}")
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
    """:func:`moecomm.quant.quantize` as the op ``moecomm::quantize`` (what it calls under ``torch.compile``).

    Parameters
    ----------
    x : Tensor
        ``[num_tokens, hidden]`` bf16 / fp16 / fp32.
    fmt : QuantFormat or str
    global_scale : Tensor, float or None
        NVFP4 only; a Python number becomes a constant fp32 tensor of the graph. None for NVFP4: the op
        computes ``nvfp4_global_scale(amax(|x|))`` on the device and returns it.
    out : tuple of Tensor, optional
        ``(data, scales)``: the op's results are copied into them (one copy more than eager).
    backend : {"auto", "triton", "torch"}

    Returns
    -------
    QuantizedTensor
        ``data`` and ``scales`` in the linear layout of ``fmt`` (:class:`moecomm.quant.QuantizedTensor`);
        ``global_scale`` fp32 0-dim for NVFP4, else None.

    Raises
    ------
    ValueError
        While tracing (the fake): an unknown format, ``x`` not 2-D, ``hidden`` not a multiple of the block,
        ``global_scale`` for a format other than NVFP4. When the op runs: as :func:`moecomm.quant.quantize`.
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

    return collectives.all_gatherv(list(tensors), sizes.tolist(), _group(group_name), algorithm=algorithm,
                                   validate=validate)


@_all_gatherv_op.register_fake
def _(tensors, sizes, group_name, algorithm, validate):
    rows = torch.library.get_ctx().new_dynamic_size()  # sum(sizes): known only when the op runs
    return [t.new_empty((rows, *t.shape[1:])) for t in tensors]


def all_gatherv(tensors, sizes, group=None, *, out=None, validate=False, algorithm="auto"):
    """:func:`moecomm.collectives.all_gatherv` as the op ``moecomm::all_gatherv``.

    What ``moecomm.collectives.all_gatherv`` calls under ``torch.compile`` or for a tensor ``sizes``.

    Parameters
    ----------
    tensors : Tensor or list/tuple of (Tensor or None)
        Each ``[sizes[rank], *trailing]``, any dtype; the ``None`` holes are kept out of the op.
    sizes : Tensor or list[int]
        A CPU ``int64 [world_size]`` tensor (:func:`sizes_tensor`) or a list (a constant of the graph).
    group, out, validate, algorithm :
        As for :func:`moecomm.collectives.all_gatherv`; with ``out`` the op's results are copied into it.

    Returns
    -------
    Tensor or list
        The structure of ``tensors``, each ``[sum(sizes), *trailing]``. While tracing, ``sum(sizes)`` is a
        new data-dependent size (``torch._check`` it against a known size where a model needs one).

    Raises
    ------
    TypeError
        ``sizes`` is a tensor that is not a 1-D CPU int32/int64 tensor. When the op runs: as
        :func:`moecomm.collectives.all_gatherv`.
    """
    single = isinstance(tensors, Tensor)
    items = [tensors] if single else list(tensors)
    present = [t for t in items if t is not None]
    if out is not None:  # checked before the collective, as the eager path does
        from moecomm import collectives

        outs = [out] if single else list(out)
        collectives._check_out(outs, items, _rows(sizes, sum), dist.get_rank(group), group)
    gathered = iter(torch.ops.moecomm.all_gatherv(present, _as_sizes(sizes), _group_name(group), _value(algorithm),
                                                  validate))
    results = [None if t is None else next(gathered) for t in items]
    if out is not None:
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

    return collectives.reduce_scatterv(tensor, sizes.tolist(), _group(group_name), algorithm=algorithm,
                                       validate=validate)


@_reduce_scatterv_op.register_fake
def _(tensor, sizes, group_name, algorithm, validate):
    rows = torch.library.get_ctx().new_dynamic_size()  # sizes[rank]: known only when the op runs
    return tensor.new_empty((rows, *tensor.shape[1:]))


def reduce_scatterv(tensor, sizes, group=None, *, out=None, validate=False, algorithm="auto"):
    """:func:`moecomm.collectives.reduce_scatterv` as the op ``moecomm::reduce_scatterv``.

    What ``moecomm.collectives.reduce_scatterv`` calls under ``torch.compile`` or for a tensor ``sizes``.

    Parameters
    ----------
    tensor : Tensor
        ``[sum(sizes), *trailing]`` bf16 / fp16 / fp32.
    sizes : Tensor or list[int]
        A CPU ``int64 [world_size]`` tensor (:func:`sizes_tensor`) or a list (a constant of the graph).
    group, out, validate, algorithm :
        As for :func:`moecomm.collectives.reduce_scatterv`; with ``out`` the result is copied into it.

    Returns
    -------
    Tensor
        ``[sizes[rank], *trailing]``, the dtype of ``tensor``. While tracing, ``sizes[rank]`` is a new
        data-dependent size.

    Raises
    ------
    TypeError
        ``sizes`` is a tensor that is not a 1-D CPU int32/int64 tensor. When the op runs: as
        :func:`moecomm.collectives.reduce_scatterv`.
    """
    if out is not None:  # checked before the collective, as the eager path does
        from moecomm import collectives

        rank = dist.get_rank(group)  # -1 outside the group: the op raises that
        rows = _rows(sizes, lambda s: s[rank] if 0 <= rank < len(s) else None)
        collectives._check_out([out], [tensor], rows, rank, group)
    result = torch.ops.moecomm.reduce_scatterv(tensor, _as_sizes(sizes), _group_name(group), _value(algorithm),
                                               validate)
    return result if out is None else out.copy_(result)
