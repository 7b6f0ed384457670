r"""``lipkern.lipschitz_bound``: a network's Lipschitz upper bound, read off the model itself.

The model is traced with torch.fx (or, when it does not trace, its leaf modules are recorded
in call order with forward hooks and read as a chain). Every node gets the log of a
Lipschitz constant of the map from the network input to that node's output:

* input: log 1 = 0;
* linear layers (Linear, Conv1d/2d, ConvTranspose1d/2d, AvgPool as the linear operator it
  is): ``log sigma + log L(arg)``, every sigma from ONE fused power iteration over all of
  them, convs as true operators at the sizes the example input gives them (``mode="operator"``);
* fixed-constant maps: ``log c + log L(arg)`` (activations with their exact constants,
  BatchNorm in eval as the diagonal scaling it is, max pooling, dropout, reshapes);
* ``a + b`` (residuals: ``x + f(x)`` gives ``1 + L_f``), ``a - b``: ``L(a) + L(b)``;
  concatenation: ``sqrt(sum L_i^2)``; multiplication or division by a constant ``c``:
  ``|c| L``.

Constants of a node combine along every path of the graph, so residual and branched nets get
a bound, not a chain's pretence. All of it is computed in log space (a 100-layer bound does
not overflow ``log_bound``) and is differentiable w.r.t. the weights, so it can be added to a
training loss every step.

Power iteration approaches each sigma from below: with few iterations the result estimates the
bound; with many (or warm starts across training steps, ``state=``) it converges to it.
"""
from __future__ import annotations

import math
import operator
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layout import PowerIterState
from .power_iter import fused_power_iter
from .spec import ConvSpec

Constant = Union[float, Callable[[nn.Module, Tuple[int, ...]], float]]


# ---------------------------------------------------------------- exact constants
def _gelu_constant() -> float:
    # d/dx x Phi(x) = Phi(x) + x phi(x), maximal where phi(x)(2 - x^2) = 0, i.e. x = sqrt 2
    x = math.sqrt(2.0)
    return 0.5 * (1 + math.erf(x / math.sqrt(2))) + x * math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _max_derivative(f: Callable[[torch.Tensor], torch.Tensor], lo: float, hi: float) -> float:
    """max |f'(x)| on [lo, hi] (float64 grid of 2e5 points, then golden-section refinement
    around the best point): for smooth activations whose maximum has no closed form."""
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
    return max(g((a + b) / 2), float(d.abs().max()))


_CACHE: Dict[str, float] = {}


def _cached(key: str, make: Callable[[], float]) -> float:
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def activation_constant(module: nn.Module) -> Optional[float]:
    """The exact Lipschitz constant of an elementwise activation module, or None."""
    if isinstance(module, (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Hardtanh, nn.Identity, nn.Softsign,
                           nn.CELU)):  # CELU: derivative exp(x / alpha) <= 1 below 0
        return 1.0
    if isinstance(module, nn.Sigmoid):
        return 0.25
    if isinstance(module, nn.LeakyReLU):
        return max(1.0, abs(module.negative_slope))
    if isinstance(module, nn.ELU):
        return max(1.0, float(module.alpha))  # derivative alpha e^x below 0
    if isinstance(module, nn.Softplus):
        return 1.0  # derivative sigmoid(beta x) < 1
    if isinstance(module, nn.GELU):
        if module.approximate == "none":
            return _cached("gelu", _gelu_constant)
        return _cached("gelu_tanh", lambda: _max_derivative(
            lambda t: F.gelu(t, approximate="tanh"), -10, 10))
    if isinstance(module, nn.SiLU):
        return _cached("silu", lambda: _max_derivative(F.silu, -10, 10))
    if isinstance(module, nn.Mish):
        return _cached("mish", lambda: _max_derivative(F.mish, -10, 10))
    if isinstance(module, nn.Hardswish):
        return 1.5  # (2x + 3) / 6 on (-3, 3), largest at x -> 3
    return None


_FUNCTIONAL_ACTIVATIONS: Dict[Any, Callable[[tuple, dict], float]] = {
    F.relu: lambda a, k: 1.0, torch.relu: lambda a, k: 1.0, F.relu6: lambda a, k: 1.0,
    torch.tanh: lambda a, k: 1.0, F.tanh: lambda a, k: 1.0, torch.sigmoid: lambda a, k: 0.25,
    F.sigmoid: lambda a, k: 0.25,
    F.leaky_relu: lambda a, k: max(1.0, abs(k.get("negative_slope", a[1] if len(a) > 1 else 0.01))),
    F.elu: lambda a, k: max(1.0, float(k.get("alpha", a[1] if len(a) > 1 else 1.0))),
    F.gelu: lambda a, k: activation_constant(nn.GELU(k.get("approximate", "none"))),
    F.silu: lambda a, k: activation_constant(nn.SiLU()),
    F.softplus: lambda a, k: 1.0,
}
_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
                    torch.permute, torch.transpose, F.dropout, torch.clone}
