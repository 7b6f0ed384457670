"""The registered op ``lipkern::power_iter`` and its backward ``lipkern::power_iter_backward``.

Reads top to bottom: launchers per backend -> registration (+ fake) -> autograd. The public
function that validates and packs is :func:`lipkern.fused_power_iter`.

Both are defined with ``torch.library.Library`` (schema + one Python kernel per dispatch key,
fake kernels and autograd registered below): opaque to torch.compile (the graph sees one node
per call), tested with ``torch.library.opcheck``. Not ``torch.library.custom_op``: its Python
wrapper checks every output for aliasing on every call, ~0.5 ms here and ~1.2 ms of host time
per call on an H100 machine for a 100-weight call (measured 2026-11-22; bench/NOTES.md). One
forward op and one backward op per call is the whole registered surface, on every backend.

Forward: (weights, x0, u0?, meta, n_iters, eps, tol, backend)
    -> (sigmas (L,), lipschitz (), log_lipschitz (), x (total_x,), u (total_y,))
    u0 given (total_y,) selects torch's spectral_norm update (``variant="spectral_norm"`` of
    :mod:`lipkern.reference`); u0 None the default power iteration.
Backward: (x, u, sigmas, grad_sigmas?, grad_lipschitz?, grad_log_lipschitz?, meta, backend,
    weight_dtype) -> packed weight gradient (total_w,) in weight_dtype; autograd splits it into
    views, one per weight, so the split costs no kernel.
tol < 0 means "no tolerance". x and u are not differentiable.
"""
from __future__ import annotations

import math

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from ..backends import load_ext
from ..layout import Layout, check_op_inputs, layout_from_meta
from . import grouped


# ---------------------------------------------------------------- launchers
def _torch_forward(weights, x0, u0, layout: Layout, n_iters, eps, tol):
    cdtype = x0.dtype
    xs, us, sigmas = [], [], []
    with torch.autocast(x0.device.type, enabled=False):
        for i, (w, g) in enumerate(zip(weights, layout.geoms)):
            x, u, s = reference.iterate_layer(
                g, w.to(cdtype), x0[layout.x_slice(i)], n_iters, eps, None if tol < 0 else tol,
                None if u0 is None else u0[layout.y_slice(i)].to(cdtype))
            xs.append(x)
            us.append(u)
            sigmas.append(s)
    sigmas = torch.stack(sigmas)
    lip, log_lip = reference.bound_from_sigmas(sigmas)
    return sigmas, lip, log_lip, torch.cat(xs), torch.cat(us)


def prod_others(s: Tensor) -> Tensor:
    """(L,) -> (L,) with entry l = prod_{j != l} s_j, without division (exclusive scans)."""
    ones = s.new_ones(1)
    before = torch.cumprod(torch.cat([ones, s[:-1]]), 0)
    after = torch.cumprod(torch.cat([ones, s.flip(0)[:-1]]), 0).flip(0)
    return before * after


def sigma_coefficients(sigmas, grad_sigmas, grad_lip, grad_log) -> Tensor:
    """dLoss/dsigma_l from the three upstream gradients (module docstring of reference)."""
    coef = torch.zeros_like(sigmas) if grad_sigmas is None else grad_sigmas.to(sigmas.dtype)
    if grad_lip is not None:
        coef = coef + torch.where(grad_lip != 0, grad_lip * prod_others(sigmas),
                                  torch.zeros_like(sigmas))
    if grad_log is not None:
        coef = coef + torch.where(sigmas > 0, grad_log / sigmas.clamp_min(1e-300),
                                  torch.zeros_like(sigmas))
    return coef


def _torch_backward(x, u, sigmas, grad_sigmas, grad_lip, grad_log, layout: Layout, wdtype):
    coef = sigma_coefficients(sigmas, grad_sigmas, grad_lip, grad_log)
    with torch.autocast(x.device.type, enabled=False):
        grads = [reference.weight_grad(g, x[layout.x_slice(i)], u[layout.y_slice(i)]) * coef[i]
                 for i, g in enumerate(layout.geoms)]
    return torch.cat(grads).to(wdtype)


def _triton():
    from ..triton_kernels import power_iter as kernels  # lazy: Triton is optional
    return kernels


