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
  crop of the circular one on that grid (``symbol._axis`` takes the smallest grid that
  still embeds the layer: the padding may wrap onto padding). Padding, phase split and crop
  have norm <= 1, so ``sigma <= ||circ||``. Phases no tap reaches are dropped (a 1x1
  stride-2 conv is its matrix). The bound is the one Sedghi et al. (2019) and Delattre et
  al. (2024) use for zero padding; stride handled by polyphase keeps it tight (bounding by
  the stride-1 conv is valid but loose by up to ``s``);
* conv, circular padding: the layer evaluates the circular correlation on the input's own
  ``n``-grid at positions ``(s o - p) mod n``; when ``s`` divides ``n`` they fall in one
  phase class (polyphase on ``n / s`` points, exact for the usual "same" settings), else the
  stride-1 circular correlation is used on that axis. Positions hit twice (only with
  padding beyond the usual) multiply the bound by ``sqrt(max multiplicity)``;
* transposed convs: ``sigma(A) = sigma(A^T)``, the conv with the same settings; groups: the
  operator is block diagonal, the bound is the max over groups.

**Exact norms of the circular operator** (Sedghi et al. 2019): ``||circ|| = max_f
||A_f||_2`` over the grid's frequencies, ``A_f = sum_q T_q exp(-2 pi i <f, q / M>)``, one of
each conjugate pair (``symbol.frequencies``: real taps give conjugate matrices). The Gram
matrices ``H_f`` (the smaller side) are formed in complex64 with a bound on their error
(:mod:`.gram`), then certified by Cholesky (:mod:`.certify`): every step's rounding is
bounded a posteriori, so the result is ``>= sigma`` unconditionally, and within
``(1 + CERT_MARGIN)^(1/2)`` (plus ~1e-3 of float32 error terms on 512-channel layers) of the
exact circular norm once the estimates converged.

**Cost** (ResNet-18, CIFAR): ~``F (4.5 n^2 m + 4 n^3 / 3)`` float32 flops per layer (F the
frequencies up to conjugation: 13 for the 512-channel 4x4 layers; the C++ layer op forms
the Gram's lower triangle, and a strided conv's phase blocks that depend on one frequency
axis or none once per key) against ``4 n m k^2 h w`` per power iteration;
bench/bench_bound.py measures both (bench/NOTES.md, issue 17).

**Gradient** (the implicit rule, as for power iteration): with ``(f*, u, v)`` the frequency
of the largest estimate and its top singular vectors, held constant,
``b = (b / s) * s(W)`` with ``s(W) = Re(u^H A_{f*}(W) v)``; so ``db/dW = (b / s) ds/dW``,
linear in ``W`` (second order: zero, like ``sigma = u^T A x``), and the graph runs through
the tap construction, so any order of autograd works.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from ..spec import KIND_DENSE, ConvSpec, resolve_geometry
from ..validate import check_specs, check_weights
from .certify import CERT_MARGIN, certify, certify_cpp
from .gram import (U64, Gram, choose_path, gram_frequency, gram_spatial, gram_taps32,
                   sigma_from_abs)
from .plan import layer_plan, trace_order
from .symbol import Symbol, frequencies, phase_angles, symbol, tap_major32

__all__ = ["certified_sigma", "symbol", "Symbol", "certify_symbol", "CERT_MARGIN"]

GRAD_REFINE_ITERS = 30  # float64 iterations on the best frequency's A_f for the gradient


def _check_triton(w: torch.Tensor) -> None:
    """backend 'triton' needs Triton and a CUDA tensor (or the interpreter)."""
    import os
    from ..backends import BackendUnavailableError
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise BackendUnavailableError(f"certified_sigma: backend 'triton' needs triton ({e})")
    if w.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendUnavailableError(
            "certified_sigma: backend 'triton' runs on CUDA tensors (or under "
            "TRITON_INTERPRET=1); got a tensor on " + str(w.device))


def _use_cpp(t: torch.Tensor, backend: str) -> bool:
    """The C++ certificate step: for CPU tensors when the extension has it."""
    if backend in ("torch", "triton") or t.device.type != "cpu":
        return False
    try:
        from .. import _C  # noqa: F401
    except ImportError:
        if backend == "cpp":
            raise
        return False
    has = hasattr(torch.ops.lipkern, "certify_frequencies")
    if backend == "cpp" and not has:
        from ..backends import BackendUnavailableError
        raise BackendUnavailableError("certified_sigma: backend 'cpp' needs lipkern._C built "
                                      "with csrc/cpu/certified.cpp (LIPKERN_BUILD_EXT=1)")
    return has


def _has_layer_op() -> bool:
    return hasattr(torch.ops.lipkern, "certify_layer")