_SHAPE_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous",
                  "squeeze", "unsqueeze", "clone", "view_as", "reshape_as"}
_ACTIVATION_METHODS = {"relu": 1.0, "tanh": 1.0, "sigmoid": 0.25}


# ---------------------------------------------------------------- the report
@dataclass
class LayerRow:
    """One entry of the bound: a module or function node and its constant."""
    name: str
    kind: str
    shape: Tuple[int, ...]
    constant: Optional[torch.Tensor]  # 0-d; sigma for linear layers
    note: str = ""

    def value(self) -> float:
        return float("nan") if self.constant is None else float(self.constant.detach())


@dataclass
class LipschitzReport:
    """``bound`` (differentiable; may be inf for deep nets: use ``log_bound``), ``log_bound``
    (differentiable), ``layers`` (a :class:`LayerRow` per node that has a constant) and
    ``state`` (warm start for the next call)."""
    bound: torch.Tensor
    log_bound: torch.Tensor
    layers: List[LayerRow] = field(default_factory=list)
    state: Optional[PowerIterState] = None
    method: str = "fx"
    # what went into the fused call, in order: (name, weight, ConvSpec or None)
    fused_layers: List[Tuple[str, torch.Tensor, Optional[ConvSpec]]] = field(default_factory=list)

    def __str__(self) -> str:
        w = max([len(r.name) for r in self.layers] + [4])
        k = max([len(r.kind) for r in self.layers] + [4])
        lines = [f"{'name':<{w}}  {'kind':<{k}}  {'shape':<22}  constant",
                 f"{'-' * w}  {'-' * k}  {'-' * 22}  --------"]
        for r in self.layers:
            lines.append(f"{r.name:<{w}}  {r.kind:<{k}}  {str(tuple(r.shape)):<22}  "
                         f"{r.value():.6g}{'  ' + r.note if r.note else ''}")
        lines.append(f"Lipschitz upper bound: {float(self.bound.detach()):.6g} "
                     f"(log {float(self.log_bound.detach()):.6g}; graph read by {self.method})")
        return "\n".join(lines)


# ---------------------------------------------------------------- per-module rules
_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)


def _conv_spec(m: nn.Module, in_shape: Tuple[int, ...], name: str) -> ConvSpec:
    spatial = tuple(in_shape[2:])
    one_d = isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))
    if len(spatial) != (1 if one_d else 2):
        raise ValueError(f"{name}: expected a batched input (N, C, {'L' if one_d else 'H, W'}),"
                         f" got shape {tuple(in_shape)}")
    pad = m.padding
    if one_d and not isinstance(pad, str):
        pad = (0, pad[0])
    transposed = isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d))
    lift = (lambda v: (1, v[0])) if one_d else (lambda v: tuple(v))
    try:
        return ConvSpec(lift(spatial), stride=lift(m.stride), padding=pad,
                        dilation=lift(m.dilation), groups=m.groups,
                        padding_mode=m.padding_mode, transposed=transposed,
                        output_padding=lift(m.output_padding) if transposed else 0)
    except ValueError as e:
        raise ValueError(f"module {name!r} ({type(m).__name__}): {e}") from None