def _forward_impl(backend, weights, x0, u0, layout, n_iters, eps, tol):
    if backend.startswith("triton"):  # "triton" or "triton:<precision>" (v2 only)
        weights = [w.contiguous() for w in weights]
        if backend != "triton" or _triton_v2_requested():
            from ..triton_kernels import v2_conv  # v2 where its plan covers a layer, else v1
            return v2_conv.forward(weights, x0, u0, layout, n_iters, eps, tol,
                                   backend.partition(":")[2] or "ieee")
        return _triton().forward(weights, x0, u0, layout, n_iters, eps, tol)
    if backend == "grouped":
        return grouped.forward(weights, x0, u0, layout, n_iters, eps, tol)
    return _torch_forward(weights, x0, u0, layout, n_iters, eps, tol)


def _triton_v2_requested() -> bool:
    from ..triton_kernels.v2_plan import v2_requested
    return v2_requested()


def _backward_impl(backend, x, u, sigmas, gs, gl, glog, layout, wdtype):
    if backend.startswith("triton"):  # the v1 backward reads any forward's x and u
        return _triton().backward(x, u, sigmas, gs, gl, glog, layout, wdtype)
    if backend == "grouped":
        return grouped.backward(x, u, sigma_coefficients(sigmas, gs, gl, glog), layout, wdtype)
    return _torch_backward(x, u, sigmas, gs, gl, glog, layout, wdtype)


