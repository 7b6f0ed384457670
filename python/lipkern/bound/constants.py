"""Exact Lipschitz constants of elementwise activations (max |f'|), and what rounding does
to the few that are computed numerically."""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# constants found by a numerical search are the max of |f'| at points found, so from below:
# they are raised by this relative amount (the search is accurate to ~1e-12 in float64)
SEARCH_INFLATION = 1e-9


def _gelu_constant() -> float:
    # d/dx x Phi(x) = Phi(x) + x phi(x), maximal where phi(x)(2 - x^2) = 0, i.e. x = sqrt 2
    x = math.sqrt(2.0)
    return 0.5 * (1 + math.erf(x / math.sqrt(2))) + x * math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _max_derivative(f: Callable[[torch.Tensor], torch.Tensor], lo: float, hi: float) -> float:
    """max |f'(x)| on [lo, hi] (float64 grid of 2e5 points, then golden-section refinement
    around the best point), raised by SEARCH_INFLATION: for smooth activations whose maximum
    has no closed form (|f'| -> its limits outside [lo, hi], below the max here)."""
    x = torch.linspace(lo, hi, 200001, dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(f(x).sum(), x)
    i = int(d.abs().argmax())
    x = x.detach()
    a, b = float(x[max(i - 1, 0)]), float(x[min(i + 1, len(x) - 1)])

    def g(t):
        t = torch.tensor(t, dtype=torch.float64, requires_grad=True)
        (dt,) = torch.autograd.grad(f(t), t)
        return abs(float(dt))

    r = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        c, e = b - r * (b - a), a + r * (b - a)
        if g(c) > g(e):
            b = e
        else:
            a = c
    return max(g((a + b) / 2), float(d.abs().max())) * (1 + SEARCH_INFLATION)


_CACHE: Dict[str, float] = {}


def _cached(key: str, make: Callable[[], float]) -> float:
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def gelu_constant(approximate: str = "none") -> float:
    if approximate == "none":
        return _gelu_constant() * (1 + SEARCH_INFLATION)  # erf/exp rounding
    return _cached("gelu_tanh", lambda: _max_derivative(
        lambda t: F.gelu(t, approximate="tanh"), -10, 10))


def silu_constant() -> float:
    return _cached("silu", lambda: _max_derivative(F.silu, -10, 10))


def mish_constant() -> float:
    return _cached("mish", lambda: _max_derivative(F.mish, -10, 10))


def activation_constant(module: nn.Module) -> Optional[float]:
    """The exact Lipschitz constant (max |f'|) of an elementwise activation module, or None."""
    if type(module) in (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Hardtanh, nn.Identity, nn.Softsign,
                        nn.CELU, nn.Tanhshrink, nn.Hardsigmoid):
        # CELU: derivative exp(x / alpha) <= 1 below 0; Tanhshrink: 1 - tanh' in [0, 1);
        # Hardsigmoid: slope 1/6 (listed with 1: still a bound; exact below)
        return 1.0 / 6 if type(module) is nn.Hardsigmoid else 1.0
    if type(module) is nn.Sigmoid:
        return 0.25
    if type(module) is nn.LeakyReLU:
        return max(1.0, abs(module.negative_slope))
    if type(module) is nn.ELU:
        return max(1.0, float(module.alpha))  # derivative alpha e^x below 0
    if type(module) is nn.SELU:
        return 1.0507009873554805 * 1.6732632423543772  # scale * alpha: slope just below 0
    if type(module) is nn.Softplus:
        return 1.0  # derivative sigmoid(beta x) < 1
    if type(module) is nn.GELU:
        return gelu_constant(module.approximate)
    if type(module) is nn.SiLU:
        return silu_constant()
    if type(module) is nn.Mish:
        return mish_constant()
    if type(module) is nn.Hardswish:
        return 1.5  # (2x + 3) / 6 on (-3, 3), largest at x -> 3
    return None
