"""Argument checks shared by every entry point. Each error names the argument at fault."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .layout import Layout, PowerIterState, layout_for, weight_shapes
from .spec import ConvSpec

BACKENDS = ("auto", "triton", "cuda", "cpp", "torch", "grouped")
VARIANTS = ("power", "spectral_norm")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Iteration dtype: float64 stays float64, everything else iterates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_weights(weights) -> Tuple[torch.Tensor, ...]:
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence):
        raise TypeError("weights must be a list or tuple of tensors (2-D dense (out, in), or "
                        f"3-D/4-D conv kernels), got {type(weights).__name__}")
    if len(weights) == 0:
        raise ValueError("weights is empty: pass at least one weight tensor")
    first = None
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"weights[{i}] must be a torch.Tensor, got {type(w).__name__}")
        if w.dtype not in FLOAT_DTYPES:
            raise TypeError(f"weights[{i}] has dtype {w.dtype}; expected one of float16, "
                            f"bfloat16, float32, float64")
        if w.dim() not in (2, 3, 4):
            raise ValueError(f"weights[{i}] has {w.dim()} dims (shape {tuple(w.shape)}); "
                             f"expected 2 (dense), 3 (conv1d) or 4 (conv2d)")
        if w.numel() == 0:
            raise ValueError(f"weights[{i}] is empty (shape {tuple(w.shape)})")
        if first is None:
            first = w
        elif w.device != first.device:
            raise ValueError(f"weights[{i}] is on {w.device} but weights[0] is on "
                             f"{first.device}: all weights must share one device")
        elif w.dtype != first.dtype:
            raise TypeError(f"weights[{i}] has dtype {w.dtype} but weights[0] has "
                            f"{first.dtype}: all weights must share one dtype")
    return tuple(weights)


def check_finite(weights: Sequence[torch.Tensor]) -> None:
    """Raise ValueError naming the first weight with a NaN or Inf. Costs one multi-tensor
    reduction and one device->host sync (skip it with ``check_finite=False``)."""
    with torch.no_grad():
        # in the weights' own dtype (one dtype per call): a float64 entry of 1e150 is finite
        maxabs = torch.stack(torch._foreach_norm([w.detach() for w in weights], float("inf")))
        if bool(torch.isfinite(maxabs).all()):
            return
        bad = int((~torch.isfinite(maxabs)).nonzero()[0, 0])
    raise ValueError(f"weights[{bad}] contains NaN or Inf values")


def check_specs(specs, n: int) -> Tuple[Optional[ConvSpec], ...]:
    if specs is None:
        return (None,) * n
    if isinstance(specs, ConvSpec) or not isinstance(specs, Sequence):
        raise TypeError("specs must be None or a list with one entry (None or ConvSpec) per "
                        f"weight, got {type(specs).__name__}")
    if len(specs) != n:
        raise ValueError(f"specs has {len(specs)} entries but weights has {n}")
    for i, s in enumerate(specs):
        if s is not None and not isinstance(s, ConvSpec):
            raise TypeError(f"specs[{i}] must be None or a lipkern.ConvSpec, "
                            f"got {type(s).__name__}")
    return tuple(specs)


def check_variant(variant, tol) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "spectral_norm" and tol is not None:
        raise ValueError("tol is not supported with variant='spectral_norm' (torch's update "
                         "runs a fixed number of iterations); pass tol=None")


def check_scalars(n_iters, eps, tol, backend, generator) -> None:
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 0:
        raise ValueError(f"n_iters must be an int >= 0, got {n_iters!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (
            math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float))
                            or not (math.isfinite(tol) and tol >= 0)):
        raise ValueError(f"tol must be None or a finite float >= 0, got {tol!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, "
                        f"got {type(generator).__name__}")


def check_state(state, layout: Layout, device: torch.device) -> None:
    if state is None:
        return
    if not isinstance(state, PowerIterState):
        raise TypeError("state must be the .state of an earlier lipkern result, "
                        f"got {type(state).__name__}")
    if state.meta != layout.meta:
        raise ValueError("state was computed for different layers (shapes or specs differ "
                         "from this call's); pass state=None for a cold start")
    if state.x.device != device or state.u.device != device:
        raise ValueError(f"state is on {state.x.device} but the weights are on {device}; "
                         f"move it with state.to(device)")
    if tuple(state.x.shape) != (layout.total_x,) or tuple(state.u.shape) != (layout.total_y,):
        raise ValueError(f"state.x / state.u must have shapes ({layout.total_x},) / "
                         f"({layout.total_y},) for these layers, got {tuple(state.x.shape)} / "
                         f"{tuple(state.u.shape)}")


def validate_call(weights, specs, state, n_iters, eps, tol, backend, generator,
                  finite: bool, variant: str = "power"
                  ) -> Tuple[Tuple[torch.Tensor, ...], Layout]:
    """Everything :func:`fused_power_iter` checks, in order; returns the weights as a tuple
    and the packed layout."""
    weights = check_weights(weights)
    specs = check_specs(specs, len(weights))
    check_scalars(n_iters, eps, tol, backend, generator)
    check_variant(variant, tol)
    layout = layout_for(weight_shapes(weights), specs)
    check_state(state, layout, weights[0].device)
    if finite:
        check_finite(weights)
    return weights, layout