def _pool_operator(m: nn.Module, in_shape, name: str, dtype, device):
    """AvgPool as a (single-channel, depthwise) conv with weight 1/k^2; None if it is not a
    fixed linear operator we model exactly."""
    if isinstance(m, nn.AdaptiveAvgPool2d):
        h, w = in_shape[-2:]
        out = m.output_size if isinstance(m.output_size, tuple) else (m.output_size,) * 2
        out = tuple(h if o is None else o for o in out)
        if h % out[0] or w % out[1]:
            raise ValueError(f"{name}: AdaptiveAvgPool2d with output {out} on input {(h, w)} "
                             f"has unequal windows; give its constant with constants=")
        k = (h // out[0], w // out[1])
        stride, pad = k, (0, 0)
    else:
        if getattr(m, "ceil_mode", False) or (not getattr(m, "count_include_pad", True)
                                              and any(_pair(m.padding))):
            raise ValueError(f"{name}: AvgPool with ceil_mode or count_include_pad=False is not "
                             f"a fixed linear operator here; give its constant with constants=")
        k = _pair(m.kernel_size)
        stride = _pair(m.stride if m.stride is not None else m.kernel_size)
        pad = _pair(m.padding)
        if isinstance(m, nn.AvgPool1d):
            k, stride, pad = (1, k[0]), (1, stride[0]), (0, pad[0])
    spatial = tuple(in_shape[2:]) if len(in_shape) == 4 else (1, in_shape[-1])
    weight = torch.full((1, 1, *k), 1.0 / (k[0] * k[1]), dtype=dtype, device=device)
    return weight, ConvSpec(spatial, stride=stride, padding=pad)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _max_pool_constant(m: nn.Module, name: str) -> float:
    """Max pooling: each output is 1-Lipschitz in its window, so the map is sqrt(c)-Lipschitz
    where c is the most windows one input lies in (1 for non-overlapping windows)."""
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)):
        k, s, d = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.dilation)
        if isinstance(m, nn.MaxPool1d):
            k, s, d = k[:1], s[:1], d[:1]
        c = 1
        for ki, si, di in zip(k, s, d):
            c *= -(-((ki - 1) * di + 1) // si)
        return math.sqrt(c)
    raise ValueError(f"{name}: unsupported pooling {type(m).__name__}")


def _batchnorm_constant(m: nn.Module, name: str) -> torch.Tensor:
    if m.training:
        raise ValueError(f"module {name!r} ({type(m).__name__}): BatchNorm in train mode "
                         f"normalizes by the batch, which has no fixed Lipschitz constant; "
                         f"call model.eval() first")
    if m.running_var is None:
        raise ValueError(f"module {name!r} ({type(m).__name__}): BatchNorm without running "
                         f"statistics is not supported")
    scale = torch.rsqrt(m.running_var + m.eps)
    if m.weight is not None:
        scale = m.weight * scale
    return scale.abs().max()


# ---------------------------------------------------------------- graph reading
class _Collector:
    """Gathers the linear layers for one fused call, and the fixed constants."""

    def __init__(self, mode: str, dtype: torch.dtype, device: torch.device):
        self.mode, self.dtype, self.device = mode, dtype, device
        self.names: List[str] = []
        self.weights: List[torch.Tensor] = []
        self.specs: List[Optional[ConvSpec]] = []
        self.rows: List[LayerRow] = []

    def linear(self, name, kind, weight, spec, shape) -> int:
        self.names.append(name)
        self.weights.append(weight)
        self.specs.append(spec if self.mode == "operator" else None)
        self.rows.append(LayerRow(name, kind, tuple(shape), None))
        return len(self.weights) - 1

    def fixed(self, name, kind, value, shape, note="") -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            value = torch.tensor(float(value))
        self.rows.append(LayerRow(name, kind, tuple(shape), value, note))
        return value


def _module_rule(name: str, m: nn.Module, in_shape, col: _Collector,
                 constants: Dict[Any, Constant]):
    """("sigma", index) for a fused linear layer, ("const", tensor) otherwise."""
    user = constants.get(name, constants.get(type(m)))
    if user is not None:
        v = user(m, tuple(in_shape)) if callable(user) else user
        return "const", col.fixed(name, type(m).__name__, v, in_shape, "given")
    if isinstance(m, _LINEAR):
        spec = None if isinstance(m, nn.Linear) else _conv_spec(m, in_shape, name)
        return "sigma", col.linear(name, type(m).__name__, m.weight, spec, in_shape)
    if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        w, spec = _pool_operator(m, in_shape, name, col.dtype, col.device)
        return "sigma", col.linear(name, type(m).__name__, w, spec, in_shape)
    c = activation_constant(m)
    if c is not None:
        return "const", col.fixed(name, type(m).__name__, c, in_shape)
    if isinstance(m, (nn.Flatten, nn.Unflatten)):
        return "const", col.fixed(name, type(m).__name__, 1.0, in_shape)
    if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)):
        v = 1.0 / (1.0 - m.p) if m.training and m.p < 1 else 1.0
        return "const", col.fixed(name, type(m).__name__, v, in_shape,
                                  "train mode: 1/(1-p)" if m.training else "")
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)):
        return "const", col.fixed(name, type(m).__name__, _max_pool_constant(m, name), in_shape)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return "const", col.fixed(name, type(m).__name__, _batchnorm_constant(m, name),
                                  in_shape)
    raise ValueError(
        f"lipschitz_bound: module {name!r} ({type(m).__name__}) has no known Lipschitz "
        f"constant; give one with constants={{{name!r}: value}} (or keyed by its type, or a "
        f"callable(module, input_shape) -> value)")


