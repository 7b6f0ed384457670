"""``lipkern::sn_linear``: one spectrally normalized Linear layer whose power iteration rides
in its own matmul (CPU; the kernel and the why: csrc/cpu/sn_linear.cpp; the spec:
:func:`lipkern.reference.sn_linear`).

Reads top to bottom: validation -> fake kernels (torch.compile, opcheck) -> public function.
The schema, the CPU kernels and the autograd kernel are C++ (csrc/ops.cpp,
csrc/cpu/sn_linear.cpp): the layer runs once per layer per step, so its Python cost is the
point -- a Python autograd.Function here cost ~60 us of host time per layer per step, the
C++ one a few.

    sn_linear(x (..., in), weight (out, in), bias (out,) | None, u (out,), v (in,), n_iters,
              eps) -> (y (..., out), sigma (), u_new (out,), v_new (in,))
    sn_linear_forward(same)  -> (y, z (B, out), x_aug (B+1, in), sigma, u_new, v_new)
    sn_linear_backward(grad_y, x_aug, weight, z, sigma, u_new, output_mask[3])
                             -> (grad_x (B, in), grad_weight (out, in), grad_bias (out,))
                                (empty tensors where output_mask is False)

    linear(x (..., in), weight (out, in), bias (out,) | None) -> y (..., out)
                             F.linear on the same matmul, no normalization (the benchmark's
                             equal-matmul baseline)

with B the number of rows of x (all leading dimensions flattened). float32 with at most 16
rows of x takes the one-sweep kernel (csrc/cpu/skinny.h: the matmul and the power iteration
in one pass over W, AVX-512); other inputs take MKL's GEMM and then a pass over the hot W.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..backends import load_ext

__all__ = ["sn_linear", "linear", "available"]


def available() -> bool:
    """Whether the compiled op is built (it lives in lipkern._C)."""
    return load_ext() is not None


# ---------------------------------------------------------------- validation
def _validate_layer(x, weight, bias):
    """The checks sn_linear and linear share: x (..., in), weight (out, in) float32/float64,
    bias (out,) or None, one dtype and one CPU device."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if weight.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"weight must be float32 or float64, got {weight.dtype}")
    out, inp = weight.shape
    if out == 0 or inp == 0:
        raise ValueError(f"weight is empty (shape {tuple(weight.shape)}): a layer with no "
                         f"inputs or outputs has no spectral norm to divide by")
    if x.dim() < 1 or x.shape[-1] != inp:
        raise ValueError(f"x must have shape (..., {inp}), got {tuple(x.shape)}")
    if bias is not None and bias.shape != (out,):
        raise ValueError(f"bias must have shape ({out},), got {tuple(bias.shape)}")
    for name, t in (("x", x), ("bias", bias)):
        if t is not None and t.dtype != weight.dtype:
            raise TypeError(f"{name} is {t.dtype} but weight is {weight.dtype}")
        if t is not None and t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but weight is on {weight.device}")


def _validate(x, weight, bias, u, v, n_iters, eps, check_finite):
    _validate_layer(x, weight, bias)
    for name, t in (("u", u), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 0:
        raise ValueError(f"n_iters must be an int >= 0, got {n_iters!r}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    out, inp = weight.shape
    if u.shape != (out,):
        raise ValueError(f"u must have shape ({out},), got {tuple(u.shape)}")
    if v.shape != (inp,):
        raise ValueError(f"v must have shape ({inp},), got {tuple(v.shape)}")
    for name, t in (("u", u), ("v", v)):
        if t.dtype != weight.dtype:
            raise TypeError(f"{name} is {t.dtype} but weight is {weight.dtype}")
        if t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but weight is on {weight.device}")
    if weight.device.type != "cpu":
        raise ValueError(f"weight is on {weight.device}: sn_linear runs on the CPU (on CUDA, "
                         f"spectral_norm_model's one-launch strategies do this work)")
    if check_finite and not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN or Inf values")


# ---------------------------------------------------------------- fake kernels
def _rows(x: Tensor, inp: int):
    return x.numel() // inp if inp else 0


def _fake(x, weight, bias, u, v, n_iters, eps):
    out, inp = weight.shape
    return (x.new_empty((*x.shape[:-1], out)), weight.new_empty(()), weight.new_empty(out),
            weight.new_empty(inp))


def _fake_forward(x, weight, bias, u, v, n_iters, eps):
    out, inp = weight.shape
    b = _rows(x, inp)
    return (x.new_empty((*x.shape[:-1], out)), weight.new_empty((b, out)),
            weight.new_empty((b + 1, inp)), weight.new_empty(()), weight.new_empty(out),
            weight.new_empty(inp))


def _fake_backward(grad_y, x_aug, weight, z, sigma, u_new, output_mask):
    out, inp = weight.shape
    b = x_aug.shape[0] - 1
    return (weight.new_empty((b, inp) if output_mask[0] else (0,)),
            weight.new_empty((out, inp) if output_mask[1] else (0,)),
            weight.new_empty((out,) if output_mask[2] else (0,)))


def _fake_linear(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


if available():
    torch.library.register_fake("lipkern::linear")(_fake_linear)
    torch.library.register_fake("lipkern::sn_linear")(_fake)
    torch.library.register_fake("lipkern::sn_linear_forward")(_fake_forward)
    torch.library.register_fake("lipkern::sn_linear_backward")(_fake_backward)


# ---------------------------------------------------------------- public function
def sn_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], u: Tensor, v: Tensor,
              n_iters: int = 1, eps: float = 1e-12, *,
              check_finite: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``y = x (W / sigma)^T + b`` with torch's spectral_norm sigma, the power iteration
    folded into the layer's own matmul (CPU, float32/float64).

    Args:
        x: (..., in). weight: (out, in). bias: (out,) or None.
        u: (out,), v: (in,): the current vectors (renormalized before use; not modified).
        n_iters: power iterations (torch's update: ``u = normalize(W v)``,
            ``v = normalize(W^T u)``); 0 uses the vectors as they are (eval mode).
        eps: as in spectral_norm.
        check_finite: raise ValueError on a NaN/Inf weight (one reduction over it).
    Returns:
        (y (..., out), sigma (), u_new (out,), v_new (in,)). y is differentiable in x, weight
        and bias, with spectral_norm's gradient (u, v held constant); sigma and the new
        vectors are not differentiable. The caller stores the vectors (training mode).
    """
    if not available():
        from ..backends import _ext_missing
        raise RuntimeError("sn_linear needs " + _ext_missing())
    _validate(x, weight, bias, u, v, n_iters, eps, check_finite)
    return torch.ops.lipkern.sn_linear(x, weight, bias, u, v, n_iters, float(eps))


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, weight, bias)`` on the matmul :func:`sn_linear` runs, without the
    normalization (CPU, float32/float64; autograd: F.linear's gradients).

    What it is for: measuring the normalization's cost at equal matmuls. At small batch the
    kernel sn_linear runs beats MKL's GEMM on some CPUs, so "sn_linear minus F.linear" would
    count that matmul gain as a cheaper normalization; "sn_linear minus linear" does not.

    Args: x (..., in), weight (out, in), bias (out,) or None. Returns y (..., out).
    """
    if not available():
        from ..backends import _ext_missing
        raise RuntimeError("linear needs " + _ext_missing())
    _validate_layer(x, weight, bias)
    if weight.device.type != "cpu":
        raise ValueError(f"weight is on {weight.device}: linear runs on the CPU")
    return torch.ops.lipkern.linear(x, weight, bias)
