"""backend="grouped": the power iteration of every layer of one geometry as ONE grouped
convolution (cuDNN on a GPU, oneDNN on a CPU) or ONE batched matmul (cuBLAS) per phase.

The fix users reach for first (bench provider ``grouped``), done as a backend of the one
registered op ``lipkern::power_iter`` (:mod:`lipkern.ops.power_iter` dispatches here):

* layers are bucketed by geometry (their :class:`~lipkern.spec.LayerGeom`: kind, shapes,
  stride, padding, dilation, groups, padding mode; one dtype per call). A bucket of G conv
  layers is the block-diagonal operator whose kernel is the G kernels concatenated along
  the output channels, i.e. a conv with ``groups = G * groups``; a bucket of G matrices
  (dense layers, reshaped kernels) is a ``(G, m, n)`` batch for ``torch.bmm``;
* each phase (``y = A x``, ``x = A^T y``, the norms) is one call per bucket: a call costs
  O(buckets) launches, not O(layers). The forward runs below autograd (it is the kernel of
  a registered op), so nothing is saved for backward but the vectors;
* the implicit gradient ``dsigma/dW`` (x, u held constant; :mod:`lipkern.reference`) is one
  weight-gradient call per bucket: ``aten.convolution_backward`` with only the weight mask
  (``torch.nn.grad.conv2d_weight``) for convs, one batched outer product for matrices;
* ``tol`` is decided per layer on the device (a mask, ``torch.where``): no host sync.

The math is :func:`lipkern.reference.iterate_layer` (the spec and test oracle), numeric
contract N1-N5 included (per-layer image floors from one max-reduction per bucket, half-step
normalization, float64 sums of squares, the fallback start vector); this module only batches
it, with every per-layer decision taken on the device. Vectors are gathered from / scattered to the packed state in *runs* (maximal
sequences of consecutive layers in one bucket): one ``split`` and one ``cat`` per call and
direction instead of a slice per layer, and no copy at all when a call is a single bucket.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from ..layout import FALLBACK_ADD, FALLBACK_MUL, Layout
from ..spec import KIND_CONV_T, LayerGeom
from ..validate import compute_dtype


# ---------------------------------------------------------------- the plan of one layout
class Bucket(NamedTuple):
    """G layers of one geometry, run as one block-diagonal operator."""
    geom: LayerGeom            # the layers' common geometry
    layers: Tuple[int, ...]    # their indices in the call, ascending
    matrix: bool               # run as a (G, m, n) batched matmul (else a grouped conv)
    block: LayerGeom           # the G-layer operator as one grouped conv (conv buckets)
    runs: Tuple[int, ...]      # indices into Plan.runs of this bucket's runs, in order

    @property
    def size(self) -> int:
        return len(self.layers)


class Plan(NamedTuple):
    """How one layer table is batched (built once per layout, memoized)."""
    layout: Layout
    buckets: Tuple[Bucket, ...]
    runs: Tuple[Tuple[int, int], ...]       # (bucket, number of layers), in layer order
    sizes: dict                             # "x" | "y" | "w" | "s" -> per-run element counts

    @property
    def single(self) -> bool:
        """One bucket whose layers are the whole call in order: the packed buffers are the
        bucket's own (G, n) matrices, no gather or scatter copies."""
        return len(self.runs) == 1


def _is_matrix(g: LayerGeom) -> bool:
    return g.h == g.w == g.oh == g.ow == g.kh == g.kw == 1 and g.groups == 1


def _build_plan(layout: Layout) -> Plan:
    order, members = [], {}
    for i, g in enumerate(layout.geoms):
        if g not in members:
            order.append(g)
            members[g] = []
        members[g].append(i)
    bucket_of = {g: b for b, g in enumerate(order)}
    runs = []
    for i, g in enumerate(layout.geoms):
        b = bucket_of[g]
        if runs and runs[-1][0] == b:
            runs[-1][1] += 1
        else:
            runs.append([b, 1])
    runs = tuple((b, n) for b, n in runs)
    buckets = []
    for b, g in enumerate(order):
        G = len(members[g])
        block = g._replace(cin=G * g.cin, cout=G * g.cout, groups=G * g.groups)
        buckets.append(Bucket(g, tuple(members[g]), _is_matrix(g), block,
                              tuple(r for r, (rb, _) in enumerate(runs) if rb == b)))
    per = {"x": lambda g: g.x_numel, "y": lambda g: g.y_numel, "w": lambda g: g.w_numel,
           "s": lambda g: 1}
    sizes = {k: [n * f(order[b]) for b, n in runs] for k, f in per.items()}
    return Plan(layout, tuple(buckets), runs, sizes)


