"""Triton v2 forward for conv operators: several programs per layer, constexpr geometry per
shape class (:mod:`.v2_plan`), implicit-GEMM tiles, one kernel code in two modes.

Steps of one call (power variant, ``n_steps = 2 n_iters + 3``)::

    0            pack: W -> Wc[tap][co][ci] and Wt[tap][ci][co] (K-contiguous, zero-padded
                 channels) and partial max|W|; x0 (CHW) -> xs (HWC) and the fallback vector
                 -> xf, with partial sums of squares of both
    2k+1         A phase:  ys = A x / ws, x = x0 / max(||x0||, eps) at step 1 (xf if x0 is
                 all zero or not finite), x = xs / max(||xs|| ws, f) after
    2k+2         AT phase: xs = A^T (y / max(||y||, f)) / ws; the tol test of iteration k > 0
    2 n_iters+1  the final A phase
    n_steps-1    finalize: sigma = ||A x||, u = A x / max(sigma, f), x, in the public CHW
                 layout; the last program writes the product

(the numeric contract of lipkern.reference: ``f = max(eps min(1, max|W|), tiny)``, one
normalization per half-step, float64 sums of squares, the fallback start vector, NaN logs as
NaN). The normalizations are folded into the epilogue scale of the next phase (C is linear):
no separate norm or scale passes. Stored vectors are images of unit vectors divided by
``ws = max|W|``, so every phase multiplies a vector of size ~1 by the weights before that
scale: nothing of size sigma^2 is formed, for sigma in 1e-30..1e30.

``variant="spectral_norm"`` (``n_steps = 2 n_iters + 2``): no final A phase; finalize takes
sigma = ||A^T u||^2 / max(||A^T u||, f) (= u^T A x, see v1's ``_iterate_sn``); with
``n_iters = 0`` step 1 is ``<x0, A^T u0>`` without a store (torch's eval mode).

**Modes.** GPU (``USE_BARRIER``): one launch over all steps; the G programs of a layer meet in
a per-layer group barrier after every step (never grid-wide); the launch is cooperative and
the grid never exceeds the SM count (``v2_plan.size_groups``), so all members are
co-resident. Interpreter, or a GPU without guaranteed co-residency: the host launches once
per step and the launch boundary is the barrier. Same code: a step reads only what other
members wrote in earlier steps.

**Norms without float atomics.** Member g writes its partial sum of squares of step s to
``part[layer, s % 4, g]``; readers sum the G partials with one ``tl.sum`` over a masked
vector: the same values in the same reduction tree in every member, so every member takes
the same ``tol`` decision (one that skipped a barrier would deadlock its group). The ring of
4 keeps steps s-1, s-2 and s-3 readable at step s (the tol test compares steps s-1, s-3).

**Precision** (``PREC``): "ieee" (fp32 FMA dot), "tf32x3" (3 tf32 MMAs, fp32-level error),
"tf32" on operands rounded to nearest where they are produced (packed weights; vectors in the
epilogue that stores them); never raw fp32 into a tf32 dot (truncation biases sigma low,
-1.4% on a 20-layer product: gpu_v2/README, acc/tf32_sigma.py). Norms and sigma always come
from the fp32 accumulators. The interpreter ignores ``input_precision``.
"""
from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl

from . import v2_plan

# per-layer table (int64, LT_WIDTH per layer)
(LT_CLS, LT_G, LT_XOFF, LT_YOFF, LT_XS, LT_YS, LT_WP, LT_PART) = (
    tl.constexpr(i) for i in range(8))
LT_WIDTH = 8
# int32 control words (zeroed by the host once per call): [0] product ticket, [1] hang flag,
# then per layer: barrier counter, done flag
CTL_TICKET, CTL_HANG, CTL_BASE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
RING = tl.constexpr(4)
# fixed partial slots after the ring (written at step 0, read later): max|W|, ||x0||^2, the
# fallback x's ||.||^2, ||u0||^2, the fallback u's ||.||^2
(S_WMAX, S_X0, S_XF, S_U0, S_UF) = (tl.constexpr(i) for i in range(4, 9))
N_SLOTS = 9
TINY = tl.constexpr(1.1754943508222875e-38)  # smallest normal float32 (N1's floor of f)


@triton.jit
def _round_tf32(v):
    """fp32 -> nearest tf32 (ties away, as cvt.rna.tf32.f32) in an fp32 container, so the
    tensor core's dropping of the low 13 mantissa bits is exact. Integer ops only (runs under
    the interpreter)."""
    i = v.to(tl.int32, bitcast=True)
    i = (i + 0x1000) & -8192
    return i.to(tl.float32, bitcast=True)


@triton.jit
def _group_barrier(bar_ptr, target, hang_ptr, SPIN_LIMIT: tl.constexpr):
    """Wait until the layer's counter reaches ``target`` (= G * barriers so far: monotonic,
    no ABA). The release add publishes this CTA's stores; the acquire load's value feeds the
    loop condition, which keeps it (Triton deletes an acquire atomic whose result is unused:
    tests/test_triton_v2_static.py greps the PTX for both). SPIN_LIMIT > 0: give up after
    that many polls and raise the hang flag (a hang guard for the GPU tests; 0 in production)."""
    tl.debug_barrier()
    tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
    cur = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    n = 0
    while cur < target:
        cur = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        if SPIN_LIMIT > 0:
            n += 1
            if n > SPIN_LIMIT:
                tl.atomic_xchg(hang_ptr, 1, sem="relaxed", scope="gpu")
                cur = target
    tl.debug_barrier()


