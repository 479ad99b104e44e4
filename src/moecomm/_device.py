"""Which device a kernel runs on: its tensors', never merely the current one (private).

Triton launches on ``torch.cuda.current_device()``; a tensor on ``cuda:1`` while the current device is
``cuda:0`` makes the launch fail ("Pointer argument cannot be accessed from Triton") or, worse, run on
the wrong GPU. Every kernel launch site of moecomm runs inside :func:`device_guard` of its tensors'
device, after :func:`common_device` has checked that they share one.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["common_device", "device_guard"]


def common_device(name: str, **tensors: torch.Tensor | None) -> torch.device:
    """The one device of the given tensors (``None`` entries are skipped).

    Raises ``ValueError`` naming each tensor's device when they are on different devices.
    """
    devices = {k: t.device for k, t in tensors.items() if isinstance(t, torch.Tensor)}
    if not devices:
        raise ValueError(f"{name}: no tensor given")
    distinct = set(devices.values())
    if len(distinct) > 1:
        where = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"{name}: tensors must be on one device, got {where}")
    return distinct.pop()


def device_guard(device: torch.device):
    """A context manager that makes ``device`` current for CUDA launches (no-op for other devices)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
