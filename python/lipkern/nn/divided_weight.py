"""A normalized weight from a fused call's sigma and vectors: ``W / sigma`` with the gradient
of ``sigma = u^T A(W) x`` for the (constant) vectors u, x of that call.

The fused call then runs without autograd; the layers that divide their weight
(strategy "mixed") take spectral_norm's gradient from :class:`SigmaFromVectors` (the call's
value, the gradient ``dsigma/dW`` from u and x: weight-sized, not activation-sized work;
:func:`sigma_of` is the same sigma recomputed by plain autograd, used by ScaledLayerExact),
and so every order of derivative is exact (DESIGN.md: the same implicit rule at every order;
gradient penalties differentiate through it again). ``coeff`` gives the soft normalization of invertible
ResNets / DUE, ``W * min(1, coeff / sigma)``.

Shapes (sigma_of): ``w`` the layer's weight as the fused op reads it (``dim`` first; (out, in)
or a 4-D kernel), ``u`` (y_numel,), ``x`` (x_numel,); returns 0-d in the compute dtype.
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


class SigmaFromVectors(torch.autograd.Function):
    """``sigma = u^T A(W) x`` without recomputing it: the forward returns the fused call's
    value, the backward ``g * dsigma/dW = grad_fn(g)`` (``dsigma/dW``: ``u x^T`` for a
    matrix, the conv weight gradient of (x, u) for an operator) -- constant in W, since u and
    x are, so this backward is exact at every order (its own derivative in W is zero, in g
    the constant; ``grad_fn`` is linear in g and differentiable in it). Saves the forward's
    weight pass (matrix) or one-sample conv (operator) of :func:`sigma_of`. Inputs: w (any
    shape, for its gradient), sigma 0-d, grad_fn (g 0-d) -> a tensor shaped like w."""

    @staticmethod
    def forward(ctx, w, sigma, grad_fn):
        ctx.grad_fn = grad_fn
        return sigma.detach().to(compute_dtype(w.dtype)).clone()

    @staticmethod
    def backward(ctx, g):
        return ctx.grad_fn(g), None, None


def sigma_fast(geom, w: torch.Tensor, sigma: torch.Tensor, u: torch.Tensor, x: torch.Tensor,
               matrix: bool, dim: int, unit=None) -> torch.Tensor:
    """:func:`sigma_of`'s value and gradients from the fused call's sigma and vectors: ``w``
    the layer's own weight (``dim``: torch's output dimension, moved first for the
    operator's layout). ``unit``: None, or a callable giving dsigma/dW (flat, the op's
    layout) already computed for this layer (FusedSigmas.unit: one C++ call for every
    operator layer of the forward)."""
    from ..reference import weight_grad

    def grad_fn(g):
        cd = compute_dtype(w.dtype)
        g = g.to(cd)
        if unit is not None:
            d = unit() * g
        else:
            uu, xx = u.detach().to(cd), x.detach().to(cd)
            # matrix: g u x^T as one weight-sized write (outer, then a scaling pass, was two)
            d = torch.outer(uu * g, xx) if matrix else weight_grad(geom, xx, uu) * g
        shape = w.shape if dim == 0 else w.movedim(dim, 0).shape
        d = d.view(shape)
        return (d if dim == 0 else d.movedim(0, dim)).to(w.dtype)
    return SigmaFromVectors.apply(w, sigma, grad_fn)


class DividedBySigma(torch.autograd.Function):
    """``W / sigma(W)`` where ``sigma(W)`` is :class:`SigmaFromVectors` (the fused call's
    value, the constant slope ``dsigma/dW``): the same function and gradients as
    ``divided(w, sigma_fast(...))``, with a first-order backward of three weight-sized ops
    and about six passes, ``g / sigma + c * dsigma/dW`` with ``c = -<g, W> / sigma^2``:
    ``g / sigma`` into a contiguous tensor, one dot on it, then the rank-one ``c u x^T``
    (matrix: BLAS ger in place) or the shared unit term added in place -- instead of the
    ~12 passes of autograd's DivBackward (``-g * W / sigma^2`` summed), the separate dsigma/dW
    term and their accumulation. Under ``create_graph=True`` the backward differentiates that
    composite with autograd, so every order stays exact. Inputs: w (float32 or float64,
    torch's ``dim`` 0), sigma 0-d, data = (geom, u, x, matrix, unit) as in
    :func:`divided_fast` (a tuple, not closures: this runs per layer and forward)."""

    @staticmethod
    def forward(ctx, w, sigma, data):
        s = sigma if sigma.dtype == w.dtype else sigma.to(w.dtype)  # a constant: no grad
        ctx.save_for_backward(w)
        ctx.s, ctx.sigma, ctx.data = s, sigma, data
        return w / s

    @staticmethod
    def backward(ctx, g):
        w, = ctx.saved_tensors
        s = ctx.s
        geom, u, x, matrix, unit = ctx.data
        if torch.is_grad_enabled():  # create_graph=True: the composite, again differentiable
            with torch.enable_grad():
                y = divided(w, sigma_fast(geom, w, ctx.sigma, u, x, matrix, 0, unit))
                gw, = torch.autograd.grad(y, w, g, create_graph=True)
            return gw, None, None
        if w.device.type == "cpu" and _divided_backward() is not None:
            # the same two terms in one C++ call of two passes (csrc/cpu/divided.cpp)
            d = None
            if not matrix:
                from ..reference import weight_grad
                d = (unit() if unit is not None else weight_grad(
                    geom, x.detach().to(w.dtype), u.detach().to(w.dtype))).to(w.dtype)
            return _divided_backward()(g, w, s, u.detach().to(w.dtype),
                                       x.detach().to(w.dtype), d), None, None
        # g / sigma + c dsigma/dW, c = -<g, W> / sigma^2 = -<g / sigma, W> / sigma: the
        # scalars stay tensors (no host read in a training step, tests/test_host_sync.py);
        # g / sigma written straight into a contiguous tensor, and the dot taken on it (a
        # strided g, as double backward gives, then costs no copy)
        base = g / s if g.is_contiguous() else torch.div(
            g, s, out=torch.empty_like(w, memory_format=torch.contiguous_format))
        c = torch.vdot(base.view(-1), w.reshape(-1)).div_(s).neg_()
        if matrix:  # + c u x^T in place (BLAS ger: 29 us against 104 for an out-of-place addr
            # on a 147k weight, 1 thread)
            uu = u if u.dtype == w.dtype else u.to(w.dtype)
            xx = x if x.dtype == w.dtype else x.to(w.dtype)
            base.view(base.shape[0], -1).addr_(uu.detach() * c, xx.detach())
            return base, None, None
        from ..reference import weight_grad
        d = unit() if unit is not None else weight_grad(
            geom, x.detach().to(base.dtype), u.detach().to(base.dtype))
        base.view(-1).addcmul_(d.view(-1), c)
        return base, None, None


def _divided_backward():
    """``lipkern::divided_backward`` (the C++ extension), or None where it is not built."""
    from ..backends import load_ext
    return torch.ops.lipkern.divided_backward if load_ext() is not None else None


def divided_fast(geom, w: torch.Tensor, sigma: torch.Tensor, u: torch.Tensor,
                 x: torch.Tensor, matrix: bool, unit=None) -> torch.Tensor:
    """``divided(w, sigma_fast(geom, w, sigma, u, x, matrix, 0, unit))`` through
    :class:`DividedBySigma` (weights of torch's ``dim`` 0, float32/float64, no coeff)."""
    return DividedBySigma.apply(w, sigma, (geom, u, x, matrix, unit))


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