@triton.jit
def _sum_parts(ptr, G, GMAX: tl.constexpr):
    """Sum of the G float64 partials at ptr, in one fixed reduction (the same in every
    member)."""
    i = tl.arange(0, GMAX)
    return tl.sum(tl.load(ptr + i, mask=i < G, other=0.0), axis=0)


@triton.jit
def _norm_parts(ptr, G, GMAX: tl.constexpr):
    """sqrt of the summed partial squares, float64."""
    return tl.sqrt(_sum_parts(ptr, G, GMAX))


@triton.jit
def _start(part, S_V: tl.constexpr, S_F: tl.constexpr, G, GMAX: tl.constexpr):
    """(use the fallback, ||start||) of a start vector (N4: all-zero or non-finite x0/u0 ->
    the fallback vector); the same decision in every member."""
    n0 = _norm_parts(part + S_V * GMAX, G, GMAX)
    use_fb = (n0 == 0) | (n0 != n0) | (n0 == float("inf"))
    return use_fb, tl.where(use_fb, _norm_parts(part + S_F * GMAX, G, GMAX), n0)


@triton.jit
def _wrap(i, N: tl.constexpr):
    """i in [-N, 2N) -> i mod N (one wrap: circular padding <= the input size)."""
    return tl.where(i < 0, i + N, tl.where(i >= N, i - N, i))


@triton.jit
def _epilogue(acc, dst_ptrs, mask, scale, dot_ptrs, DOT, ROUND: tl.constexpr):
    """Scale the tile; store it (ROUND: tf32-rounded) and return its sum of squares, or
    (DOT != 0) return <tile, dst> without storing; both in float64."""
    acc = acc * scale
    a64 = acc.to(tl.float64)  # N3: a float32 entry above ~1.8e19 squares to inf
    if DOT != 0:
        other = tl.load(dot_ptrs, mask=mask, other=0.0).to(tl.float64)
        r = tl.sum(tl.sum(a64 * other, axis=1), axis=0)
    else:
        r = tl.sum(tl.sum(a64 * a64, axis=1), axis=0)
        if ROUND:
            acc = _round_tf32(acc)
        tl.store(dst_ptrs, acc, mask=mask)
    return r


