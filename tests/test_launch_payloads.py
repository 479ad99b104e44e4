"""``launch`` carries every tensor dtype torch has both ways: arguments to the ranks and results back, FP8 /
NVFP4 ``QuantizedTensor`` results included (plain pickle cannot carry float8, float4, uint16/32/64,
complex32, bits or sub-byte tensors). The bytes that arrive are the bytes that were sent."""

import random

import torch
import torch.distributed as dist

from moecomm.comm import launch
from moecomm.quant import QuantFormat, QuantizedTensor, nvfp4_global_scale, quantize, quantize_fp8

# Dtypes whose tensors hold plain bytes (quantized dtypes need a quantizer, deprecated in torch 2.13)
QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}
DTYPES = sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype)} - QUANTIZED, key=str)


def _tensor(seed: int, dtype: torch.dtype, rows: int = 3) -> torch.Tensor:
    """Random bytes viewed as ``dtype`` ``[rows, 4]`` (every bit pattern is a value of the dtype)."""
    size = max(1, dtype.itemsize)
    raw = torch.randint(0, 256, (rows, 4 * size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return raw.view(dtype) if dtype != torch.bool else raw.bool()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _payload(seed: int, rank: int):
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(seed + rank)).bfloat16()
    return {
        "dtypes": {str(d): _tensor(seed + rank, d) for d in DTYPES},
        "strided": _tensor(seed, torch.float8_e4m3fn, 6)[::2, 1:],  # a non-contiguous view
        "fp8": quantize_fp8(x),
        "nvfp4": quantize(x, QuantFormat.NVFP4, global_scale=nvfp4_global_scale(torch.tensor(7.0))),
        "fp8 group": quantize(x, QuantFormat.FP8_GROUP),
        "nested": [(torch.zeros(0, 2, dtype=torch.float8_e5m2), "text", 3)],
    }


def _echo(seed, sent):
    """Return what arrived and what this rank makes itself."""
    return sent, _payload(seed, dist.get_rank())


def _assert_same(got, expected, where):
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == expected.dtype and got.shape == expected.shape, where
        assert torch.equal(_bytes(got), _bytes(expected)), where
    elif isinstance(expected, QuantizedTensor):
        assert isinstance(got, QuantizedTensor) and got.format == expected.format, where
        for field in ("data", "scales", "global_scale"):
            e = getattr(expected, field)
            if e is not None:
                _assert_same(getattr(got, field), e, f"{where}.{field}")
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for k in expected:
            _assert_same(got[k], expected[k], f"{where}[{k}]")
    elif isinstance(expected, (list, tuple)):
        assert type(got) is type(expected) and len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            _assert_same(g, e, f"{where}[{i}]")
    else:
        assert got == expected, where


def test_launch_carries_every_dtype_both_ways():
    seed = random.randrange(1 << 30)
    sent = _payload(seed, 99)
    results = launch(_echo, 2, (seed, sent), backend="gloo", timeout=120)
    for rank, (arrived, made) in enumerate(results):
        _assert_same(arrived, sent, f"seed {seed}: argument back from rank {rank}")
        _assert_same(made, _payload(seed, rank), f"seed {seed}: result of rank {rank}")
