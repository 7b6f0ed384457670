"""Triton kernels for the fused power iteration: ONE launch for the forward of every layer
(all iterations, all kinds) plus the network product, ONE launch for every weight gradient.

Forward design (v1): one program per layer walks the layer table (``lipkern.layout``) and runs
that layer's whole iteration; phases within a program are ordered by ``tl.debug_barrier``.
No program ever waits on another, so the same kernel runs under ``TRITON_INTERPRET=1`` (where
a spin barrier would deadlock). The product of the sigmas is taken by the last program to
finish (an acq_rel atomic counter that the same program resets to 0), so it costs no second
launch. Each layer's map is written in conv form (see ``lipkern.spec``):

* dense (m, n): one pass over W per iteration -- for each row block, ``y_b = W_b x`` then
  ``xn += W_b^T y_b`` while the block is in cache, so ``W^T W x`` never needs y whole;
* conv ``C x``: implicit GEMM over (output channels) x (output pixels), reducing over
  (input channel, kh, kw) with a gathered input tile; circular padding wraps the gather;
* adjoint ``C^T y``: a gather as well (no atomics): input pixel (ih, iw) collects the output
  pixels with ``oh * sh + kh * dh == ih + ph (+ t * h for circular, t in {-1, 0, 1})``.

Backward: one program per (layer, weight tile) from a host-built tile table; a tile is
``g_l * u x^T`` (dense) or a conv weight-gradient tile (x and u swapped for transposed convs),
where ``g_l = dL/dsigma_l`` combines the three upstream gradients without dividing by sigma.

All iteration math is float32 (weights of any float dtype are upcast on load); matmul-like
reductions use ``tl.dot`` with ``input_precision="ieee"`` (tf32 would cost ~1e-3 relative
error in sigma, more than the tolerance users expect of an fp32 result).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------- table fields
# (indices into a META_WIDTH row; must match lipkern.layout.META_FIELDS). Globals read by
# @triton.jit code must be tl.constexpr: the interpreter does not check this, the compiler
# does (tests/test_build.py compiles the kernels for sm_90 to catch such things without a GPU).
(F_KIND, F_XOFF, F_YOFF, F_CIN, F_H, F_W, F_COUT, F_OH, F_OW, F_KH, F_KW, F_SH, F_SW, F_PH,
 F_PW, F_DH, F_DW, F_G, F_CIRC, F_WOFF) = (tl.constexpr(i) for i in range(20))

# Block sizes. tl.dot needs every dim >= 16; 32 keeps masked waste low on the small channel
# counts of real layers (3, 64, 128) while giving the GPU 1k-element tiles.
BLOCK_C, BLOCK_P, BLOCK_R = 32, 32, 32
BLOCK_M, BLOCK_N = 32, 64
BLOCK_V = 256  # vector passes (normalize, scale)


@triton.jit
def _mul(a, b):
    return a * b


@triton.jit
def _load_row_head(row):
    """(kind, x_off, y_off, w_off, CIN, COUT) of a layer-table row: what every kernel reads
    first (see lipkern.layout.META_FIELDS)."""
    return (tl.load(row + F_KIND), tl.load(row + F_XOFF), tl.load(row + F_YOFF),
            tl.load(row + F_WOFF), tl.load(row + F_CIN), tl.load(row + F_COUT))


@triton.jit
def _load_conv_geom(row):
    """The spatial fields of a layer-table row (see lipkern.layout.META_FIELDS)."""
    return (tl.load(row + F_H), tl.load(row + F_W), tl.load(row + F_OH), tl.load(row + F_OW),
            tl.load(row + F_KH), tl.load(row + F_KW), tl.load(row + F_SH), tl.load(row + F_SW),
            tl.load(row + F_PH), tl.load(row + F_PW), tl.load(row + F_DH), tl.load(row + F_DW),
            tl.load(row + F_G), tl.load(row + F_CIRC))


@triton.jit
def _gather_input(src_ptr, chan, ih, iw, H, W, CIRC, valid):
    """Load src[chan, ih, iw] (flat (C, H, W)), wrapping ih/iw when CIRC, 0 outside."""
    ihw = ((ih % H) + H) % H  # python and C agree on this form for negative ih
    iww = ((iw % W) + W) % W
    inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    ih = tl.where(CIRC != 0, ihw, ih)
    iw = tl.where(CIRC != 0, iww, iw)
    # (inside | CIRC) in int arithmetic: the interpreter's `bool | scalar` is not a bool mask
    ok = valid & ((inside.to(tl.int32) + CIRC) != 0)
    return tl.load(src_ptr + chan * (H * W) + ih * W + iw, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _conv_c_phase(w_ptr, src_ptr, dst_ptr, CIN, H, W, COUT, OH, OW, KH, KW, SH, SW, PH, PW,
                  DH, DW, G, CIRC,
                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    """dst (COUT*OH*OW) = C src (CIN*H*W); returns ||dst||^2."""
    CIG = CIN // G
    COG = COUT // G
    KK = KH * KW
    R = CIG * KK
    P = OH * OW
    ss = tl.zeros([BLOCK_C, BLOCK_P], tl.float64)  # N3: squares of 1e20 overflow fp32
    for g in range(G):
        for c0 in range(0, COG, BLOCK_C):
            co = c0 + tl.arange(0, BLOCK_C)
            cmask = co < COG
            for p0 in range(0, P, BLOCK_P):
                pm = p0 + tl.arange(0, BLOCK_P)
                pmask = pm < P
                oh = pm // OW
                ow = pm % OW
                acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
                for r0 in range(0, R, BLOCK_R):
                    r = r0 + tl.arange(0, BLOCK_R)
                    rmask = r < R
                    ci = r // KK
                    kh = (r % KK) // KW
                    kw = r % KW
                    wt = tl.load(w_ptr + (g * COG + co)[:, None] * R + r[None, :],
                                 mask=cmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
                    ih = oh[None, :] * SH - PH + kh[:, None] * DH
                    iw = ow[None, :] * SW - PW + kw[:, None] * DW
                    xv = _gather_input(src_ptr, (g * CIG + ci)[:, None], ih, iw, H, W, CIRC,
                                       rmask[:, None] & pmask[None, :])
                    acc += tl.dot(wt, xv, input_precision="ieee")
                tl.store(dst_ptr + (g * COG + co)[:, None] * P + pm[None, :], acc,
                         mask=cmask[:, None] & pmask[None, :])
                a64 = acc.to(tl.float64)
                ss += a64 * a64
    return tl.sum(ss)


@triton.jit
def _conv_ct_phase(w_ptr, src_ptr, dst_ptr, CIN, H, W, COUT, OH, OW, KH, KW, SH, SW, PH, PW,
                   DH, DW, G, CIRC,
                   BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    """dst (CIN*H*W) = C^T src (COUT*OH*OW); returns ||dst||^2."""
    CIG = CIN // G
    COG = COUT // G
    KK = KH * KW
    R = CIG * KK          # weight row length
    R2 = COG * KK         # reduction length of the adjoint
    P2 = H * W
    OP = OH * OW
    ss = tl.zeros([BLOCK_C, BLOCK_P], tl.float64)  # N3: squares of 1e20 overflow fp32
    for g in range(G):
        for c0 in range(0, CIG, BLOCK_C):
            ci = c0 + tl.arange(0, BLOCK_C)
            cmask = ci < CIG
            for p0 in range(0, P2, BLOCK_P):
                pm = p0 + tl.arange(0, BLOCK_P)
                pmask = pm < P2
                ih = pm // W
                iw = pm % W
                acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
                for r0 in range(0, R2, BLOCK_R):
                    r = r0 + tl.arange(0, BLOCK_R)
                    rmask = r < R2
                    co = r // KK
                    kk = r % KK
                    kh = kk // KW
                    kw = kk % KW
                    wt = tl.load(w_ptr + (g * COG + co)[None, :] * R + ci[:, None] * KK
                                 + kk[None, :],
                                 mask=cmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
                    base = rmask[:, None] & pmask[None, :]
                    # circular: padded row q = ih + PH + t*H, t in {-1, 0, 1} (PH <= H)
                    for th in range(-CIRC, CIRC + 1):
                        nh = ih[None, :] + PH - kh[:, None] * DH + th * H
                        okh = nh >= 0
                        nh = tl.where(okh, nh, 0)
                        okh = okh & (nh % SH == 0) & (nh // SH < OH)
                        for tw in range(-CIRC, CIRC + 1):
                            nw = iw[None, :] + PW - kw[:, None] * DW + tw * W
                            okw = nw >= 0
                            nw = tl.where(okw, nw, 0)
                            okw = okw & (nw % SW == 0) & (nw // SW < OW)
                            yv = tl.load(src_ptr + (g * COG + co)[:, None] * OP
                                         + (nh // SH) * OW + nw // SW,
                                         mask=base & okh & okw, other=0.0)
                            acc += tl.dot(wt, yv, input_precision="ieee")
                tl.store(dst_ptr + (g * CIG + ci)[:, None] * P2 + pm[None, :], acc,
                         mask=cmask[:, None] & pmask[None, :])
                a64 = acc.to(tl.float64)
                ss += a64 * a64
    return tl.sum(ss)


@triton.jit
def _dense_pass(w_ptr, x_ptr, y_ptr, xn_ptr, M, N, ACCUM,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y = W x (W row-major (M, N)); if ACCUM, also xn += W^T y, row block by row block, so
    W is streamed once per iteration. Returns ||y||^2."""
    ss = tl.zeros([BLOCK_M], tl.float64)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < M
        yb = tl.zeros([BLOCK_M], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < N
            wt = tl.load(w_ptr + rows[:, None] * N + cols[None, :],
                         mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            xv = tl.load(x_ptr + cols, mask=cmask, other=0.0)
            yb += tl.sum(wt * xv[None, :], axis=1)
        tl.store(y_ptr + rows, yb, mask=rmask)
        ss += yb.to(tl.float64) * yb.to(tl.float64)
        if ACCUM != 0:
            for n0 in range(0, N, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                cmask = cols < N
                wt = tl.load(w_ptr + rows[:, None] * N + cols[None, :],
                             mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
                xo = tl.load(xn_ptr + cols, mask=cmask, other=0.0)
                tl.store(xn_ptr + cols, xo + tl.sum(wt * yb[:, None], axis=0), mask=cmask)
            tl.debug_barrier()  # the next row block adds into the same xn entries
    return tl.sum(ss)


@triton.jit
def _sumsq(src_ptr, N, BLOCK_V: tl.constexpr):
    """sum of squares, accumulated in float64 (N3 of lipkern.reference: a float32 entry
    above ~1.8e19 squares to inf, one below ~1e-19 to a subnormal)."""
    ss = tl.zeros([BLOCK_V], tl.float64)
    for n0 in range(0, N, BLOCK_V):
        offs = n0 + tl.arange(0, BLOCK_V)
        v = tl.load(src_ptr + offs, mask=offs < N, other=0.0).to(tl.float64)
        ss += v * v
    return tl.sum(ss)


@triton.jit
def _norm(src_ptr, N, BLOCK_V: tl.constexpr):
    """||src|| in float32 (the sum in float64)."""
    return tl.sqrt(_sumsq(src_ptr, N, BLOCK_V)).to(tl.float32)


@triton.jit
def _maxabs(src_ptr, N, BLOCK_V: tl.constexpr):
    m = tl.zeros([BLOCK_V], tl.float32)
    for n0 in range(0, N, BLOCK_V):
        offs = n0 + tl.arange(0, BLOCK_V)
        m = tl.maximum(m, tl.abs(tl.load(src_ptr + offs, mask=offs < N, other=0.0)
                                 .to(tl.float32)))
    return tl.max(m, 0)


@triton.jit
def _floored(norm, w_ptr, n_w, eps, BLOCK_V: tl.constexpr):
    """max(norm, f), f = max(eps * min(1, max|W|), tiny) (N1 of lipkern.reference). f <= eps,
    so W is read only for a norm below eps."""
    d = norm
    if norm < eps:
        f = eps * tl.minimum(_maxabs(w_ptr, n_w, BLOCK_V), 1.0)
        d = tl.maximum(norm, tl.maximum(f, 1.1754943508222875e-38))
    return d


@triton.jit
def _fallback_into(dst_ptr, N, BLOCK_V: tl.constexpr):
    """lipkern.layout.fallback_vector: (i * 2654435761 + 1013904223) mod 2^32, / 2^32 - 0.5
    (exact int64 arithmetic, the same numbers as every other backend)."""
    for n0 in range(0, N, BLOCK_V):
        offs = n0 + tl.arange(0, BLOCK_V)
        h = (offs.to(tl.int64) * 2654435761 + 1013904223) % 4294967296
        tl.store(dst_ptr + offs, (h.to(tl.float64) / 4294967296.0 - 0.5).to(tl.float32),
                 mask=offs < N)


@triton.jit
def _start_into(src_ptr, dst_ptr, N, eps, BLOCK_V: tl.constexpr):
    """dst = src / max(||src||, eps), or the normalized fallback vector when src is all zero
    or not finite (N4); src may be the fp32 state or start vector."""
    n0 = _norm(src_ptr, N, BLOCK_V)
    if (n0 > 0) & (n0 < float("inf")):
        _scale_into(src_ptr, dst_ptr, N, 1.0 / tl.maximum(n0, eps), 0, BLOCK_V)
    else:
        _fallback_into(dst_ptr, N, BLOCK_V)
        tl.debug_barrier()
        n1 = _norm(dst_ptr, N, BLOCK_V)
        tl.debug_barrier()
        _scale_into(dst_ptr, dst_ptr, N, 1.0 / tl.maximum(n1, eps), 0, BLOCK_V)


@triton.jit
def _scale_into(src_ptr, dst_ptr, N, scale, ZERO_SRC, BLOCK_V: tl.constexpr):
    """dst = src * scale; then src = 0 if ZERO_SRC (the dense accumulator's reset)."""
    for n0 in range(0, N, BLOCK_V):
        offs = n0 + tl.arange(0, BLOCK_V)
        m = offs < N
        v = tl.load(src_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(dst_ptr + offs, v * scale, mask=m)
        if ZERO_SRC != 0:
            tl.store(src_ptr + offs, tl.zeros([BLOCK_V], tl.float32), mask=m)


@triton.jit
def _apply_a(kind, w_ptr, x_ptr, y_ptr, xn_ptr, ACCUM, CIN, H, W, COUT, OH, OW, KH, KW,
             SH, SW, PH, PW, DH, DW, G, CIRC, HAS_CONV: tl.constexpr,
             BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y = A x for the layer's operator; returns ||y||^2 (dense also does xn += W^T y).
    HAS_CONV=False (every layer of the call dense) compiles no conv code at all."""
    if HAS_CONV:
        if kind == 0:
            s2 = _dense_pass(w_ptr, x_ptr, y_ptr, xn_ptr, COUT, CIN, ACCUM, BLOCK_M, BLOCK_N)
        elif kind == 1:
            s2 = _conv_c_phase(w_ptr, x_ptr, y_ptr, CIN, H, W, COUT, OH, OW, KH, KW, SH, SW,
                               PH, PW, DH, DW, G, CIRC, BLOCK_C, BLOCK_P, BLOCK_R)
        else:
            s2 = _conv_ct_phase(w_ptr, x_ptr, y_ptr, CIN, H, W, COUT, OH, OW, KH, KW, SH,
                                SW, PH, PW, DH, DW, G, CIRC, BLOCK_C, BLOCK_P, BLOCK_R)
    else:
        s2 = _dense_pass(w_ptr, x_ptr, y_ptr, xn_ptr, COUT, CIN, ACCUM, BLOCK_M, BLOCK_N)
    return s2


@triton.jit
def _adjoint_into(kind, w_ptr, src, dst, CIN, H, W, COUT, OH, OW, KH, KW, SH, SW, PH, PW, DH,
                  DW, G, CIRC, HAS_CONV: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """dst = A^T src; returns ||dst||^2. With conv layers in the call a dense layer goes as
    the 1x1 conv it is; in a dense-only call (HAS_CONV=False) through _dense_adjoint."""
    if HAS_CONV:
        if kind == 2:
            s2 = _conv_c_phase(w_ptr, src, dst, CIN, H, W, COUT, OH, OW, KH, KW, SH, SW, PH,
                               PW, DH, DW, G, CIRC, BLOCK_C, BLOCK_P, BLOCK_R)
        else:
            s2 = _conv_ct_phase(w_ptr, src, dst, CIN, H, W, COUT, OH, OW, KH, KW, SH, SW, PH,
                                PW, DH, DW, G, CIRC, BLOCK_C, BLOCK_P, BLOCK_R)
    else:
        s2 = _dense_adjoint(w_ptr, src, dst, COUT, CIN, BLOCK_M, BLOCK_N)
    return s2


@triton.jit
def _dense_adjoint(w_ptr, src_ptr, dst_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dst = W^T src (W row-major (M, N)), column block by column block; returns ||dst||^2."""
    ss = tl.zeros([BLOCK_N], tl.float64)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        acc = tl.zeros([BLOCK_N], tl.float32)
        for m0 in range(0, M, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            rmask = rows < M
            wt = tl.load(w_ptr + rows[:, None] * N + cols[None, :],
                         mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
            sv = tl.load(src_ptr + rows, mask=rmask, other=0.0)
            acc += tl.sum(wt * sv[:, None], axis=0)
        tl.store(dst_ptr + cols, acc, mask=cmask)
        ss += acc.to(tl.float64) * acc.to(tl.float64)
    return tl.sum(ss)


@triton.jit
def _adjoint_step(kind, w_ptr, x, u, xn, ss, n_w, NX, NY, eps, CIN, H, W, COUT, OH, OW, KH, KW,
                  SH, SW, PH, PW, DH, DW, G, CIRC, HAS_CONV: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """The adjoint half-step after u_raw = A x with ss = ||u_raw||^2 (fp64): u = u_raw /
    max(||u_raw||, f) in place, x = A^T u / max(||A^T u||, f), xn = 0; returns ||A^T u||.
    A dense layer's xn already holds A^T u_raw from its one pass over W; that is used only
    while ss lies in [2^-60, 2^60] (an accumulator of size sigma^2 that cannot overflow or
    underflow fp32: N2 of lipkern.reference), else A^T u runs here on the unit u."""
    cu = 1.0 / _floored(tl.sqrt(ss).to(tl.float32), w_ptr, n_w, eps, BLOCK_V)
    _scale_into(u, u, NY, cu, 0, BLOCK_V)
    tl.debug_barrier()
    one_pass = (kind == 0) & (ss >= 8.673617379884035e-19) & (ss <= 1.152921504606847e18)
    if not one_pass:
        _adjoint_into(kind, w_ptr, u, xn, CIN, H, W, COUT, OH, OW, KH, KW, SH, SW, PH, PW, DH,
                      DW, G, CIRC, HAS_CONV, BLOCK_C, BLOCK_P, BLOCK_R, BLOCK_M, BLOCK_N)
        tl.debug_barrier()
    c = tl.where(one_pass, cu, 1.0)  # A^T u = c * xn
    t = _norm(xn, NX, BLOCK_V) * c
    tl.debug_barrier()
    # x = A^T u / max(||A^T u||, f), and xn = 0 for the next dense accumulation
    _scale_into(xn, x, NX, c / _floored(t, w_ptr, n_w, eps, BLOCK_V), 1, BLOCK_V)
    tl.debug_barrier()
    return t


@triton.jit
def _iterate_power(kind, w_ptr, x, u, xn, NX, NY, n_w, n_iters, eps, tol, CIN, H, W, COUT, OH,
                   OW, KH, KW, SH, SW, PH, PW, DH, DW, G, CIRC, HAS_CONV: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """The default update on one layer (x unit, xn zero on entry): leaves u = A x / sigma,
    returns sigma = ||A x||."""
    k = 0
    s_prev = -1.0
    while k < n_iters:
        ss = _apply_a(kind, w_ptr, x, u, xn, 1, CIN, H, W, COUT, OH, OW, KH, KW,
                      SH, SW, PH, PW, DH, DW, G, CIRC, HAS_CONV,
                      BLOCK_C, BLOCK_P, BLOCK_R, BLOCK_M, BLOCK_N)
        s = tl.sqrt(ss).to(tl.float32)
        tl.debug_barrier()
        done = (tol >= 0) & (k > 0) & (tl.abs(s - s_prev) <= tol * s)
        if done:
            k = n_iters
        else:
            _adjoint_step(kind, w_ptr, x, u, xn, ss, n_w, NX, NY, eps, CIN, H, W, COUT, OH, OW,
                          KH, KW, SH, SW, PH, PW, DH, DW, G, CIRC, HAS_CONV, BLOCK_C, BLOCK_P,
                          BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_V)
            k += 1
        s_prev = s

    sigma = tl.sqrt(_apply_a(kind, w_ptr, x, u, xn, 0, CIN, H, W, COUT, OH, OW, KH, KW,
                             SH, SW, PH, PW, DH, DW, G, CIRC, HAS_CONV,
                             BLOCK_C, BLOCK_P, BLOCK_R, BLOCK_M, BLOCK_N)).to(tl.float32)
    tl.debug_barrier()
    _scale_into(u, u, NY, 1.0 / _floored(sigma, w_ptr, n_w, eps, BLOCK_V), 0, BLOCK_V)
    return sigma


@triton.jit
def _dot(a_ptr, b_ptr, N, BLOCK_V: tl.constexpr):
    """<a, b> over N elements in fp32 (either side may be a half-precision weight)."""
    acc = tl.zeros([BLOCK_V], tl.float32)
    for n0 in range(0, N, BLOCK_V):
        offs = n0 + tl.arange(0, BLOCK_V)
        m = offs < N
        acc += (tl.load(a_ptr + offs, mask=m, other=0.0).to(tl.float32)
                * tl.load(b_ptr + offs, mask=m, other=0.0).to(tl.float32))
    return tl.sum(acc)


@triton.jit
def _iterate_sn(kind, w_ptr, x, u, xn, u0, NX, NY, n_w, n_iters, eps, CIN, H, W, COUT, OH, OW,
                KH, KW, SH, SW, PH, PW, DH, DW, G, CIRC, HAS_CONV: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """torch's spectral_norm update on one layer (x unit, xn zero on entry): per iteration
    u = normalize(A x), x = normalize(A^T u); returns sigma = u^T A x, which after an iteration
    is t * (t / max(t, f)) with t = ||A^T u|| (x is A^T u normalized): no extra matvec, and
    no t^2 that could overflow. With no iteration (eval mode): u = normalize(u0),
    sigma = <x, A^T u>."""
    t = eps * 0.0
    if n_iters == 0:
        _start_into(u0, u, NY, eps, BLOCK_V)
        tl.debug_barrier()
        _adjoint_into(kind, w_ptr, u, xn, CIN, H, W, COUT, OH, OW, KH, KW, SH, SW, PH, PW,
                      DH, DW, G, CIRC, HAS_CONV, BLOCK_C, BLOCK_P, BLOCK_R, BLOCK_M, BLOCK_N)
        tl.debug_barrier()
        sigma = _dot(x, xn, NX, BLOCK_V)
    else:
        for _k in range(n_iters):
            ss = _apply_a(kind, w_ptr, x, u, xn, 1, CIN, H, W, COUT, OH, OW, KH, KW, SH, SW,
                          PH, PW, DH, DW, G, CIRC, HAS_CONV, BLOCK_C, BLOCK_P, BLOCK_R,
                          BLOCK_M, BLOCK_N)
            tl.debug_barrier()
            t = _adjoint_step(kind, w_ptr, x, u, xn, ss, n_w, NX, NY, eps, CIN, H, W, COUT, OH,
                              OW, KH, KW, SH, SW, PH, PW, DH, DW, G, CIRC, HAS_CONV, BLOCK_C,
                              BLOCK_P, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_V)
        sigma = t * (t / _floored(t, w_ptr, n_w, eps, BLOCK_V))
    return sigma


# L and n_iters change between calls (per-layer paths have L == 1, eval n_iters == 0, warm
# steps 1): Triton would compile a variant for each "== 1" and "% 16 == 0" value it sees;
# ~10-20 s each for this kernel, and nothing to gain from the specialization.
@triton.jit(do_not_specialize=["L", "n_iters"])
def power_iter_fwd_kernel(
        meta_ptr, wptr_ptr, x0_ptr, u0_ptr, x_ptr, u_ptr, xn_ptr, sig_ptr, lip_ptr,
        loglip_ptr, counter_ptr, what_ptr, L, n_iters, eps, tol,
        W_DTYPE: tl.constexpr, SN_VARIANT: tl.constexpr, WRITE_WHAT: tl.constexpr,
        HAS_CONV: tl.constexpr, META_WIDTH: tl.constexpr, BLOCK_L: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Program l runs layer l's iteration; the last program to finish writes the product.

    meta_ptr: (L, META_WIDTH) int32 layer table; wptr_ptr: (L,) int64 weight addresses;
    x0/x/xn: packed (total_x,) fp32 (start, result, scratch); u: (total_y,) fp32;
    u0: (total_y,) fp32 start left vectors, read only when SN_VARIANT (torch's update);
    sig: (L,) fp32; lip, loglip: () fp32; counter: (1,) int32, 0 on entry and on exit;
    what: packed (total_w,) of W_DTYPE, written with W_l / sigma_l when WRITE_WHAT (the
    normalized weights of lipkern.fused_normalize). tol < 0 disables the early exit.
    HAS_CONV: some layer is a conv operator; False compiles a dense-only kernel (measured on
    an H100, 2026-11-22: the kernel with every path held 255 registers and spilled 28-72,
    one 512x512 dense layer took 427 us)."""
    l = tl.program_id(0)
    row = meta_ptr + l * META_WIDTH
    kind, x_off, y_off, w_off, CIN, COUT = _load_row_head(row)
    H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, G, CIRC = _load_conv_geom(row)
    w_ptr = tl.load(wptr_ptr + l).to(tl.pointer_type(W_DTYPE), bitcast=True)
    NI = CIN * H * W
    NO = COUT * OH * OW
    NX = tl.where(kind == 2, NO, NI)
    NY = tl.where(kind == 2, NI, NO)
    x = x_ptr + x_off
    xn = xn_ptr + x_off
    u = u_ptr + y_off

    n_w = COUT * (CIN // G) * KH * KW
    # x = x0 / max(||x0||, eps) (the fallback vector for a zero/non-finite x0); xn = 0 (the
    # dense accumulator)
    _start_into(x0_ptr + x_off, x, NX, eps, BLOCK_V)
    tl.debug_barrier()
    _scale_into(x, xn, NX, 0.0, 0, BLOCK_V)
    tl.debug_barrier()

    if SN_VARIANT:
        sigma = _iterate_sn(kind, w_ptr, x, u, xn, u0_ptr + y_off, NX, NY, n_w, n_iters, eps,
                            CIN, H, W, COUT, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, G, CIRC,
                            HAS_CONV, BLOCK_C, BLOCK_P, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_V)
    else:
        sigma = _iterate_power(kind, w_ptr, x, u, xn, NX, NY, n_w, n_iters, eps, tol, CIN, H, W,
                               COUT, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, G, CIRC, HAS_CONV,
                               BLOCK_C, BLOCK_P, BLOCK_R, BLOCK_M, BLOCK_N, BLOCK_V)
    tl.store(sig_ptr + l, sigma)
    if WRITE_WHAT:
        # W / sigma rounded once from the exact quotient (div_rn), as torch's `weight / sigma`
        # is: the normalized weight matches torch's to the last bit for the same sigma
        for e0 in range(0, n_w, BLOCK_V):
            offs = e0 + tl.arange(0, BLOCK_V)
            m = offs < n_w
            wv = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(what_ptr + w_off + offs,
                     tl.math.div_rn(wv, tl.zeros_like(wv) + sigma).to(W_DTYPE), mask=m)
    tl.debug_barrier()  # every thread's stores precede the release below

    # the network bound, by whichever program finishes last
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if ticket == L - 1:
        idx = tl.arange(0, BLOCK_L)
        sl = tl.load(sig_ptr + idx, mask=idx < L, other=1.0, cache_modifier=".cg")
        tl.store(lip_ptr, tl.reduce(sl, 0, _mul))
        # N5: a zero sigma logs as -inf, a NaN one as NaN
        logs = tl.where(sl > 0, tl.log(tl.maximum(sl, 1e-38)),
                        tl.where(sl == 0, float("-inf"), float("nan")))
        tl.store(loglip_ptr, tl.sum(tl.where(idx < L, logs, 0.0)))
        tl.atomic_xchg(counter_ptr, 0)  # ready for the next launch on this stream


@triton.jit(do_not_specialize=["L"])
def power_iter_bwd_kernel(
        meta_ptr, tiles_ptr, x_ptr, u_ptr, sig_ptr, gs_ptr, gl_ptr, glog_ptr, grad_ptr, L,
        HAS_GS: tl.constexpr, HAS_GL: tl.constexpr, HAS_GLOG: tl.constexpr,
        META_WIDTH: tl.constexpr, BLOCK_L: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program t writes weight-gradient tile tiles[t] = (layer, tile) into the packed grad.

    g_l = gs[l] + gl * prod_{j != l} sigma_j + glog / sigma_l (0 where sigma_l == 0), then
    dense: grad = g_l u x^T; conv: grad[co, r] = g_l sum_p u[co, p] x_gathered[r, p]
    (transposed convs: x and u swap roles, since sigma = x^T C u)."""
    t = tl.program_id(0)
    l = tl.load(tiles_ptr + 2 * t)
    tile = tl.load(tiles_ptr + 2 * t + 1)
    row = meta_ptr + l * META_WIDTH
    kind, x_off, y_off, w_off, CIN, COUT = _load_row_head(row)
    sigma = tl.load(sig_ptr + l)

    coef = sigma * 0.0
    if HAS_GS:
        coef += tl.load(gs_ptr + l)
    if HAS_GL:
        gl = tl.load(gl_ptr)
        idx = tl.arange(0, BLOCK_L)
        sl = tl.load(sig_ptr + idx, mask=(idx < L) & (idx != l), other=1.0)
        # gl == 0 with an overflowed product must give 0, not 0 * inf = NaN
        coef += tl.where(gl != 0, gl * tl.reduce(sl, 0, _mul), 0.0)
    if HAS_GLOG:
        coef += tl.where(sigma > 0, tl.load(glog_ptr) / tl.maximum(sigma, 1e-38), 0.0)
    if kind == 0:
        _dense_grad_tile(u_ptr + y_off, x_ptr + x_off, grad_ptr + w_off, coef, tile, COUT, CIN,
                         BLOCK_M, BLOCK_N)
    elif kind == 1:  # sigma = <u, C x>: C's input is x
        _conv_grad_tile(row, x_ptr + x_off, u_ptr + y_off, grad_ptr + w_off, coef, tile, CIN,
                        COUT, BLOCK_C, BLOCK_P, BLOCK_R)
    else:            # sigma = <x, C u>: C's input is u
        _conv_grad_tile(row, u_ptr + y_off, x_ptr + x_off, grad_ptr + w_off, coef, tile, CIN,
                        COUT, BLOCK_C, BLOCK_P, BLOCK_R)


@triton.jit
def _dense_grad_tile(u_ptr, x_ptr, gptr, coef, tile, M, N,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """grad[rows, cols] = coef * u[rows] x[cols]^T for tile (row block, col block)."""
    n_tn = tl.cdiv(N, BLOCK_N)
    rows = (tile // n_tn) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tile % n_tn) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    uv = tl.load(u_ptr + rows, mask=rmask, other=0.0)
    xv = tl.load(x_ptr + cols, mask=cmask, other=0.0)
    tl.store(gptr + rows[:, None] * N + cols[None, :], (coef * uv)[:, None] * xv[None, :],
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _conv_grad_tile(row, in_ptr, out_ptr, gptr, coef, tile, CIN, COUT,
                    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    """grad[co, r] = coef * sum_p out[co, p] * in_gathered[r, p] for tile (group, co block,
    r block); in is C's input-space vector, out its output-space vector."""
    acc, offs, mask = _conv_grad_acc(row, in_ptr, out_ptr, tile, CIN, COUT, BLOCK_C, BLOCK_P,
                                     BLOCK_R)
    tl.store(gptr + offs, coef * acc, mask=mask)


@triton.jit
def _conv_grad_acc(row, in_ptr, out_ptr, tile, CIN, COUT,
                   BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr):
    """One tile of the conv weight gradient d<out, C in>/dW: returns (acc (BLOCK_C, BLOCK_R)
    fp32, its flat offsets into the (COUT, R) weight, the mask of real entries)."""
    H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, G, CIRC = _load_conv_geom(row)
    CIG = CIN // G
    COG = COUT // G
    KK = KH * KW
    R = CIG * KK
    P = OH * OW
    n_cb = tl.cdiv(COG, BLOCK_C)
    n_rb = tl.cdiv(R, BLOCK_R)
    g = tile // (n_cb * n_rb)
    co = ((tile // n_rb) % n_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    r = (tile % n_rb) * BLOCK_R + tl.arange(0, BLOCK_R)
    cmask = co < COG
    rmask = r < R
    ci = r // KK
    kh = (r % KK) // KW
    kw = r % KW
    acc = tl.zeros([BLOCK_C, BLOCK_R], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        pm = p0 + tl.arange(0, BLOCK_P)
        pmask = pm < P
        oh = pm // OW
        ow = pm % OW
        ov = tl.load(out_ptr + (g * COG + co)[:, None] * P + pm[None, :],
                     mask=cmask[:, None] & pmask[None, :], other=0.0)
        ih = oh[:, None] * SH - PH + kh[None, :] * DH
        iw = ow[:, None] * SW - PW + kw[None, :] * DW
        xv = _gather_input(in_ptr, (g * CIG + ci)[None, :], ih, iw, H, W, CIRC,
                           pmask[:, None] & rmask[None, :])
        acc += tl.dot(ov, xv, input_precision="ieee")
    return acc, (g * COG + co)[:, None] * R + r[None, :], cmask[:, None] & rmask[None, :]


# ---------------------------------------------------------------- launchers
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
_counters: dict = {}
# Tests set this to fill every output with NaN before a launch, so an element the kernel
# forgets to write cannot pass by holding a plausible stale value.
POISON_OUTPUTS = os.environ.get("LIPKERN_POISON_OUTPUTS", "0") == "1"


def _empty(*shape, dtype, device):
    t = torch.empty(*shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if POISON_OUTPUTS else t


@functools.lru_cache(maxsize=256)
def _tables(meta: tuple, width: int, device: torch.device):
    """Device copies of the layer table and the backward tile table (cached per layer set)."""
    from lipkern.layout import layout_from_meta
    layout = layout_from_meta(meta)
    tiles = []
    for i, g in enumerate(layout.geoms):
        if g.kind == 0:
            n = triton.cdiv(g.cout, BLOCK_M) * triton.cdiv(g.cin, BLOCK_N)
        else:
            n = (g.groups * triton.cdiv(g.cout // g.groups, BLOCK_C)
                 * triton.cdiv((g.cin // g.groups) * g.kh * g.kw, BLOCK_R))
        tiles += [v for j in range(n) for v in (i, j)]
    meta_t = torch.tensor(meta, dtype=torch.int32).to(device)
    tiles_t = torch.tensor(tiles, dtype=torch.int32).to(device)
    has_conv = any(g.kind != 0 for g in layout.geoms)
    return meta_t, tiles_t, len(tiles) // 2, has_conv


@functools.lru_cache(maxsize=64)
def _pointer_table(ptrs: tuple, device: torch.device) -> torch.Tensor:
    """(L,) int64 weight addresses on the device. Cached by the addresses themselves (always
    valid: equal addresses give an equal table), so a training loop whose parameters stay in
    place pays the host->device copy once."""
    return torch.tensor(ptrs, dtype=torch.int64).to(device)


def _counter(device: torch.device) -> torch.Tensor:
    # One per device; each launch leaves it at 0. Launches on one stream are ordered, so they
    # never share it concurrently; lipkern does not launch this kernel on two streams at once.
    c = _counters.get(device)
    if c is None:
        c = _counters[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return c


def _check_int32(layout) -> None:
    if max(layout.total_x, layout.total_y, layout.total_w) >= 2 ** 31:
        raise ValueError("weights: the triton backend indexes with int32; these layers need "
                         ">= 2^31 elements (use backend='torch')")


def forward(weights, x0, u0, layout, n_iters: int, eps: float, tol: float,
            write_normalized: bool = False):
    """Launch the fused forward. weights: same dtype/device, contiguous; x0: (total_x,) fp32;
    u0: None, or (total_y,) fp32 for torch's spectral_norm update.
    Returns (sigmas (L,), lipschitz (), log_lipschitz (), x (total_x,), u (total_y,)), fp32,
    and with ``write_normalized`` also ``what`` (total_w,) in the weights' dtype: every
    W_l / sigma_l, packed at the layer table's weight offsets."""
    from lipkern.layout import META_WIDTH
    _check_int32(layout)
    device = x0.device
    L = layout.num_layers
    meta_t, _, _, has_conv = _tables(layout.meta, META_WIDTH, device)
    wptrs = _pointer_table(tuple(w.data_ptr() for w in weights), device)
    f32 = dict(dtype=torch.float32, device=device)
    x = _empty(layout.total_x, **f32)
    xn = _empty(layout.total_x, **f32)
    u = _empty(layout.total_y, **f32)
    sig = _empty(L, **f32)
    lip = _empty((), **f32)
    loglip = _empty((), **f32)
    what = _empty(layout.total_w, dtype=weights[0].dtype, device=device) \
        if write_normalized else sig
    power_iter_fwd_kernel[(L,)](
        meta_t, wptrs, x0, x0 if u0 is None else u0.contiguous(), x, u, xn, sig, lip, loglip,
        _counter(device), what, L, n_iters, eps, tol, W_DTYPE=_TL_DTYPES[weights[0].dtype],
        SN_VARIANT=u0 is not None, WRITE_WHAT=write_normalized, HAS_CONV=has_conv,
        META_WIDTH=META_WIDTH,
        BLOCK_L=max(16, triton.next_power_of_2(L)), BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P,
        BLOCK_R=BLOCK_R, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, num_warps=4)
    if write_normalized:
        return sig, lip, loglip, x, u, what
    return sig, lip, loglip, x, u


def backward(x, u, sigmas, grad_sigmas, grad_lip, grad_log, layout, wdtype):
    """Launch the fused backward; returns the packed weight gradient (total_w,) in wdtype."""
    from lipkern.layout import META_WIDTH
    device = x.device
    meta_t, tiles_t, n_tiles, _ = _tables(layout.meta, META_WIDTH, device)
    grad = _empty(layout.total_w, dtype=wdtype, device=device)
    # autograd may hand over expanded (stride-0) gradients, e.g. from sigmas.sum()
    grad_sigmas, grad_lip, grad_log = (None if t is None else t.contiguous().float()
                                       for t in (grad_sigmas, grad_lip, grad_log))
    dummy = sigmas
    power_iter_bwd_kernel[(n_tiles,)](
        meta_t, tiles_t, x, u, sigmas,
        grad_sigmas if grad_sigmas is not None else dummy,
        grad_lip if grad_lip is not None else dummy,
        grad_log if grad_log is not None else dummy, grad, layout.num_layers,
        HAS_GS=grad_sigmas is not None, HAS_GL=grad_lip is not None,
        HAS_GLOG=grad_log is not None, META_WIDTH=META_WIDTH,
        BLOCK_L=max(16, triton.next_power_of_2(layout.num_layers)), BLOCK_C=BLOCK_C,
        BLOCK_P=BLOCK_P, BLOCK_R=BLOCK_R, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4)
    return grad