def _sigma_bound(bound: torch.Tensor, lam: torch.Tensor, v: torch.Tensor, gram: Gram,
                 e: int, factor: float, freqs):
    """The layer's bound from its frequencies' lambda bounds (scaled units): (bound float64
    0-d, (group, frequency, vector, left) for the gradient)."""
    lam_bound = float(bound.max())
    best = int(lam.argmax())
    # sqrt, the additions and the products each round by <= u64: (1 + 8 u64) per step
    sig = (math.sqrt(lam_bound) * (1 + 8 * U64) + gram.sigma_err) * (1 + 8 * U64)
    val = sig * 2.0 ** e * factor * (1 + 8 * U64)
    nf = len(freqs)
    return (torch.tensor(val, dtype=torch.float64, device=bound.device),
            (best // nf, freqs[best % nf], v[best, :, 0].to(torch.complex128), gram.left))


def _scale_exponent(amax: float) -> int:
    """e with max |T| * 2^-e in [1, 2): the exact power-of-two scaling, so that float32
    neither over- nor underflows."""
    return math.floor(math.log2(amax))


def certify_symbol(sym: Symbol, generator=None, backend: str = "auto"):
    """(bound float64 0-d >= ||circ|| * factor, detached; (group, frequency, vector, left)
    for the gradient, None for zero taps) for one layer's symbol."""
    taps = sym.taps.detach()
    amax = float(taps.abs().max()) if taps.numel() else 0.0
    if amax == 0.0:
        return torch.zeros((), dtype=torch.float64, device=taps.device), None
    e = _scale_exponent(amax)
    taps = taps * 2.0 ** -e
    freqs = frequencies(sym.grid)
    gr, co, ci, qh, qw = taps.shape
    use_cpp = _use_cpp(taps, backend)
    layer_op = use_cpp and _has_layer_op()
    # the C++ layer op forms each A_f and its Gram in its own buffers: no (F, n, n) array, so
    # it takes the frequency path on every layer
    path = "frequency" if layer_op else choose_path(
        qh * qw, len(freqs), max(co, ci), (2 * qh - 1) * (2 * qw - 1), use_cpp)
    if path == "spatial":
        gram = gram_spatial(taps, sym.grid, freqs)
    else:
        gram = gram_frequency(taps, freqs, phase_angles(freqs, sym.grid, qh, qw, taps.device),
                              use_triton=backend == "triton", use_cpp=layer_op)
    if layer_op:
        used = torch.ones(1, qh, qw, dtype=torch.bool)  # one block: every tap
        bound, lam, v, _ = certify_cpp(gram, freqs, sym.grid, used, generator)
    else:
        bound, lam, v = certify(gram, use_cpp, generator)
    return _sigma_bound(bound, lam, v, gram, e, sym.factor, freqs)


def certify_weight(w: torch.Tensor, g, amax: float, generator=None, backend: str = "auto"):
    """``certify_symbol(symbol(w, g))`` for the C++ layer op without the float64 symbol: the
    float32 taps straight from ``w`` (``symbol.tap_major32``: the same values), the geometry's
    tables from ``plan.layer_plan`` (kept per geometry). None where that path does not apply
    (another backend or device, no layer op, aliased taps)."""
    if amax == 0.0 or not _use_cpp(w, backend) or not _has_layer_op():
        return None
    e = _scale_exponent(amax)
    taps32 = tap_major32(w, g, 2.0 ** -e)
    if taps32 is None:
        return None
    plan = layer_plan(g)
    gram = gram_taps32(taps32, plan.ph)
    bound, lam, v, tabs_sq = certify_cpp(gram, plan.freqs, plan.grid, plan.used, generator,
                                         order=trace_order(taps32, plan), fq=plan.fq)
    gram = gram._replace(sigma_err=sigma_from_abs(plan.qh * plan.qw, math.sqrt(tabs_sq)))
    return _sigma_bound(bound, lam, v, gram, e, plan.factor, plan.freqs)


def _frequency_matrix(taps_g: torch.Tensor, grid, f) -> torch.Tensor:
    """A_f (co, ci) complex128 of one group's taps at frequency f = (fh, fw)."""
    mh, mw = grid
    fh, fw = f
    qh, qw = taps_g.shape[-2:]
    ph = torch.exp(-2j * math.pi * fh * torch.arange(qh, dtype=torch.float64,
                                                         device=taps_g.device) / mh)
    pw = torch.exp(-2j * math.pi * fw * torch.arange(qw, dtype=torch.float64,
                                                         device=taps_g.device) / mw)
    return torch.einsum("oihw,h,w->oi", taps_g.to(torch.complex128), ph, pw)


def differentiable_bound(sym: Symbol, val: torch.Tensor, info) -> torch.Tensor:
    """``val`` (certified, detached) carried by the implicit gradient of the top singular
    value at the best frequency: ``(val / s) * s(W)``, ``s = Re(u^H A_f(W) v)``."""
    if not sym.taps.requires_grad:
        return val  # nothing to differentiate: skip the float64 refinement (~25 ms / layer)
    if info is None:
        return val + 0 * sym.taps.sum()  # zero weight: no gradient, no NaN
    g, f, vec, left = info
    a = _frequency_matrix(sym.taps[g], sym.grid, f)
    with torch.no_grad():
        if left:
            v = a.mH @ vec
        else:
            v = vec
        v = v / torch.linalg.vector_norm(v).clamp_min(1e-300)
        for _ in range(GRAD_REFINE_ITERS):  # the estimate's vector is complex64: refine it
            v = a.mH @ (a @ v)
            v = v / torch.linalg.vector_norm(v).clamp_min(1e-300)
        u = a @ v
        u = u / torch.linalg.vector_norm(u).clamp_min(1e-300)
    s = torch.real(u.conj() @ (a @ v)) * sym.factor
    sd = s.detach()
    if not bool(sd > 0):
        return val + 0 * s
    return s * (val / sd)


def _up(x64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x64 rounded upwards to dtype (float32 or float64)."""
    if dtype == torch.float64:
        return x64
    x = x64.to(dtype)
    return torch.where(x.double() < x64, torch.nextafter(x, torch.full_like(x, math.inf)), x)


# ---------------------------------------------------------------- public function
def certified_sigma(weights: Sequence[torch.Tensor],
                    specs: Optional[Sequence[Optional[ConvSpec]]] = None, *,
                    backend: str = "auto",
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Certified upper bounds of the spectral norms of many layers (package docstring).

    Args:
        weights: L tensors as for :func:`lipkern.fused_power_iter` (dense 2-D, conv 3-D/4-D;
            one dtype, one device).
        specs: as for :func:`lipkern.fused_power_iter`: None reads a weight as a matrix,
            a :class:`ConvSpec` gives the conv operator (zero or circular padding, any
            stride, dilation and groups; transposed convs).
        backend: "auto" | "cpp" | "triton" | "torch". "cpp": the certificate step in C++
            (csrc/cpu/certified.cpp; CPU tensors; "auto" takes it when built); "triton":
            the frequency matrices by a Triton kernel (triton_kernels/certified.py; CUDA
            tensors), Gram and Cholesky by cuBLAS/cuSOLVER through ATen; "torch": batched
            ATen GEMMs and Cholesky (any device). The taps and the Gram matrices of
            few-tap layers are formed by ATen in both. :func:`lipkern.reference.certified_sigma`
            is the specification (the exact circular norms by SVD).
        generator: seeds the estimates' start vectors (the bound holds for any seed; only
            its tightness depends on it).

    Returns:
        (L,) tensor, float32 (float64 for float64 weights), every entry ``>= sigma`` of its
        layer's operator, rounded upwards; differentiable w.r.t. every weight (implicit
        rule, see the package docstring).
    """
    weights = check_weights(weights)
    specs = check_specs(specs, len(weights))
    if backend == "cuda":
        from ..backends import BackendUnavailableError
        raise BackendUnavailableError(
            "certified_sigma: backend 'cuda' is not implemented yet; use 'auto', 'triton', "
            "'cpp' or 'torch'")
    if backend not in ("auto", "torch", "cpp", "triton"):
        raise ValueError(f"backend must be 'auto', 'cpp', 'triton' or 'torch', got {backend!r}")
    if backend == "triton":
        _check_triton(weights[0])
    out_dtype = torch.float64 if weights[0].dtype == torch.float64 else torch.float32
    geoms = [resolve_geometry(tuple(w.shape), s, f"weights[{i}]")
             for i, (w, s) in enumerate(zip(weights, specs))]
    outs = []
    for i, (w, g) in enumerate(zip(weights, geoms)):
        # max |w| in one pass (aminmax: ~10x faster than abs().max() here); NaN propagates,
        # so the check below sees NaN and Inf
        lo, hi = torch.aminmax(w.detach()) if w.numel() else (torch.zeros(()),) * 2
        amax = max(-float(lo), float(hi))
        if not math.isfinite(amax):
            raise ValueError(f"weights[{i}] contains NaN or Inf values")
        grad = torch.is_grad_enabled() and w.requires_grad
        res = certify_weight(w, g, amax, generator, backend)
        sym = symbol(w, g) if res is None or grad else None
        if res is None:
            res = certify_symbol(sym, generator, backend)
        outs.append(differentiable_bound(sym, *res) if grad else res[0])
    out = torch.stack(outs)
    up = _up(out.detach(), out_dtype)
    return up + (out - out.detach()).to(out_dtype)
