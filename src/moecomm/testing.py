"""Test helpers shared by the test suite and the GPU check script."""

from __future__ import annotations

import torch

__all__ = ["assert_close", "rel_error", "error_of", "assert_raised_on_every_rank", "on_every_gpu_count"]


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (0 when both are all zero)."""
    a, e = actual.double(), expected.double()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rel: float, name: str = "tensor") -> None:
    """Raise ``AssertionError`` unless shapes match, nothing is NaN and the relative L2 error <= ``rel``.

    Tolerances by arithmetic (see docs): float32 ~1e-6, tf32 ~3e-4, bf16 operands 1e-3..1e-2.
    ``rel=0`` asks for bit-identical values (NaNs still fail).
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if torch.isnan(actual).any():
        raise AssertionError(f"{name}: {int(torch.isnan(actual).sum())} NaN values")
    if rel == 0:
        if not torch.equal(actual, expected):
            bad = (actual != expected).nonzero()
            raise AssertionError(f"{name}: {bad.shape[0]} elements differ, first at {bad[0].tolist()}")
        return
    err = rel_error(actual, expected)
    if not err <= rel:
        worst = (actual.double() - expected.double()).abs().flatten().argmax().item()
        raise AssertionError(f"{name}: relative error {err:.3e} > {rel:.1e} (worst at flat index {worst})")


def error_of(fn) -> str | None:
    """The message of the ``ValueError`` / ``TypeError`` that ``fn()`` raises, or None if it returns.

    For multi-rank error tests: each rank collects its messages and returns them to the caller.
    """
    try:
        fn()
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def assert_raised_on_every_rank(results: list[dict[str, str | None]]) -> None:
    """``results[rank][case]`` from :func:`error_of`: raise ``AssertionError`` unless every rank raised in every case."""
    for case in results[0]:
        for rank, res in enumerate(results):
            if res[case] is None:
                raise AssertionError(f"{case}: rank {rank} did not raise")


def on_every_gpu_count(fn, *args) -> None:
    """Run ``fn(seed, *args)`` over NCCL at world size 1 and at the number of visible GPUs; every rank must
    return ``"ok"``. The seed is fresh and appears in the failure message."""
    import random

    from moecomm.comm import launch

    seed = random.randrange(1 << 30)
    for ws in sorted({1, torch.cuda.device_count()}):
        results = launch(fn, ws, (seed, *args), backend="nccl", timeout=300)
        assert results == ["ok"] * ws, (fn.__name__, ws, seed, results)
