"""Triton kernel of ``lipkern.certified_sigma`` (backend "triton"): the per-frequency
matrices ``A_f = sum_q T_q exp(i angle_fq)`` of the frequency path, every frequency and
every tap entry in one launch (python/lipkern/certified/gram.py has the error bound it
shares with the ATen path: per real component an inner product of Q float32 terms).

On a GPU the rest of the certificate is what the vendor libraries do best: the Gram GEMMs
(cuBLAS) and the batched Cholesky (cuSOLVER, ``torch.linalg.cholesky_ex``); this kernel
replaces the ATen route's GEMM with the (2F, Q) phase table and its permuting copy, which
streams the (F, co, ci) complex array twice more.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_E = 256  # tap entries per program (4 warps x 2 elements, each a Q-term sum)


@triton.jit
def phase_sum_kernel(t_ptr, ph_ptr, out_ptr, E, NF, CO_CI, Q: tl.constexpr,
                     BLOCK_E: tl.constexpr):
    """Program (f, e-block): out[g, f, r] = sum_q t[e, q] (cos, sin)[f, q], e = g CO_CI + r.

    t: (E, Q) float32 taps (E = groups * co * ci); ph: (NF, Q, 2) float32 (cos, sin) of the
    angles; out: (groups, NF, CO_CI, 2) float32, read as complex64."""
    f = tl.program_id(0)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask = e < E
    re = tl.zeros((BLOCK_E,), dtype=tl.float32)
    im = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for q in tl.static_range(Q):
        t = tl.load(t_ptr + e * Q + q, mask=mask, other=0.0)
        c = tl.load(ph_ptr + (f * Q + q) * 2)
        s = tl.load(ph_ptr + (f * Q + q) * 2 + 1)
        re += t * c
        im += t * s
    g = e // CO_CI
    r = e - g * CO_CI
    o = ((g.to(tl.int64) * NF + f) * CO_CI + r) * 2
    tl.store(out_ptr + o, re, mask=mask)
    tl.store(out_ptr + o + 1, im, mask=mask)


def phase_sum(taps32: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """taps32 (G, co, ci, Q) float32 contiguous, angles (F, Q) float64 -> A (G, F, co, ci)
    complex64."""
    gr, co, ci, nq = taps32.shape
    nf = angles.shape[0]
    from lipkern.certified.symbol import phase_table
    ph = phase_table(angles)
    out = torch.empty(gr, nf, co * ci, 2, dtype=torch.float32, device=taps32.device)
    e = gr * co * ci
    phase_sum_kernel[(nf, triton.cdiv(e, BLOCK_E))](taps32, ph, out, e, nf, co * ci, Q=nq,
                                                    BLOCK_E=BLOCK_E)
    return torch.view_as_complex(out).view(gr, nf, co, ci)
