"""``lipkern.fused_power_iter`` and ``lipkern.fused_normalize``: validate -> pack -> pick
backend -> the registered op."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .backends import choose_backend
from .layout import PowerIterState, initial_u, initial_x
from .ops import grouped
from .ops.normalize import normalize_op
from .ops.power_iter import call_op
from .reference import divide
from .result import NormalizeResult, PowerIterResult
from .spec import ConvSpec
from .validate import compute_dtype, validate_call


def fused_power_iter(weights: Sequence[torch.Tensor],
                     specs: Optional[Sequence[Optional[ConvSpec]]] = None, *,
                     state: Optional[PowerIterState] = None, n_iters: int = 5,
                     eps: float = 1e-12, tol: Optional[float] = None, backend: str = "auto",
                     generator: Optional[torch.Generator] = None,
                     check_finite: bool = True, variant: str = "power",
                     precision: str = "ieee") -> PowerIterResult:
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
        backend: "auto" | "triton" | "cuda" | "cpp" | "grouped" | "torch". An explicit
            backend that cannot run here raises :class:`lipkern.BackendUnavailableError` (a
            ValueError). "grouped" runs every bucket of equal-geometry layers as one grouped
            conv / batched matmul per phase (:mod:`lipkern.ops.grouped`); "auto" picks by
            the committed measurements (:mod:`lipkern.evidence`; :func:`lipkern.explain`
            says which backend a call takes and why).
        generator: seeds the cold-start vectors (drawn on the generator's device).
        check_finite: raise ValueError on NaN/Inf weights (one reduction and one host sync;
            pass False inside a tight training loop).
        variant: "power" (above) or "spectral_norm": torch's spectral_norm update, both
            vectors carried in ``state`` (``state.x`` is torch's ``v``, ``state.u`` its
            ``u``), per iteration ``u = normalize(A x)``, ``x = normalize(A^T u)``, then
            ``sigma = u^T A x``; ``n_iters=0`` evaluates ``u0^T A x0`` (torch's eval mode).
            No ``tol``. Used by :mod:`lipkern.nn` to match per-layer spectral_norm exactly.
        precision: "ieee" | "tf32x3" | "tf32", the conv products of the Triton v2 kernel
            (opt-in: ``LIPKERN_TRITON_V2=1``; a precision other than "ieee" also selects it):
            "tf32x3" three tf32 tensor-core products per step (fp32-level error), "tf32"
            one, on operands rounded to nearest where they are produced (never raw fp32 into
            a tf32 dot: that truncation biases sigma low); norms and sigma always come from
            fp32 accumulators. GPU only: ignored (the result is "ieee") on CPU tensors, on
            other backends and for layers v2 does not cover (they run v1, ieee). The default
            stays "ieee" until a GPU run has measured the sigma error of each (predicted from
            a CPU emulation: tf32x3 ~2e-7 median relative, tf32-rounded ~3e-6; see
            bench/NOTES.md, issue 13): the default then becomes the fastest one within 1e-5.

    Returns:
        :class:`PowerIterResult` with ``sigmas`` (L,), ``lipschitz`` (), ``log_lipschitz`` ()
        -- float32 (float64 for float64 weights), differentiable w.r.t. every weight -- and
        ``state``. Bf16/fp16 weights iterate in float32, also under autocast.
    """
    weights, layout, chosen, x0, u0 = _prepare(weights, specs, state, n_iters, eps, tol,
                                               backend, generator, check_finite, variant)
    sigmas, lip, log_lip, x, u = call_op(
        _with_precision(chosen, precision, x0.device), list(weights), x0, u0,
        list(layout.meta), n_iters, float(eps), -1.0 if tol is None else float(tol))
    return PowerIterResult(sigmas, lip, log_lip, PowerIterState(x, u, layout.meta))


PRECISIONS = ("ieee", "tf32x3", "tf32")


def _with_precision(backend: str, precision: str, device: torch.device) -> str:
    """The op's backend string: "triton:<precision>" runs the v2 kernel in that precision
    (GPU only); anything else ignores precision (documented in fused_power_iter)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if backend == "triton" and precision != "ieee" and device.type == "cuda":
        return f"triton:{precision}"
    return backend


def fused_normalize(weights: Sequence[torch.Tensor],
                    specs: Optional[Sequence[Optional[ConvSpec]]] = None, *,
                    state: Optional[PowerIterState] = None, n_iters: int = 5,
                    eps: float = 1e-12, tol: Optional[float] = None, backend: str = "auto",
                    generator: Optional[torch.Generator] = None,
                    check_finite: bool = True, variant: str = "power") -> NormalizeResult:
    """Every weight divided by its spectral norm, ``W_l / sigma_l``, for many layers at once.

    The same power iteration as :func:`fused_power_iter` (same arguments and ``sigmas``,
    ``state``); on the GPU (``backend="triton"``, what "auto" picks for CUDA tensors) the
    division happens in the same single kernel launch, and the backward of all the normalized
    weights is one more launch -- so normalizing a whole network costs two launches per
    training step whatever its depth. Other backends run the fused iteration and then one
    division per layer (same values and gradients).

    Returns:
        :class:`NormalizeResult`: ``weights`` (L tensors shaped and typed like the inputs,
        float32 arithmetic for bf16/fp16), ``sigmas`` (L,), ``state``. Gradients follow
        spectral_norm's rule (vectors held constant; see :func:`lipkern.reference.normalize`).
        A sigma of 0 gives inf/NaN entries, as ``W / sigma`` does in torch.
    """
    weights, layout, chosen, x0, u0 = _prepare(weights, specs, state, n_iters, eps, tol,
                                               backend, generator, check_finite, variant,
                                               op="normalize")
    tol = -1.0 if tol is None else float(tol)
    if chosen != "triton":
        sigmas, _, _, x, u = call_op(chosen, list(weights), x0, u0, list(layout.meta), n_iters,
                                     float(eps), tol)
        if chosen == "grouped":  # one division per bucket, not per layer
            outs = grouped.divide_weights(list(weights), sigmas, layout)
        else:
            outs = [divide(w, s) for w, s in zip(weights, sigmas.unbind(0))]
    else:
        sigmas, x, u, what = normalize_op(list(weights), x0, u0, list(layout.meta), n_iters,
                                          float(eps), tol)
        # one split (one autograd node, whose backward is one cat) and a view per layer
        outs = [t.view(w.shape) for t, w in zip(
            what.split([g.w_numel for g in layout.geoms]), weights)]
    return NormalizeResult(outs, sigmas, PowerIterState(x, u, layout.meta))


def _prepare(weights, specs, state, n_iters, eps, tol, backend, generator, check_finite,
             variant, op="power_iter"):
    """validate -> pack -> pick backend; the start vectors in the compute dtype."""
    weights, layout = validate_call(weights, specs, state, n_iters, eps, tol, backend,
                                    generator, check_finite and not torch.compiler.is_compiling(),
                                    variant)
    device, dtype = weights[0].device, weights[0].dtype
    chosen = choose_backend(backend, layout, device, dtype, op)
    cdtype = compute_dtype(dtype)
    x0 = state.x if state is not None else initial_x(layout, device, cdtype, generator)
    u0 = None
    if variant == "spectral_norm":
        u0 = state.u if state is not None else initial_u(layout, device, cdtype, generator)
        # contiguous: a state may be a strided or expanded (stride-0) view, and the kernels
        # read the packed vectors as flat buffers
        u0 = u0.to(cdtype).contiguous()
    return weights, layout, chosen, x0.to(cdtype).contiguous(), u0