@triton.jit
def _c_tile(src, dst, wc, pt, nt, scale, DOT, GEOM: tl.constexpr, PREC: tl.constexpr,
            ROUND: tl.constexpr):
    """dst[tile] = scale * (C src)[pixels pt, out channels nt] (HWC, padded channels).
    M = output pixels, N = output channels, K = (tap, input-channel chunk) flattened into one
    loop of constexpr trip count (one software pipeline; the tap's offsets come from
    divisions by constexprs, a few integer ops per 64x64x32 step)."""
    CIN: tl.constexpr = GEOM[1]
    H: tl.constexpr = GEOM[2]
    W: tl.constexpr = GEOM[3]
    OH: tl.constexpr = GEOM[5]
    OW: tl.constexpr = GEOM[6]
    KH: tl.constexpr = GEOM[7]
    KW: tl.constexpr = GEOM[8]
    SH: tl.constexpr = GEOM[9]
    SW: tl.constexpr = GEOM[10]
    PH: tl.constexpr = GEOM[11]
    PW: tl.constexpr = GEOM[12]
    DH: tl.constexpr = GEOM[13]
    DW: tl.constexpr = GEOM[14]
    CIRC: tl.constexpr = GEOM[15]
    CINP: tl.constexpr = GEOM[16]
    COUTP: tl.constexpr = GEOM[17]
    BP: tl.constexpr = GEOM[18]
    BN: tl.constexpr = GEOM[20]
    BK: tl.constexpr = GEOM[21]
    NKB: tl.constexpr = CINP // BK
    p = pt * BP + tl.arange(0, BP)
    pm = p < OH * OW
    oh = p // OW
    ow = p % OW
    n = nt * BN + tl.arange(0, BN)
    kk = tl.arange(0, BK)
    acc = tl.zeros([BP, BN], tl.float32)
    for t in range(KH * KW * NKB):
        tap = t // NKB
        c0 = (t % NKB) * BK
        ih = oh * SH + ((tap // KW) * DH - PH)
        iw = ow * SW + ((tap % KW) * DW - PW)
        if CIRC:
            ok = pm
            ih = _wrap(ih, H)
            iw = _wrap(iw, W)
        else:
            ok = pm & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(src + (ih * W + iw)[:, None] * CINP + (c0 + kk)[None, :],
                    mask=ok[:, None], other=0.0)
        b = tl.load(wc + (tap * COUTP + n)[None, :] * CINP + (c0 + kk)[:, None])
        acc = tl.dot(a, b, acc, input_precision=PREC)
    offs = p[:, None] * COUTP + n[None, :]
    mask = pm[:, None] & (n < COUTP)[None, :]
    return _epilogue(acc, dst + offs, mask, scale, dst + offs, DOT, ROUND)


@triton.jit
def _ct_tile(src, dst, wt, pt, nt, scale, DOT, RH: tl.constexpr, RW: tl.constexpr,
             GEOM: tl.constexpr, PREC: tl.constexpr, ROUND: tl.constexpr):
    """dst[tile] = scale * (C^T src) on the input pixels of parity class (RH, RW)
    (ih = RH + SH*i, iw = RW + SW*j). In one class the taps that reach a pixel form an
    arithmetic progression (kh = KH0 + KSH*a, a < NKH: from the plan, v2_plan.tap_progression)
    and oh = i + (RH + PH - kh*DH) / SH exactly: a sub-pixel conv, no zero insertion, no
    parity test in the inner loop. M = class pixels, N = input channels, K = (tap,
    output-channel chunk) in one flattened loop; Wt[tap][ci][co]."""
    H: tl.constexpr = GEOM[2]
    W: tl.constexpr = GEOM[3]
    OH: tl.constexpr = GEOM[5]
    OW: tl.constexpr = GEOM[6]
    KW: tl.constexpr = GEOM[8]
    SH: tl.constexpr = GEOM[9]
    SW: tl.constexpr = GEOM[10]
    PH: tl.constexpr = GEOM[11]
    PW: tl.constexpr = GEOM[12]
    DH: tl.constexpr = GEOM[13]
    DW: tl.constexpr = GEOM[14]
    CIRC: tl.constexpr = GEOM[15]
    CINP: tl.constexpr = GEOM[16]
    COUTP: tl.constexpr = GEOM[17]
    BP: tl.constexpr = GEOM[18]
    BN: tl.constexpr = GEOM[19]
    BK: tl.constexpr = GEOM[22]
    KH0: tl.constexpr = GEOM[23 + 3 * RH]
    KSH: tl.constexpr = GEOM[24 + 3 * RH]
    NKH: tl.constexpr = GEOM[25 + 3 * RH]
    KW0: tl.constexpr = GEOM[29 + 3 * RW]
    KSW: tl.constexpr = GEOM[30 + 3 * RW]
    NKW: tl.constexpr = GEOM[31 + 3 * RW]
    NKB: tl.constexpr = COUTP // BK
    NI: tl.constexpr = (H - RH + SH - 1) // SH
    NJ: tl.constexpr = (W - RW + SW - 1) // SW
    q = pt * BP + tl.arange(0, BP)
    qm = q < NI * NJ
    i = q // NJ
    j = q % NJ
    n = nt * BN + tl.arange(0, BN)
    kk = tl.arange(0, BK)
    acc = tl.zeros([BP, BN], tl.float32)
    for t in range(NKH * NKW * NKB):
        a_ = t // NKB
        c0 = (t % NKB) * BK
        kh = KH0 + (a_ // NKW) * KSH
        kw = KW0 + (a_ % NKW) * KSW
        # exact divisions (the progression makes the numerators multiples of SH, SW), so
        # truncation and floor agree for negative numerators
        oh = i + (RH + PH - kh * DH) // SH
        ow = j + (RW + PW - kw * DW) // SW
        if CIRC:  # stride 1, OH == H (the plan's condition)
            ok = qm
            oh = _wrap(oh, OH)
            ow = _wrap(ow, OW)
        else:
            ok = qm & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        a = tl.load(src + (oh * OW + ow)[:, None] * COUTP + (c0 + kk)[None, :],
                    mask=ok[:, None], other=0.0)
        b = tl.load(wt + ((kh * KW + kw) * CINP + n)[None, :] * COUTP + (c0 + kk)[:, None])
        acc = tl.dot(a, b, acc, input_precision=PREC)
    ih = RH + SH * i
    iw = RW + SW * j
    offs = (ih * W + iw)[:, None] * CINP + n[None, :]
    mask = qm[:, None] & (n < CINP)[None, :]
    return _epilogue(acc, dst + offs, mask, scale, dst + offs, DOT, ROUND)


@triton.jit
def _c_phase(src, dst, wc, g, G, scale, DOT, GEOM: tl.constexpr, PREC: tl.constexpr,
             ROUND: tl.constexpr):
    """Member g of G: the tiles t = g, g + G, ... of dst = scale * C src; returns the
    member's partial (sum of squares, or the dot with DOT)."""
    OH: tl.constexpr = GEOM[5]
    OW: tl.constexpr = GEOM[6]
    COUTP: tl.constexpr = GEOM[17]
    BP: tl.constexpr = GEOM[18]
    BN: tl.constexpr = GEOM[20]
    NNT: tl.constexpr = COUTP // BN
    NT: tl.constexpr = ((OH * OW + BP - 1) // BP) * NNT
    r = g.to(tl.float64) * 0.0
    t = g
    while t < NT:
        r += _c_tile(src, dst, wc, t // NNT, t % NNT, scale, DOT, GEOM, PREC, ROUND)
        t += G
    return r


@triton.jit
def _ct_phase(src, dst, wt, g, G, scale, DOT, GEOM: tl.constexpr, PREC: tl.constexpr,
              ROUND: tl.constexpr):
    """Member g of G: its tiles of dst = scale * C^T src over the SH*SW parity classes; the
    tiles of all classes are numbered in one sequence and dealt round-robin (balanced)."""
    H: tl.constexpr = GEOM[2]
    W: tl.constexpr = GEOM[3]
    SH: tl.constexpr = GEOM[9]
    SW: tl.constexpr = GEOM[10]
    CINP: tl.constexpr = GEOM[16]
    BP: tl.constexpr = GEOM[18]
    BN: tl.constexpr = GEOM[19]
    NNT: tl.constexpr = CINP // BN
    r = g.to(tl.float64) * 0.0
    base = g * 0
    for rh in tl.static_range(SH):
        for rw in tl.static_range(SW):
            nq = ((H - rh + SH - 1) // SH) * ((W - rw + SW - 1) // SW)  # constexpr
            n_t = ((nq + BP - 1) // BP) * NNT
            t = (g + G - base % G) % G
            while t < n_t:
                r += _ct_tile(src, dst, wt, t // NNT, t % NNT, scale, DOT, rh, rw, GEOM, PREC,
                              ROUND)
                t += G
            base += n_t
    return r


@triton.jit
def _fallback(i):
    """lipkern.layout.fallback_vector at flat indices i: (i * 2654435761 + 1013904223) mod
    2^32, / 2^32 - 0.5 (exact int64 arithmetic: the numbers of every other backend)."""
    h = (i.to(tl.int64) * 2654435761 + 1013904223) % 4294967296
    return (h.to(tl.float64) / 4294967296.0 - 0.5).to(tl.float32)


@triton.jit
def _pack_vector(v0_ptr, dst, fb, g, G, NC: tl.constexpr, NCP: tl.constexpr,
                 NP: tl.constexpr, ROUND: tl.constexpr, BLOCK_E: tl.constexpr):
    """Member g's share of a start vector CHW (NC x NP) -> HWC (NP x NCP, padded with 0), and
    of the fallback vector (N4) into fb; returns both partial sums of squares (float64)."""
    ss = tl.zeros([BLOCK_E], tl.float64)
    sf = tl.zeros([BLOCK_E], tl.float64)
    e0 = g * BLOCK_E
    while e0 < NP * NCP:
        e = e0 + tl.arange(0, BLOCK_E)
        p = e // NCP
        c = e % NCP
        m = e < NP * NCP
        real = m & (c < NC)
        v = tl.load(v0_ptr + c * NP + p, mask=real, other=0.0)
        f = tl.where(real, _fallback(c * NP + p), 0.0)
        ss += v.to(tl.float64) * v.to(tl.float64)
        sf += f.to(tl.float64) * f.to(tl.float64)
        if ROUND:
            v = _round_tf32(v)
            f = _round_tf32(f)
        tl.store(dst + e, v, mask=m)
        tl.store(fb + e, f, mask=m)
        e0 += G * BLOCK_E
    return tl.sum(ss, axis=0), tl.sum(sf, axis=0)


@triton.jit
def _pack(w_ptr, x0_ptr, u0_ptr, wc, wt, xs, ys, xf, uf, part, g, G, n_iters,
          GEOM: tl.constexpr, SN_VARIANT: tl.constexpr, ROUND: tl.constexpr,
          GMAX: tl.constexpr, BLOCK_E: tl.constexpr):
    """Member g's share of step 0: both packed weights (padded entries written as 0, so no
    memset is needed) and its partial max|W| (N1); x0 CHW -> xs HWC and the fallback vector
    -> xf; for the eval mode of the spectral_norm variant also u0 -> ys and its fallback ->
    uf. The partials go to their fixed slots. W is (COUT, CIN, KH, KW), the weight of C, for
    either kind. Loops with program-dependent bounds are `while` loops: the interpreter's
    `range` rejects tensor bounds."""
    T: tl.constexpr = GEOM[0]
    CIN: tl.constexpr = GEOM[1]
    H: tl.constexpr = GEOM[2]
    W: tl.constexpr = GEOM[3]
    COUT: tl.constexpr = GEOM[4]
    OH: tl.constexpr = GEOM[5]
    OW: tl.constexpr = GEOM[6]
    KK: tl.constexpr = GEOM[7] * GEOM[8]
    CINP: tl.constexpr = GEOM[16]
    COUTP: tl.constexpr = GEOM[17]
    NWP: tl.constexpr = KK * COUTP * CINP
    wmax = tl.zeros([BLOCK_E], tl.float32)
    e0 = g * BLOCK_E
    while e0 < NWP:
        e = e0 + tl.arange(0, BLOCK_E)
        m = e < NWP
        tap = e // (COUTP * CINP)
        co = (e // CINP) % COUTP
        ci = e % CINP
        v = tl.load(w_ptr + (co * CIN + ci) * KK + tap, mask=m & (co < COUT) & (ci < CIN),
                    other=0.0).to(tl.float32)
        wmax = tl.maximum(wmax, tl.abs(v))
        if ROUND:
            v = _round_tf32(v)
        tl.store(wc + e, v, mask=m)
        ci2 = (e // COUTP) % CINP
        co2 = e % COUTP
        v = tl.load(w_ptr + (co2 * CIN + ci2) * KK + tap, mask=m & (co2 < COUT) & (ci2 < CIN),
                    other=0.0).to(tl.float32)
        if ROUND:
            v = _round_tf32(v)
        tl.store(wt + e, v, mask=m)
        e0 += G * BLOCK_E
    tl.store(part + S_WMAX * GMAX + g, tl.max(wmax, axis=0).to(tl.float64))
    # the A operator's input (x) and output (y) spaces: C's for T == 0, swapped for T == 1
    if T:
        ssx, ssf = _pack_vector(x0_ptr, xs, xf, g, G, COUT, COUTP, OH * OW, ROUND, BLOCK_E)
    else:
        ssx, ssf = _pack_vector(x0_ptr, xs, xf, g, G, CIN, CINP, H * W, ROUND, BLOCK_E)
    tl.store(part + S_X0 * GMAX + g, ssx)
    tl.store(part + S_XF * GMAX + g, ssf)
    if SN_VARIANT:
        if n_iters == 0:
            if T:
                ssu, ssuf = _pack_vector(u0_ptr, ys, uf, g, G, CIN, CINP, H * W, ROUND,
                                         BLOCK_E)
            else:
                ssu, ssuf = _pack_vector(u0_ptr, ys, uf, g, G, COUT, COUTP, OH * OW, ROUND,
                                         BLOCK_E)
            tl.store(part + S_U0 * GMAX + g, ssu)
            tl.store(part + S_UF * GMAX + g, ssuf)


@triton.jit
def _unpack(src, out_ptr, scale, g, G, NC: tl.constexpr, NCP: tl.constexpr,
            NP: tl.constexpr, BLOCK_E: tl.constexpr):
    """out (CHW, NC x NP) = scale * src (HWC, NP x NCP): member g's share."""
    e0 = g * BLOCK_E
    while e0 < NC * NP:
        e = e0 + tl.arange(0, BLOCK_E)
        m = e < NC * NP
        c = e // NP
        p = e % NP
        tl.store(out_ptr + e, tl.load(src + p * NCP + c, mask=m, other=0.0) * scale, mask=m)
        e0 += G * BLOCK_E


@triton.jit
def _finalize(xs, ys, x_out, u_out, sig_ptr, sigma, inv_x, inv_u, g, G,
              GEOM: tl.constexpr, BLOCK_E: tl.constexpr):
    """Outputs of one layer: sigma (member 0), x = inv_x * xs and u = inv_u * ys in CHW."""
    T: tl.constexpr = GEOM[0]
    CIN: tl.constexpr = GEOM[1]
    HW: tl.constexpr = GEOM[2] * GEOM[3]
    COUT: tl.constexpr = GEOM[4]
    OHW: tl.constexpr = GEOM[5] * GEOM[6]
    CINP: tl.constexpr = GEOM[16]
    COUTP: tl.constexpr = GEOM[17]
    if g == 0:
        tl.store(sig_ptr, sigma)
    if T:
        _unpack(xs, x_out, inv_x, g, G, COUT, COUTP, OHW, BLOCK_E)
        _unpack(ys, u_out, inv_u, g, G, CIN, CINP, HW, BLOCK_E)
    else:
        _unpack(xs, x_out, inv_x, g, G, CIN, CINP, HW, BLOCK_E)
        _unpack(ys, u_out, inv_u, g, G, COUT, COUTP, OHW, BLOCK_E)


@triton.jit
def _apply(src, dst, wc, wt, g, G, scale, DOT, ADJ: tl.constexpr, GEOM: tl.constexpr,
           PREC: tl.constexpr, ROUND: tl.constexpr):
    """dst = scale * A src (ADJ False) or scale * A^T src (ADJ True), A = C or C^T (GEOM[0])."""
    if GEOM[0] ^ ADJ:
        r = _ct_phase(src, dst, wt, g, G, scale, DOT, GEOM, PREC, ROUND)
    else:
        r = _c_phase(src, dst, wc, g, G, scale, DOT, GEOM, PREC, ROUND)
    return r


@triton.jit
def _layer_steps(l, g, row, w_ptr, x0_ptr, u0_ptr, x_ptr, u_ptr, xs_ptr, ys_ptr, xf_ptr, uf_ptr,
                 wc_ptr, wt_ptr, part_ptr, ctl_ptr, sig_ptr, step_lo, step_hi, n_steps, n_iters,
                 eps, tol,
                 GEOM: tl.constexpr, SN_VARIANT: tl.constexpr, PREC: tl.constexpr,
                 GMAX: tl.constexpr, BLOCK_E: tl.constexpr, USE_BARRIER: tl.constexpr,
                 SPIN_LIMIT: tl.constexpr):
    """Steps [step_lo, step_hi) of layer l for member g (module docstring)."""
    ROUND: tl.constexpr = PREC == "tf32"
    G = tl.load(row + LT_G).to(tl.int32)
    x_off = tl.load(row + LT_XOFF)
    y_off = tl.load(row + LT_YOFF)
    # scratch offsets are multiples of 16 elements (channels padded to 16, V2Tables): said
    # here, the compiler can issue 16-byte cp.async for the tiles (4-byte copies otherwise)
    xs = xs_ptr + tl.multiple_of(tl.load(row + LT_XS), 16)
    ys = ys_ptr + tl.multiple_of(tl.load(row + LT_YS), 16)
    xf = xf_ptr + tl.multiple_of(tl.load(row + LT_XS), 16)   # fallback vectors: same shapes
    uf = uf_ptr + tl.multiple_of(tl.load(row + LT_YS), 16)
    wc = wc_ptr + tl.multiple_of(tl.load(row + LT_WP), 16)
    wt = wt_ptr + tl.multiple_of(tl.load(row + LT_WP), 16)
    part = part_ptr + tl.load(row + LT_PART)
    bar = ctl_ptr + CTL_BASE + 2 * l
    done_ptr = ctl_ptr + CTL_BASE + 2 * l + 1
    s = step_lo
    n_bar = 0
    while s < step_hi:
        p1 = part + ((s + RING - 1) % RING) * GMAX   # step s-1
        p2 = part + ((s + RING - 2) % RING) * GMAX   # step s-2
        p3 = part + ((s + RING - 3) % RING) * GMAX   # step s-3
        cur = part + (s % RING) * GMAX
        if s == 0:
            _pack(w_ptr, x0_ptr + x_off, u0_ptr + y_off, wc, wt, xs, ys, xf, uf, part, g, G,
                  n_iters, GEOM, SN_VARIANT, ROUND, GMAX, BLOCK_E)
        elif tl.load(done_ptr, volatile=True) == 0:
            # Each phase body is inlined ONCE per class (one _finalize, one C, one C^T call
            # site): with a call site per case the 11-class ResNet-18 kernel took 190 s to
            # compile for sm_90 here.
            # N1: image norms floored at f = max(eps * min(1, max|W|), tiny); start vectors
            # at eps (N4: the fallback vector for an all-zero or non-finite one)
            i_g = tl.arange(0, GMAX)
            wmax = tl.max(tl.load(part + S_WMAX * GMAX + i_g, mask=i_g < G, other=0.0), axis=0)
            f = tl.maximum(eps * tl.minimum(wmax, 1.0), TINY)
            # Stored vectors are images of UNIT vectors divided by ws = max|W| (1 for a zero
            # or non-finite W): of size sigma/max|W|, between ~1 and ~sqrt(K) whatever the
            # weights' scale. Each phase then multiplies by sigma (not sigma^2) before its
            # epilogue scale, so folding the normalization into the epilogue cannot overflow
            # or underflow float32 for sigma in 1e-30..1e30 (N2; tested). True norms are
            # stored norms * ws.
            ws = tl.where((wmax >= TINY) & (wmax < float("inf")), wmax, 1.0)
            x_fb, nx0 = _start(part, S_X0, S_XF, G, GMAX)
            x_in = tl.where(x_fb, xf, xs)     # step 1's x: the start vector (packed, raw)
            last = s == n_steps - 1
            adj = (s % 2) == 0                # AT phase (even steps)
            eval_dot = (n_iters == 0) & SN_VARIANT  # spectral_norm eval: <x0, A^T u0>
            adj = adj | eval_dot
            n1 = _norm_parts(p1, G, GMAX) * ws   # true norm of step s-1's output (float64)
            # tol (power variant): iteration k = s/2 - 1 > 0 compares ||A x|| of steps s-1
            # and s-3; on a stop ys = A x for the x kept: finalize now, idle to the end
            stop = adj & (tol >= 0) & (s >= 4) & (not SN_VARIANT)
            if stop:
                stop = tl.abs(n1 - _norm_parts(p3, G, GMAX) * ws) <= tol * n1
            if last | stop:
                # x: A^T u normalized after an AT step; the start vector without one
                xb = tl.where(n_steps == 3, x_in, xs)
                p_x = p1 if SN_VARIANT else p2  # the step that wrote xs
                inv_x = tl.where(n_steps == 3, 1.0 / tl.maximum(nx0, eps),
                                 ws / tl.maximum(_norm_parts(p_x, G, GMAX) * ws, f))
                if SN_VARIANT:
                    if n_iters == 0:  # sigma = <x0, A^T u0> / (max(|x0|, eps) max(|u0|, eps))
                        u_fb, nu0 = _start(part, S_U0, S_UF, G, GMAX)
                        yb = tl.where(u_fb, uf, ys)
                        inv_u = 1.0 / tl.maximum(nu0, eps)
                        sigma = _sum_parts(p1, G, GMAX) * inv_u / tl.maximum(nx0, eps)
                    else:             # sigma = u^T A x = ||A^T u|| * ||A^T u|| / max(., f)
                        yb = ys
                        inv_u = ws / tl.maximum(_norm_parts(p2, G, GMAX) * ws, f)
                        sigma = n1 * (n1 / tl.maximum(n1, f))
                else:
                    yb = ys
                    sigma = n1
                    inv_u = ws / tl.maximum(n1, f)
                _finalize(xb, yb, x_ptr + x_off, u_ptr + y_off, sig_ptr + l,
                          sigma.to(tl.float32), inv_x.to(tl.float32), inv_u.to(tl.float32), g,
                          G, GEOM, BLOCK_E)
                if stop & (g == 0):
                    tl.store(done_ptr, 1)
            else:
                # A phase: ys = A (x / max(||x||, .)) / ws (eps for the start vector at step
                # 1, f after); AT phase (N2): xs = A^T (y / max(||y||, f)) / ws; eval:
                # <x0, A^T u0> from the packed (or fallback) raw vectors, nothing stored
                if adj:
                    u_fb, _ = _start(part, S_U0, S_UF, G, GMAX)
                    src = tl.where(eval_dot & u_fb, uf, ys)
                    dst = tl.where(eval_dot, x_in, xs)
                    scale = tl.where(eval_dot, 1.0, 1.0 / tl.maximum(n1, f))
                    r = _apply(src, dst, wc, wt, g, G, scale.to(tl.float32),
                               eval_dot.to(tl.int32), True, GEOM, PREC, ROUND)
                else:
                    src = tl.where(s == 1, x_in, xs)
                    scale = tl.where(s == 1, 1.0 / (tl.maximum(nx0, eps) * ws),
                                     1.0 / tl.maximum(n1, f))
                    r = _apply(src, ys, wc, wt, g, G, scale.to(tl.float32), 0, False, GEOM,
                               PREC, ROUND)
                tl.store(cur + g, r)
        if USE_BARRIER:
            if s < n_steps - 1:
                n_bar += 1
                _group_barrier(bar, G * n_bar, ctl_ptr + CTL_HANG, SPIN_LIMIT)
        s += 1


@triton.jit(do_not_specialize=["L", "n_programs", "step_lo", "step_hi", "n_steps", "n_iters"])
def conv_v2_fwd_kernel(
        lt_ptr, prog_ptr, wptr_ptr, x0_ptr, u0_ptr, x_ptr, u_ptr, xs_ptr, ys_ptr, xf_ptr,
        uf_ptr, wc_ptr, wt_ptr,
        part_ptr, ctl_ptr, sig_ptr, lip_ptr, loglip_ptr, L, n_programs, step_lo, step_hi,
        n_steps, n_iters, eps, tol,
        CLASSES: tl.constexpr, NCLS: tl.constexpr, W_DTYPE: tl.constexpr,
        SN_VARIANT: tl.constexpr, PREC: tl.constexpr, GMAX: tl.constexpr,
        BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr, USE_BARRIER: tl.constexpr,
        SPIN_LIMIT: tl.constexpr, LT_W: tl.constexpr):
    """Program pid is member g of layer l (prog table); runs steps [step_lo, step_hi).

    lt: (L, LT_W) int64 layer table (class, G, offsets); prog: (n_programs, 2) int32 (layer,
    member); wptr: (L,) int64 weight addresses; x0/x: packed (total_x,) fp32 start/result;
    u0/u: (total_y,);
    xs/ys/wc/wt: fp32 scratch (HWC vectors, packed weights); part: fp32 partials
    (layer, RING, GMAX); ctl: int32 control words (zero on entry of step 0); sig: (L,);
    lip/loglip: () written by the last program of the final step."""
    pid = tl.program_id(0)
    l = tl.load(prog_ptr + 2 * pid)
    g = tl.load(prog_ptr + 2 * pid + 1)
    row = lt_ptr + l * LT_W
    cls = tl.load(row + LT_CLS)
    w_ptr = tl.load(wptr_ptr + l).to(tl.pointer_type(W_DTYPE), bitcast=True)
    for c in tl.static_range(NCLS):
        if cls == c:
            _layer_steps(l, g, row, w_ptr, x0_ptr, u0_ptr, x_ptr, u_ptr, xs_ptr, ys_ptr, xf_ptr,
                         uf_ptr, wc_ptr, wt_ptr, part_ptr, ctl_ptr, sig_ptr, step_lo, step_hi,
                         n_steps, n_iters, eps, tol, CLASSES[c], SN_VARIANT, PREC, GMAX,
                         BLOCK_E, USE_BARRIER, SPIN_LIMIT)
    if step_hi == n_steps:
        # the network bound, by whichever program finishes the final step last
        tl.debug_barrier()
        ticket = tl.atomic_add(ctl_ptr + CTL_TICKET, 1, sem="acq_rel", scope="gpu")
        if ticket == n_programs - 1:
            idx = tl.arange(0, BLOCK_L)
            sl = tl.load(sig_ptr + idx, mask=idx < L, other=1.0, cache_modifier=".cg")
            tl.store(lip_ptr, tl.reduce(sl, 0, _mul))
            # N5: a zero sigma logs as -inf, a NaN one as NaN
            logs = tl.where(sl > 0, tl.log(tl.maximum(sl, 1e-38)),
                            tl.where(sl == 0, float("-inf"), float("nan")))
            tl.store(loglip_ptr, tl.sum(tl.where(idx < L, logs, 0.0)))


@triton.jit
def _mul(a, b):
    return a * b


# ---------------------------------------------------------------- launcher
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
PRECISIONS = ("ieee", "tf32x3", "tf32")
BLOCK_E = 256  # elementwise passes (pack, unpack): 2 elements per thread with 4 warps
NUM_WARPS = 4  # a 64x64 fp32 accumulator is 32 registers per thread at 4 warps


class V2Tables:
    """Device tables and scratch sizes of one (layer set, plan) pair (cached)."""

    def __init__(self, layout, plan, device):
        lt, prog = [], []
        xs = ys = wp = part = 0
        gmax = max(16, v2_plan._next_pow2(max(plan.programs)))
        for j, (i, ci, G) in enumerate(zip(plan.v2_layers, plan.layer_class, plan.programs)):
            c = plan.classes[ci]
            nx_in, nx_out = c.H * c.W * c.CINP, c.OH * c.OW * c.COUTP
            nxs, nys = (nx_out, nx_in) if c.T else (nx_in, nx_out)
            lt.append([ci, G, layout.x_offsets[i], layout.y_offsets[i], xs, ys, wp, part])
            prog += [v for g in range(G) for v in (j, g)]
            xs += nxs
            ys += nys
            wp += c.KH * c.KW * c.CINP * c.COUTP
            part += N_SLOTS * gmax
        assert all(v % 16 == 0 for r in lt for v in r[4:7]), "scratch offsets (multiple_of)"
        self.lt = torch.tensor(lt, dtype=torch.int64).to(device)
        self.prog = torch.tensor(prog, dtype=torch.int32).to(device)
        self.n_programs = len(prog) // 2
        self.sizes = (xs, ys, wp, part)
        self.gmax = gmax
        self.n_layers = len(plan.v2_layers)
        if plan.v1_layers:
            from lipkern.layout import _build  # a sub-layout of the v1 layers
            self.v1_layout = _build(tuple(layout.geoms[i] for i in plan.v1_layers))
            cat = lambda sl: torch.cat([torch.arange(s.start, s.stop) for s in sl])  # noqa
            self.v1_x = cat([layout.x_slice(i) for i in plan.v1_layers]).to(device)
            self.v1_y = cat([layout.y_slice(i) for i in plan.v1_layers]).to(device)
            self.v1_idx = torch.tensor(plan.v1_layers, dtype=torch.int64).to(device)
            self.v2_idx = torch.tensor(plan.v2_layers, dtype=torch.int64).to(device)


@functools.lru_cache(maxsize=64)
def plan_for(meta: tuple, device: torch.device, mode=None, programs_per_layer=None,
             block_p=None):
    """(plan, tables) of a layer set on a device (see :func:`v2_plan.make_plan`)."""
    from lipkern.layout import layout_from_meta
    layout = layout_from_meta(meta)
    if block_p is None:
        # 64-pixel tiles on a GPU (a 64x64 tf32 MMA tile); 16 under the interpreter, so the
        # tests' tiny layers still span several tiles
        block_p = 64 if device.type == "cuda" else 16
    plan = v2_plan.make_plan(layout.geoms, v2_plan.device_desc(device), block_p=block_p,
                             mode=mode, programs_per_layer=programs_per_layer)
    tables = V2Tables(layout, plan, device) if plan.v2_layers else None
    return plan, tables


@functools.lru_cache(maxsize=64)
def _pointer_table(ptrs: tuple, device: torch.device) -> torch.Tensor:
    """(L,) int64 weight addresses (cached by the addresses: equal addresses, equal table)."""
    return torch.tensor(ptrs, dtype=torch.int64).to(device)


def forward(weights, x0, u0, layout, n_iters: int, eps: float, tol: float,
            precision: str = "ieee", *, mode=None, programs_per_layer=None, block_p=None,
            spin_limit: int = 0):
    """The fused forward with the v2 conv kernel where the plan covers a layer, v1 for the
    rest (visible in the ``lipkern.triton_v2`` debug log). Same contract as
    ``power_iter.forward``: weights contiguous, one dtype; x0 (total_x,) fp32; u0 None or
    (total_y,) fp32. Returns (sigmas (L,), lipschitz (), log_lipschitz (), x, u), fp32.

    mode / programs_per_layer / block_p override the plan (tests, benchmarks); spin_limit > 0
    arms the barrier's hang guard (:func:`hang_flag` reads it)."""
    from . import power_iter as v1
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = x0.device
    x0 = x0.contiguous()  # no-ops from fused_power_iter (its _prepare already did this)
    u0 = None if u0 is None else u0.contiguous()
    plan, tab = plan_for(layout.meta, device, mode, programs_per_layer, block_p)
    if v2_plan.LOG.isEnabledFor(logging.DEBUG):
        v2_plan.LOG.debug(v2_plan.describe(plan) + f", precision {precision}")
    if tab is None:
        return v1.forward(weights, x0, u0, layout, n_iters, eps, tol)
    v1._check_int32(layout)
    f32 = dict(dtype=torch.float32, device=device)
    xs_n, ys_n, wp_n, part_n = tab.sizes
    xs, ys = torch.empty(xs_n, **f32), torch.empty(ys_n, **f32)
    xf = torch.empty(xs_n, **f32)
    uf = torch.empty(ys_n, **f32) if u0 is not None and n_iters == 0 else ys
    wc, wt = torch.empty(wp_n, **f32), torch.empty(wp_n, **f32)
    # control words and partials in one zero-filled buffer (one memset per call): the first
    # steps read ring slots no step has written yet (unused, but never uninitialized memory)
    n_ctl = 2 + 2 * tab.n_layers
    n_ctl += n_ctl % 2  # the float64 partials start 8-byte aligned
    zero = torch.zeros(n_ctl + 2 * part_n, dtype=torch.int32, device=device)
    ctl, part = zero[:n_ctl], zero[n_ctl:].view(torch.float64)
    x, u = v1._empty(layout.total_x, **f32), v1._empty(layout.total_y, **f32)
    sig = v1._empty(tab.n_layers, **f32)
    lip, loglip = v1._empty((), **f32), v1._empty((), **f32)
    wptrs = _pointer_table(tuple(weights[i].data_ptr() for i in plan.v2_layers), device)
    sn = u0 is not None
    n_steps = 2 * n_iters + (2 if sn else 3)
    if sn and n_iters == 0:
        n_steps = 3
    args = (tab.lt, tab.prog, wptrs, x0, u0 if sn else x0, x, u, xs, ys, xf, uf, wc, wt, part, ctl,
            sig, lip, loglip, tab.n_layers, tab.n_programs)
    meta = dict(CLASSES=tuple(tuple(c) for c in plan.classes), NCLS=len(plan.classes),
                W_DTYPE=_TL_DTYPES[weights[0].dtype], SN_VARIANT=sn, PREC=precision,
                GMAX=tab.gmax, BLOCK_L=max(16, v2_plan._next_pow2(tab.n_layers)),
                BLOCK_E=BLOCK_E, SPIN_LIMIT=spin_limit, LT_W=LT_WIDTH, num_warps=NUM_WARPS)
    grid = (tab.n_programs,)
    if plan.mode == "persistent":
        # one launch; cooperative, so a grid that cannot be co-resident fails at launch
        # instead of hanging in a barrier
        conv_v2_fwd_kernel[grid](*args, 0, n_steps, n_steps, n_iters, eps, tol,
                                 USE_BARRIER=True, launch_cooperative_grid=True, **meta)
    else:
        for s in range(n_steps):  # the launch boundary is the barrier
            conv_v2_fwd_kernel[grid](*args, s, s + 1, n_steps, n_iters, eps, tol,
                                     USE_BARRIER=False, **meta)
    forward.last = (plan, ctl)
    if not plan.v1_layers:
        return sig, lip, loglip, x, u
    # the layers v2 does not cover: v1 on their sub-layout, results scattered into place
    from lipkern.reference import bound_from_sigmas
    r = v1.forward([weights[i] for i in plan.v1_layers], x0[tab.v1_x],
                   None if u0 is None else u0[tab.v1_y], tab.v1_layout, n_iters, eps, tol)
    sig_all = torch.empty(layout.num_layers, **f32)
    sig_all[tab.v2_idx] = sig
    sig_all[tab.v1_idx] = r[0]
    x[tab.v1_x] = r[3]
    u[tab.v1_y] = r[4]
    lip, loglip = bound_from_sigmas(sig_all)
    return sig_all, lip, loglip, x, u


forward.last = None


def hang_flag() -> bool:
    """True if the last v2 launch's barrier hang guard fired (a host sync; tests only)."""
    return forward.last is not None and bool(forward.last[1][1].item())
