"""A normalized layer without a normalized weight: ``y = layer(x; W) / sigma + b``.

``layer(x; W / sigma) + b`` and ``layer(x; W) / sigma + b`` are the same function; the second
never materializes ``W / sigma`` (a full pass over W, and a fresh weight-sized tensor, in the
forward and again in the backward) and costs O(output) instead. The gradient is the one of
spectral_norm, where ``sigma = u^T W v`` with u, v held constant:

    g_z = g_y / sigma,   g_sigma = -<g_z, z> / sigma,   g_x = layer^T(g_z),
    g_W = (g_z)^T x  +  g_sigma * dsigma/dW,   dsigma/dW = u v^T (torch's matrix) or the conv
    weight gradient of (v, u) (the conv operator)

and the rank-one term is added in place into the GEMM's weight gradient (no weight-sized
allocation). Second order (``create_graph=True``): the backward then runs as differentiable
torch ops on the saved x, W, b -- DESIGN's rule holds u, v constant, so sigma(W) is linear
with gradient dsigma/dW and the forward's value -- and autograd differentiates it again.
Under autocast the layer's own op runs in the autocast dtype and sigma's terms in float32. Inputs: x (B, ..., in) or (B, C, [H,] W); w the layer's own weight; sigma 0-d
(float32); ``rank1(g_sigma, g_w)`` adds g_sigma * dsigma/dW into g_w in place.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

ConvArgs = Tuple[tuple, tuple, tuple, bool, tuple, int]  # stride, padding, dilation, transposed,
#                                                          output_padding, groups


class ScaledLayer(torch.autograd.Function):
    """y = layer(x; w) / sigma + b with spectral_norm's gradient (module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
                sigma: torch.Tensor, rank1: Callable, conv: Optional[ConvArgs]):
        z = F.linear(x, w) if conv is None else torch.ops.aten.convolution(x, w, None, *conv)
        s = sigma if sigma.dtype == z.dtype else sigma.to(z.dtype)
        if b is None:
            y = z / s
        else:  # b + z / s
            bv = b if conv is None else b.view(-1, *([1] * (z.dim() - 2)))
            # float32/64: two ops with addcdiv's roundings (bitwise equal), ~3x faster than its
            # broadcast of a conv bias (131k outputs at 8x8: 44 us against 135, 1 thread,
            # bench/NOTES.md); half precision: addcdiv's one rounding of the float sum
            y = (z / s).add_(bv) if z.dtype in (torch.float32, torch.float64) else \
                torch.addcdiv(bv, z, s)
        ctx.save_for_backward(x, w, z, s, b, sigma)
        ctx.rank1, ctx.conv, ctx.has_b = rank1, conv, b is not None
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, w, z, s, b, sigma = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return _differentiable_backward(ctx, gy, x, w, b, sigma)
        gz = gy / s
        if gz.dtype == z.dtype and z.dtype in (torch.float32, torch.float64):
            g_sigma = torch.vdot(gz.reshape(-1), z.reshape(-1)).div_(s).neg_()
        else:  # <g_z, z> in float32 at least: under autocast z is bf16/fp16, g_y may not be
            acc = torch.promote_types(torch.promote_types(gz.dtype, z.dtype), torch.float32)
            g_sigma = torch.vdot(gz.reshape(-1).to(acc), z.reshape(-1).to(acc)).div_(s).neg_()
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = gb = None
        if ctx.conv is None:
            if need_x:
                gx = gz @ w
            if need_w:
                gz2, x2 = gz.reshape(-1, gz.shape[-1]), x.reshape(-1, x.shape[-1])
                rows = getattr(ctx.rank1, "rows", None)
                if rows is not None:  # the rank-one term as one more row of the GEMM
                    ur, vr = rows(g_sigma, gz2.dtype)
                    gw = torch.cat([gz2, ur]).t() @ torch.cat([x2, vr])
                    need_w = False  # done
                else:
                    gw = gz2.t() @ x2
            if need_b:
                gb = gy.reshape(-1, gy.shape[-1]).sum(0)
        else:
            gx, gw, _ = torch.ops.aten.convolution_backward(
                gz, x, w, None, *ctx.conv, [need_x, need_w, False])
            if need_b:
                gb = gy.sum(dim=[d for d in range(gy.dim()) if d != 1])
        if need_w:
            ctx.rank1(g_sigma, gw)
        return gx, gw, gb, None, None, None


