"""Inputs at any storage offset torch allows give the bytes of their ``clone()``.

An engine's flat workspace sliced at an odd element (``workspace[1 : 1 + 4 * 256].view(4, 256)``) is a
contiguous tensor whose rows are not 4-byte aligned: the quantizer kernels read pairs of 16-bit elements
as 32-bit words (fp32 as 64-bit words), the FP8 dequantizer reads byte pairs. Every Triton kernel (on the
CPU interpreter here, ``TRITON_INTERPRET=1``) and every torch path must give the bytes the torch reference
gives for ``x.clone()`` (a fresh, aligned tensor), for inputs and for ``out=`` buffers at odd offsets.
"""

import random

import pytest
import torch

from moecomm import quant as Q
from moecomm.comm import all_gatherv, launch
from moecomm.moe import _kernels as moe_kernels
from moecomm.moe import experts as moe_experts
from moecomm.moe import make_expert_weights, topk_softmax
from moecomm.testing import assert_close

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
VARIANTS = ["nvfp4", "nvfp4-swizzled", "mxfp4-floor", "mxfp4-up", "fp8-token", "fp8-group128", "fp8-group16-ue8m0"]
M, K = 4, 256


def _at_offset(x: torch.Tensor, offset: int) -> torch.Tensor:
    """``x``'s values in a contiguous view that starts ``offset`` elements into a larger flat buffer."""
    flat = torch.empty(offset + x.numel() + 3, dtype=x.dtype, device=x.device)
    view = flat[offset : offset + x.numel()].view(x.shape)
    assert view.is_contiguous() and view.storage_offset() == offset
    return view.copy_(x)


def _quantize(name: str, x: torch.Tensor, backend: str, out=None):
    gs = 50.0
    if name.startswith("nvfp4"):
        packed, scales = Q.quantize_nvfp4(x, gs, swizzled=name.endswith("swizzled"), backend=backend, out=out)
        return packed, scales.view(torch.uint8)
    if name.startswith("mxfp4"):
        return Q.quantize_mxfp4(x, scale_rounding=name.split("-")[1], backend=backend, out=out)
    group = None if "token" in name else int(name.split("group")[1].split("-")[0])
    q, scales = Q.quantize_fp8(x, group_size=group, ue8m0=name.endswith("ue8m0"), backend=backend, out=out)
    return q.view(torch.uint8), scales.view(torch.int32)


def _values(dtype, seed):
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed)) * 3
    x[1, 5:40] *= 100
    return x.to(dtype)


