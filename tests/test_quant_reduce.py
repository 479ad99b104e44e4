"""The wire formats of the quantized combine in one process: the int8 group format against independent numpy
math, FP8 with ``saturate_inf=False``, and the dequantize-and-sum against float64; every Triton kernel against
its torch reference bit for bit (the interpreter on CPU, the GPU in the tests marked ``gpu``).

Inputs are fresh random draws (the seed is in the failure message).
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
import torch

from moecomm import quant as Q
from moecomm.quant.reduce import ReduceFormat, partial_views

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
FORMATS = ["int8", "fp8"]


def _seeded():
    seed = random.randrange(1 << 30)
    return seed, torch.Generator().manual_seed(seed)


def _activations(m, k, gen, dtype=torch.bfloat16):
    """Gaussian rows over six orders of magnitude (four in fp16, whose range ends at 65504), an outlier channel,
    an all-zero group and a zero row."""
    x = torch.randn(m, k, generator=gen) * torch.logspace(-3, 1 if dtype == torch.float16 else 3, m).unsqueeze(1)
    x[:, 3] *= 50
    if m > 2:
        x[1, :128] = 0
        x[2] = 0
    return x.to(dtype)


def _nan_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other is NaN (NaN payloads aside)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))


# ----------------------------------------------------------------------------------------------------
# int8 groups


def _int8_numpy(x: torch.Tensor):
    """The int8 group format from its definition, in numpy float64: scale = fp32(amax / 127) (a float64
    division of fp32 values rounded to fp32 is the correctly rounded fp32 division), q = rint(fp32(x / scale))."""
    xf = x.float().numpy().astype(np.float64).reshape(x.shape[0], -1, 128)
    amax = np.abs(xf).max(axis=-1, keepdims=True)
    bad = ~np.isfinite(amax)
    scale = (np.maximum(np.where(bad, 0.0, amax), np.float64(np.float32(1e-10))) / 127.0).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        quotient = (xf / scale.astype(np.float64)).astype(np.float32).astype(np.float64)
    q = np.where(bad, 0.0, np.clip(np.rint(quotient), -127, 127)).astype(np.int8)
    return q.reshape(x.shape), np.where(bad, np.float32(np.nan), scale).reshape(x.shape[0], -1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_reference_matches_numpy_definition(dtype):
    seed, gen = _seeded()
    x = _activations(37, 512, gen, dtype)
    x[5, 130] = float("inf")
    x[6, 300] = float("nan")
    x[7, 0] = -float("inf")
    q, s = Q.quantize_int8_ref(x)
    q_np, s_np = _int8_numpy(x)
    assert torch.equal(q, torch.from_numpy(q_np)), seed
    assert _nan_equal(s, torch.from_numpy(s_np)), seed
    assert s.isnan().sum() == 3 and q[5, 128:256].eq(0).all() and s[1, 0] == np.float32(1e-10) / np.float32(127)


def test_int8_ties_round_to_even():
    # amax 127 gives the scale 1.0 exactly: x / scale = x, so every .5 is a tie
    x = torch.zeros(1, 128)
    x[0, :10] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 125.5, 127.0, -127.0])
    q, s = Q.quantize_int8_ref(x)
    assert s.item() == 1.0
    assert q[0, :10].tolist() == [0, 2, 2, 0, -2, -2, 126, 126, 127, -127]


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_round_trip_error_bound(dtype):
    # |x - q * scale| <= scale * (1/2 + 2**-16): half a step from rounding to an integer, plus the fp32
    # quotient's rounding (2**-24 relative of at most 127.00002 steps); the product is exact in float64.
    seed, gen = _seeded()
    x = _activations(64, 1024, gen, dtype)
    q, s = Q.quantize_int8(x)
    deq = q.double().reshape(64, 8, 128) * s.double().unsqueeze(-1)
    err = (deq - x.double().reshape(64, 8, 128)).abs()
    assert (err <= s.double().unsqueeze(-1) * (0.5 + 2**-16)).all(), seed
    # dequantizing is one fp32 multiply: the exact float64 product rounded to fp32
    assert torch.equal(Q.dequantize_int8_ref(q, s), deq.reshape(64, 1024).float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [0, 1, 7, 129])
def test_int8_kernel_matches_reference(dtype, m):
    seed, gen = _seeded()
    x = _activations(m, 384, gen, dtype)
    if m > 5:
        x[4, 5], x[5, 200] = float("inf"), float("nan")
    q, s = Q.quantize_int8(x.to(KERNEL_DEVICE), backend="triton")
    qr, sr = Q.quantize_int8_ref(x)
    assert torch.equal(q.cpu(), qr) and _nan_equal(s.cpu(), sr), seed


def test_int8_kernel_writes_row_strided_views():
    """Codes and scales written into one uint8 send buffer (the combine's layout); strided, non-contiguous input."""
    seed, gen = _seeded()
    x = _activations(9, 512, gen).to(KERNEL_DEVICE)
    xt = x.t().contiguous().t()  # column-major
    buf = torch.full((9, Q.reduce_row_bytes("int8", 512)), 0xAB, dtype=torch.uint8, device=KERNEL_DEVICE)
    views = partial_views(buf, ReduceFormat.INT8, 512)
    Q.quantize_int8(xt, out=views, backend="triton")
    qr, sr = Q.quantize_int8_ref(x.cpu())
    assert torch.equal(views[0].cpu(), qr) and torch.equal(views[1].cpu(), sr), seed


def test_int8_dequantize_kernel_matches_reference():
    seed, gen = _seeded()
    q, s = Q.quantize_int8(_activations(11, 256, gen))
    s[3, 1] = float("nan")
    for dtype in (torch.bfloat16, torch.float32):
        got = Q.dequantize_int8(q.to(KERNEL_DEVICE), s.to(KERNEL_DEVICE), dtype=dtype, backend="triton")
        assert _nan_equal(got.cpu(), Q.dequantize_int8_ref(q, s, dtype=dtype)), seed


def test_int8_input_errors():
    with pytest.raises(ValueError, match="multiple of the block size 128"):
        Q.quantize_int8(torch.randn(2, 200))
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        Q.quantize_int8(torch.randn(2, 128).double())
    with pytest.raises(ValueError, match=r"out\[0\] must be torch.int8"):
        Q.quantize_int8(torch.randn(2, 128), out=(torch.empty(2, 128, dtype=torch.uint8), torch.empty(2, 1)))
    with pytest.raises(ValueError, match="scales"):
        Q.dequantize_int8(torch.zeros(2, 256, dtype=torch.int8), torch.ones(2, 1))


def test_int8_dequantize_kernel_takes_any_strides():
    """Column-major codes and scales (strides the kernel does not take) give the reference's values, not others."""
    seed, gen = _seeded()
    q, s = Q.quantize_int8(_activations(7, 384, gen))
    want = Q.dequantize_int8_ref(q, s, dtype=torch.float32)
    for qq, ss in ((q.t().contiguous().t(), s), (q, s.t().contiguous().t()),
                   (torch.stack([q, q], -1)[..., 0], torch.stack([s, s], -1)[..., 1])):
        got = Q.dequantize_int8(qq.to(KERNEL_DEVICE), ss.to(KERNEL_DEVICE), backend="triton")
        assert torch.equal(got.cpu(), want), (seed, qq.stride(), ss.stride())


def test_dequantizers_and_outputs_refuse_grad():
    """Inference only: scales or an ``out`` that require grad raise ValueError naming them (not a result without
    gradients, nor torch's in-place RuntimeError)."""
    q, s = Q.quantize_int8(torch.randn(2, 128))
    with pytest.raises(ValueError, match="scales requires grad"):
        Q.dequantize_int8(q, s.clone().requires_grad_())
    with pytest.raises(ValueError, match="scales requires grad"):
        Q.dequantize_sum(q[None], s[None].clone().requires_grad_())
    with pytest.raises(ValueError, match="out requires grad"):
        Q.dequantize_sum(q[None], s[None], out=torch.empty(2, 128, dtype=torch.bfloat16, requires_grad=True))
    with pytest.raises(ValueError, match=r"out\[1\] requires grad"):
        Q.quantize_int8(torch.randn(2, 128), out=(torch.empty(2, 128, dtype=torch.int8),
                                                 torch.empty(2, 1, requires_grad=True)))
    with torch.no_grad():
        assert torch.equal(Q.dequantize_sum(q[None], s[None].clone().requires_grad_()),
                           Q.dequantize_sum_ref(q[None], s[None]))


@pytest.mark.parametrize("flag", ["saturate_inf", "ue8m0"])
@pytest.mark.parametrize("value", ["no", None, 0, 1.0])
def test_fp8_flags_must_be_bools(flag, value):
    """``saturate_inf="no"`` would be truthy: the flags of quantize_fp8 are bools or a TypeError naming them."""
    for fn in (Q.quantize_fp8, Q.quantize_fp8_ref):
        with pytest.raises(TypeError, match=f"{flag} must be a bool, got {value!r}"):
            fn(torch.randn(2, 128), **{flag: value})


# ----------------------------------------------------------------------------------------------------
# FP8 groups with the combine's Inf policy


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp8_saturate_inf_false_makes_inf_groups_nan(backend):
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    x = torch.randn(4, 384).bfloat16()
    x[1, 130], x[2, 0], x[3, 300] = float("inf"), -float("inf"), float("nan")
    q, s = Q.quantize_fp8(x.to(device), saturate_inf=False, backend=backend)
    q, s = q.cpu().view(torch.uint8), s.cpu()
    assert s.isnan().tolist() == [[False] * 3, [False, True, False], [True, False, False], [False, False, True]]
    assert q[1, 128:256].eq(0).all() and q[2, :128].eq(0).all() and q[3, 256:].eq(0).all()
    saturated, scale = Q.quantize_fp8(x.to(device), backend=backend)  # the default: Inf saturates to 448
    assert saturated.cpu().view(torch.uint8)[1, 130] == 0x7E and torch.isfinite(scale.cpu()[1, 1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_saturate_inf_false_kernel_matches_reference(dtype):
    seed, gen = _seeded()
    x = _activations(33, 512, gen, dtype)
    x[4, 5], x[5, 200], x[6, 511] = float("inf"), float("nan"), -float("inf")
    for group in (128, None):
        q, s = Q.quantize_fp8(x.to(KERNEL_DEVICE), group_size=group, saturate_inf=False, backend="triton")
        qr, sr = Q.quantize_fp8_ref(x, group_size=group, saturate_inf=False)
        assert torch.equal(q.cpu().view(torch.uint8), qr.view(torch.uint8)) and _nan_equal(s.cpu(), sr), (seed, group)


# ----------------------------------------------------------------------------------------------------
# dequantize and sum


def _pieces(fmt, p, m, k, gen, device="cpu"):
    """``p`` pieces quantized into one receive-buffer layout ``uint8 [p, m, row_bytes]``; returns the views."""
    x = torch.cat([_activations(m, k, gen) for _ in range(p)]) if m else torch.zeros(0, k, dtype=torch.bfloat16)
    buf = torch.empty((p * m, Q.reduce_row_bytes(fmt, k)), dtype=torch.uint8)
    Q.quantize_partials(x, fmt, out=partial_views(buf, ReduceFormat(fmt), k))
    data, scales = partial_views(buf.view(p, m, buf.shape[1]).to(device), ReduceFormat(fmt), k)
    return data, scales


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_sum_reference_is_the_fixed_order_fp32_sum(fmt):
    # An independent float64 oracle of the same arithmetic: each product and each partial sum rounded to fp32
    # (float64 products of 8-bit codes and fp32 scales are exact; the float64 sum of two fp32 values rounded
    # to fp32 is the correctly rounded fp32 sum), then one rounding to bf16.
    seed, gen = _seeded()
    data, scales = _pieces(fmt, 3, 17, 256, gen)
    deq = [(data[p].double().reshape(17, 2, 128) * scales[p].double().unsqueeze(-1)).float().reshape(17, 256)
           for p in range(3)]
    acc = deq[0]
    for t in deq[1:]:
        acc = (acc.double() + t.double()).float()
    assert torch.equal(Q.dequantize_sum_ref(data, scales, dtype=torch.float32), acc), seed
    assert torch.equal(Q.dequantize_sum_ref(data, scales), acc.bfloat16()), seed


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("pieces", [1, 2, 3, 8])
@pytest.mark.parametrize("m", [0, 1, 33])
def test_dequantize_sum_kernel_matches_reference(fmt, pieces, m):
    seed, gen = _seeded()
    data, scales = _pieces(fmt, pieces, m, 384, gen)
    if m and pieces > 1:  # a NaN group (as the quantizer writes for Inf / NaN) in one piece
        scales[1, 0, 2] = float("nan")
        data[1, 0, 256:] = 0
    if fmt == "fp8" and m:  # the e4m3 NaN codes 0x7F / 0xFF
        data.view(torch.uint8)[0, m - 1, :2] = torch.tensor([0x7F, 0xFF], dtype=torch.uint8)
    for dtype in (torch.bfloat16, torch.float32):
        got = Q.dequantize_sum(data.to(KERNEL_DEVICE), scales.to(KERNEL_DEVICE), dtype=dtype, backend="triton")
        want = Q.dequantize_sum_ref(data, scales, dtype=dtype)
        assert _nan_equal(got.cpu(), want), (seed, dtype)
        if m:
            assert want.isnan().any() == (pieces > 1 or fmt == "fp8")


def test_dequantize_sum_writes_into_out_and_checks_it():
    seed, gen = _seeded()
    data, scales = _pieces("int8", 2, 5, 256, gen, KERNEL_DEVICE)
    out = torch.full((5, 512), float("nan"), dtype=torch.bfloat16, device=KERNEL_DEVICE)[:, :256]  # row-strided
    assert Q.dequantize_sum(data, scales, out=out, backend="triton") is out
    assert torch.equal(out.cpu(), Q.dequantize_sum_ref(data.cpu(), scales.cpu())), seed
    with pytest.raises(ValueError, match="out must be torch.bfloat16"):
        Q.dequantize_sum(data, scales, out=torch.empty(5, 256, device=KERNEL_DEVICE))
    with pytest.raises(TypeError, match="dtype must be bfloat16 or float32"):
        Q.dequantize_sum(data, scales, dtype=torch.float16)
    with pytest.raises(ValueError, match="multiple of 128"):
        Q.dequantize_sum(torch.zeros(2, 3, 200, dtype=torch.int8), torch.ones(2, 3, 1))
    with pytest.raises(TypeError, match="int8 or float8_e4m3fn"):
        Q.dequantize_sum(torch.zeros(2, 3, 256), torch.ones(2, 3, 2))


def test_reduce_formats_row_bytes_and_errors():
    assert Q.reduce_row_bytes("bf16", 7168) == 14336
    assert Q.reduce_row_bytes("int8", 7168) == Q.reduce_row_bytes("fp8", 7168) == 7168 + 224
    assert Q.reduce_row_bytes("int8", 7168) / Q.reduce_row_bytes("bf16", 7168) == pytest.approx(0.5156, abs=1e-4)
    with pytest.raises(ValueError, match="positive multiple of 128"):
        Q.reduce_row_bytes("fp8", 7000)
    with pytest.raises(ValueError, match="choose one of 'bf16', 'int8', 'fp8'"):
        Q.reduce_row_bytes("int4", 7168)
    with pytest.raises(ValueError, match="not quantized"):
        Q.quantize_partials(torch.randn(2, 128), "bf16")


def test_every_new_launch_runs_inside_the_device_guard(monkeypatch):
    from moecomm.quant import _kernels_int8, _kernels_reduce

    events = []

    @contextlib.contextmanager
    def recorder(device):
        events.append(("enter", device))
        yield
        events.append(("exit", device))

    for module in (_kernels_int8, _kernels_reduce):
        monkeypatch.setattr(module, "device_guard", recorder)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    for fn in (lambda: Q.quantize_int8(x, backend="triton"),
               lambda: Q.dequantize_sum(*_pieces("fp8", 2, 3, 256, torch.Generator()), backend="triton")):
        events.clear()
        fn()
        assert events == [("enter", x.device), ("exit", x.device)]


# ----------------------------------------------------------------------------------------------------
# GPU: the kernels at DeepSeek-V3 width against the CPU references


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_kernels_match_cpu_references_at_7168(fmt):
    seed, gen = _seeded()
    x = _activations(4099, 7168, gen)
    x[7, 9], x[8, 4000] = float("inf"), float("nan")
    q, s = Q.quantize_partials(x.cuda(), fmt)
    qr, sr = Q.quantize_partials(x, fmt, backend="torch")
    assert torch.equal(q.cpu().view(torch.uint8), qr.view(torch.uint8)) and _nan_equal(s.cpu(), sr), seed
    for pieces in (1, 2, 4, 8):
        data, scales = _pieces(fmt, pieces, 1025, 7168, gen)
        for dtype in (torch.bfloat16, torch.float32):
            got = Q.dequantize_sum(data.cuda(), scales.cuda(), dtype=dtype)
            assert _nan_equal(got.cpu(), Q.dequantize_sum_ref(data, scales, dtype=dtype)), (seed, pieces, dtype)
