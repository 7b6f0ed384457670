r"""The pure-torch reference: the specification of lipkern and the oracle of every test.

For each layer with operator A (see :mod:`lipkern.spec`) and a start vector x0:

.. math::

    x \leftarrow x_0 / \max(\|x_0\|, \epsilon)

    \text{repeat } n\_iters \text{ times:}\quad y = A x,\;
        x = \frac{A^\top \hat y}{\max(\|A^\top \hat y\|, f)},\;
        \hat y = \frac{y}{\max(\|y\|, f)}

    y = A x,\quad \sigma = \|y\|,\quad u = y / \max(\sigma, f)

Numeric contract (every backend follows it; ``tests/test_numeric_contract.py``):

* N1 -- ``f = max(eps * min(1, max|W|), tiny)`` floors the norms of operator images
  (``A x``, ``A^T u``): eps itself for weights with an entry >= 1 (torch's absolute eps), scaled
  down with smaller weights, so eps never floors a norm that is really of the weight's scale
  (``sigma >= max|W|`` up to border effects); ``tiny`` is the compute dtype's smallest normal.
  Start vectors (``x0``, ``u0``) keep the absolute eps. Since ``f <= eps``, a norm >= eps is
  never floored, so kernels compute ``max|W|`` only when a norm falls below eps.
* N2 -- the default update normalizes after each half-step (``A x``, then ``A^T`` of the unit
  vector): nothing of size sigma^2 is ever formed or floored. (Dense kernels may still form
  ``W^T W x`` in one pass over W when ``||W x||^2`` lies within [2^-60, 2^60], where it can
  neither overflow nor underflow float32.)
* N3 -- sums of squares accumulate in float64 (float32 weights), so every sigma between the
  smallest and the largest normal float32 (1e-30..1e30 tested) comes out right, with no 0,
  inf or NaN from an overflowed ``||y||^2``.
* N4 -- an all-zero or non-finite start vector (``x0``, or ``u0`` of torch's update) is
  replaced by :func:`lipkern.layout.fallback_vector`, never iterated into sigma 0.
* N5 -- a NaN sigma gives ``log_lipschitz`` NaN (a zero sigma gives -inf).

With ``tol``, iteration ``k > 0`` first compares ``s_k = \|A x\|`` with ``s_{k-1}`` and stops
(keeping x) once ``|s_k - s_{k-1}| <= tol * s_k``.

``variant="spectral_norm"`` is torch's spectral_norm update instead, with both vectors in the
state (x is torch's v, u its u; no ``tol``):

.. math::

    x \leftarrow x_0 / \max(\|x_0\|, \epsilon),\quad u \leftarrow u_0 / \max(\|u_0\|, \epsilon)

    \text{repeat } n\_iters \text{ times:}\quad u = \frac{A x}{\max(\|A x\|, f)},\;
        x = \frac{A^\top u}{\max(\|A^\top u\|, f)}

    \sigma = u^\top A x

so sigma uses u of the last half-step (slightly below ``\|A x\|`` before convergence), and
``n_iters = 0`` evaluates ``u_0^\top A x_0`` (torch's eval mode). The gradient rule below is the
same for both variants.

Gradient (the implicit rule of torch.nn.utils.spectral_norm): x and u are held constant, so
``sigma = u^T A(W) x`` and ``dsigma/dW = u x^T`` for dense layers, the conv weight gradient
of input x and output gradient u for conv operators (x and u swapped for transposed convs).
The network bound is ``L = prod(sigma_l)`` with ``dL/dsigma_l = prod_{j != l} sigma_j`` and
``log L = sum(log sigma_l)``; a zero sigma contributes no gradient to ``log L`` (its u is 0).

Second order (``create_graph=True``): the same rule at every order -- x and u are constants,
so sigma is the linear function ``<W, dsigma/dW>`` of W, ``W / sigma`` an ordinary
differentiable function of W, and every backward differentiable again. The reference gets this
from autograd; the registered ops (``lipkern.ops``) re-express their backward as torch ops
when grad mode is on in the backward (``tests/test_second_order.py``).

Bf16/fp16 weights iterate in float32 (autocast is disabled inside); float64 stays float64.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .layout import PowerIterState, fallback_vector, initial_u, initial_x
from .result import NormalizeResult, PowerIterResult
from .spec import KIND_CONV_T, KIND_DENSE, ConvSpec, LayerGeom, resolve_geometry
from .validate import compute_dtype, validate_call

__all__ = ["power_iter", "normalize", "exact_sigma", "apply_op", "apply_adjoint", "iterate_layer",
           "weight_grad", "bound_from_sigmas", "divide", "EXACT_MAX_ELEMENTS", "certified_sigma"]


# ---------------------------------------------------------------- the conv-form map C
def _kernel4(w: torch.Tensor, g: LayerGeom) -> torch.Tensor:
    return w.reshape(g.cout, g.cin // g.groups, g.kh, g.kw)


def _is_matrix(g: LayerGeom) -> bool:
    return g.h == g.w == g.oh == g.ow == g.kh == g.kw == 1 and g.groups == 1


def conv_c(g: LayerGeom, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """C x: flat (..., cin*h*w) -> flat (..., cout*oh*ow)."""
    if _is_matrix(g):
        return x @ w.reshape(g.cout, g.cin).t()
    batch = x.shape[:-1]
    x = x.reshape(-1, g.cin, g.h, g.w)
    pad = (g.ph, g.pw)
    if g.circular:
        x = F.pad(x, (g.pw, g.pw, g.ph, g.ph), mode="circular")
        pad = (0, 0)
    y = F.conv2d(x, _kernel4(w, g), stride=(g.sh, g.sw), padding=pad,
                 dilation=(g.dh, g.dw), groups=g.groups)
    return y.reshape(*batch, -1)


def _fold_circular(z: torch.Tensor, p: int, n: int, dim: int) -> torch.Tensor:
    """Adjoint of circular padding by p along dim: z has size n + 2p there (p <= n)."""
    core = z.narrow(dim, p, n).clone()
    if p:
        core.narrow(dim, n - p, p).add_(z.narrow(dim, 0, p))
        core.narrow(dim, 0, p).add_(z.narrow(dim, p + n, p))
    return core


def conv_ct(g: LayerGeom, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """C^T y: flat (..., cout*oh*ow) -> flat (..., cin*h*w) (conv_transpose2d with the
    output_padding that restores (h, w); circular padding folded back)."""
    if _is_matrix(g):
        return y @ w.reshape(g.cout, g.cin)
    batch = y.shape[:-1]
    y = y.reshape(-1, g.cout, g.oh, g.ow)
    if g.circular:
        ph, pw, hp, wp = 0, 0, g.h + 2 * g.ph, g.w + 2 * g.pw
    else:
        ph, pw, hp, wp = g.ph, g.pw, g.h, g.w
    oph = hp - ((g.oh - 1) * g.sh - 2 * ph + g.dh * (g.kh - 1) + 1)
    opw = wp - ((g.ow - 1) * g.sw - 2 * pw + g.dw * (g.kw - 1) + 1)
    z = F.conv_transpose2d(y, _kernel4(w, g), stride=(g.sh, g.sw), padding=(ph, pw),
                           output_padding=(oph, opw), groups=g.groups, dilation=(g.dh, g.dw))
    if g.circular:
        z = _fold_circular(_fold_circular(z, g.ph, g.h, 2), g.pw, g.w, 3)
    return z.reshape(*batch, -1)


def apply_op(g: LayerGeom, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A x for the layer's operator A (C, or C^T for transposed convs)."""
    return conv_ct(g, w, x) if g.kind == KIND_CONV_T else conv_c(g, w, x)


