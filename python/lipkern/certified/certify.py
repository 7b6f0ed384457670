r"""The certificate: ``lambda_max(H_f) <= mu`` for every frequency, by Cholesky in complex64.

``mu`` is the largest power-iteration estimate over the frequencies (from below) raised by
``CERT_MARGIN``; ``mu I - H`` positive semi-definite iff ``lambda_max(H) <= mu``, and a
Cholesky factorization that runs to completion proves it for a matrix within a computable
distance (Rump 2006): ``L L^H = S + E`` with ``|E| <= c_n |L| |L|^H`` (Higham, ASNA 2nd ed.,
Thm 10.3; the theorem needs only that the factorization completes; ``c_n`` twice the
complex constant, ``gram.inner_constant``), so ``S >= -||E||_2 I`` with ``||E||_2 <= c_n
|| |L| ||_2^2``, the Perron root bounded by Collatz-Wielandt. Forming ``S = mu I - H`` rounds
the diagonal only: ``<= u mu`` (``0 <= H_ii``). Together, for the computed ``H``:

    lambda_max(H) <= mu + c_n || |L| ||_2^2 + u mu   (+ the error of H itself, gram.py).

A frequency whose factorization fails gets more iterations and a larger ``mu`` (rounds),
and after the last round ``||H||_F >= lambda_max`` is used (no factorization needed). So the
result is always a bound; its tightness depends only on the estimate.

Measured on ResNet-18's 512-channel layers: ``c_n || |L| ||^2 ~ 3e-3 mu`` (the Perron root
of ``|L|^H |L|`` ~25 mu, against ~390 mu for ``||L||_F^2``).

Where the Frobenius bounds are small against mu they replace the Perron roots:
``|| |L| ||^2 <= ||L||_F^2 <= tr S / (1 - c_n)`` (``tr(L L^H) = tr(S + E)``) for n <= 128
(the C++ layer op also for n <= ~360 at a first trial lowered by that term),
and ``|| |B| ||^2 <= ||B||_F^2 <= tr fl(H) / (1 - kappa)`` where that costs <= mu / 32
(csrc/cpu/certified.cpp has the argument and the measured costs).

Three implementations:

* ``certify_cpp``: the whole layer in one C++ call, ``lipkern::certify_layer``
  (csrc/cpu/certified.cpp): the A_f formed in batches, the Gram by lower-triangle GEMM
  (column blocks that do not depend on every frequency axis -- polyphase phases of strided
  convs -- formed once per key and added), Lanczos estimates on the top frequencies, one
  first trial for every frequency and the failed ones retried in rounds at one trial each
  (the bound independent of the thread count), its own Cholesky for n <= 128 and LAPACK
  potrf above, frequencies on a guided schedule.
  The default for CPU tensors when the extension is built.
* ``certify`` with the C++ step ``lipkern::certify_frequencies`` (given H_f or B_f; the
  spatial path's Gram matrices), and with batched ATen
  (``torch.linalg.cholesky_ex``, any device, backend "torch" and "triton").
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from .gram import TINY, U32, Gram, inner_constant, perron_bound

CERT_MARGIN = 2.0 ** -5  # mu = estimate * (1 + margin): 1.6% on sigma, leaves room for an
#                          estimate that is ~1% low after ESTIMATE_ITERS iterations
ESTIMATE_TOP = 4  # frequencies (of largest trace = ||A_f||_F^2) whose power iteration sets mu
ESTIMATE_ITERS = 20  # power iterations on each of them before the first certificate: the
#                      estimate of the largest frequency is within ~1% on ResNet-18
RETRY_ITERS = 60  # more iterations for a frequency whose certificate failed
ROUNDS = 4  # certificate attempts (margin x4 each), then the Frobenius bound


def power(side: torch.Tensor, is_gram: bool, v: torch.Tensor, iters: int):
    """Power iteration on H (B, n, n) (or H = B B^H from B (B, n, m)) from v (B, n, 1):
    (lambda_est (B,) float64, v).

    Runs on row vectors r = v^H: ``r H`` and ``(r B) B^H`` with B^H made contiguous once
    (measured, 512 x 512 complex64, 1 thread: B^H v as a strided bmm 3.2 ms, r B 0.4 ms)."""
    bh = None if is_gram else side.mH.contiguous()

    def apply(r):
        return r @ side if is_gram else (r @ side) @ bh

    r = v.mH
    for i in range(iters):
        r = apply(r)
        if i % 2 or i == iters - 1:  # scaled units: lambda^2 < 1e16, no overflow between
            r = r / _norm(r).clamp_min(1e-30)
    lam = _norm(apply(r))[:, 0, 0]  # ||H v|| <= lambda_max for unit v
    return lam.double(), r.mH


def _norm(r: torch.Tensor) -> torch.Tensor:
    """(B, 1, n) complex -> (B, 1, 1) 2-norms (on the real view: vector_norm of complex
    tensors is ~10x slower here)."""
    return torch.view_as_real(r).square().sum(dim=(2, 3)).sqrt()[:, :, None]


def _gram_of(side: torch.Tensor, is_gram: bool) -> torch.Tensor:
    return side if is_gram else side @ side.mH


def _step_torch(side: torch.Tensor, is_gram: bool, mu32: torch.Tensor):
    """(info, perron_l, perron_b) as the C++ kernel returns them, by batched ATen."""
    sm = _gram_of(side, is_gram).neg()
    sm.diagonal(dim1=-2, dim2=-1).add_(mu32[:, None])  # mu I - H, one pass
    r, info = torch.linalg.cholesky_ex(sm)
    pl = torch.zeros(side.shape[0], dtype=torch.float64, device=side.device)
    ok = info == 0
    if bool(ok.any()):
        pl[ok] = perron_bound(r[ok].abs())
    pb = pl.new_zeros(side.shape[0]) if is_gram else perron_bound(side.abs())
    return info, pl, pb


def _step(side: torch.Tensor, is_gram: bool, mu32: torch.Tensor, use_cpp: bool):
    if use_cpp:
        info, pl, pb = torch.ops.lipkern.certify_frequencies(side, mu32, is_gram)
        # the kernel bounds the Perron roots of the float32 moduli: (1 + 8 u) covers them
        return info, pl * (1 + 8 * U32), pb * (1 + 8 * U32)
    return _step_torch(side, is_gram, mu32)


LANCZOS_STEPS = 12  # the C++ path's estimate: Lanczos (full reorthogonalization) on H_f
LANCZOS_RETRY = 48  # for a frequency whose first trial failed


def certify_cpp(gram: Gram, freqs, grid, used: torch.Tensor, generator=None,
                order: torch.Tensor = None, fq: torch.Tensor = None
                ) -> Tuple[torch.Tensor, ...]:
    """``certify`` in one C++ call (``lipkern::certify_layer``, csrc/cpu/certified.cpp):
    A_f, H_f, the Lanczos estimates, the trials and their factorizations for every
    frequency of the layer. The same certified quantities as ``certify`` (the trial that was
    factored, the Perron bounds of |L| and |B|), assembled here the same way. freqs: the F
    frequencies (f_h, f_w) of the grid (M_h, M_w); used: (P, Qh, Qw) bool or uint8, tap q reaches phase block p (the
    kernel forms blocks that do not depend on every frequency axis once per key). Also
    returns ``sum_(g,o,c) (sum_q |T_q|)^2`` (rounded up: ``gram.sigma_from_abs``'s input)."""
    bsz = gram.count
    if order is None:  # by decreasing trace (plan.trace_order: the same ranking in float32)
        order = gram.traces().argsort(descending=True)
    n = gram.taps32.shape[2] if gram.left else gram.taps32.shape[3]
    m = gram.taps32.shape[3] if gram.left else gram.taps32.shape[2]
    start = torch.randn(n, dtype=torch.complex64, generator=generator)
    if fq is None:
        fq = torch.tensor(freqs, dtype=torch.int64).reshape(-1, 2)
    info, trial, pl, pb, lam, vec, tabs_sq, kappa = torch.ops.lipkern.certify_layer(
        gram.taps32, gram.ph, fq, grid[0], grid[1], used.to(torch.uint8), order,
        min(ESTIMATE_TOP, bsz), start,
        gram.left, CERT_MARGIN, LANCZOS_STEPS, LANCZOS_RETRY, ROUNDS)
    # kappa: the kernel's Gram error constant, |fl(H) - H| <= kappa |B| |B|^T (c_m for one
    # column block; ~c of the widest block where blocks are formed apart)
    c_n, c_m = inner_constant(n), inner_constant(m)
    t = trial.double()
    # the kernel bounds the Perron roots of the float32 moduli: (1 + 8 u) covers them
    cert = (t + c_n * pl * (1 + 8 * U32) + 2 * U32 * t + kappa * pb * (1 + 8 * U32) + TINY) \
        * (1 + 1e-12)
    ok = info == 0
    bound = torch.where(ok, cert, torch.full_like(cert, math.inf))
    ids = (~ok).nonzero().flatten()
    if ids.numel():  # the last resort, ||H||_F >= lambda_max (summed in float64), + H's error
        sub = gram.rows(ids)
        hf = torch.linalg.matrix_norm(_gram_of(sub, False).to(torch.complex128))
        bound[ids] = (hf + c_m * perron_bound(sub.abs()) + TINY) * (1 + 1e-10)
    return bound, lam, vec[:, :, None], tabs_sq


def certify(gram: Gram, use_cpp: bool, generator=None) -> Tuple[torch.Tensor, ...]:
    """Certified ``lambda_max`` bounds of the true ``H_f`` of one layer (scaled units,
    including ``gram``'s error terms), (B,) float64; also the estimates (B,) and the top
    vectors (B, n, 1) complex64."""
    side, is_gram = gram.side, gram.is_gram
    bsz = gram.count
    top = gram.traces().topk(min(ESTIMATE_TOP, bsz)).indices
    side_top = gram.rows(top)
    n, m = side_top.shape[1], side_top.shape[2]
    dev = side_top.device
    gdev = generator.device if generator is not None else dev  # a CPU generator may seed CUDA
    v = torch.randn(bsz, n, 1, dtype=side_top.dtype, device=gdev, generator=generator).to(dev)
    lam = torch.zeros(bsz, dtype=torch.float64, device=dev)
    lt, vt = power(side_top, is_gram, v[top], ESTIMATE_ITERS)
    lam[top], v[top] = lt, vt
    # one mu per layer (the largest estimate): every frequency must pass it anyway
    mu = lam.max().expand(bsz) * (1 + CERT_MARGIN)
    bound = torch.full((bsz,), math.inf, dtype=torch.float64, device=dev)
    todo = torch.ones(bsz, dtype=torch.bool, device=dev)
    c_n, c_m = inner_constant(n), inner_constant(m)
    margin = CERT_MARGIN  # growth of a failed trial without a higher estimate: x4 per round
    for rnd in range(ROUNDS):
        ids = todo.nonzero().flatten()
        if ids.numel() == 0:
            break
        sub = None if side is None else (side if ids.numel() == bsz else side[ids])
        if rnd > 0:  # failed before: the estimate was low; iterate those further
            if sub is None:
                sub = gram.rows(ids)
            l2, v2 = power(sub, is_gram, v[ids], RETRY_ITERS)
            v[ids] = v2
            lam[ids] = torch.maximum(lam[ids], l2)
            # an estimate above the failed trial sets the next one (as tight as the first);
            # else the failed trial grows
            fresh = lam[ids] * (1 + CERT_MARGIN)
            mu[ids] = torch.where(fresh > mu[ids], fresh, mu[ids] * (1 + margin))
        trial32 = mu[ids].to(torch.float32)  # the value the factorization sees
        info, pl, pb = _step(sub, is_gram, trial32, use_cpp)
        ok = info == 0
        if bool(ok.any()):
            good = ids[ok]
            t = trial32[ok].double()
            err = gram.lam_err[good] if is_gram else c_m * pb[ok] + TINY
            cert = (t + c_n * pl[ok] + 2 * U32 * t + err) * (1 + 1e-12)
            bound[good] = torch.minimum(bound[good], cert)
            todo[good] = False
        margin *= 4
    ids = todo.nonzero().flatten()
    if ids.numel():  # the last resort, ||H||_F >= lambda_max (summed in float64), + H's error
        sub = gram.rows(ids)
        hf = torch.linalg.matrix_norm(_gram_of(sub, is_gram).to(torch.complex128))
        err = gram.lam_err[ids] if is_gram else c_m * perron_bound(sub.abs()) + TINY
        bound[ids] = (hf + err) * (1 + 1e-10)
    return bound, lam, v