def _record_input_shapes(model: nn.Module, example_input) -> Dict[str, List[Tuple[int, ...]]]:
    """Input shape of every call of every leaf module, in call order (one forward)."""
    shapes: Dict[str, List[Tuple[int, ...]]] = {}
    order: List[str] = []
    handles = []
    for name, m in model.named_modules():
        if name and not list(m.children()):
            def hook(mod, args, _name=name):
                x = args[0] if args else None
                shapes.setdefault(_name, []).append(
                    tuple(x.shape) if isinstance(x, torch.Tensor) else ())
                order.append(_name)
            handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for h in handles:
            h.remove()
    shapes["__order__"] = order  # type: ignore[assignment]
    return shapes


_PLANS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _plan(model: nn.Module, example_input):
    """(input shapes per module, fx graph or None), cached per model, input shape and model
    structure (module names, types and train/eval flags): recording the shapes costs a whole
    forward pass and tracing ~20 ms on a ResNet-18, too much to repeat every training step."""
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    key = (tuple((tuple(t.shape), t.dtype, t.device.type) if isinstance(t, torch.Tensor)
                 else repr(t) for t in inputs),
           tuple((n, type(m), m.training) for n, m in model.named_modules()))
    per_model = _PLANS.setdefault(model, {})
    hit = per_model.get(key)
    if hit is None:
        if len(per_model) > 8:
            per_model.clear()
        hit = per_model[key] = (_record_input_shapes(model, example_input), _trace(model))
    return hit


def _trace(model: nn.Module):
    try:
        import torch.fx
        return torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure: fall back to hooks
        return None


def _log(c: torch.Tensor) -> torch.Tensor:
    c = torch.as_tensor(c, dtype=torch.float32)
    return torch.where(c > 0, torch.log(torch.where(c > 0, c, torch.ones_like(c))),
                       torch.full_like(c, float("-inf")))


