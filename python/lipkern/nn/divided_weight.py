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


class ScaledLayerExact(torch.autograd.Function):
    """:class:`~lipkern.nn.scaled_layer.ScaledLayer` (``layer(x; W) / s + b``, its fast
    first-order backward) whose backward is itself differentiable: under
    ``create_graph=True`` (gradient penalties, R1) the backward recomputes the plain formula
    ``layer(x; W) / s(W) + b`` from the saved inputs, with ``s(W) = sigma_fn(W)`` (u^T A(W) x
    with the vectors fixed, then coeff), and differentiates it -- the same implicit rule at
    every order (DESIGN.md), at the cost of one more forward of the layer in that backward.
    Extra argument: ``sigma_fn`` (W -> 0-d divisor, differentiable)."""

    @staticmethod
    def forward(ctx, x, w, b, sigma, rank1, conv, sigma_fn):
        from .scaled_layer import ScaledLayer
        y = ScaledLayer.forward(ctx, x, w, b, sigma, rank1, conv)
        ctx.b, ctx.sigma_fn = b, sigma_fn
        return y

    @staticmethod
    def backward(ctx, gy):
        from .scaled_layer import ScaledLayer
        if not torch.is_grad_enabled():  # first order: the fast path
            return (*ScaledLayer.backward(ctx, gy), None)
        x, w = ctx.saved_tensors[:2]
        b, conv = ctx.b, ctx.conv
        need = ctx.needs_input_grad[:3]
        inputs = [t for t, n in zip((x, w, b), need) if n]
        with torch.enable_grad():
            z = torch.nn.functional.linear(x, w) if conv is None else \
                torch.ops.aten.convolution(x, w, None, *conv)
            y = z / ctx.sigma_fn(w).to(z.dtype)
            if b is not None:
                y = y + (b if conv is None else b.view(-1, *([1] * (z.dim() - 2))))
            grads = iter(torch.autograd.grad(y, inputs, gy, create_graph=True,
                                             allow_unused=True))
        gx, gw, gb = (next(grads) if n else None for n in need)
        return gx, gw, gb, None, None, None, None
