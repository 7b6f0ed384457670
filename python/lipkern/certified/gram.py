r"""The Gram matrix of every frequency, in complex64, with a bound on its error.

Two ways to form ``H_f`` (``n x n``, ``n`` the smaller side, ``m`` the other), the cheaper
chosen per layer (``choose_path``):

* **frequency** (float32): ``A_f = sum_q T_q exp(i angle_fq)`` by one real GEMM with the
  phase table, then ``H_f = B_f B_f^H`` (``B = A`` or ``A^H``), ``8 n^2 m`` flops per
  frequency. Errors: ``||A_f - fl(A_f)||_2 <= sqrt(2) (Q + 3) u ||sum_q |T_q| ||_F`` (per
  real component an inner product of Q terms with phases rounded to float32 and taps
  rounded to float32, Higham Lemma 3.1) -- added on the sigma level (``sigma_err``); and
  ``|fl(B B^H) - B B^H| <= c_m |B| |B|^T`` entrywise (``c_m = 4 (m + 4) u / (1 - ...)``,
  twice the complex inner-product constant of Higham Lemma 3.5, any summation order), so
  ``||.||_2 <= c_m || |B| ||_2^2``, the Perron root bounded from above by Collatz-Wielandt
  (``perron_bound``) -- added on the lambda level (``lam_err``).
* **spatial** (float64): ``G_d = sum_q B_q B_{q-d}^T`` for the ``(2Q - 1)^2`` offsets (half
  of them by symmetry), ``Q(Q + 1)`` GEMMs of ``n^2 m`` at half the float32 rate, then one
  GEMM with the (F, D) phase matrix; cheaper when the taps are few (polyphase strided convs,
  1x1) or the grid is large. Error: the a-priori ``e_form`` below plus the rounding to
  complex64, ``u ||H_f||_F``.

The taps come in scaled by a power of two (``max |T| in [1, 2)``, exact) so that float32
neither overflows nor underflows for weights from 1e-30 to 1e30; an absolute ``TINY`` in
those units covers gradual underflow of the small entries (each op errs by <= 2^-149
absolutely: far below 1e-30 for any size here).
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple

import torch

from .symbol import phase_table

U32 = 2.0 ** -24  # unit roundoff of float32
U64 = 2.0 ** -53
TINY = 1e-30  # absolute slack (scaled units, where lambda_max >= max|T|^2 >= 1)


class Gram(NamedTuple):
    """The per-frequency Gram matrices of one layer (or their factors) and error bounds.

    side: (G * F, n, n) complex64 H_f (``is_gram``), or (G * F, n, m) complex64 B_f with
    ``H_f = B_f B_f^H`` formed by the certificate step (whose GEMM error, ``c_m`` times the
    Perron root of |B_f|, that step bounds); lam_err: (G * F,) float64 bound on the error of
    a given H_f (None for B_f); sigma_err: float, bound on ``||A_f - fl(A_f)||_2``; left:
    H = A A^H (True) or A^H A."""
    side: Optional[torch.Tensor]
    is_gram: bool
    lam_err: Optional[torch.Tensor]
    sigma_err: float
    left: bool
    taps32: Optional[torch.Tensor] = None  # (G, Q, co, ci) float32: B_f formed on demand
    ph: Optional[torch.Tensor] = None  # (F, Q, 2) float32 (cos, sin) of the angles

    @property
    def count(self) -> int:
        """G * F, the number of matrices."""
        return self.side.shape[0] if self.side is not None else \
            self.taps32.shape[0] * self.ph.shape[0]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The side matrices of the flat indices ids (g * F + f): (K, n, m) complex64."""
        if self.side is not None:
            return self.side[ids]
        nf = self.ph.shape[0]
        out = torch.empty(ids.numel(), *self.taps32.shape[2:], 2, dtype=torch.float32,
                          device=self.ph.device)
        grp = ids // nf
        for g in grp.unique().tolist():  # one real GEMM per group (no gathered taps copy)
            sel = (grp == g).nonzero().flatten()
            ph = self.ph[ids[sel] % nf]  # (K_g, Q, 2)
            t = self.taps32[g].flatten(1, 2)  # (Q, E)
            ri = (ph.transpose(1, 2).reshape(-1, t.shape[0]) @ t)  # (K_g * 2, E)
            out[sel] = ri.view(sel.numel(), 2, *self.taps32.shape[2:]).movedim(1, -1)
        a = torch.view_as_complex(out)
        return (a if self.left else a.mH).contiguous()

    def traces(self) -> torch.Tensor:
        """(G * F,) float64: tr H_f = ||A_f||_F^2 (an estimate's ranking, not a bound)."""
        if self.side is not None:
            if self.is_gram:
                return self.side.diagonal(dim1=-2, dim2=-1).real.sum(-1).double()
            return torch.view_as_real(self.side).square().sum(dim=(1, 2, 3)).double()
        k = tap_inner(self.taps32).double()  # <T_q, T_q'> (a ranking: float32)
        z = torch.view_as_complex(self.ph.double().contiguous())  # (F, Q)
        return torch.einsum("fq,gqr,fr->gf", z, k.to(z.dtype), z.conj()).real.reshape(-1)


