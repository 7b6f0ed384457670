r"""``lipkern.lipschitz_bound``: a network's Lipschitz constant (l2 -> l2), read off the model.

The model is traced with torch.fx (every op with a rule is a leaf) and run once on the
example input, so every op's arguments are concrete (shapes, sizes, kernels computed at run
time). Every input-dependent node gets the log of a Lipschitz constant of the map from the
network input to that node's output, by the rule of its op (:mod:`lipkern.bound.rules`,
one row per op, each with its constant and the reason it holds):

* linear layers (Linear, Conv1d/2d, ConvTranspose1d/2d, F.linear/conv, ``x @ W``, average
  pools as the linear operators they are): ``sigma * L(arg)``;
* fixed-constant maps (activations, BatchNorm in eval, max pooling, dropout, reshapes,
  sums and means over dims, scalings): ``c * L(arg)``;
* ``a + alpha b``: ``L(a) + |alpha| L(b)``; concatenation: ``sqrt(sum L_i^2)``.

Constants combine along every path of the graph, in log space (no overflow; float64 for
float64 models), differentiably w.r.t. the weights. Models fx cannot trace are read by
forward hooks only when they really are a chain of modules.

Three numbers, never confused:

* ``report.estimate``: the product bound with every sigma from ONE fused power iteration
  (:func:`lipkern.fused_power_iter`): an estimate of it from below;
* ``report.upper``: the same combination with certified per-layer bounds
  (:func:`lipkern.certified_sigma`, one call for all layers): an upper bound of the
  network's Lipschitz constant that holds (``report.bound`` is this number);
* ``report.lower`` (with ``inputs=``): the largest local Jacobian norm at those inputs, by
  power iteration with jvp/vjp: a lower bound of the true constant.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..certified import certified_sigma
from ..layout import PowerIterState
from ..power_iter import fused_power_iter
from ..spec import ConvSpec
from .constants import activation_constant
from .graph import Plan, read_chain, read_fx, trace
from .lower import local_lower_bound
from .rules import INDEPENDENT, Affine, NoRule, Scale, Stack

__all__ = ["lipschitz_bound", "LipschitzReport", "LayerRow", "activation_constant",
           "local_lower_bound", "NoRule"]

Constant = Union[float, Callable[..., float]]


@dataclass
class LayerRow:
    """One node with a constant: its estimate (power iteration for linear layers) and its
    certified value (``upper``; None when not certified), both 0-d tensors."""
    name: str
    kind: str
    shape: Tuple[int, ...]
    estimate: torch.Tensor
    upper: Optional[torch.Tensor]
    note: str = ""

    @property
    def gap(self) -> float:
        """upper / estimate (1 for exact constants)."""
        if self.upper is None:
            return float("nan")
        e, u = float(self.estimate.detach()), float(self.upper.detach())
        return u / e if e > 0 else (1.0 if u == 0 else float("inf"))


@dataclass
class LipschitzReport:
    """``estimate``/``log_estimate``: power-iteration product (an estimate); ``upper``/
    ``log_upper``: certified upper bound (None with ``certify=False``); ``lower``: the
    largest local Jacobian norm at ``inputs`` (None without them). ``bound``/``log_bound``
    are ``upper``/``log_upper``. All but ``lower`` are differentiable w.r.t. the weights.
    ``layers``: a :class:`LayerRow` per node with a constant; ``state``: warm start."""
    estimate: torch.Tensor
    log_estimate: torch.Tensor
    upper: Optional[torch.Tensor]
    log_upper: Optional[torch.Tensor]
    lower: Optional[torch.Tensor] = None
    layers: List[LayerRow] = field(default_factory=list)
    state: Optional[PowerIterState] = None
    method: str = "torch.fx"
    # what went into the fused calls, in order: (name, weight, ConvSpec or None)
    fused_layers: List[Tuple[str, torch.Tensor, Optional[ConvSpec]]] = field(default_factory=list)

    @property
    def bound(self) -> torch.Tensor:
        return self._need_upper(self.upper)

    @property
    def log_bound(self) -> torch.Tensor:
        return self._need_upper(self.log_upper)

    def _need_upper(self, v):
        if v is None:
            raise ValueError("this report has no certified bound (certify=False or "
                             "mode='matrix'); report.estimate is an estimate, not a bound")
        return v

    def __str__(self) -> str:
        w = max([len(r.name) for r in self.layers] + [4])
        k = max([len(r.kind) for r in self.layers] + [4])
        lines = [f"{'name':<{w}}  {'kind':<{k}}  {'input shape':<20}  {'estimate':>10}  "
                 f"{'certified':>10}  {'gap':>6}",
                 f"{'-' * w}  {'-' * k}  {'-' * 20}  {'-' * 10}  {'-' * 10}  {'-' * 6}"]
        for r in self.layers:
            up = "-" if r.upper is None else f"{float(r.upper.detach()):.6g}"
            gap = "-" if r.upper is None else f"{r.gap:.4f}"
            lines.append(f"{r.name:<{w}}  {r.kind:<{k}}  {str(tuple(r.shape)):<20}  "
                         f"{float(r.estimate.detach()):>10.6g}  {up:>10}  {gap:>6}"
                         f"{'  ' + r.note if r.note else ''}")
        lines.append(f"estimate (power iteration, from below): "
                     f"{float(self.estimate.detach()):.6g} "
                     f"(log {float(self.log_estimate.detach()):.6g})")
        if self.upper is not None:
            lines.append(f"Lipschitz upper bound (certified): {float(self.upper.detach()):.6g} "
                         f"(log {float(self.log_upper.detach()):.6g})")
        if self.lower is not None:
            lines.append(f"lower bound (local Jacobian norm at the inputs): "
                         f"{float(self.lower):.6g}")
        lines.append(f"graph read by {self.method}")
        return "\n".join(lines)


def _as(c, dtype) -> torch.Tensor:
    """A constant as a tensor of dtype (Python floats straight to dtype: no float32 hop)."""
    return c.to(dtype) if isinstance(c, torch.Tensor) else torch.tensor(float(c), dtype=dtype)


def _log(c, dtype) -> torch.Tensor:
    c = _as(c, dtype)
    pos = c > 0
    return torch.where(pos, torch.log(torch.where(pos, c, torch.ones_like(c))),
                       torch.full_like(c, -math.inf))


def evaluate(plan: Plan, log_sigma: Optional[torch.Tensor], dtype,
             inputs: List[Any]) -> torch.Tensor:
    """log L at the output: the terms of the plan combined in graph order."""
    env: Dict[Any, torch.Tensor] = {i: torch.zeros((), dtype=dtype) for i in inputs}
    for node, term, deps in plan.steps:
        if isinstance(term, Scale):
            if len(deps) != 1:
                raise NoRule(f"lipschitz_bound: node {node} has {len(deps)} input-dependent "
                             f"arguments but its rule takes one")
            v = _log(term.c, dtype) + env[deps[0]]
            if term.layer is not None:
                v = v + log_sigma[term.layer]
        elif isinstance(term, Affine):
            if not term.coefs:
                raise NoRule(f"lipschitz_bound: node {node}: no input-dependent summand")
            v = torch.logsumexp(torch.stack([_log(c, dtype) + env[n]
                                             for n, c in term.coefs.items()]), 0)
        elif isinstance(term, Stack):
            v = 0.5 * torch.logsumexp(torch.stack([2 * env[p] for p in term.parts]), 0)
        else:
            raise TypeError(f"unknown term {term!r}")
        env[node] = v
    return env[plan.output]


def lipschitz_bound(model: nn.Module, example_input, *, n_iters: int = 10,
                    mode: str = "operator", constants: Optional[Dict[Any, Constant]] = None,
                    state: Optional[PowerIterState] = None, backend: str = "auto",
                    generator: Optional[torch.Generator] = None,
                    check_finite: bool = True, certify: bool = True,
                    inputs=None, lower_iters: int = 20) -> LipschitzReport:
    """Lipschitz constant (l2 -> l2) of ``model`` at inputs shaped like ``example_input``:
    estimate, certified upper bound, and (with ``inputs``) a lower bound.

    Args:
        model: an ``nn.Module``. BatchNorm must be in eval mode; dropout in train mode counts
            its 1/(1-p) scaling.
        example_input: a tensor (or a tuple of positional inputs) of the shape the bound is
            for: it fixes every conv's input size; the model is run on it once.
        n_iters: power iterations of the one fused call over every linear layer (with
            ``state`` from the previous step, 1-2 suffice): sets ``estimate`` only.
        mode: "operator" (true conv operator norms) or "matrix" (reshaped kernels, torch's
            spectral_norm quantity: NOT a bound for convs, so no ``upper``).
        constants: overrides and additions for ops without a rule, keyed by a module's
            qualified name or type, a function (e.g. ``torch.erf``), a method name (e.g.
            ``"cumsum"``) or an fx node name: a number, or ``callable(module, input_shape)``
            for modules / ``callable(input_shape)`` otherwise.
        state, backend, generator, check_finite: passed to :func:`fused_power_iter`.
        certify: compute ``upper`` (:func:`lipkern.certified_sigma` on all linear layers in
            one call; costs about as much as tens of power iterations on conv nets).
        inputs: a batch (tensor, or tuple for several positional inputs) at which ``lower``
            is computed; None: no lower bound.
        lower_iters: power iterations of ``J^T J`` (jvp, vjp) for ``lower``.

    Returns:
        :class:`LipschitzReport`.

    Raises:
        ValueError (:class:`lipkern.bound.NoRule`) naming the node whose constant is unknown
        and how to give it, or whose settings (padding mode, BatchNorm in train mode,
        division by zero) have none; ValueError for untraceable models that are not chains.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if mode not in ("operator", "matrix"):
        raise ValueError(f"mode must be 'operator' or 'matrix', got {mode!r}")
    if isinstance(constants, (list, tuple)) or (constants is not None
                                                and not isinstance(constants, dict)):
        raise TypeError("constants must be a dict")
    constants = dict(constants or {})
    example = example_input if isinstance(example_input, tuple) else (example_input,)
    gm, why = trace(model, constants)
    if gm is not None:
        plan = read_fx(model, gm, example, constants)
        starts = [n for n in gm.nodes if n.op == "placeholder"]
        method = "torch.fx"
    else:
        plan = read_chain(model, example, constants, why)
        starts = ["input"]
        method = "forward hooks (a chain of modules)"

    floats = [p for p in model.parameters() if p.is_floating_point()]
    floats += [t for t in example if isinstance(t, torch.Tensor) and t.is_floating_point()]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in floats) else torch.float32
    names = [n for n, _, _ in plan.layers]
    weights = [w.to(dtype) for _, w, _ in plan.layers]
    specs = [s if mode == "operator" else None for _, _, s in plan.layers]
    est = cert = None
    new_state = None
    if weights:
        res = fused_power_iter(weights, specs, state=state, n_iters=n_iters, backend=backend,
                               generator=generator, check_finite=check_finite)
        est, new_state = res.sigmas.to(dtype), res.state
        if certify and mode == "operator":
            cert = certified_sigma(weights, specs, generator=generator).to(dtype)
    log_est = evaluate(plan, None if est is None else _log(est, dtype), dtype, starts)
    log_up = None
    if certify and mode == "operator":
        log_up = evaluate(plan, None if cert is None else _log(cert, dtype), dtype, starts)

    rows = []
    for name, kind, shape, term in plan.rows:
        c = _as(term.c, dtype)
        e = c if term.layer is None else c * est[term.layer]
        u = None if log_up is None else (c if term.layer is None else c * cert[term.layer])
        rows.append(LayerRow(name, kind, shape, e, u, term.note))
    lower = None
    if inputs is not None:
        lower = local_lower_bound(model, inputs, n_iters=lower_iters, generator=generator)
    return LipschitzReport(torch.exp(log_est), log_est,
                           None if log_up is None else torch.exp(log_up), log_up, lower,
                           rows, new_state, method, list(zip(names, weights, specs)))
