"""Every moecomm custom op passes ``torch.library.opcheck`` (schema, fake tensor, autograd registration,
AOT dispatch with dynamic shapes) over empty lists, holes, zero rows and every dtype / format it carries,
and compiled calls whose list holds only holes return what eager returns.

The collectives and the layer step run on 2 gloo ranks (opcheck calls each op the same number of times on
every rank, so the collectives inside pair up); the quantizer runs in-process.
"""

import random

import pytest
import torch
import torch.distributed as dist

from moecomm import ops
from moecomm.comm import all_gatherv, launch
from moecomm.moe import make_expert_weights, topk_softmax
from moecomm.quant import QuantFormat, nvfp4_global_scale

ALL_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
# test_schema compares inputs before and after the call with arithmetic that torch does not implement for
# float8 / float4 (pytorch's opcheck, as of 2.13); their bytes travel like uint8's, which it covers.
NARROW_FLOATS = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float4_e2m1fn_x2)


def _rows_of(seed, rank, n, trailing, dtype):
    gen = torch.Generator().manual_seed(seed + rank)
    if dtype.is_floating_point and dtype != torch.float4_e2m1fn_x2:  # finite values: NaN != NaN in comparisons
        return torch.randn(n, *trailing, generator=gen).to(dtype)
    bits = torch.randint(0, 256, (n, *trailing), generator=gen, dtype=torch.int64)
    return bits.to(torch.uint8).view(dtype) if dtype.itemsize == 1 else bits.to(dtype)


def _gather_cases(seed, rank):
    """Name -> (the op's tensor list, sizes): empty lists, zero rows, every dtype of the wire, 1-D and 3-D."""
    sizes = [2, 3]
    cases = {"empty list": ([], sizes), "empty list, zero rows": ([], [0, 0])}
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.int32, torch.int64, torch.uint8,
                  *NARROW_FLOATS):
        cases[f"{dtype}"] = ([_rows_of(seed, rank, sizes[rank], (16,), dtype)], sizes)
    cases["idle rank"] = ([_rows_of(seed, rank, [0, 4][rank], (8,), torch.bfloat16)], [0, 4])
    cases["all idle"] = ([_rows_of(seed, rank, 0, (8,), torch.float32)], [0, 0])
    cases["1-D and 3-D"] = ([_rows_of(seed, rank, sizes[rank], (), torch.int32),
                             _rows_of(seed, rank, sizes[rank], (2, 4), torch.bfloat16)], sizes)
    return cases


def _opcheck(op, args, narrow: bool):
    tests = tuple(t for t in ALL_TESTS if not (narrow and t == "test_schema"))
    torch.library.opcheck(op, args, test_utils=tests)


def _collective_ops(seed):
    rank = dist.get_rank()
    for name, (tensors, sizes) in _gather_cases(seed, rank).items():
        narrow = any(t.dtype in NARROW_FLOATS for t in tensors)
        try:
            _opcheck(torch.ops.moecomm.all_gatherv.default,
                     (tensors, ops.sizes_tensor(sizes), "", "auto", False), narrow)
        except Exception as e:  # noqa: BLE001 - report which case
            return f"all_gatherv {name}: {e}"
    cases = [(dtype, "bf16", 8) for dtype in (torch.bfloat16, torch.float16, torch.float32)]
    cases += [(dtype, wire, 128) for dtype in (torch.bfloat16, torch.float32) for wire in ("int8", "fp8")]
    for sizes in ([2, 3], [0, 4], [0, 0]):
        for dtype, wire, cols in cases:
            t = _rows_of(seed, 0, sum(sizes), (cols,), dtype)  # the same on every rank: a sum of equals
            try:
                _opcheck(torch.ops.moecomm.reduce_scatterv.default,
                         (t, ops.sizes_tensor(sizes), "", "auto", False, wire), False)
            except Exception as e:  # noqa: BLE001
                return f"reduce_scatterv {sizes} {dtype} {wire}: {e}"
    return "ok"