# Memoized by the layout object (layouts are memoized themselves, lipkern.layout): the id is
# checked against the stored layout, so a recycled id after the layout memo is cleared
# rebuilds instead of returning another table's plan. A dict, not functools.lru_cache (see
# lipkern.layout), and no hashing of the int table on the hot path.
_PLANS: dict = {}
_PLANS_MAX = 1024


def plan_for(layout: Layout) -> Plan:
    plan = _PLANS.get(id(layout))
    if plan is None or plan.layout is not layout:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        plan = _PLANS[id(layout)] = _build_plan(layout)
    return plan


def _gather(plan: Plan, v: Tensor, kind: str) -> List[Tensor]:
    """Packed (total,) -> one (G, n) tensor per bucket (views when runs allow)."""
    if plan.single:
        return [v.view(plan.buckets[0].size, -1)]
    pieces = v.split(plan.sizes[kind])
    out = []
    for bk in plan.buckets:
        parts = [pieces[r] for r in bk.runs]
        out.append((parts[0] if len(parts) == 1 else torch.cat(parts)).view(bk.size, -1))
    return out


def _scatter(plan: Plan, parts: List[Tensor], kind: str) -> Tensor:
    """Inverse of :func:`_gather`: one (G, n) tensor per bucket -> packed (total,)."""
    if plan.single:
        return parts[0].reshape(-1)
    pieces: List[Optional[Tensor]] = [None] * len(plan.runs)
    for bk, part in zip(plan.buckets, parts):
        chunks = part.reshape(-1).split([plan.sizes[kind][r] for r in bk.runs])
        for r, chunk in zip(bk.runs, chunks):
            pieces[r] = chunk
    return torch.cat(pieces)


