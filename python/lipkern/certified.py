r"""``lipkern.certified_sigma``: per-layer spectral-norm upper bounds that hold.

Power iteration approaches sigma from below; a certified robustness radius ``margin / L``
needs the other side. For every layer this module computes a number ``b >= sigma`` that is
a mathematical upper bound in exact arithmetic and is computed so that rounding cannot push
it below the truth.

**The circular operator a layer is a restriction of.** Every layer kind is reduced to a
circular convolution on a grid ``(Mh, Mw)`` with a small tap tensor ``T`` of shape
``(groups, co, ci', Qh, Qw)`` (``symbol``), together with an isometric embedding of the
layer's input and a selection of outputs:

* dense ``W`` (m, n) (and reshaped kernels): grid 1x1, one tap, ``T = W``;
* conv, zero padding ``p``, stride ``s``, dilation ``d``: the zero-padded input lives on
  ``N = n + 2p`` points, where the layer is a *valid* (stride-s) correlation; splitting the
  padded input into its ``s^2`` phases ``x_r[m] = x[s m + r]`` (polyphase) turns it into a
  stride-1 valid correlation with ``ci * s^2`` input channels and ``ceil(d (k-1) + 1) / s)``
  taps on a grid of ``ceil(N / s)`` points, and a valid correlation never wraps, so it is a
  crop of the circular one on that grid. Padding, phase split and crop have norm <= 1, so
  ``sigma <= ||circ||``. Phases no tap reaches are dropped (a 1x1 stride-2 conv is its
  matrix). The bound is the one Sedghi et al. (2019) and Delattre et al. (2024) use for zero
  padding; stride handled by polyphase keeps it tight (bounding by the stride-1 conv is valid
  but loose by up to ``s``);
* conv, circular padding: the layer evaluates the circular correlation on the input's own
  ``n``-grid at positions ``(s o - p) mod n``; when ``s`` divides ``n`` they fall in one
  phase class (polyphase on ``n / s`` points, exact for the usual "same" settings), else the
  stride-1 circular correlation is used on that axis. Positions hit twice (only with
  padding beyond the usual) multiply the bound by ``sqrt(max multiplicity)``;
* transposed convs: ``sigma(A) = sigma(A^T)``, the conv with the same settings; groups: the
  operator is block diagonal, the bound is the max over groups.

**Exact norms of the circular operator** (Sedghi et al. 2019): ``||circ|| = max_f
||A_f||_2`` over the grid's frequencies, ``A_f = sum_q T_q exp(-2 pi i <f, q / M>)``. The
Gram matrices ``H_f = A_f A_f^H`` (or ``A_f^H A_f``, the smaller side) are formed in the
spatial domain, ``H_f = sum_d G_d exp(-2 pi i <f, d / M>)``, ``G_d = sum_q T_q T_{q+d}^T``
(one GEMM per offset ``d`` of one half-plane, ``G_{-d} = G_d^T``), then one GEMM with the
phase matrix over the half grid of frequencies (conjugate frequencies share a spectrum). That costs
``~(Qh Qw)^2 / 2`` products of the taps instead of one per frequency.

**Certificate** (Cholesky, as in verified-numerics practice, Rump 2006): ``lambda_max(H) <=
mu`` iff ``mu I - H`` is positive semi-definite, and a Cholesky factorization that runs to
completion proves that for a matrix within a computable distance. ``mu`` comes from a
few power iterations on the ``H_f`` (an estimate from below), raised by ``2^-5``
(3% on sigma^2, 1.6% on sigma); a frequency whose factorization fails gets more iterations
and a larger ``mu`` (rounds in ``_certify``), and after the last round the Frobenius norm
``||H_f||_F >= lambda_max`` is used, which needs no factorization. So the result is always
a bound; how tight depends only on the estimate, and is ``<= (1 + 2^-5)^(1/2)`` above the
exact circular norm when the estimate converged.

**Rounding.** Everything is computed in float64 (weights are cast exactly). Three
a-priori/a-posteriori terms are added before the square root (``u = 2^-53``, constants 8x
the textbook ones to cover complex arithmetic and any summation order):

* forming ``H_f``: ``|fl(G_d) - G_d| <= gamma_{inner + Q^2} sum |T|^T |T|`` entrywise and
  the FFT's error ``<= eta log2(Mh Mw) ||.||`` (Higham, ASNA 2nd ed., Thm 24.2), together
  ``||fl(H_f) - H_f||_2 <= e_form = 8 (inner + Q^2 + 4 log2(Mh Mw) + 8) u
  sqrt(Mh Mw) (sum_q ||T_q||_F)^2`` (kept from an FFT formulation; the direct sum over the
  ``(2Q-1)^2`` offsets used now has a smaller error, so it is conservative);
* Cholesky of ``S = mu I - fl(H_f)`` (Higham Thm 10.3): ``R^H R = S + E`` with ``|E| <=
  gamma_{n+1} |R^H||R|``, so ``S >= -||E||_2 I`` with ``||E||_2 <= e_chol = 8 (n + 1) u
  ||R||_F^2`` (computed from the factor);
* the square root and the cast to float32 round upwards (``nextafter``).

For ResNet-18's layers these terms are ~1e-10 relative: they never decide the result, but
they make the ``>=`` unconditional.

**Gradient** (the implicit rule, as for power iteration): with ``(f*, u, v)`` the frequency
of the largest estimate and its top singular vectors, held constant,
``b = (b / s) * s(W)`` with ``s(W) = Re(u^H A_{f*}(W) v)``; so ``db/dW = (b / s) ds/dW``,
linear in ``W`` (second order: zero, like ``sigma = u^T A x``), and the graph runs through
the tap construction, so any order of autograd works.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from .spec import KIND_DENSE, ConvSpec, LayerGeom, resolve_geometry
from .validate import check_specs, check_weights

__all__ = ["certified_sigma", "symbol", "Symbol", "certify_symbol", "CERT_MARGIN"]

U64 = 2.0 ** -53  # unit roundoff of float64
CERT_MARGIN = 2.0 ** -5  # mu = estimate * (1 + margin): 1.6% on sigma, leaves room for an
#                          estimate that is ~1% low after ESTIMATE_ITERS iterations
ESTIMATE_TOP = 4  # frequencies (of largest ||H_f||_F) whose power iteration sets mu
ESTIMATE_ITERS = 20  # power iterations on each H_f before the first certificate: the
#                      estimate of the largest frequency is within ~1% of it on ResNet-18
RETRY_ITERS = 60  # more iterations for a frequency whose certificate failed
GRAD_REFINE_ITERS = 30  # float64 iterations on the best frequency's A_f for the gradient
ROUNDS = 4  # certificate attempts (margin x4 each), then the Frobenius bound


class Symbol(NamedTuple):
    """A layer as a restriction of a circular convolution (see the module docstring).

    taps: (groups, co, ci', Qh, Qw), float64, differentiable w.r.t. the weight.
    grid: (Mh, Mw), the circular grid.
    factor: >= 1, multiplies the circular norm (repeated output positions)."""
    taps: torch.Tensor
    grid: Tuple[int, int]
    factor: float


def _axis(k: int, d: int, s: int, p: int, n: int, circular: bool, out_len: int):
    """One spatial axis: per tap j its (phase, shift), the phases used, the grid length and
    the output multiplicity. See the module docstring for the derivation."""
    if not circular:
        grid = -(-(n + 2 * p) // s)  # the zero-padded input, split into s phases
        offs = [d * j for j in range(k)]
        se, mult = s, 1
    else:
        se = s if n % s == 0 else 1  # polyphase needs whole periods on the circle
        r0 = (-p) % se
        grid = n // se
        offs = [r0 + d * j for j in range(k)]
        pos = [(((s * o - p) % n) - r0) // se for o in range(out_len)]
        mult = max(pos.count(m) for m in set(pos))
    phases = sorted({e % se for e in offs})
    shifts = [(e // se) % grid for e in offs]
    q = max(shifts) + 1
    return [phases.index(e % se) for e in offs], shifts, len(phases), q, grid, mult


def symbol(w: torch.Tensor, g: LayerGeom) -> Symbol:
    """The circular operator ``w`` under geometry ``g`` is a restriction of (float64 taps)."""
    wd = w.to(torch.float64)
    if g.kind == KIND_DENSE:
        return Symbol(wd.reshape(1, g.cout, -1, 1, 1), (1, 1), 1.0)
    circ = bool(g.circular)
    rh, qh_of, nrh, qh, mh, multh = _axis(g.kh, g.dh, g.sh, g.ph, g.h, circ, g.oh)
    rw, qw_of, nrw, qw, mw, multw = _axis(g.kw, g.dw, g.sw, g.pw, g.w, circ, g.ow)
    co, ci = g.cout, g.cin // g.groups
    # target slot of every tap in (phase_h, phase_w, shift_h, shift_w), flattened; taps that
    # alias on a small circular grid land in one slot and add up (index_add)
    idx = [((rh[a] * nrw + rw[b]) * qh + qh_of[a]) * qw + qw_of[b]
           for a in range(g.kh) for b in range(g.kw)]
    k = wd.reshape(co, ci, g.kh * g.kw)
    t = k.new_zeros(co, ci, nrh * nrw * qh * qw).index_add(
        2, torch.tensor(idx, device=w.device), k)
    t = t.reshape(g.groups, co // g.groups, ci * nrh * nrw, qh, qw)
    # an axis with one tap has the same matrix at every frequency: a grid of 1 says the same
    return Symbol(t, (1 if qh == 1 else mh, 1 if qw == 1 else mw), math.sqrt(multh * multw))


# ---------------------------------------------------------------- Gram matrices per frequency
def gram_per_frequency(taps: torch.Tensor, grid: Tuple[int, int]) -> Tuple[torch.Tensor, bool]:
    """H_f for every frequency of the half grid (real FFT), every group.

    taps (G, co, ci, Qh, Qw) -> (G, F, n, n) complex128 with n = min(co, ci) and
    F = Mh * (Mw // 2 + 1); also whether the side is A A^H (True) or A^H A."""
    gr, co, ci, qh, qw = taps.shape
    mh, mw = grid
    left = co <= ci
    # side matrices B_q with H_f = sum_{q, q'} B_q B_{q'}^T w^(f (q - q')): B_q = T_q (left,
    # H = A A^H) or T_q^T (right, H = A^H A, where the phase is w^(f (q' - q)))
    b = taps if left else taps.transpose(1, 2)
    n = b.shape[1]
    bq = b.permute(0, 3, 4, 1, 2).contiguous()  # (G, Qh, Qw, n, inner)
    offsets, blocks = [], []
    for dh in range(-(qh - 1), qh):
        for dw in range(-(qw - 1), qw):
            if (dh, dw) < (0, 0):
                continue  # the other half-plane is the transpose: G_{-d} = G_d^T
            hs = slice(max(0, dh), min(qh, qh + dh))  # taps q with q - d also a tap
            ws = slice(max(0, dw), min(qw, qw + dw))
            hr = slice(hs.start - dh, hs.stop - dh)
            wr = slice(ws.start - dw, ws.stop - dw)
            lhs = bq[:, hs, ws].permute(0, 3, 1, 2, 4).reshape(gr, n, -1)
            rhs = bq[:, hr, wr].permute(0, 3, 1, 2, 4).reshape(gr, n, -1)
            gd = lhs @ rhs.transpose(1, 2)  # sum_q B_q B_{q-d}^T: one GEMM per offset
            sd = (dh, dw) if left else (-dh, -dw)
            offsets.append(sd)
            blocks.append(gd)
            if (dh, dw) != (0, 0):
                offsets.append((-sd[0], -sd[1]))
                blocks.append(gd.transpose(1, 2))
    # H_f = sum_d G_d exp(-2 pi i <f, d / M>) over the (2Q - 1)^2 offsets only: one GEMM of
    # the (F, D) phase matrix with the (D, n^2) blocks, cheaper than an FFT over the whole
    # grid (F * D * n^2 vs. F log F * n^2 with F >> D on large grids, and no grid array)
    fh = torch.arange(mh, dtype=torch.float64, device=taps.device)
    fw = torch.arange(mw // 2 + 1, dtype=torch.float64, device=taps.device)
    d = torch.tensor(offsets, dtype=torch.float64, device=taps.device)  # (D, 2)
    ang = -2 * math.pi * (fh[:, None, None] * d[None, None, :, 0] / mh
                          + fw[None, :, None] * d[None, None, :, 1] / mw)  # (Mh, Mw', D)
    ang = ang.reshape(-1, len(offsets))
    gflat = torch.stack(blocks, 1).reshape(gr, len(offsets), n * n)
    h = torch.complex(torch.cos(ang) @ gflat, torch.sin(ang) @ gflat)  # (G, F, n^2)
    return h.reshape(gr, -1, n, n), left


def _form_error(taps: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """A-priori bound e_form on ||fl(H_f) - H_f||_2 per group (module docstring)."""
    gr, co, ci, qh, qw = taps.shape
    mh, mw = grid
    inner = max(co, ci)
    tsum = torch.linalg.vector_norm(taps, dim=(1, 2)).sum(dim=(1, 2))  # sum_q ||T_q||_F
    c = 8 * (inner + qh * qw + 4 * math.log2(mh * mw + 1) + 8) * U64 * math.sqrt(mh * mw)
    return c * tsum * tsum * (1 + 1e-6)


# ---------------------------------------------------------------- estimate and certificate
def _power(h: torch.Tensor, v: torch.Tensor, iters: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Power iteration on Hermitian PSD H (B, n, n) from v (B, n, 1): (lambda_est (B,), v)."""
    for _ in range(iters):
        v = h @ v
        v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(
            torch.finfo(v.real.dtype).tiny)  # a zero H keeps v = 0, no 0/0
    lam = torch.linalg.vector_norm(h @ v, dim=(1, 2))  # ||H v|| <= lambda_max for unit v
    return lam, v


def _certify(h: torch.Tensor, e_form: torch.Tensor, generator=None):
    """Certified lambda_max bound per matrix of h (B, n, n) complex128, the estimates, and
    the top vectors. e_form (B,) is the bound on the formation error of each matrix."""
    bsz, n, _ = h.shape
    # power iteration is memory bound (a pass over every H_f per step): run it on the
    # ESTIMATE_TOP frequencies of largest trace (= ||A_f||_F^2, read off the diagonal) only;
    # the others are checked against the same mu by their factorization, and iterated only
    # if that fails
    trace = h.diagonal(dim1=-2, dim2=-1).real.sum(-1)
    top = trace.topk(min(ESTIMATE_TOP, bsz)).indices
    v = torch.randn(bsz, n, 1, dtype=torch.complex64, device=h.device, generator=generator)
    lam = torch.zeros(bsz, dtype=torch.float64, device=h.device)
    # estimates in complex64 on H / scale (scale = the largest trace >= every lambda_max):
    # weights of 1e-30 or 1e30 would under/overflow float32 squared
    scale = trace.max().clamp_min(1e-300)
    lt, vt = _power((h[top] / scale).to(torch.complex64), v[top], ESTIMATE_ITERS)
    lam[top], v[top] = lt.double() * scale, vt
    # one mu per layer (the largest estimate): every frequency must pass it anyway
    mu = lam.max().expand(bsz) * (1 + CERT_MARGIN)
    bound = torch.full((bsz,), math.inf, dtype=torch.float64, device=h.device)
    todo = torch.ones(bsz, dtype=torch.bool, device=h.device)
    margin = CERT_MARGIN  # growth of a failed trial without a higher estimate: x4 per round
    for rnd in range(ROUNDS):
        ids = todo.nonzero().flatten()
        if ids.numel() == 0:
            break
        if rnd > 0:  # failed before: the estimate was low; iterate those further
            l2, v2 = _power((h[ids] / scale).to(torch.complex64), v[ids], RETRY_ITERS)
            v[ids] = v2
            lam[ids] = torch.maximum(lam[ids], l2.double() * scale)
            # an estimate above the failed trial sets the next one (as tight as the first);
            # else the failed trial grows
            fresh = lam[ids] * (1 + CERT_MARGIN)
            mu[ids] = torch.where(fresh > mu[ids], fresh, mu[ids] * (1 + margin))
        trial = mu[ids]
        sm = h[ids].neg_() if ids.numel() < bsz else h.neg()
        sm.diagonal(dim1=-2, dim2=-1).add_(trial[:, None])  # mu I - H, one pass
        r, info = torch.linalg.cholesky_ex(sm)
        del sm
        ok = info == 0
        e_chol = 8 * (n + 1) * U64 / (1 - 8 * (n + 1) * U64) * \
            torch.view_as_real(r).square().sum(dim=(1, 2, 3))
        cert = trial + e_chol + e_form[ids]
        good = ids[ok]
        bound[good] = torch.minimum(bound[good], cert[ok])
        todo[good] = False
        margin *= 4
    ids = todo.nonzero().flatten()
    if ids.numel():  # the last resort, ||H||_F >= lambda_max (its rounding: <= n u relative)
        bound[ids] = torch.linalg.matrix_norm(h[ids]) * (1 + 4 * n * U64) + e_form[ids]
    return bound, lam, v.to(h.dtype)


def _up32(x64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x64 rounded upwards to dtype (float32 or float64)."""
    if dtype == torch.float64:
        return x64
    x = x64.to(dtype)
    return torch.where(x.double() < x64, torch.nextafter(x, torch.full_like(x, math.inf)), x)


def certify_symbol(sym: Symbol, generator=None):
    """(bound float64 0-d >= ||circ|| * factor, detached; (group, freq, u, v) for the
    gradient) for one layer's symbol."""
    taps = sym.taps.detach()
    h, left = gram_per_frequency(taps, sym.grid)
    gr, nf, n, _ = h.shape
    e_form = _form_error(taps, sym.grid).repeat_interleave(nf)
    bound, lam, v = _certify(h.reshape(gr * nf, n, n), e_form, generator)
    best = int(lam.argmax())
    lam_bound = bound.max()
    # sqrt and the product each round by <= u: one upward factor covers both
    val = torch.sqrt(lam_bound) * sym.factor * (1 + 8 * U64)
    return val, (best // nf, best % nf, v[best, :, 0], left)


def _frequency_matrix(taps_g: torch.Tensor, grid, f: int) -> torch.Tensor:
    """A_f (co, ci) complex128 of one group's taps at half-grid frequency index f."""
    mh, mw = grid
    fh, fw = divmod(f, mw // 2 + 1)
    qh, qw = taps_g.shape[-2:]
    ph = torch.exp(-2j * math.pi * fh * torch.arange(qh, dtype=torch.float64,
                                                         device=taps_g.device) / mh)
    pw = torch.exp(-2j * math.pi * fw * torch.arange(qw, dtype=torch.float64,
                                                         device=taps_g.device) / mw)
    return torch.einsum("oihw,h,w->oi", taps_g.to(torch.complex128), ph, pw)


def differentiable_bound(sym: Symbol, val: torch.Tensor, info) -> torch.Tensor:
    """``val`` (certified, detached) carried by the implicit gradient of the top singular
    value at the best frequency: ``(val / s) * s(W)``, ``s = Re(u^H A_f(W) v)``."""
    g, f, vec, left = info
    a = _frequency_matrix(sym.taps[g], sym.grid, f)
    with torch.no_grad():
        if left:
            u = vec
            v = a.mH @ u
        else:
            v = vec
            u = a @ v
        v = v / torch.linalg.vector_norm(v).clamp_min(1e-300)
        for _ in range(GRAD_REFINE_ITERS):  # the estimate's vector is complex64: refine it
            v = a.mH @ (a @ v)
            v = v / torch.linalg.vector_norm(v).clamp_min(1e-300)
        u = a @ v
        u = u / torch.linalg.vector_norm(u).clamp_min(1e-300)
    s = torch.real(u.conj() @ (a @ v)) * sym.factor
    sd = s.detach()
    if not bool(sd > 0):
        return val + 0 * s  # zero weight: no gradient, no NaN
    return s * (val / sd)


# ---------------------------------------------------------------- public function
def certified_sigma(weights: Sequence[torch.Tensor],
                    specs: Optional[Sequence[Optional[ConvSpec]]] = None, *,
                    backend: str = "auto",
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Certified upper bounds of the spectral norms of many layers (module docstring).

    Args:
        weights: L tensors as for :func:`lipkern.fused_power_iter` (dense 2-D, conv 3-D/4-D;
            one dtype, one device).
        specs: as for :func:`lipkern.fused_power_iter`: None reads a weight as a matrix,
            a :class:`ConvSpec` gives the conv operator (zero or circular padding, any
            stride, dilation and groups; transposed convs).
        backend: "auto" | "torch": the batched torch implementation (GEMMs and batched
            Cholesky through ATen); :func:`lipkern.reference.certified_sigma` is its
            specification (the exact circular norms by SVD). Fused C++/Triton kernels are
            not written yet: asking for "cpp"/"triton"/"cuda" raises.
        generator: seeds the estimates' start vectors (the bound holds for any seed; only
            its tightness, ``<= (1 + CERT_MARGIN)^(1/2)`` over the exact circular norm once
            the estimate converged, depends on it).

    Returns:
        (L,) tensor, float32 (float64 for float64 weights), every entry ``>= sigma`` of its
        layer's operator, rounded upwards; differentiable w.r.t. every weight (implicit
        rule, see the module docstring).
    """
    weights = check_weights(weights)
    specs = check_specs(specs, len(weights))
    if backend in ("cpp", "triton", "cuda"):
        from .backends import BackendUnavailableError
        raise BackendUnavailableError(
            f"certified_sigma: backend {backend!r} is not implemented yet; use 'auto' or "
            f"'torch' (the batched ATen implementation)")
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend must be 'auto' or 'torch', got {backend!r}")
    out_dtype = torch.float64 if weights[0].dtype == torch.float64 else torch.float32
    geoms = [resolve_geometry(tuple(w.shape), s, f"weights[{i}]")
             for i, (w, s) in enumerate(zip(weights, specs))]
    for i, w in enumerate(weights):
        if not bool(torch.isfinite(w.detach()).all()):
            raise ValueError(f"weights[{i}] contains NaN or Inf values")
    syms = [symbol(w, g) for w, g in zip(weights, geoms)]
    vals, infos = _run(syms, backend, generator)
    outs = [differentiable_bound(sym, v, inf) for sym, v, inf in zip(syms, vals, infos)]
    res = torch.stack(outs)
    up = _up32(res.detach(), out_dtype)
    return up + (res - res.detach()).to(out_dtype)


def _run(syms: List[Symbol], backend: str, generator):
    # one path today: the batched torch implementation (ATen GEMMs, batched Cholesky)
    res = [certify_symbol(s, generator) for s in syms]
    return [r[0] for r in res], [r[1] for r in res]
