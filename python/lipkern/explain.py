"""``lipkern.explain``: which backend and path each layer of a call takes, and why.

Runs nothing on the weights: it resolves the call exactly as :func:`lipkern.fused_power_iter`
/ :func:`lipkern.fused_normalize` would (same validation, same choice of backend) and
describes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .backends import choose_backend
from .evidence import choose, device_family, shape_class
from .spec import KIND_CONV, KIND_CONV_T, ConvSpec
from .validate import validate_call

_KIND = {KIND_CONV: "conv", KIND_CONV_T: "conv_transpose"}

_PATHS = {
    "triton": "Triton fused kernel: every layer and the product in one launch, the backward "
              "in one more",
    "cuda": "CUDA C++ kernel (csrc/cuda): one launch forward, one backward",
    "cpp": "C++ CPU kernel (csrc/cpu): all layers in one call, split over threads",
    "torch": "per-layer torch loop (the reference's math, one op per layer and phase)",
}


@dataclass(frozen=True)
class LayerPlan:
    index: int
    shape: tuple
    kind: str          # "dense" | "conv" | "conv_transpose"
    backend: str
    path: str
    reason: str


@dataclass(frozen=True)
class Explanation:
    """Per-layer rows (``layers``) and the call-level choice; ``str()`` is a markdown table."""
    backend: str
    device_family: str
    shape_class: str
    reason: str
    layers: List[LayerPlan]

    def __str__(self) -> str:
        head = (f"backend {self.backend!r} on {self.device_family}, shape class "
                f"{self.shape_class!r}: {self.reason}\n\n"
                "| layer | shape | kind | backend | path |\n|---:|---|---|---|---|\n")
        return head + "\n".join(f"| {r.index} | {tuple(r.shape)} | {r.kind} | {r.backend} | "
                                f"{r.path} |" for r in self.layers)


def explain(weights: Sequence[torch.Tensor],
            specs: Optional[Sequence[Optional[ConvSpec]]] = None, *, backend: str = "auto",
            op: str = "power_iter", n_iters: int = 5, eps: float = 1e-12,
            tol: Optional[float] = None, variant: str = "power") -> Explanation:
    """What ``fused_power_iter(weights, specs, backend=backend, ...)`` (``op="power_iter"``)
    or ``fused_normalize(...)`` (``op="normalize"``) runs: the backend (for "auto", the
    measured row of :mod:`lipkern.evidence` behind it) and, per layer, the path (for
    "grouped", the layer's bucket and the one grouped call per phase it shares).

    Raises what the call itself would raise for invalid arguments."""
    if op not in ("power_iter", "normalize"):
        raise ValueError(f"op must be 'power_iter' or 'normalize', got {op!r}")
    weights, layout = validate_call(weights, specs, None, n_iters, eps, tol, backend, None,
                                    False, variant)
    device, dtype = weights[0].device, weights[0].dtype
    chosen = choose_backend(backend, layout, device, dtype, op)
    if backend == "auto":
        reason = "auto: " + choose(layout.geoms, device, dtype, op).reason
    else:
        reason = f"explicit backend={backend!r}"
    if chosen == "grouped":
        from .ops.grouped import describe
        paths = describe(layout)
    else:
        path = _PATHS[chosen]
        if chosen == "triton" and op == "normalize":
            path += " (the forward also writes every W / sigma)"
        elif op == "normalize":
            path += "; then one division W / sigma per layer"
        paths = [path] * layout.num_layers
    rows = [LayerPlan(i, tuple(w.shape), _KIND.get(g.kind, "dense"), chosen, paths[i], reason)
            for i, (w, g) in enumerate(zip(weights, layout.geoms))]
    return Explanation(chosen, device_family(device), shape_class(layout.geoms), reason, rows)
