"""moecomm under torch's grad modes: inference only, and state that serves every mode (private).

**Autograd.** moecomm is an inference library: its kernels and collectives have no backward pass. A
public entry point that computes (``moe_forward``, ``dispatch``, ``combine``, ``experts_forward``,
``GraphedMoE``, ``all_gatherv``, ``reduce_scatterv``, ``all_reduce``, the quantizers and dequantizers,
``nvfp4_global_scale``, ``make_expert_weights``, and the custom ops' wrappers) raises ``ValueError`` at the
door, before any communication, when an input tensor requires grad while grad mode is on: a result that
silently carried no gradient, or wrong ones, is worse than no result. Under ``torch.no_grad()`` or
``torch.inference_mode()`` the same inputs work (the usual way to serve a model whose weights are
``nn.Parameter``). The routing functions (``topk_softmax``, ``grouped_topk``, ``normalize_topk``) are plain
torch and differentiable, as torch makes them.

**State kept between calls.** A tensor made inside ``torch.inference_mode()`` is an inference tensor, which
cannot be updated in place outside inference mode; one made in grad mode may carry autograd history. A
serving engine warms up under inference mode and may later run under ``no_grad``, or the other way round.
So every tensor moecomm keeps between calls (the error buffers, the cached NVFP4 global scales, the
symmetric-memory staging buffers, the statics of ``GraphedMoE``) is made inside :func:`kept_state`: a
normal tensor without autograd history, which torch lets every mode read and update in place.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["refuse_grad", "kept_state"]


def refuse_grad(where: str, **tensors) -> None:
    """Raise ``ValueError`` naming the first of ``tensors`` (tensors or None) that requires grad, when grad
    mode is on (module docstring). Costs one flag read when grad mode is off."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(f"{where}: {name} requires grad, but moecomm has no backward pass (inference "
                             f"only): call it under torch.no_grad() or torch.inference_mode(), or pass "
                             f"{name}.detach()")


@contextlib.contextmanager
def kept_state():
    """Make tensors that moecomm keeps between calls: normal tensors (not inference tensors) without autograd
    history, whatever the caller's mode. Also a decorator."""
    with torch.inference_mode(False), torch.no_grad():
        yield