def test_opcheck_collectives():
    seed = random.randrange(1 << 30)
    assert launch(_collective_ops, 2, (seed,), backend="gloo", timeout=300) == ["ok", "ok"], seed


STRATEGIES = [("allreduce", None), ("agrs", None), ("agrs-nvfp4", QuantFormat.NVFP4),
              ("agrs-fp8", QuantFormat.FP8_GROUP), ("agrs-fp8", QuantFormat.FP8_TOKEN)]


def _moe_op(seed):
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(seed)
    hidden, inter, experts = 128, 32, 4
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    weights = make_expert_weights(w13, w2, ep_size=world, ep_rank=rank)
    tensors = [getattr(weights, f) for f in ops.EXPERT_TENSORS]
    for sizes in ([3, 2], [0, 4]):
        x = torch.randn(sizes[rank], hidden, generator=gen).bfloat16()
        ids, w = topk_softmax(torch.randn(sizes[rank], experts, generator=gen), 2)
        for strategy, fmt in STRATEGIES:
            gs_tensor = nvfp4_global_scale(torch.tensor(9.0)) if fmt == QuantFormat.NVFP4 else None
            for gs, gs_value in ((gs_tensor, None), (None, 300.0)) if gs_tensor is not None else ((None, None),):
                args = (x, ids, w, ops.sizes_tensor(sizes), tensors, weights.activation.value, weights.format.value,
                        weights.first_expert, weights.num_experts, strategy, gs, gs_value,
                        None if fmt is None else fmt.value, "", True, "auto", False, None, 1)
                for combine_format in ("bf16",) if strategy == "allreduce" else ("bf16", "int8", "fp8"):
                    try:
                        _opcheck(torch.ops.moecomm.moe_forward.default, (*args, combine_format), False)
                    except Exception as e:  # noqa: BLE001
                        return f"moe_forward {strategy} {fmt} {sizes} gs={gs_value} {combine_format}: {e}"
    return "ok"


def test_opcheck_moe_forward():
    seed = random.randrange(1 << 30)
    assert launch(_moe_op, 2, (seed,), backend="gloo", timeout=300) == ["ok", "ok"], seed


@pytest.mark.parametrize("fmt", list(QuantFormat))
@pytest.mark.parametrize("rows", [0, 1, 5])
def test_opcheck_quantize(fmt, rows):
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(random.randrange(1 << 30))).bfloat16()
    scales = [None, torch.tensor(40.0)] if fmt is QuantFormat.NVFP4 else [None]
    for gs in scales:
        _opcheck(torch.ops.moecomm.quantize.default, (x, fmt.value, gs, "auto"), narrow=fmt is not QuantFormat.MXFP4)


def _compiled_holes(seed):
    """all_gatherv of a list with holes only, an empty list, and holes around a tensor, compiled with
    fullgraph: the results eager gives (holes stay None), for sizes of every kind."""
    rank = dist.get_rank()
    fn = torch.compile(lambda ts, s: all_gatherv(ts, s), fullgraph=True, backend="aot_eager", dynamic=True)
    for sizes in ([1, 1], [0, 3], [0, 0]):
        st = ops.sizes_tensor(sizes)
        if fn([None], st) != [None] or fn([None, None], st) != [None, None] or fn([], st) != []:
            return f"holes {sizes}"
        xs = [_rows_of(seed, r, n, (4,), torch.bfloat16) for r, n in enumerate(sizes)]
        got = fn((None, xs[rank], None), st)
        if not (isinstance(got, tuple) and got[0] is None and got[2] is None and torch.equal(got[1], torch.cat(xs))):
            return f"holes around a tensor {sizes}: {got}"
    return "ok"


def test_compiled_all_gatherv_of_holes_and_empty_lists():
    seed = random.randrange(1 << 30)
    assert launch(_compiled_holes, 2, (seed,), backend="gloo", timeout=300) == ["ok", "ok"], seed
