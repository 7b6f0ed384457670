"""What :func:`lipkern.fused_power_iter` returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch

from .layout import PowerIterState


@dataclass(frozen=True)
class PowerIterResult:
    """Per-layer spectral-norm estimates and the network bound they give.

    Attributes:
        sigmas: (L,) float32 (float64 for float64 weights), differentiable w.r.t. every
            weight by the implicit rule (x and u held constant). Power-iteration estimates:
            each is <= the true sigma, approaching it from below.
        lipschitz: () ``prod(sigmas)``, differentiable; ``d/dsigma_l`` is the product of the
            others (no division, so a zero sigma gives no NaN). May overflow float32 for deep
            nets: prefer ``log_lipschitz``.
        log_lipschitz: () ``sum(log(sigmas))`` (-inf if a sigma is 0), differentiable.
        state: :class:`PowerIterState`, detached packed vectors for a warm start.
    """
    sigmas: torch.Tensor
    lipschitz: torch.Tensor
    log_lipschitz: torch.Tensor
    state: PowerIterState


@dataclass(frozen=True)
class NormalizeResult:
    """What :func:`lipkern.fused_normalize` returns.

    Attributes:
        weights: list of L tensors ``W_l / sigma_l``, each shaped and typed as its input
            weight, differentiable w.r.t. it (spectral_norm's rule: the vectors held constant).
        sigmas: (L,) float32 (float64 for float64 weights) estimates, differentiable.
        state: :class:`PowerIterState` for a warm start (both vectors with
            ``variant="spectral_norm"``).
    """
    weights: List[torch.Tensor]
    sigmas: torch.Tensor
    state: PowerIterState
