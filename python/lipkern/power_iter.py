"""``lipkern.fused_power_iter``: validate -> pack -> pick backend -> the registered op."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .backends import resolve_backend
from .layout import PowerIterState, initial_u, initial_x
from .ops.power_iter import call_op
from .result import PowerIterResult
from .spec import ConvSpec
from .validate import compute_dtype, validate_call


def fused_power_iter(weights: Sequence[torch.Tensor],
                     specs: Optional[Sequence[Optional[ConvSpec]]] = None, *,
                     state: Optional[PowerIterState] = None, n_iters: int = 5,
                     eps: float = 1e-12, tol: Optional[float] = None, backend: str = "auto",
                     generator: Optional[torch.Generator] = None,
                     check_finite: bool = True, variant: str = "power") -> PowerIterResult:
    """Spectral norms of many layers at once, and the network's Lipschitz upper bound.

    Power iteration (see :mod:`lipkern.reference` for the exact math) on every layer in one
    call; on the GPU the forward is one kernel launch and the backward is one more.

    Args:
        weights: sequence of L tensors, one dtype (float32, bfloat16, float16 or float64) and
            one device: 2-D dense ``(out, in)``, or 3-D/4-D conv kernels
            ``(C_out, C_in // groups, [kh,] kw)`` (``(C_in, C_out // groups, ...)`` for
            transposed convs).
        specs: None, or L entries: ``None`` reads the weight as a matrix (conv kernels
            reshaped to ``(C_out, -1)``, as torch's spectral_norm does), a
            :class:`ConvSpec` gives the true conv operator at that input size.
        state: ``.state`` of an earlier result for the same layers: warm start (one
            iteration per training step then suffices, as in spectral_norm).
        n_iters: iterations (>= 0) before the final sigma = ||A x||.
        eps: floor of every norm that divides.
        tol: if set, a layer stops once its estimate changes by <= tol (relative) between two
            iterations; decided inside the kernel, with no host synchronisation.
        backend: "auto" | "triton" | "cuda" | "cpp" | "torch". An explicit backend that cannot
            run here raises :class:`lipkern.BackendUnavailableError` (a ValueError).
        generator: seeds the cold-start vectors (drawn on the generator's device).
        check_finite: raise ValueError on NaN/Inf weights (one reduction and one host sync;
            pass False inside a tight training loop).
        variant: "power" (above) or "spectral_norm": torch's spectral_norm update, both
            vectors carried in ``state`` (``state.x`` is torch's ``v``, ``state.u`` its
            ``u``), per iteration ``u = normalize(A x)``, ``x = normalize(A^T u)``, then
            ``sigma = u^T A x``; ``n_iters=0`` evaluates ``u0^T A x0`` (torch's eval mode).
            No ``tol``. Used by :mod:`lipkern.nn` to match per-layer spectral_norm exactly.

    Returns:
        :class:`PowerIterResult` with ``sigmas`` (L,), ``lipschitz`` (), ``log_lipschitz`` ()
        -- float32 (float64 for float64 weights), differentiable w.r.t. every weight -- and
        ``state``. Bf16/fp16 weights iterate in float32, also under autocast.
    """
    weights, layout = validate_call(weights, specs, state, n_iters, eps, tol, backend,
                                    generator, check_finite and not torch.compiler.is_compiling(),
                                    variant)
    device, dtype = weights[0].device, weights[0].dtype
    chosen = resolve_backend(backend, device, dtype)
    cdtype = compute_dtype(dtype)
    x0 = state.x if state is not None else initial_x(layout, device, cdtype, generator)
    u0 = None
    if variant == "spectral_norm":
        u0 = state.u if state is not None else initial_u(layout, device, cdtype, generator)
        u0 = u0.to(cdtype)
    sigmas, lip, log_lip, x, u = call_op(
        chosen, list(weights), x0.to(cdtype), u0, list(layout.meta), n_iters, float(eps),
        -1.0 if tol is None else float(tol))
    return PowerIterResult(sigmas, lip, log_lip, PowerIterState(x, u, layout.meta))
