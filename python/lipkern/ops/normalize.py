"""The registered op ``lipkern::normalize``: the fused power iteration that also writes every
normalized weight ``W_l / sigma_l``, and its backward ``lipkern::normalize_backward``.

Reads top to bottom: launchers -> registration (+ fake) -> autograd. The public function that
validates and packs is :func:`lipkern.fused_normalize`; the math (and the oracle of the tests)
is :func:`lipkern.reference.normalize`.

Forward: (weights, x0, u0?, meta, n_iters, eps, tol)
    -> (sigmas (L,), x (total_x,), u (total_y,), what (total_w,) in the weights' dtype)
    ``what`` holds W_l / sigma_l packed at the layer table's weight offsets (op layout).
Backward: (weights, x, u, sigmas, grad_sigmas?, grad_what?, meta) -> packed dL/dW (total_w,)
    with dL/dW = G / sigma + (g_sigma - <G, W> / sigma^2) * dsigma/dW (x, u held constant).

Triton only (CUDA tensors, or CPU under TRITON_INTERPRET=1): the other backends compose
the fused power iteration with one division per layer (same values and gradients, more
launches), see :func:`lipkern.fused_normalize`.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..layout import check_op_inputs, layout_from_meta
from .power_iter import _split, unit_sigma_grads


def _kernels():
    from ..triton_kernels import normalize, power_iter  # lazy: Triton is optional
    return power_iter, normalize


# ---------------------------------------------------------------- registration
# Library.define + impl rather than torch.library.custom_op: see lipkern.ops.power_iter (the
# custom_op wrapper's per-call aliasing check cost ~1.2 ms of host time per call here).
LIB = torch.library.Library("lipkern", "FRAGMENT")
LIB.define("normalize(Tensor[] weights, Tensor x0, Tensor? u0, int[] meta, int n_iters, "
           "float eps, float tol) -> (Tensor, Tensor, Tensor, Tensor)")
LIB.define("normalize_backward(Tensor[] weights, Tensor x, Tensor u, Tensor sigmas, "
           "Tensor? grad_sigmas, Tensor? grad_what, int[] meta) -> Tensor")


def _normalize_kernel(weights: List[Tensor], x0: Tensor, u0: Optional[Tensor], meta: List[int],
                      n_iters: int, eps: float, tol: float
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    layout = layout_from_meta(tuple(meta))
    check_op_inputs(layout, weights, x0, u0)
    fwd, _ = _kernels()
    sig, _, _, x, u, what = fwd.forward([w.contiguous() for w in weights], x0, u0, layout,
                                        n_iters, eps, tol, write_normalized=True)
    return sig, x, u, what


def _normalize_backward_kernel(weights, x, u, sigmas, grad_sigmas, grad_what, meta) -> Tensor:
    _, bwd = _kernels()
    return bwd.backward([w.contiguous() for w in weights], x, u, sigmas, grad_sigmas,
                        grad_what, layout_from_meta(tuple(meta)))


for _key in ("CPU", "CUDA"):  # CPU: the Triton interpreter (TRITON_INTERPRET=1)
    LIB.impl("normalize", _normalize_kernel, _key)
    LIB.impl("normalize_backward", _normalize_backward_kernel, _key)
normalize_op = torch.ops.lipkern.normalize.default
normalize_backward_op = torch.ops.lipkern.normalize_backward.default


@torch.library.register_fake("lipkern::normalize")
def _(weights, x0, u0, meta, n_iters, eps, tol):
    layout = layout_from_meta(tuple(meta))
    return (x0.new_empty(layout.num_layers), x0.new_empty(layout.total_x),
            x0.new_empty(layout.total_y), weights[0].new_empty(layout.total_w))


@torch.library.register_fake("lipkern::normalize_backward")
def _(weights, x, u, sigmas, grad_sigmas, grad_what, meta):
    return weights[0].new_empty(layout_from_meta(tuple(meta)).total_w)


# ---------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    weights, meta = inputs[0], inputs[3]
    sigmas, x, u, _ = output
    ctx.save_for_backward(x, u, sigmas, *weights)
    ctx.meta = meta
    ctx.weight_shapes = [w.shape for w in weights]
    ctx.mark_non_differentiable(x, u)
    # outputs the loss does not use (x, u; often sigmas) arrive as None instead of
    # zero-filled tensors: one fill kernel less each, and the kernel skips their terms
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_sigmas, _gx, _gu, grad_what):
    x, u, sigmas, *weights = ctx.saved_tensors
    if grad_sigmas is None and grad_what is None:
        return (None,) * 7
    if torch.is_grad_enabled():
        return (_differentiable_grads(ctx, weights, x, u, sigmas, grad_sigmas, grad_what),) \
            + (None,) * 6
    packed = normalize_backward_op(weights, x, u, sigmas, grad_sigmas, grad_what, ctx.meta)
    return (_split(packed, ctx.weight_shapes),) + (None,) * 6


def _differentiable_grads(ctx, weights, x, u, sigmas, grad_sigmas, grad_what):
    """create_graph=True: the kernel's formula
    ``G / sigma + (g_sigma - <G, W> / sigma^2) * dsigma/dW`` as torch ops, differentiable in
    W, in the sigmas (saved outputs, whose graph leads back to this op) and in G, g_sigma;
    dsigma/dW is the constant of DESIGN's second-order rule (x, u held constant), from one
    unit-coefficient launch of the power-iteration backward. Per layer: this path serves
    gradient penalties, not the one-launch hot path."""
    unit = _split(unit_sigma_grads("triton", x, u, sigmas, ctx.meta, sigmas.dtype),
                  ctx.weight_shapes)
    gw = _split(grad_what, ctx.weight_shapes) if grad_what is not None else None
    grads = []
    for i, (w, d) in enumerate(zip(weights, unit)):
        s = sigmas[i]
        coef = grad_sigmas[i] if grad_sigmas is not None else torch.zeros_like(s)
        g = torch.zeros_like(d)
        if gw is not None:
            gi = gw[i].to(d.dtype)
            coef = coef - (gi * w.to(d.dtype)).sum() / (s * s)
            g = gi / s
        grads.append((g + coef * d).to(w.dtype))
    return grads


torch.library.register_autograd("lipkern::normalize", _backward, setup_context=_setup_context)
