"""Layers for 1-Lipschitz networks (deel-torchlip style): thin wrappers of the fused op."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

from ..power_iter import fused_power_iter
from ..spec import ConvSpec
from .parametrization import spectral_norm

__all__ = ["SpectralLinear", "SpectralConv2d", "ScaledAvgPool2d"]


class SpectralLinear(nn.Linear):
    """``nn.Linear`` with orthogonal init and spectral normalization: sigma(W) = 1 (estimated by
    ``n_power_iterations`` per training forward, warm-started). For 1-Lipschitz networks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 n_power_iterations: int = 1, **kwargs):
        super().__init__(in_features, out_features, bias, **kwargs)
        nn.init.orthogonal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        spectral_norm(self, n_power_iterations=n_power_iterations)


class SpectralConv2d(nn.Conv2d):
    """``nn.Conv2d`` with orthogonal init, divided by its conv *operator's* sigma at
    ``input_size`` (given, or taken from the first forward): a 1-Lipschitz convolution."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 input_size=None, n_power_iterations: int = 1, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, **kwargs)
        nn.init.orthogonal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        spectral_norm(self, n_power_iterations=n_power_iterations, mode="operator",
                      input_size=input_size)


class ScaledAvgPool2d(nn.AvgPool2d):
    """Average pooling rescaled to Lipschitz constant 1: multiplied by 1 / sigma of the pooling
    operator at the input's size (sqrt(kh * kw) for non-overlapping windows without padding;
    otherwise computed once per input size by power iteration to convergence)."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__(kernel_size, stride, padding)
        self._scales = {}

    def _scale(self, size: Tuple[int, int]) -> float:
        k = _as_pair(self.kernel_size)
        s = _as_pair(self.stride if self.stride is not None else self.kernel_size)
        p = _as_pair(self.padding)
        if s == k and p == (0, 0):
            return (k[0] * k[1]) ** 0.5
        if size not in self._scales:
            w = torch.full((1, 1, *k), 1.0 / (k[0] * k[1]), dtype=torch.float64)
            r = fused_power_iter([w], [ConvSpec(size, stride=s, padding=p)], n_iters=500,
                                 tol=1e-12, generator=torch.Generator().manual_seed(0))
            self._scales[size] = 1.0 / float(r.sigmas[0])
        return self._scales[size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self._scale(tuple(x.shape[-2:]))


def _as_pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