# ---------------------------------------------------------------- one bucket's operator
def _bucket_weight(bk: Bucket, weights: List[Tensor], cdtype: torch.dtype) -> Tensor:
    """(G, cout, cin) for a matrix bucket, (G*cout, cin/groups, kh, kw) for a conv bucket,
    in the compute dtype: one stack/cat per bucket (the only pass that copies weights)."""
    g = bk.geom
    ws = [weights[i] for i in bk.layers]
    first = ws[0].shape
    if any(w.shape != first for w in ws):  # e.g. a (5, 27) matrix beside a (5, 3, 3, 3) kernel
        ws = [w.reshape(g.cout, -1) if bk.matrix else w.reshape(
            g.cout, g.cin // g.groups, g.kh, g.kw) for w in ws]
    if bk.matrix:
        return torch.stack(ws).to(cdtype).view(bk.size, g.cout, g.cin)
    return torch.cat(ws).to(cdtype).view(bk.size * g.cout, g.cin // g.groups, g.kh, g.kw)


def _c(bk: Bucket, K: Tensor, v: Tensor) -> Tensor:
    """C v for every layer of the bucket: (G, cin*h*w) -> (G, cout*oh*ow)."""
    if bk.matrix:
        return torch.bmm(K, v.unsqueeze(2)).squeeze(2)
    return reference.conv_c(bk.block, K, v.reshape(-1)).view(bk.size, -1)


def _ct(bk: Bucket, K: Tensor, v: Tensor) -> Tensor:
    """C^T v: (G, cout*oh*ow) -> (G, cin*h*w)."""
    if bk.matrix:
        return torch.bmm(v.unsqueeze(1), K).squeeze(1)
    return reference.conv_ct(bk.block, K, v.reshape(-1)).view(bk.size, -1)


def _op(bk, K, v):
    return _ct(bk, K, v) if bk.geom.kind == KIND_CONV_T else _c(bk, K, v)


def _adj(bk, K, v):
    return _c(bk, K, v) if bk.geom.kind == KIND_CONV_T else _ct(bk, K, v)


def _norms(v: Tensor) -> Tensor:
    """Per-layer 2-norms of a (G, n) block, (G,) float64: the sums of squares accumulate in
    float64 (N3 of lipkern.reference: sigma^2 of 1e30 overflows float32)."""
    return torch.linalg.vector_norm(v, dim=1, dtype=torch.float64)


def _normalize(v: Tensor, floor) -> Tuple[Tensor, Tensor]:
    """(v / max(||v||, floor), ||v||) per layer, as the reference's ``_normalize``: the norm
    in float64, clamped, then cast to v's dtype. ``floor``: a float or a (G,) float64."""
    n = _norms(v)
    return v / n.clamp_min(floor).to(v.dtype).unsqueeze(1), n.to(v.dtype)


def _image_floor(bk: Bucket, K: Tensor, eps: float) -> Tensor:
    """N1 per layer, (G,) float64: ``max(eps * min(1, max|W_l|), tiny)``. One max-reduction
    over the bucket's weight every call, on the device: the reference reads max|W| on the
    host, which a batched backend cannot do without a sync."""
    maxabs = torch.linalg.vector_norm(K.reshape(bk.size, -1), float("inf"), dim=1).double()
    return (eps * maxabs.clamp_max(1.0)).clamp_min(torch.finfo(K.dtype).tiny)


_FALLBACK: dict = {}  # (n, dtype, device) -> (n,) fallback start vector


def _fallback(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """:func:`lipkern.layout.fallback_vector` built on the device (exact int64 arithmetic:
    the same numbers; no host->device copy, so a call stays capturable), memoized."""
    key = (n, dtype, device)
    v = _FALLBACK.get(key)
    if v is None:
        if len(_FALLBACK) >= 64:
            _FALLBACK.clear()
        i = torch.arange(n, dtype=torch.int64, device=device)
        h = (i * FALLBACK_MUL + FALLBACK_ADD) % (1 << 32)
        v = _FALLBACK[key] = (h.double() / float(1 << 32) - 0.5).to(dtype)
    return v


def _start(v0: Tensor, eps: float) -> Tensor:
    """The reference's ``start_vector`` per layer (N4): an all-zero or non-finite row is
    replaced by the fallback vector, decided on the device; then normalized with eps."""
    n = _norms(v0)
    bad = ~(torch.isfinite(n) & (n > 0))
    v0 = torch.where(bad.unsqueeze(1), _fallback(v0.shape[1], v0.dtype, v0.device), v0)
    return _normalize(v0, eps)[0]


def _iterate_bucket(bk: Bucket, K: Tensor, x: Tensor, u0: Optional[Tensor], n_iters: int,
                    eps: float, tol: float) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`lipkern.reference.iterate_layer` on G layers at once. x (G, x_numel), u0
    (G, y_numel) or None. Returns (x, u, sigma (G,))."""
    f = _image_floor(bk, K, eps)
    x = _start(x, eps)
    if u0 is not None:  # variant="spectral_norm"
        u = _start(u0, eps)
        for _ in range(n_iters):
            u, _ = _normalize(_op(bk, K, x), f)
            x, _ = _normalize(_adj(bk, K, u), f)
        return x, u, (u * _op(bk, K, x)).sum(1)
    active = s_prev = None
    for k in range(n_iters):
        # N2: normalize after each half-step (A x, then A^T of the unit vector)
        uy, s = _normalize(_op(bk, K, x), f)
        x_new, _ = _normalize(_adj(bk, K, uy), f)
        if tol >= 0:
            # the reference's test, |s_k - s_{k-1}| <= tol * s_k, in float64 on the
            # compute-dtype estimates, as the reference does it on Python floats
            s = s.double()
            if k == 0:
                active = torch.ones_like(s, dtype=torch.bool)
            else:
                # written as "not <=" so a NaN estimate keeps iterating, as in the reference
                active = active & ~((s - s_prev).abs() <= tol * s)
            s_prev = s
            x = torch.where(active.unsqueeze(1), x_new, x)  # a stopped layer keeps its x
        else:
            x = x_new
    u, sigma = _normalize(_op(bk, K, x), f)
    return x, u, sigma


# ---------------------------------------------------------------- launchers (the op's kernels)
def forward(weights: List[Tensor], x0: Tensor, u0: Optional[Tensor], layout: Layout,
            n_iters: int, eps: float, tol: float):
    """The forward of ``lipkern::power_iter`` (same outputs as every backend):
    (sigmas (L,), lipschitz (), log_lipschitz (), x (total_x,), u (total_y,))."""
    plan = plan_for(layout)
    cdtype = x0.dtype
    with torch.autocast(x0.device.type, enabled=False):
        xs = _gather(plan, x0, "x")
        us = _gather(plan, u0, "y") if u0 is not None else [None] * len(plan.buckets)
        out_x, out_u, out_s = [], [], []
        for bk, xb, ub in zip(plan.buckets, xs, us):
            x, u, s = _iterate_bucket(bk, _bucket_weight(bk, weights, cdtype), xb, ub,
                                      n_iters, eps, tol)
            out_x.append(x)
            out_u.append(u)
            out_s.append(s.unsqueeze(1))
        sigmas = _scatter(plan, out_s, "s")
        lip, log_lip = reference.bound_from_sigmas(sigmas)
        return sigmas, lip, log_lip, _scatter(plan, out_x, "x"), _scatter(plan, out_u, "y")


def _bucket_weight_grad(bk: Bucket, x: Tensor, u: Tensor) -> Tensor:
    """d(u^T A(W) x)/dW of every layer of the bucket, (G, w_numel):
    :func:`lipkern.reference.weight_grad` as one call."""
    g = bk.geom
    if g.kind == KIND_CONV_T:
        x, u = u, x
    if bk.matrix:
        return (u.unsqueeze(2) * x.unsqueeze(1)).view(bk.size, -1)  # G outer products
    # the bucket as one grouped conv (bk.block): its weight gradient holds every layer's
    return reference.conv_weight_grad(bk.block, x, u).view(bk.size, -1)


def backward(x: Tensor, u: Tensor, coef: Tensor, layout: Layout, wdtype: torch.dtype) -> Tensor:
    """The backward of ``lipkern::power_iter``: packed dLoss/dW (total_w,) in ``wdtype``, with
    ``coef`` (L,) = dLoss/dsigma_l (:func:`lipkern.ops.power_iter.sigma_coefficients`)."""
    plan = plan_for(layout)
    with torch.autocast(x.device.type, enabled=False):
        xs, us, cs = _gather(plan, x, "x"), _gather(plan, u, "y"), _gather(plan, coef, "s")
        grads = [_bucket_weight_grad(bk, xb, ub) * cb
                 for bk, xb, ub, cb in zip(plan.buckets, xs, us, cs)]
        return _scatter(plan, grads, "w").to(wdtype)


# ---------------------------------------------------------------- fused_normalize's division
def divide_weights(weights: List[Tensor], sigmas: Tensor, layout: Layout) -> List[Tensor]:
    """``W_l / sigma_l`` for every layer, as :func:`lipkern.reference.divide` (the compute
    dtype, one rounding to the weight's dtype; bit-equal to it), one division per bucket:
    stack -> divide -> unbind is three autograd nodes per bucket instead of three per layer
    (measured: bench/NOTES.md, issue 14). Differentiable w.r.t. weights and sigmas."""
    plan = plan_for(layout)
    cdtype = compute_dtype(weights[0].dtype)
    out: List[Optional[Tensor]] = [None] * layout.num_layers
    for bk, sb in zip(plan.buckets, _gather(plan, sigmas, "s")):
        ws = [weights[i] for i in bk.layers]
        if bk.size == 1 or any(w.shape != ws[0].shape for w in ws):
            for i, w, s in zip(bk.layers, ws, sb.unbind(0)):
                out[i] = reference.divide(w, s.squeeze(0))
            continue
        stacked = torch.stack(ws).to(cdtype)
        q = (stacked / sb.to(cdtype).view(bk.size, *([1] * ws[0].dim()))).to(ws[0].dtype)
        for i, t in zip(bk.layers, q.unbind(0)):
            out[i] = t
    return out


# ---------------------------------------------------------------- what a call does (explain)
def describe(layout: Layout) -> List[str]:
    """Per layer, one sentence saying how this backend runs it (for :func:`lipkern.explain`)."""
    plan = plan_for(layout)
    out = [""] * layout.num_layers
    for b, bk in enumerate(plan.buckets):
        if bk.matrix:
            how = f"one torch.bmm over a ({bk.size}, {bk.geom.cout}, {bk.geom.cin}) batch"
        else:
            how = (f"one grouped conv (groups={bk.block.groups}, "
                   f"{bk.block.cout} output channels)")
        for i in bk.layers:
            out[i] = (f"bucket {b} of {bk.size} layer(s) of this geometry: {how} per phase, "
                      f"one weight-gradient call per bucket")
    return out