def tap_inner(taps32: torch.Tensor) -> torch.Tensor:
    """(G, Q, Q) float32 ``<T_q, T_r>`` of tap-major taps (G, Q, co, ci) float32. One
    (Q x E) (E x Q) product runs on one thread at ~6 GB/s here (1.6 ms at 512 x 512 x 9);
    for one group, eight partial products of a strided view (no copy) take 0.3 ms."""
    gr, nq = taps32.shape[:2]
    e = taps32.shape[2] * taps32.shape[3]
    if gr == 1 and e % 8 == 0 and e >= 8 * 1024 and taps32.is_contiguous():
        t = taps32.view(nq, 8, e // 8).transpose(0, 1)  # (8, Q, E / 8)
        return torch.bmm(t, t.transpose(1, 2)).sum(0, keepdim=True)
    t = taps32.flatten(2, 3)  # (G, Q, E)
    return torch.bmm(t, t.transpose(1, 2))


def inner_constant(m: int, u: float = U32) -> float:
    """c_m with |fl(x^H y) - x^H y| <= c_m |x|^T |y| for complex vectors of length m."""
    c = 4 * (m + 4) * u
    return c / (1 - c)


def perron_bound(mat_abs: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Upper bounds of ``lambda_max(|M|^T |M|)`` for (B, r, c) nonnegative float32 ``|M|``.

    Collatz-Wielandt: for any x > 0, ``lambda_max(P) <= max_i (P x)_i / x_i`` for a
    nonnegative P; x from a few power steps (floored at 1e-6 to stay positive). ``P x`` is
    a sum of nonnegative terms, its float32 error <= (r + c + 2) u relative; the division
    adds u: one upward factor covers both."""
    b, r, c = mat_abs.shape
    x = torch.ones(b, c, 1, dtype=mat_abs.dtype, device=mat_abs.device)
    mt = mat_abs.mT
    for _ in range(iters):
        y = mt @ (mat_abs @ x)
        x = (y / y.amax(dim=1, keepdim=True).clamp_min(1e-30)).clamp_min(1e-6)
    y = mt @ (mat_abs @ x)
    ratio = (y / x).amax(dim=(1, 2)).double()
    return ratio * (1 + 4 * (r + c + 8) * U32)


def choose_path(q: int, n_freq: int, m: int, n_off: int, lower_only: bool) -> str:
    """'spatial' or 'frequency', by flop counts in units of n^2 m float32 flops (float64
    GEMMs counted twice: half the rate on AVX-512 and on GPUs' fp32/fp64 ratio or worse;
    the C++ step forms only the lower triangle, ~56% of the product at n = 512)."""
    spatial = 2.0 * q * (q + 1) + 8.0 * n_freq * n_off / m
    frequency = (4.5 if lower_only else 8.0) * n_freq
    return "spatial" if spatial < frequency else "frequency"


def gram_frequency(taps: torch.Tensor, freqs: List[Tuple[int, int]],
                   angles: torch.Tensor, use_triton: bool = False,
                   use_cpp: bool = False) -> Gram:
    """Gram matrices by the frequency path. taps (G, co, ci, Qh, Qw) float64 (scaled),
    angles (F, Q) float64 (``symbol.phase_angles``). use_triton: A_f by the Triton kernel
    (triton_kernels/certified.py), else by one ATen GEMM with the phase table. use_cpp:
    none formed here (for the C++ layer op, which forms each in its buffer)."""
    gr, co, ci, qh, qw = taps.shape
    nf, nq = angles.shape
    t32 = taps.to(torch.float32).reshape(gr, co * ci, nq)
    left = co <= ci
    tabs = taps.abs().sum(dim=(3, 4))  # sum_q |T_q|, (G, co, ci)
    sigma_err = sigma_from_abs(nq, float(torch.linalg.vector_norm(tabs)))
    if use_cpp:  # the C++ layer op forms each A_f in its own buffer (certify_layer)
        return Gram(None, False, None, sigma_err, left,
                    t32.transpose(1, 2).reshape(gr, nq, co, ci).contiguous(),
                    phase_table(angles))
    if use_triton:
        from ..triton_kernels.certified import phase_sum
        a = phase_sum(t32.reshape(gr, co, ci, nq).contiguous(), angles)  # (G, F, co, ci)
    else:
        # interleaved (cos, sin) per frequency: the GEMM's output is complex64 in place
        ph = phase_table(angles).transpose(1, 2).reshape(2 * nf, nq)
        a = t32 @ ph.T  # (G, co * ci, 2F)
        a = torch.view_as_complex(a.view(gr, co, ci, nf, 2)).permute(0, 3, 1, 2)
    b = a if left else a.mH
    b = b.reshape(gr * nf, *b.shape[2:]).contiguous()
    return Gram(b, False, None, sigma_err, left)


def sigma_from_abs(nq: int, tabs_norm: float) -> float:
    """``sigma_err``, the bound on ``||A_f - fl(A_f)||_2`` of the frequency path, from
    ``||sum_q |T_q| ||_F`` (module docstring)."""
    return math.sqrt(2) * (nq + 3) * U32 * 1.01 * tabs_norm + TINY


def gram_taps32(taps32: torch.Tensor, ph: torch.Tensor) -> Gram:
    """The frequency path's ``Gram`` for the C++ layer op from tap-major float32 taps
    (G, Q, co, ci) (``symbol.tap_major32``: scaled, exact or rounded once) and the phase
    table ph (F, Q, 2) (``symbol.phase_table``). ``sigma_err`` is NaN here: the layer op
    returns ``||sum_q |T_q| ||_F^2`` (rounded up) for ``sigma_from_abs``."""
    left = taps32.shape[2] <= taps32.shape[3]
    return Gram(None, False, None, math.nan, left, taps32.contiguous(), ph)


def _form_error(taps: torch.Tensor, grid: Tuple[int, int]) -> float:
    """A-priori bound on ``||fl(H_f) - H_f||_2`` of the float64 spatial path:
    ``8 (inner + Q^2 + 4 log2(M) + 8) u sqrt(Mh Mw) (sum_q ||T_q||_F)^2`` (kept from an FFT
    formulation: it covers the offsets' float64 GEMMs with 8x the textbook constants; the
    float32 phase GEMM has its own term in ``gram_spatial``)."""
    gr, co, ci, qh, qw = taps.shape
    mh, mw = grid
    inner = max(co, ci)
    tsum = float(torch.linalg.vector_norm(taps, dim=(1, 2)).sum(dim=(1, 2)).max())
    c = 8 * (inner + qh * qw + 4 * math.log2(mh * mw + 1) + 8) * U64 * math.sqrt(mh * mw)
    return c * tsum * tsum * (1 + 1e-6)


def _runs(mask: torch.Tensor) -> List[Tuple[int, int]]:
    """[start, stop) of the runs of True in a 1-D bool tensor."""
    m = torch.cat([mask.new_zeros(1), mask, mask.new_zeros(1)]).to(torch.int8)
    d = m[1:] - m[:-1]
    return list(zip(d.eq(1).nonzero().flatten().tolist(), d.eq(-1).nonzero().flatten().tolist()))


def gram_spatial(taps: torch.Tensor, grid: Tuple[int, int], freqs: List[Tuple[int, int]]
                 ) -> Gram:
    """Gram matrices by the spatial path (float64 offsets, phase GEMM), rounded to
    complex64. taps (G, co, ci, Qh, Qw) float64 (scaled)."""
    gr, co, ci, qh, qw = taps.shape
    mh, mw = grid
    left = co <= ci
    # side matrices B_q with H_f = sum_{q, q'} B_q B_{q'}^T w^(f (q - q')): B_q = T_q (left,
    # H = A A^H) or T_q^T (right, H = A^H A, where the phase is w^(f (q' - q)))
    b = taps if left else taps.transpose(1, 2)
    n = b.shape[1]
    bq = b.permute(0, 3, 4, 1, 2).contiguous()  # (G, Qh, Qw, n, inner)
    # columns of B_q that are zero in every group: the phases a tap does not reach (a 3x3
    # stride-2 conv's polyphase symbol has 9 of its 16 (shift, phase) blocks nonzero, and
    # symbol() lays the phases out as contiguous column blocks); a pair's GEMMs run over the
    # column runs nonzero in both (25 of 64 blocks for that conv), on strided views
    nz = bq.ne(0).any(dim=3).any(dim=0)  # (Qh, Qw, inner)
    offsets, blocks = [], []
    for dh in range(-(qh - 1), qh):
        for dw in range(-(qw - 1), qw):
            if (dh, dw) < (0, 0):
                continue  # the other half-plane is the transpose: G_{-d} = G_d^T
            gd = bq.new_zeros(gr, n, n)
            for ah in range(max(0, dh), min(qh, qh + dh)):  # taps q with q - d also a tap
                for aw in range(max(0, dw), min(qw, qw + dw)):
                    for c0, c1 in _runs(nz[ah, aw] & nz[ah - dh, aw - dw]):
                        # sum_q B_q B_{q-d}^T, accumulated in place
                        gd.baddbmm_(bq[:, ah, aw, :, c0:c1],
                                    bq[:, ah - dh, aw - dw, :, c0:c1].transpose(1, 2))
            sd = (dh, dw) if left else (-dh, -dw)
            offsets.append(sd)
            blocks.append(gd)
            if (dh, dw) != (0, 0):
                offsets.append((-sd[0], -sd[1]))
                blocks.append(gd.transpose(1, 2))
    # H_f = sum_d G_d exp(-2 pi i <f, d / M>) over the (2Q - 1)^2 offsets: one float32 GEMM
    # of the (D, n^2) blocks with the (D, 2F) interleaved phase table, complex64 in place.
    # Its error per real component <= (D + 3) u sum_d |G_d| (D terms, the phases and the
    # blocks rounded to float32), so ||.||_2 <= sqrt(2) (D + 3) u ||sum_d |G_d| ||_F for every
    # frequency; the float64 blocks' own error is e_form.
    f = torch.tensor(freqs, dtype=torch.float64, device=taps.device)  # (F, 2)
    d = torch.tensor(offsets, dtype=torch.float64, device=taps.device)  # (D, 2)
    ang = -2 * math.pi * (f[:, None, 0] * d[None, :, 0] / mh + f[:, None, 1] * d[None, :, 1] / mw)
    nf, nd = len(freqs), len(offsets)
    ph = phase_table(ang).transpose(1, 2).reshape(2 * nf, nd)  # (2F, D)
    gflat = torch.stack(blocks, 1).reshape(gr, nd, n * n)
    gabs = float(torch.linalg.vector_norm(gflat.abs().sum(1), dim=1).max())
    out = gflat.to(torch.float32).transpose(1, 2) @ ph.T  # (G, n^2, 2F)
    h = torch.view_as_complex(out.view(gr, n * n, nf, 2)).permute(0, 2, 1)
    h = h.reshape(gr * nf, n, n).contiguous()
    err = math.sqrt(2) * (nd + 3) * U32 * 1.01 * gabs + _form_error(taps, grid) + TINY
    lam_err = torch.full((gr * nf,), err, dtype=torch.float64, device=taps.device)
    return Gram(h, True, lam_err, 0.0, left)
