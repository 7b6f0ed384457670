"""A normalized weight from a fused call's vectors: ``W / sigma`` with ``sigma = u^T A(W) x``
recomputed differentiably from the (constant) vectors u, x of that call.

The fused call then runs without autograd; the layers that divide their weight
(strategy "mixed") take spectral_norm's gradient from plain autograd through
``sigma = u^T A(W) x`` -- one matrix-vector product (or a one-sample conv, operator mode)
per layer, at the size of the weight, not of the activations -- and so every order of
derivative is exact (DESIGN.md: the same implicit rule at every order; gradient penalties
differentiate through it again). ``coeff`` gives the soft normalization of invertible
ResNets / DUE, ``W * min(1, coeff / sigma)``.

Shapes: ``w`` the layer's weight as the fused op reads it (``dim`` first; (out, in) or a
4-D kernel), ``u`` (y_numel,), ``x`` (x_numel,) in the compute dtype; returns 0-d.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..reference import apply_op
from ..validate import compute_dtype


def sigma_of(geom, w: torch.Tensor, u: torch.Tensor, x: torch.Tensor,
             matrix: bool) -> torch.Tensor:
    """``u^T A(w) x`` in the compute dtype, differentiable in ``w`` (u, x constants)."""
    wc = w.to(compute_dtype(w.dtype))
    u, x = u.detach().to(wc.dtype), x.detach().to(wc.dtype)
    if matrix:
        return torch.dot(u, wc.reshape(wc.shape[0], -1).mv(x))
    return torch.dot(u, apply_op(geom, wc, x[None])[0])


def scale_of(sigma: torch.Tensor, coeff: Optional[float]) -> torch.Tensor:
    """The divisor: ``sigma``, or ``max(sigma / coeff, 1)`` (``W * min(1, coeff / sigma)``:
    gradient through sigma only where sigma > coeff; below, the layer is its own weight)."""
    if coeff is None:
        return sigma
    return torch.clamp_min(sigma / coeff, 1.0)


def divided(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``w / scale``, in float32 for half-precision weights (as spectral_norm does)."""
    if w.dtype in (torch.float16, torch.bfloat16):
        return (w.float() / scale.float()).to(w.dtype)
    return w / scale.to(w.dtype)