def scaled_layer(x, w, b, sigma, rank1, conv):
    """:class:`ScaledLayer` on a batched or unbatched input (aten.convolution needs the batch
    dimension: an unbatched (C, H, W) input runs as a batch of one)."""
    if conv is not None and x.dim() == w.dim() - 1:
        return ScaledLayer.apply(x.unsqueeze(0), w, b, sigma, rank1, conv).squeeze(0)
    return ScaledLayer.apply(x, w, b, sigma, rank1, conv)


def _differentiable_backward(ctx, gy, x, w, b, sigma):
    """The gradients of ``layer(x; W) / sigma(W) + b`` as a graph autograd can differentiate
    again: sigma(W) = sigma + <W - W.detach(), dsigma/dW> (its value, and DESIGN's constant
    slope), the layer's op recomputed on the saved tensors."""
    cdtype = torch.promote_types(sigma.dtype, torch.float32)
    d = ctx.rank1.full(w).to(cdtype)
    s = sigma.to(cdtype) + ((w.to(cdtype) - w.detach().to(cdtype)) * d).sum()
    conv = ctx.conv
    z = F.linear(x, w) if conv is None else torch.ops.aten.convolution(x, w, None, *conv)
    y = z / s.to(z.dtype) if z.dtype != cdtype else z / s
    if b is not None:
        y = y + (b if conv is None else b.view(-1, *([1] * (z.dim() - 2))))
    wanted = [t for t, need in zip((x, w, b), ctx.needs_input_grad[:3])
              if need and t is not None]
    got = iter(torch.autograd.grad(y, wanted, gy, create_graph=True, allow_unused=True))
    grads = [next(got) if need and t is not None else None
             for t, need in zip((x, w, b), ctx.needs_input_grad[:3])]
    return (*grads, None, None, None)


class dense_rank1:
    """dsigma/dW = u v^T for torch's matrix of W (``dim`` first, then flattened). Called,
    adds g_sigma u v^T into g_w in place (a K=1 GEMM); ``rows`` gives the pair of rows that
    fold it into a Linear layer's weight-gradient GEMM instead."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor, dim: int):
        self.u, self.v, self.dim = u, v, dim
        if dim != 0:
            self.rows = None

    def full(self, w: torch.Tensor) -> torch.Tensor:
        """dsigma/dW shaped like w (the second-order path)."""
        mat = torch.outer(self.u, self.v)
        if self.dim == 0:
            return mat.view(w.shape)
        return mat.view(w.movedim(self.dim, 0).shape).movedim(0, self.dim)

    def rows(self, g_sigma: torch.Tensor, dtype: torch.dtype):
        return ((self.u * g_sigma).to(dtype)[None], self.v.to(dtype)[None])

    def __call__(self, g_sigma: torch.Tensor, gw: torch.Tensor) -> None:
        if self.dim == 0:  # one in-place addr (no host read of g_sigma: also traced)
            gw.view(gw.shape[0], -1).addr_((self.u * g_sigma).to(gw.dtype),
                                           self.v.to(gw.dtype))
        else:
            uu = (self.u * g_sigma).to(gw.dtype)[:, None]
            mat = uu @ self.v.to(gw.dtype)[None]
            gw.add_(mat.view(gw.movedim(self.dim, 0).shape).movedim(0, self.dim))


def operator_rank1(geom, u: torch.Tensor, v: torch.Tensor, unit=None):
    """dsigma/dW for the conv operator: the conv weight gradient of (v, u) -- or ``unit()``
    where the caller has it already (FusedSigmas.unit: one C++ call for every operator layer
    of the forward; flat, the op's layout, the same tensor)."""
    from ..reference import weight_grad

    def full(w):
        return (weight_grad(geom, v, u) if unit is None else unit()).view(w.shape)

    def add(g_sigma: torch.Tensor, gw: torch.Tensor) -> None:
        gw.addcmul_(full(gw).to(gw.dtype), g_sigma.to(gw.dtype))  # one pass, no temporary
    add.full = full  # the second-order path
    return add