def lipschitz_bound(model: nn.Module, example_input, *, n_iters: int = 10,
                    mode: str = "operator", constants: Optional[Dict[Any, Constant]] = None,
                    state: Optional[PowerIterState] = None, backend: str = "auto",
                    generator: Optional[torch.Generator] = None,
                    check_finite: bool = True) -> LipschitzReport:
    """Lipschitz upper bound (l2 -> l2) of ``model`` around inputs shaped like
    ``example_input``, from the model's own graph (see the module docstring).

    Args:
        model: an ``nn.Module``. BatchNorm must be in eval mode; Dropout in train mode counts
            its 1/(1-p) scaling.
        example_input: a tensor (or a tuple of positional inputs) of the shape the bound is
            for: it fixes every conv's input size. Batched, as the model expects.
        n_iters: power iterations of the one fused call over every linear layer (with
            ``state`` from the previous step, 1-2 suffice).
        mode: "operator" (true conv operator norms: a real bound) or "matrix" (reshaped
            kernels, torch's spectral_norm quantity: NOT a bound for convs).
        constants: overrides and additions, keyed by qualified module name or module type:
            a number or ``callable(module, input_shape) -> number``.
        state, backend, generator, check_finite: passed to :func:`fused_power_iter`.

    Returns:
        :class:`LipschitzReport`; ``bound`` and ``log_bound`` are differentiable w.r.t. the
        weights (and BatchNorm scales).

    Raises:
        ValueError naming the module whose constant is unknown, or whose settings (padding
        mode, BatchNorm in train mode) have none.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if mode not in ("operator", "matrix"):
        raise ValueError(f"mode must be 'operator' or 'matrix', got {mode!r}")
    constants = dict(constants or {})
    shapes, gm = _plan(model, example_input)
    modules = dict(model.named_modules())
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    col = _Collector(mode, first.dtype if first is not None else torch.float32,
                     first.device if first is not None else torch.device("cpu"))
    calls: Dict[str, int] = {}

    def next_shape(name):
        i = calls.get(name, 0)
        calls[name] = i + 1
        lst = shapes.get(name) or [()]
        return lst[min(i, len(lst) - 1)]

    # pass 1: every node's rule; linear layers collected for the fused call
    plan: List[Tuple[str, Any, Any]] = []
    if gm is not None:
        method = "torch.fx"
        for node in gm.graph.nodes:
            if node.op == "call_module":
                m = gm.get_submodule(node.target)
                name = node.target
                if name not in modules:  # fx may rename; fall back to the traced module
                    modules[name] = m
                plan.append(("node", node, _module_rule(name, m, next_shape(name), col,
                                                        constants)))
            else:
                plan.append(("node", node, None))
    else:
        method = "forward hooks (read as a chain)"
        for name in shapes["__order__"]:
            plan.append(("chain", name, _module_rule(name, modules[name], next_shape(name),
                                                     col, constants)))

    # the one fused call
    sigmas = None
    new_state = None
    if col.weights:
        res = fused_power_iter(col.weights, col.specs, state=state, n_iters=n_iters,
                               backend=backend, generator=generator, check_finite=check_finite)
        sigmas, new_state = res.sigmas, res.state
        j = 0
        for row in col.rows:
            if row.constant is None:
                row.constant = sigmas[j]
                j += 1

    def log_of(rule):
        kind, v = rule
        return _log(sigmas[v]) if kind == "sigma" else _log(v)

    # pass 2: propagate log constants
    if gm is None:
        log_l = torch.zeros(())
        for _, _, rule in plan:
            log_l = log_l + log_of(rule)
    else:
        env: Dict[Any, torch.Tensor] = {}
        out = None
        for _, node, rule in plan:
            env[node] = _node_log_constant(node, rule, env, log_of, modules)
            if node.op == "output":
                out = env[node]
        log_l = out
    return LipschitzReport(torch.exp(log_l), log_l, col.rows, new_state, method,
                           list(zip(col.names, col.weights, col.specs)))


def _arg_logs(args, env):
    """Log constants of the graph-node arguments (constants and non-tensors contribute none)."""
    import torch.fx
    found = []

    def visit(a):
        if isinstance(a, torch.fx.Node):
            if a in env and env[a] is not None:
                found.append(env[a])
        elif isinstance(a, (list, tuple)):
            for b in a:
                visit(b)
        elif isinstance(a, dict):
            for b in a.values():
                visit(b)
    for a in args:
        visit(a)
    return found


def _node_log_constant(node, rule, env, log_of, modules):
    import torch.fx
    if node.op == "placeholder":
        return torch.zeros(())
    if node.op in ("get_attr",):
        return None  # a parameter or buffer: constant w.r.t. the input
    if node.op == "output":
        logs = _arg_logs(node.args, env)
        if len(logs) != 1:
            raise ValueError("lipschitz_bound: the model must return one tensor")
        return logs[0]
    logs = _arg_logs(node.args, env) + _arg_logs(tuple(node.kwargs.values()), env)
    if not logs:
        return None  # does not depend on the input
    if node.op == "call_module":
        if len(logs) != 1:
            raise ValueError(f"lipschitz_bound: module {node.target!r} takes several "
                             f"input-dependent arguments")
        return log_of(rule) + logs[0]
    target = node.target
    if target in (operator.add, torch.add, operator.sub, torch.sub, operator.iadd,
                  "add", "sub", "add_"):
        return torch.logsumexp(torch.stack(logs), 0)
    if target in (torch.cat, torch.stack, torch.concat, torch.hstack, torch.vstack):
        return 0.5 * torch.logsumexp(2 * torch.stack(logs), 0)
    if target in (operator.mul, torch.mul, "mul", operator.truediv, torch.div, "div",
                  operator.neg, torch.neg, "neg"):
        if len(logs) != 1:
            raise ValueError(f"lipschitz_bound: {node.name}: a product of two input-dependent "
                             f"tensors has no global Lipschitz constant")
        if target in (operator.neg, torch.neg, "neg"):
            return logs[0]
        other = [a for a in node.args if not isinstance(a, torch.fx.Node)]
        if len(other) != 1 or not isinstance(other[0], (int, float)):
            raise ValueError(f"lipschitz_bound: {node.name}: only multiplication or division "
                             f"by a Python number is supported")
        c = abs(float(other[0]))
        if target in (operator.truediv, torch.div, "div"):
            if not isinstance(node.args[0], torch.fx.Node):
                raise ValueError(f"lipschitz_bound: {node.name}: division by the input")
            c = 1.0 / c
        return math.log(c) + logs[0] if c > 0 else torch.tensor(float("-inf"))
    if target in _FUNCTIONAL_ACTIVATIONS:
        c = _FUNCTIONAL_ACTIVATIONS[target](node.args, node.kwargs)
        return math.log(c) + logs[0]
    if target in _SHAPE_FUNCTIONS or target in _SHAPE_METHODS or target == operator.getitem:
        return logs[0]
    if node.op == "call_method" and target in _ACTIVATION_METHODS:
        return math.log(_ACTIVATION_METHODS[target]) + logs[0]
    raise ValueError(f"lipschitz_bound: no Lipschitz rule for {node.op} {target!r} "
                     f"(node {node.name}); wrap it in a module and give its constant with "
                     f"constants=")
