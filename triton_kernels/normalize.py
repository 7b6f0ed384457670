"""Triton backward of ``lipkern::normalize``: the gradient of every normalized weight
``W_hat_l = W_l / sigma_l`` in ONE launch (the forward is ``power_iter_fwd_kernel`` with
``WRITE_WHAT``, so a whole model's normalization is one launch each way).

With x and u held constant (spectral_norm's rule), ``sigma = u^T A(W) x`` and

    dL/dW = G / sigma + (g_sigma - <G, W> / sigma^2) * dsigma/dW

where G = dL/dW_hat, g_sigma the upstream gradient of the sigmas themselves (if any), and
dsigma/dW = u x^T (dense / reshaped layers) or the conv weight gradient of (x, u) (conv
operators; x and u swapped for transposed convs). The coefficient needs a reduction over the
whole layer before any entry can be written, so v1 runs one program per layer: pass 1 reads G
and W for the dot, pass 2 reads G again (now from L2 for layers up to a few MB) and writes.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .power_iter import (BLOCK_C, BLOCK_P, BLOCK_R, F_G, F_KH, F_KW, _TL_DTYPES,
                         _conv_grad_acc, _dot, _empty, _load_row_head, _pointer_table, _tables)

BLOCK_E = 1024  # elements per step of the streaming passes (4 warps x 8 x fp32: 32 B per thread)


@triton.jit(do_not_specialize=["L"])
def normalize_bwd_kernel(meta_ptr, wptr_ptr, x_ptr, u_ptr, sig_ptr, gs_ptr, gwhat_ptr, grad_ptr,
                         L, W_DTYPE: tl.constexpr, HAS_GS: tl.constexpr,
                         HAS_GWHAT: tl.constexpr, HAS_CONV: tl.constexpr,
                         META_WIDTH: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_E: tl.constexpr):
    """Program l writes layer l's weight gradient into grad (packed (total_w,), W_DTYPE).

    meta: (L, META_WIDTH) int32 layer table; wptr: (L,) int64 weight addresses (op layout,
    contiguous); x (total_x,), u (total_y,), sig (L,), gs (L,) fp32; gwhat (total_w,) G in
    W_DTYPE. HAS_GS / HAS_GWHAT: which upstream gradients exist (at least one). HAS_CONV:
    some layer is a conv operator (False: no conv code is compiled)."""
    l = tl.program_id(0)
    row = meta_ptr + l * META_WIDTH
    kind, x_off, y_off, w_off, CIN, COUT = _load_row_head(row)
    KK = tl.load(row + F_KH) * tl.load(row + F_KW)
    G = tl.load(row + F_G)
    n_w = COUT * (CIN // G) * KK
    w_ptr = tl.load(wptr_ptr + l).to(tl.pointer_type(W_DTYPE), bitcast=True)
    sigma = tl.load(sig_ptr + l)

    coef = sigma * 0.0
    inv = sigma * 0.0
    if HAS_GS:
        coef += tl.load(gs_ptr + l)
    if HAS_GWHAT:
        inv = 1.0 / sigma
        coef -= _dot(gwhat_ptr + w_off, w_ptr, n_w, BLOCK_E) * inv * inv
    gw = gwhat_ptr + w_off
    out = grad_ptr + w_off
    if kind == 0:  # dsigma/dW = u x^T, W (COUT, CIN) row-major
        for e0 in range(0, n_w, BLOCK_E):
            offs = e0 + tl.arange(0, BLOCK_E)
            m = offs < n_w
            val = coef * (tl.load(u_ptr + y_off + offs // CIN, mask=m, other=0.0)
                          * tl.load(x_ptr + x_off + offs % CIN, mask=m, other=0.0))
            if HAS_GWHAT:
                val += tl.load(gw + offs, mask=m, other=0.0).to(tl.float32) * inv
            tl.store(out + offs, val.to(W_DTYPE), mask=m)
    elif HAS_CONV:
        if kind == 1:  # conv operator: sigma = <u, C x>, C's input is x
            _conv_layer_grad(row, x_ptr + x_off, u_ptr + y_off, gw, out, coef, inv, CIN,
                             COUT, W_DTYPE, HAS_GWHAT, BLOCK_C, BLOCK_P, BLOCK_R)
        else:          # transposed conv: sigma = <x, C u>, C's input is u
            _conv_layer_grad(row, u_ptr + y_off, x_ptr + x_off, gw, out, coef, inv, CIN,
                             COUT, W_DTYPE, HAS_GWHAT, BLOCK_C, BLOCK_P, BLOCK_R)


@triton.jit
def _conv_layer_grad(row, in_ptr, o_ptr, gw, out, coef, inv, CIN, COUT, W_DTYPE: tl.constexpr,
                     HAS_GWHAT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    """out = coef * dsigma/dW (+ inv * G): every weight-gradient tile of one conv layer."""
    G = tl.load(row + F_G)
    COG = COUT // G
    R = (CIN // G) * tl.load(row + F_KH) * tl.load(row + F_KW)
    n_tiles = G * tl.cdiv(COG, BLOCK_C) * tl.cdiv(R, BLOCK_R)
    for tile in range(0, n_tiles):
        acc, offs, m = _conv_grad_acc(row, in_ptr, o_ptr, tile, CIN, COUT, BLOCK_C, BLOCK_P,
                                      BLOCK_R)
        val = coef * acc
        if HAS_GWHAT:
            val += tl.load(gw + offs, mask=m, other=0.0).to(tl.float32) * inv
        tl.store(out + offs, val.to(W_DTYPE), mask=m)

def backward(weights, x, u, sigmas, grad_sigmas, grad_what, layout):
    """Launch the backward of ``lipkern::normalize``. weights: the op-layout weights of the
    forward (same dtype/device, contiguous); grad_sigmas (L,) or None; grad_what (total_w,) or
    None (not both None). Returns the packed weight gradient (total_w,) in the weights' dtype."""
    from lipkern.layout import META_WIDTH
    device = x.device
    meta_t, _, _, has_conv = _tables(layout.meta, META_WIDTH, device)
    wptrs = _pointer_table(tuple(w.data_ptr() for w in weights), device)
    wdtype = weights[0].dtype
    grad = _empty(layout.total_w, dtype=wdtype, device=device)
    gs = None if grad_sigmas is None else grad_sigmas.contiguous().float()
    gw = None if grad_what is None else grad_what.contiguous().to(wdtype)
    normalize_bwd_kernel[(layout.num_layers,)](
        meta_t, wptrs, x, u, sigmas, sigmas if gs is None else gs,
        grad if gw is None else gw, grad, layout.num_layers, W_DTYPE=_TL_DTYPES[wdtype],
        HAS_GS=gs is not None, HAS_GWHAT=gw is not None, HAS_CONV=has_conv,
        META_WIDTH=META_WIDTH,
        BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, BLOCK_R=BLOCK_R, BLOCK_E=BLOCK_E, num_warps=4)
    return grad