# ---------------------------------------------------------------- registration
LIB = torch.library.Library("lipkern", "FRAGMENT")  # kept alive: it owns the registrations
LIB.define("power_iter(Tensor[] weights, Tensor x0, Tensor? u0, int[] meta, int n_iters, "
           "float eps, float tol, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
LIB.define("power_iter_backward(Tensor x, Tensor u, Tensor sigmas, Tensor? grad_sigmas, "
           "Tensor? grad_lipschitz, Tensor? grad_log_lipschitz, int[] meta, str backend, "
           "ScalarType weight_dtype) -> Tensor")


def _power_iter_kernel(weights: List[Tensor], x0: Tensor, u0: Optional[Tensor],
                       meta: List[int], n_iters: int, eps: float, tol: float, backend: str
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    layout = layout_from_meta(tuple(meta))
    check_op_inputs(layout, weights, x0, u0)
    return _forward_impl(backend, weights, x0, u0, layout, n_iters, eps, tol)


def _power_iter_backward_kernel(x, u, sigmas, grad_sigmas, grad_lipschitz, grad_log_lipschitz,
                                meta, backend, weight_dtype) -> Tensor:
    layout = layout_from_meta(tuple(meta))
    check_op_inputs(layout, None, x, u)
    return _backward_impl(backend, x, u, sigmas, grad_sigmas, grad_lipschitz,
                          grad_log_lipschitz, layout, weight_dtype)


for _key in ("CPU", "CUDA"):  # the same Python kernels pick their backend themselves
    LIB.impl("power_iter", _power_iter_kernel, _key)
    LIB.impl("power_iter_backward", _power_iter_backward_kernel, _key)
power_iter_op = torch.ops.lipkern.power_iter.default
power_iter_backward_op = torch.ops.lipkern.power_iter_backward.default


def _fake_forward(x0, meta):
    layout = layout_from_meta(tuple(meta))
    return (x0.new_empty(layout.num_layers), x0.new_empty(()), x0.new_empty(()),
            x0.new_empty(layout.total_x), x0.new_empty(layout.total_y))


@torch.library.register_fake("lipkern::power_iter")
def _(weights, x0, u0, meta, n_iters, eps, tol, backend):
    return _fake_forward(x0, meta)


@torch.library.register_fake("lipkern::power_iter_backward")
def _(x, u, sigmas, grad_sigmas, grad_lipschitz, grad_log_lipschitz, meta, backend,
      weight_dtype):
    return x.new_empty(layout_from_meta(tuple(meta)).total_w, dtype=weight_dtype)


# ---------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    weights, meta = inputs[0], inputs[3]
    sigmas, _, _, x, u = output
    ctx.save_for_backward(x, u, sigmas)
    ctx.meta = meta
    ctx.backend = inputs[7] if len(inputs) > 7 else None  # None: the compiled op
    ctx.n_inputs = len(inputs)
    ctx.weight_shapes = [w.shape for w in weights]
    ctx.weight_dtype = weights[0].dtype
    ctx.mark_non_differentiable(x, u)
    # outputs the loss does not use arrive as None, not zero-filled (measured on an H100: a
    # backward of r.lipschitz alone launched 4 fill kernels for sigmas, log_lipschitz, x, u);
    # every backend's backward takes None for each of the three upstream gradients
    ctx.set_materialize_grads(False)


def _backward_launch(backend, x, u, sigmas, gs, gl, glog, meta, wdtype):
    """The packed weight gradient from one backward launch of this backend."""
    if backend is None:
        return torch.ops.lipkern.power_iter_ext_backward(x, u, sigmas, gs, gl, glog, meta,
                                                         wdtype)
    return power_iter_backward_op(x, u, sigmas, gs, gl, glog, meta, backend, wdtype)


def unit_sigma_grads(backend, x, u, sigmas, meta, cdtype) -> Tensor:
    """Packed dsigma_l/dW_l (total_w,) in ``cdtype``: one backward launch with unit
    coefficients. With x and u held constant sigma_l = <W_l, dsigma_l/dW_l> is linear in W_l,
    so this is a constant of the graph, and ``coef_l * unit_l`` is the whole weight gradient
    (the second-order path below, and lipkern.ops.normalize's)."""
    with torch.no_grad():
        return _backward_launch(backend, x, u, sigmas.detach(),
                                torch.ones_like(sigmas, dtype=sigmas.dtype), None, None,
                                meta, cdtype)


def _split(packed: Tensor, shapes) -> list:
    # one split (a C++ call returning every view) instead of a Python slice per layer:
    # measured on an H100 host, 100 slices + views cost ~1.5 ms per backward
    return [g.view(shape) for g, shape in zip(
        packed.split([math.prod(shape) for shape in shapes]), shapes)]


def _backward(ctx, grad_sigmas, grad_lip, grad_log, _gx, _gu):
    x, u, sigmas = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True (gradient penalties): the weight gradient coef_l * dsigma_l/dW_l
        # as a differentiable torch expression -- dsigma/dW is constant (x, u held constant,
        # DESIGN's second-order rule) and coef (sigma_coefficients) differentiable in the
        # sigmas (saved outputs: their graph leads back here) and the upstream gradients
        unit = unit_sigma_grads(ctx.backend, x, u, sigmas, ctx.meta, sigmas.dtype)
        coef = sigma_coefficients(sigmas, grad_sigmas, grad_lip, grad_log)
        sizes = [math.prod(shape) for shape in ctx.weight_shapes]
        packed = unit * torch.repeat_interleave(
            coef, torch.tensor(sizes, device=coef.device), output_size=sum(sizes))
        grads = [g.to(ctx.weight_dtype) for g in _split(packed, ctx.weight_shapes)]
        return (grads,) + (None,) * (ctx.n_inputs - 1)
    packed = _backward_launch(ctx.backend, x, u, sigmas, grad_sigmas, grad_lip, grad_log,
                              ctx.meta, ctx.weight_dtype)
    return (_split(packed, ctx.weight_shapes),) + (None,) * (ctx.n_inputs - 1)


torch.library.register_autograd("lipkern::power_iter", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------- the compiled op
# lipkern::power_iter_ext (schema in csrc/ops.cpp; CPU kernels in csrc/cpu, CUDA in
# csrc/cuda): the same contract as power_iter_op without the backend argument (the
# dispatcher picks CPU or CUDA by device). Fake kernels and autograd are registered here.
def _ext_fake(weights, x0, u0, meta, n_iters, eps, tol):
    return _fake_forward(x0, meta)


def _ext_backward_fake(x, u, sigmas, grad_sigmas, grad_lipschitz, grad_log_lipschitz, meta,
                       weight_dtype):
    return x.new_empty(layout_from_meta(tuple(meta)).total_w, dtype=weight_dtype)


if load_ext() is not None:
    torch.library.register_fake("lipkern::power_iter_ext")(_ext_fake)
    torch.library.register_fake("lipkern::power_iter_ext_backward")(_ext_backward_fake)
    torch.library.register_autograd("lipkern::power_iter_ext", _backward,
                                    setup_context=_setup_context)


def call_op(backend: str, weights, x0, u0, meta, n_iters: int, eps: float, tol: float):
    """The one registered op of a call on this backend (u0: see the module docstring)."""
    if backend in ("cpp", "cuda"):
        return torch.ops.lipkern.power_iter_ext(weights, x0, u0, meta, n_iters, eps, tol)
    return power_iter_op(weights, x0, u0, meta, n_iters, eps, tol, backend)