def apply_adjoint(g: LayerGeom, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A^T y."""
    return conv_c(g, w, y) if g.kind == KIND_CONV_T else conv_ct(g, w, y)


def weight_grad(g: LayerGeom, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """d(u^T A(W) x)/dW, flat (w_numel,): ``u x^T`` for a matrix, else the conv weight gradient
    of C with input x and output gradient u (input u and output gradient x for C^T)."""
    if g.kind == KIND_CONV_T:
        x, u = u, x
    if _is_matrix(g):
        return torch.outer(u, x).reshape(-1)
    return conv_weight_grad(g, x, u).reshape(-1)


def conv_weight_grad(g: LayerGeom, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The weight gradient (cout, cin/groups, kh, kw) of the conv C of geometry ``g`` (not a
    matrix) with input x (g.in_numel entries) and output gradient u (g.out_numel entries)."""
    inp = x.reshape(1, g.cin, g.h, g.w)
    pad = (g.ph, g.pw)
    if g.circular:
        inp = F.pad(inp, (g.pw, g.pw, g.ph, g.ph), mode="circular")
        pad = (0, 0)
    return torch.nn.grad.conv2d_weight(inp, (g.cout, g.cin // g.groups, g.kh, g.kw),
                                       u.reshape(1, g.cout, g.oh, g.ow), stride=(g.sh, g.sw),
                                       padding=pad, dilation=(g.dh, g.dw), groups=g.groups)


# ---------------------------------------------------------------- power iteration
def _norm(v: torch.Tensor) -> torch.Tensor:
    """||v|| with the sum of squares in float64 (N3: sigma^2 of 1e30 overflows float32)."""
    return torch.linalg.vector_norm(v, dtype=torch.float64)


def _normalize(v: torch.Tensor, floor):
    n = _norm(v)
    return v / n.clamp_min(floor).to(v.dtype), n.to(v.dtype)


def image_floor(w: torch.Tensor, eps: float) -> torch.Tensor:
    """N1: the floor of an operator image's norm, ``max(eps * min(1, max|W|), tiny)`` (a 0-d
    float64 tensor: no host read, so a training step on the torch backend never syncs)."""
    m = w.detach().abs().amax().to(torch.float64)
    return (eps * m.clamp(max=1.0)).clamp_min(torch.finfo(w.dtype).tiny)


def start_vector(v0: torch.Tensor, eps: float) -> torch.Tensor:
    """A start vector normalized with the absolute eps; N4: all-zero or non-finite ->
    :func:`lipkern.layout.fallback_vector` (normalized). Chosen on the device (no host read)."""
    n = _norm(v0)
    ok = torch.isfinite(n) & (n > 0)
    fb = fallback_vector(v0.numel(), v0.dtype, v0.device)
    v = torch.where(ok, v0, fb)
    return v / torch.where(ok, n, _norm(fb)).clamp_min(eps).to(v0.dtype)


@torch.no_grad()
def iterate_layer(g: LayerGeom, w: torch.Tensor, x0: torch.Tensor, n_iters: int, eps: float,
                  tol: Optional[float], u0: Optional[torch.Tensor] = None):
    """Run the iteration of the module docstring on one layer (no autograd); ``u0`` given
    selects ``variant="spectral_norm"`` (then ``tol`` must be None).

    Args: w in the compute dtype, x0 flat (x_numel,), u0 flat (y_numel,) or None. Returns
    (x, u, sigma) with x (x_numel,) and u (y_numel,) unit (or zero) vectors and sigma 0-d."""
    f = image_floor(w, eps)
    x = start_vector(x0, eps)
    if u0 is not None:
        u = start_vector(u0, eps)
        for _ in range(n_iters):
            u, _ = _normalize(apply_op(g, w, x), f)
            x, _ = _normalize(apply_adjoint(g, w, u), f)
        return x, u, torch.dot(u, apply_op(g, w, x))
    s_prev = None
    for _ in range(n_iters):
        uy, s = _normalize(apply_op(g, w, x), f)
        if tol is not None:
            s = float(s)
            if s_prev is not None and abs(s - s_prev) <= tol * s:
                break
            s_prev = s
        x, _ = _normalize(apply_adjoint(g, w, uy), f)
    u, sigma = _normalize(apply_op(g, w, x), f)
    return x, u, sigma


def bound_from_sigmas(sigmas: torch.Tensor):
    """(lipschitz, log_lipschitz) from (L,) sigmas, with the gradients of the module docstring
    (torch.prod's backward already avoids dividing by a zero sigma)."""
    pos = sigmas > 0
    # N5: a zero sigma logs as -inf, a NaN one as NaN (never hidden as -inf)
    logs = torch.where(pos, torch.log(torch.where(pos, sigmas, torch.ones_like(sigmas))),
                       torch.where(sigmas == 0, torch.full_like(sigmas, float("-inf")),
                                   torch.full_like(sigmas, float("nan"))))
    return torch.prod(sigmas), logs.sum()


def power_iter(weights: Sequence[torch.Tensor], specs: Optional[Sequence[Optional[ConvSpec]]] = None,
               *, state: Optional[PowerIterState] = None, n_iters: int = 5, eps: float = 1e-12,
               tol: Optional[float] = None, backend: str = "torch",
               generator: Optional[torch.Generator] = None,
               check_finite: bool = True, variant: str = "power") -> PowerIterResult:
    """Reference power iteration, one layer at a time in plain torch (see module docstring).

    Same signature and results as :func:`lipkern.fused_power_iter` (``backend`` is accepted
    and ignored). Gradients flow through ``sigma = u^T A(W) x`` with x, u detached.
    """
    weights, layout = validate_call(weights, specs, state, n_iters, eps, tol, backend,
                                    generator, check_finite, variant)
    device, cdtype = weights[0].device, compute_dtype(weights[0].dtype)
    x0 = state.x if state is not None else initial_x(layout, device, cdtype, generator)
    u0 = None
    if variant == "spectral_norm":
        u0 = state.u if state is not None else initial_u(layout, device, cdtype, generator)
    sigmas, xs, us = [], [], []
    with torch.autocast(device.type, enabled=False):
        for i, (w, g) in enumerate(zip(weights, layout.geoms)):
            wc = w.to(cdtype)
            x, u, _ = iterate_layer(g, wc.detach(), x0[layout.x_slice(i)].to(cdtype), n_iters,
                                    eps, tol, None if u0 is None else
                                    u0[layout.y_slice(i)].to(cdtype))
            sigmas.append(torch.dot(u, apply_op(g, wc, x)))
            xs.append(x)
            us.append(u)
    sigmas = torch.stack(sigmas)
    lip, log_lip = bound_from_sigmas(sigmas)
    new_state = PowerIterState(torch.cat(xs).detach(), torch.cat(us).detach(), layout.meta)
    return PowerIterResult(sigmas, lip, log_lip, new_state)


def divide(w: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``w / sigma`` in the compute dtype, rounded once to w's dtype (torch's spectral_norm
    divides in the weight's own dtype; for bf16/fp16 weights lipkern divides in float32)."""
    cdtype = compute_dtype(w.dtype)
    return (w.to(cdtype) / sigma.to(cdtype)).to(w.dtype)


def normalize(weights: Sequence[torch.Tensor],
              specs: Optional[Sequence[Optional[ConvSpec]]] = None, **kwargs) -> NormalizeResult:
    r"""Reference of :func:`lipkern.fused_normalize`: :func:`power_iter` (same arguments), then
    every weight divided by its sigma, ``W_hat_l = W_l / sigma_l``.

    Gradients flow through the division and through ``sigma = u^T A(W) x`` (x, u held
    constant), which gives spectral_norm's

    .. math::

        \frac{\partial L}{\partial W} = \frac{G}{\sigma}
            + \Big(g_\sigma - \frac{\langle G, W\rangle}{\sigma^2}\Big)
              \frac{\partial \sigma}{\partial W},\qquad G = \frac{\partial L}{\partial \hat W}.
    """
    r = power_iter(weights, specs, **kwargs)
    return NormalizeResult([divide(w, s) for w, s in zip(weights, r.sigmas.unbind(0))],
                           r.sigmas, r.state)


def sn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              u: torch.Tensor, v: torch.Tensor, n_iters: int = 1, eps: float = 1e-12):
    r"""Reference of ``lipkern::sn_linear`` (:mod:`lipkern.ops.sn_linear`): one Linear layer
    under torch's spectral_norm, written as torch's parametrization computes it.

    ``n_iters`` updates ``u = normalize(W v)``, ``v = normalize(W^T u)`` (u0 and v0 are
    renormalized first; the two image norms floored by :func:`image_floor`, N1, and summed
    in float64, N3), ``sigma = u^T W v``, and ``y = x (W / sigma)^T + b``. Gradients flow
    to x, weight and bias with u and v held constant. Shapes: x (..., in), weight (out, in),
    bias (out,) or None, u (out,), v (in,). Returns (y (..., out), sigma (), u (out,), v (in,));
    sigma, u and v carry no gradient.
    """
    with torch.no_grad():
        u, _ = _normalize(u, eps)
        v, _ = _normalize(v, eps)
        f = image_floor(weight, eps)  # N1: torch's eps unless every |W_ij| < 1
        for _ in range(n_iters):
            u, _ = _normalize(weight @ v, f)
            v, _ = _normalize(weight.t() @ u, f)
    sigma = torch.dot(u, weight @ v)
    y = torch.nn.functional.linear(x, weight / sigma, bias)
    return y, sigma.detach(), u, v


# ---------------------------------------------------------------- exact sigma
EXACT_MAX_ELEMENTS = 1 << 26  # 512 MiB of float64 for the dense operator matrix


def exact_sigma(w: torch.Tensor, spec: Optional[ConvSpec] = None) -> torch.Tensor:
    """Exact spectral norm (float64, 0-d) of the layer's operator via the SVD of its dense
    matrix, built by applying the operator to the identity. Small layers only: raises
    ValueError if the matrix (per group) would exceed ``EXACT_MAX_ELEMENTS`` entries.
    Grouped convs are block diagonal: the result is the max over groups."""
    if not isinstance(w, torch.Tensor) or w.dim() not in (2, 3, 4):
        raise ValueError("w must be a 2-D, 3-D or 4-D tensor")
    g = resolve_geometry(tuple(w.shape), spec, "w")
    wd = w.detach().to(torch.float64)
    if g.kind == KIND_DENSE:
        return torch.linalg.matrix_norm(wd.reshape(g.cout, -1), 2)
    # one group at a time: the operator is block diagonal over groups
    gi = g._replace(cin=g.cin // g.groups, cout=g.cout // g.groups, groups=1)
    if gi.in_numel * max(gi.in_numel, gi.out_numel) > EXACT_MAX_ELEMENTS:
        raise ValueError(f"w: the operator matrix would have {gi.in_numel}x{gi.out_numel} "
                         f"entries per group, more than EXACT_MAX_ELEMENTS="
                         f"{EXACT_MAX_ELEMENTS}; use power_iter with many iterations instead")
    k4 = wd.reshape(g.cout, g.cin // g.groups, g.kh, g.kw)
    best = torch.zeros((), dtype=torch.float64, device=w.device)
    eye = torch.eye(gi.in_numel, dtype=torch.float64, device=w.device)
    for j in range(g.groups):
        kj = k4[j * gi.cout:(j + 1) * gi.cout]
        rows = conv_c(gi, kj, eye)  # (in_numel, out_numel): row i is C e_i
        best = torch.maximum(best, torch.linalg.matrix_norm(rows, 2))
    return best


# ---------------------------------------------------------------- certified upper bound
def certified_sigma(weights: Sequence[torch.Tensor],
                    specs: Optional[Sequence[Optional[ConvSpec]]] = None) -> torch.Tensor:
    """The specification of :func:`lipkern.certified_sigma`: per layer, the spectral norm of
    the circular operator the layer is a restriction of (see :mod:`lipkern.certified`),

        b = factor * max_{group, f} ||A_f||_2,   A_f = sum_q T_q exp(-2 pi i <f, q / M>),

    by the SVD of every frequency's matrix, float64, (L,), detached. ``b >= sigma`` of the
    layer's operator (equal for dense layers and circular convs whose stride divides the
    input). The fused op certifies the same number from above: its result lies in
    ``[b, b * (1 + CERT_MARGIN)^(1/2)]`` once its estimates converged (up to ~1e-12)."""
    from .certified import symbol
    out = []
    for i, w in enumerate(weights):
        s = None if specs is None else specs[i]
        g = resolve_geometry(tuple(w.shape), s, f"weights[{i}]")
        sym = symbol(w.detach(), g)
        taps = sym.taps.to(torch.complex128)
        mh, mw = sym.grid
        qh, qw = taps.shape[-2:]
        # the full DFT on the grid (taps beyond the grid are already folded by symbol)
        a = torch.fft.fft2(taps, s=(mh, mw))  # (G, co, ci, Mh, Mw)
        a = a.permute(0, 3, 4, 1, 2).reshape(-1, taps.shape[1], taps.shape[2])
        out.append(torch.linalg.matrix_norm(a, 2).max() * sym.factor)
    return torch.stack(out)
