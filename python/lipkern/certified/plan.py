"""What the C++ layer op needs of a layer's geometry alone, computed once per geometry.

``certified_sigma`` runs every training step on the same layers; the grid, its frequencies,
the phase table and the taps' slots depend only on the shapes (``LayerGeom``), so they are
kept here (a few hundred frequencies per layer: ~0.5 ms of Python and small tensors each
time otherwise). The cached tensors are inputs only: nothing writes them.
"""
from __future__ import annotations

import functools
from typing import List, NamedTuple, Tuple

import torch

from ..spec import KIND_DENSE, LayerGeom
from .gram import tap_inner
from .symbol import frequencies, layout, phase_angles, phase_table


class LayerPlan(NamedTuple):
    """grid (Mh, Mw); qh, qw: taps per axis; factor: the output multiplicity; freqs: the F
    frequencies (one per conjugate pair); fq: (F, 2) int64 of them; ph: (F, Q, 2) float32
    (cos, sin) phase table; used: (P, Qh, Qw) uint8, tap q reaches phase block p; cos_diff: (F, Q^2)
    float32, cos(angle_fq - angle_fr): ``tr H_f = sum_(q, r) <T_q, T_r> cos_diff[f, (q, r)]``
    (the frequencies' ranking)."""
    grid: Tuple[int, int]
    qh: int
    qw: int
    factor: float
    freqs: List[Tuple[int, int]]
    fq: torch.Tensor
    ph: torch.Tensor
    used: torch.Tensor
    cos_diff: torch.Tensor


@functools.lru_cache(maxsize=512)
def layer_plan(g: LayerGeom) -> LayerPlan:
    """The plan of a CPU layer of geometry ``g`` (cached per geometry; normal tensors even
    when first made under ``torch.inference_mode``)."""
    with torch.inference_mode(False):
        return _make_plan(g)


def _make_plan(g: LayerGeom) -> LayerPlan:
    if g.kind == KIND_DENSE:
        grid, qh, qw, factor = (1, 1), 1, 1, 1.0
        used = torch.ones(1, 1, 1, dtype=torch.uint8)
    else:
        lo = layout(g)
        grid, qh, qw, factor = lo.grid, lo.qh, lo.qw, lo.factor
        used = torch.zeros(lo.phases * qh * qw, dtype=torch.uint8)
        used[list(lo.idx)] = 1  # slot = phase * Q + shift
        used = used.reshape(lo.phases, qh, qw)
    freqs = frequencies(grid)
    angles = phase_angles(freqs, grid, qh, qw, torch.device("cpu"))  # (F, Q) float64
    cos_diff = torch.cos(angles[:, :, None] - angles[:, None, :]).flatten(1).to(torch.float32)
    fq = torch.tensor(freqs, dtype=torch.int64).reshape(-1, 2)
    return LayerPlan(grid, qh, qw, factor, freqs, fq, phase_table(angles), used,
                     cos_diff.contiguous())


def trace_order(taps32: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
    """(G * F,) int64: the flat ids g * F + f by decreasing ``tr H_f = ||A_f||_F^2`` (float32:
    a ranking for the estimates, not a bound). taps32: (G, Q, co, ci) float32."""
    k = tap_inner(taps32)  # (G, Q, Q)
    return (k.flatten(1) @ plan.cos_diff.T).flatten().argsort(descending=True)