@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", VARIANTS)
def test_quantizers_at_an_odd_storage_offset(name, dtype, offset):
    seed = random.randrange(1 << 30)
    x = _values(dtype, seed)
    expected = _quantize(name, x.clone(), "torch")
    for backend in ("triton", "torch"):
        got = _quantize(name, _at_offset(x, offset), backend)
        for g, e in zip(got, expected):
            assert torch.equal(g, e), (name, dtype, offset, backend, seed)
    # a row stride that is odd too: rows of K + 1 elements in the workspace
    strided = _at_offset(torch.zeros(M, K + 1, dtype=dtype), offset)[:, :K].copy_(x)
    for g, e in zip(_quantize(name, strided, "triton"), expected):
        assert torch.equal(g, e), (name, dtype, "odd row stride", seed)


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4-floor", "fp8-token", "fp8-group128"])
def test_quantizer_outputs_at_odd_byte_offsets(name):
    """``out=`` views that start one byte into a buffer (data) or one element in (fp32 scales)."""
    seed = random.randrange(1 << 30)
    x = _values(torch.bfloat16, seed)
    expected = _quantize(name, x, "torch")
    data_dtype = torch.float8_e4m3fn if name.startswith("fp8") else torch.uint8
    data = _at_offset(torch.zeros(expected[0].shape, dtype=torch.uint8), 1).view(data_dtype)
    scale_dtype = {"nvfp4": torch.float8_e4m3fn, "mxfp4-floor": torch.uint8}.get(name, torch.float32)
    scales = _at_offset(torch.zeros(expected[1].shape, dtype=scale_dtype), 1)
    got = _quantize(name, x, "triton", out=(data, scales))
    for g, e in zip(got, expected):
        assert torch.equal(g, e), (name, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("groups", [1, 2])
def test_dequantize_fp8_of_a_byte_view_at_an_odd_offset(dtype, groups):
    seed = random.randrange(1 << 30)
    q, scales = Q.quantize_fp8(_values(torch.float32, seed), group_size=K // groups)
    expected = Q.dequantize_fp8_ref(q, scales, dtype=dtype)
    q_odd = _at_offset(q.view(torch.uint8), 1).view(torch.float8_e4m3fn)
    s_odd = _at_offset(scales, 1)
    for backend in ("triton", "torch"):
        got = Q.dequantize_fp8(q_odd, s_odd, dtype=dtype, backend=backend)
        assert torch.equal(got, expected), (backend, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_nvfp4_at_odd_offsets(dtype):
    seed = random.randrange(1 << 30)
    gs = Q.nvfp4_global_scale(torch.tensor(300.0))
    packed, scales = Q.quantize_nvfp4(_values(torch.float32, seed), gs)
    expected = Q.dequantize_nvfp4_ref(packed, scales, gs, dtype=dtype)
    p_odd, s_odd = _at_offset(packed, 1), _at_offset(scales.view(torch.uint8), 3).view(torch.float8_e4m3fn)
    for backend in ("triton", "torch"):
        got = Q.dequantize_nvfp4(p_odd, s_odd, gs, dtype=dtype, backend=backend)
        assert torch.equal(got, expected), (backend, seed)


@pytest.mark.parametrize("fmt", [None, *moe_kernels._PERMUTE_FORMATS], ids=lambda f: "bf16" if f is None else f.value)
def test_expert_permute_kernels_at_odd_offsets(fmt):
    """The experts' permute kernels on tokens (and their scales) at odd offsets vs the torch permute."""
    seed = random.randrange(1 << 30)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(9, K, generator=gen) * 2).bfloat16()
    w13 = torch.randn(8, 64, K, generator=gen) / K**0.5
    weights = make_expert_weights(w13, torch.randn(8, K, 32, generator=gen) / 32**0.5, ep_size=2, ep_rank=1)
    ids, _ = topk_softmax(torch.randn(9, 8, generator=gen), 3)
    plan = moe_experts._plan(ids, weights.first_expert, weights.num_local, 8)
    m = int(plan.end)
    if fmt is None:
        tokens = _at_offset(x, 1)
        got = moe_kernels.gather_rows(tokens, plan.src_rows, plan.end)
    else:
        q = Q.quantize(x, fmt, global_scale=Q.nvfp4_global_scale(x.float().abs().amax()) if fmt.value == "nvfp4" else None)
        data = _at_offset(q.data.view(torch.uint8), 1).view(q.data.dtype)
        scales = _at_offset(q.scales.view(torch.uint8), 1).view(q.scales.dtype) if q.scales.itemsize == 1 \
            else _at_offset(q.scales, 1)
        tokens = Q.QuantizedTensor(fmt, data, scales, q.global_scale)
        got = moe_kernels.permute_dequant(tokens, plan.src_rows, plan.end)
    expected = moe_experts._permute_torch(tokens if fmt is None else q, plan)
    assert torch.equal(got[:m], expected[:m]), seed


def _gather_odd(seed):
    import torch.distributed as dist

    rank, sizes = dist.get_rank(), [3, 2]
    xs = [_values(torch.bfloat16, seed + r)[: sizes[r]] for r in range(2)]
    got = all_gatherv([_at_offset(xs[rank], 1), None, _at_offset(xs[rank].float(), 1)], sizes)
    assert torch.equal(got[0], torch.cat(xs)) and torch.equal(got[2], torch.cat(xs).float())
    return "ok"


def test_all_gatherv_of_views_at_odd_offsets():
    seed = random.randrange(1 << 30)
    assert launch(_gather_odd, 2, (seed,), backend="gloo", timeout=120) == ["ok", "ok"], seed


def test_expert_weights_from_a_workspace_slice_are_16_byte_aligned():
    """bf16 weights sliced from a flat workspace at an odd element: the grouped GEMMs need 16-byte aligned
    operands, so make_expert_weights stores aligned copies with the same values."""
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    w13 = (torch.randn(4, 64, K, generator=gen) / K**0.5).bfloat16()
    w2 = (torch.randn(4, K, 32, generator=gen) / 32**0.5).bfloat16()
    weights = make_expert_weights(_at_offset(w13, 1), _at_offset(w2, 3), ep_size=2, ep_rank=1)
    for got, full in ((weights.w13, w13), (weights.w2, w2)):
        assert got.data_ptr() % 16 == 0 and torch.equal(got, full[2:])


@pytest.mark.gpu
def test_gpu_kernels_at_odd_offsets():
    """The CUDA kernels on workspace slices at odd elements / bytes vs the torch reference of the clone."""
    seed = random.randrange(1 << 30)
    for dtype in DTYPES:
        x = _values(dtype, seed)
        for name in VARIANTS:
            got = _quantize(name, _at_offset(x.cuda(), 1), "auto")
            for g, e in zip(got, _quantize(name, x, "torch")):
                assert torch.equal(g.cpu(), e), (name, dtype, seed)
    q, scales = Q.quantize_fp8(_values(torch.float32, seed))
    q_odd = _at_offset(q.view(torch.uint8).cuda(), 1).view(torch.float8_e4m3fn)
    got = Q.dequantize_fp8(q_odd, _at_offset(scales.cuda(), 1), dtype=torch.bfloat16)
    assert torch.equal(got.cpu(), Q.dequantize_fp8_ref(q, scales, dtype=torch.bfloat16))
    gen = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(4, 64, K, generator=gen) / K**0.5).bfloat16()
    w2 = (torch.randn(4, K, 32, generator=gen) / 32**0.5).bfloat16()
    weights = make_expert_weights(_at_offset(w13.cuda(), 1), _at_offset(w2.cuda(), 3))
    tokens = _values(torch.bfloat16, seed)
    ids, tw = topk_softmax(torch.randn(M, 4, generator=gen), 2)
    got = moe_experts.experts_forward(_at_offset(tokens.cuda(), 1), ids.cuda(), tw.cuda(), weights)
    ref = moe_experts.experts_forward_ref(tokens, ids, tw, make_expert_weights(w13, w2))
    assert_close(got.float().cpu(), ref, rel=2e-2, name="experts_forward on odd offsets")
