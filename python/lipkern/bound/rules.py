r"""The table of Lipschitz rules: one small function per op, its constant and why it holds.

Every constant is a Lipschitz constant (l2 -> l2) of the op **as a map of the whole batch
tensor** in its input-dependent arguments, at the shapes the example input gives. Maps
applied sample by sample (every layer here but reductions over the batch) have the same
constant on one sample and on a batch, so the network bound is the per-sample one.

A rule receives a :class:`Call` (the op's concrete arguments and output from a real forward,
and which arguments depend on the network input) and returns a term:

* :class:`Scale` ``(c, layer)``: one input-dependent argument ``x``; ``L(out) <= c * sigma_layer
  * L(x)`` (``layer`` is a linear layer of the fused calls, or None);
* :class:`Affine` ``{arg: coef}``: ``out = sum coef_i x_i + const``; ``L <= sum |coef_i| L_i``;
* :class:`Stack` ``[args]``: concatenation; ``||[a; b]|| <= sqrt(L_a^2 + L_b^2) ||dx||``;
* ``INDEPENDENT``: the output does not depend on the input (shapes, sizes).

An op without a rule, or with settings its rule does not cover, raises :class:`NoRule`
naming the node and how to give a constant (``constants=``). Adding an op is adding a row to
``MODULE_RULES``, ``FUNCTION_RULES`` or ``METHOD_RULES`` (and its test).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..spec import ConvSpec
from . import constants as K


class NoRule(ValueError):
    """An op has no Lipschitz rule (or none for these settings)."""


@dataclass
class Scale:
    c: Union[float, torch.Tensor] = 1.0
    layer: Optional[int] = None
    note: str = ""
    row: bool = True  # list the node in the report's table


@dataclass
class Affine:
    coefs: Dict[Any, float]  # input-dependent fx node -> |coefficient| (duplicates summed)


@dataclass
class Stack:
    parts: List[Any]  # input-dependent fx nodes, with repetition


INDEPENDENT = object()
Term = Union[Scale, Affine, Stack, object]


@dataclass
class Call:
    """One op of the forward: ``target`` applied to ``args``/``kwargs`` (concrete values),
    ``nodes`` the same arguments as fx nodes (or constants), ``dep(node)`` whether a node
    depends on the network input, ``out`` the concrete output."""
    name: str
    kind: str
    target: Any
    args: tuple
    kwargs: dict
    arg_nodes: tuple
    kwarg_nodes: dict
    out: Any
    is_dep: Callable[[Any], bool]
    add_layer: Callable[..., int]
    module: Optional[nn.Module] = None
    grad_params: Callable[[], Any] = field(default=lambda: torch.enable_grad())

    # -- argument access by position or keyword
    def get(self, i: int, key: str, default=None):
        if key in self.kwargs:
            return self.kwargs[key]
        return self.args[i] if i < len(self.args) else default

    def node(self, i: int, key: str):
        if key in self.kwarg_nodes:
            return self.kwarg_nodes[key]
        return self.arg_nodes[i] if i < len(self.arg_nodes) else None

    def dep(self, i: int, key: str = "") -> bool:
        return self.is_dep(self.node(i, key))

    def deps(self) -> List[Any]:
        """Input-dependent argument nodes in order (with repetition)."""
        out = []

        def visit(a):
            if isinstance(a, (list, tuple)):
                for b in a:
                    visit(b)
            elif isinstance(a, dict):
                for b in a.values():
                    visit(b)
            elif self.is_dep(a):
                out.append(a)
        visit(self.arg_nodes)
        visit(self.kwarg_nodes)
        return out

    def only(self, i: int = 0, key: str = "input") -> torch.Tensor:
        """The one input-dependent argument, which must be argument ``i``/``key``."""
        d = self.deps()
        if len(d) != 1 or not self.dep(i, key):
            raise NoRule(f"{self.what()}: only argument {i} ({key}) may depend on the input "
                         f"(a product or function of two input-dependent tensors has no "
                         f"global Lipschitz constant)")
        return self.get(i, key)

    def what(self) -> str:
        if self.module is not None:
            return f"module {self.name!r} ({type(self.module).__name__})"
        if self.kind == "call_method":
            return f"method .{self.target}() (node {self.name})"
        return f"function {getattr(self.target, '__name__', self.target)} (node {self.name})"

    def fail(self, why: str):
        raise NoRule(f"{self.what()}: {why}")


# ---------------------------------------------------------------- helpers
def _pair(v, n=2):
    if isinstance(v, (tuple, list)):
        return tuple(v) if len(v) == n else tuple(v) * n
    return (v,) * n


def _multiplicity(n: int, out: int, k: int, s: int, p: int, d: int = 1, ceil: bool = False
                  ) -> int:
    """Most windows (of a pooling with these settings) one of n input positions lies in."""
    count = [0] * n
    for o in range(out):
        for j in range(k):
            i = o * s + j * d - p
            if 0 <= i < n:
                count[i] += 1
    return max(count) if count else 1


def _spatial(x: torch.Tensor, nd: int, call: Call) -> Tuple[int, ...]:
    if x.dim() != nd + 2:
        call.fail(f"expected a batched input (N, C, {'L' if nd == 1 else 'H, W'}), "
                  f"got shape {tuple(x.shape)}")
    return tuple(x.shape[2:])


# ---------------------------------------------------------------- linear layers
def linear_layer(call: Call, weight: torch.Tensor) -> Scale:
    """sigma(W) of ``x W^T + b``: the operator norm of W (the bias shifts, constant 0)."""
    x = call.only()
    del x
    return Scale(layer=call.add_layer(call, weight, None))


def conv_layer(call: Call, weight, stride, padding, dilation, groups, padding_mode="zeros",
               transposed=False, output_padding=0, nd=2) -> Scale:
    """sigma of the conv operator at the input's size (ConvSpec): the exact constant of the
    linear map ``x -> conv(x, K)``; the bias shifts."""
    x = call.only()
    spatial = _spatial(x, nd, call)
    lift = (lambda v: (1, _pair(v, 1)[0])) if nd == 1 else (lambda v: _pair(v))
    pad = padding
    if not isinstance(pad, str):
        pad = lift(pad)
    try:
        spec = ConvSpec(lift(spatial) if nd == 1 else spatial, stride=lift(stride),
                        padding=pad, dilation=lift(dilation), groups=groups,
                        padding_mode=padding_mode, transposed=transposed,
                        output_padding=lift(output_padding) if transposed else 0)
    except (ValueError, TypeError) as e:
        call.fail(str(e))
    if nd == 1:
        spec = ConvSpec((1, spatial[0]), stride=spec.stride, padding=spec.padding,
                        dilation=spec.dilation, groups=groups, padding_mode=padding_mode,
                        transposed=transposed, output_padding=spec.output_padding)
    return Scale(layer=call.add_layer(call, weight, spec))


def _weight(call: Call, m: nn.Module) -> torch.Tensor:
    """The weight the module computes with: for parametrized modules (torch's spectral_norm
    / weight_norm, lipkern.nn) the parametrized weight, read with autograd on."""
    with call.grad_params():
        return m.weight


def rule_linear(call: Call) -> Scale:
    return linear_layer(call, _weight(call, call.module))


def rule_conv_module(call: Call) -> Scale:
    m = call.module
    nd = 1 if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)) else 2
    transposed = isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d))
    if transposed and len(call.args) > 1:
        call.fail("ConvTranspose called with output_size: give its constant with constants=")
    return conv_layer(call, _weight(call, m), m.stride, m.padding, m.dilation, m.groups,
                      m.padding_mode, transposed, m.output_padding if transposed else 0, nd)


def rule_f_linear(call: Call) -> Scale:
    if call.dep(1, "weight"):
        call.fail("the weight depends on the input")
    return linear_layer(call, call.get(1, "weight"))


def rule_f_matmul(call: Call) -> Scale:
    """``x @ W`` or ``W @ x`` with W constant and 2-D: sigma(W) (applied along one axis of x,
    block diagonal over the others)."""
    a, b = call.dep(0, "input"), call.dep(1, "other")
    if a and b:
        call.fail("a product of two input-dependent tensors has no global Lipschitz constant")
    w = call.get(1, "other") if a else call.get(0, "input")
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        call.fail("only products with a constant 2-D matrix are supported")
    return Scale(layer=call.add_layer(call, w, None))


def _f_conv(nd, transposed):
    def rule(call: Call) -> Scale:
        if call.dep(1, "weight"):
            call.fail("the weight depends on the input")
        w = call.get(1, "weight")
        if transposed:
            return conv_layer(call, w, call.get(3, "stride", 1), call.get(4, "padding", 0),
                              call.get(7, "dilation", 1), call.get(6, "groups", 1), "zeros",
                              True, call.get(5, "output_padding", 0), nd)
        return conv_layer(call, w, call.get(3, "stride", 1), call.get(4, "padding", 0),
                          call.get(5, "dilation", 1), call.get(6, "groups", 1), "zeros",
                          False, 0, nd)
    rule.__doc__ = conv_layer.__doc__
    return rule


# ---------------------------------------------------------------- pooling
def avg_pool(call: Call, x, k, s, p, ceil_mode, count_include_pad, divisor, nd) -> Scale:
    """Average pooling is the depthwise conv with the kernel 1/prod(k) (the same on every
    channel, so its sigma is that of one channel): its operator norm at the input's size.
    ceil_mode, count_include_pad=False with padding and divisor_override change the weights
    per window: refused."""
    spatial = _spatial(x, nd, call)
    k = _pair(k, nd)
    s = _pair(k if s is None or s == [] or s == () else s, nd)
    p = _pair(p, nd)
    if divisor is not None:
        call.fail("divisor_override is not a fixed average: give its constant with constants=")
    if ceil_mode and any(((n + 2 * pp - kk) % ss) for n, kk, ss, pp in zip(spatial, k, s, p)):
        call.fail("ceil_mode with partial windows: give its constant with constants=")
    if not count_include_pad and any(p):
        call.fail("count_include_pad=False with padding: give its constant with constants=")
    if nd == 1:
        k, s, p, spatial = (1, k[0]), (1, s[0]), (0, p[0]), (1, spatial[0])
    w = torch.full((1, 1, *k), 1.0 / (k[0] * k[1]), dtype=x.dtype, device=x.device)
    return Scale(layer=call.add_layer(call, w, ConvSpec(spatial, stride=s, padding=p)))


def adaptive_avg_pool(call: Call, x, out, nd) -> Scale:
    """Adaptive average pooling with equal windows (input divisible by output) is the average
    pooling with kernel = stride = input / output (kernel computed at run time from the
    input's size); unequal windows are refused."""
    spatial = _spatial(x, nd, call)
    out = _pair(out, nd)
    out = tuple(n if o is None else o for n, o in zip(spatial, out))
    if any(n % o for n, o in zip(spatial, out)):
        call.fail(f"adaptive pooling to {out} from {spatial} has unequal windows: give its "
                  f"constant with constants=")
    k = tuple(n // o for n, o in zip(spatial, out))
    return avg_pool(call, x, k, k, 0, False, True, None, nd)


def max_pool(call: Call, x, k, s, p, d, ceil_mode, nd) -> Scale:
    """Each output is 1-Lipschitz in its window (|max a - max b| <= max |a - b|), so
    ||dy||^2 <= sum over windows of ||dx_window||^2 <= c ||dx||^2 with c the most windows one
    input lies in: constant sqrt(c) (1 for non-overlapping windows)."""
    spatial = _spatial(x, nd, call)
    k, d, p = _pair(k, nd), _pair(d, nd), _pair(p, nd)
    s = _pair(k if s is None or s == [] or s == () else s, nd)
    out = call.out[0] if isinstance(call.out, tuple) else call.out
    c = 1
    for n, o, kk, ss, pp, dd in zip(spatial, out.shape[2:], k, s, p, d):
        c *= _multiplicity(n, o, kk, ss, pp, dd)
    return Scale(math.sqrt(c))


def adaptive_max_pool(call: Call, x, out, nd) -> Scale:
    """As max pooling, with the windows [floor(i n / o), ceil((i + 1) n / o)) torch uses."""
    spatial = _spatial(x, nd, call)
    out = _pair(out, nd)
    out = tuple(n if o is None else o for n, o in zip(spatial, out))
    c = 1
    for n, o in zip(spatial, out):
        count = [0] * n
        for i in range(o):
            for j in range((i * n) // o, -(-((i + 1) * n) // o)):
                count[j] += 1
        c *= max(count)
    return Scale(math.sqrt(c))


def rule_avg_pool_module(call: Call) -> Scale:
    m = call.module
    nd = 1 if isinstance(m, nn.AvgPool1d) else 2
    return avg_pool(call, call.only(), m.kernel_size, m.stride, m.padding, m.ceil_mode,
                    m.count_include_pad, getattr(m, "divisor_override", None), nd)


def rule_adaptive_avg_module(call: Call) -> Scale:
    nd = 1 if isinstance(call.module, nn.AdaptiveAvgPool1d) else 2
    return adaptive_avg_pool(call, call.only(), call.module.output_size, nd)


def rule_max_pool_module(call: Call) -> Scale:
    m = call.module
    nd = 1 if isinstance(m, nn.MaxPool1d) else 2
    return max_pool(call, call.only(), m.kernel_size, m.stride, m.padding, m.dilation,
                    m.ceil_mode, nd)


def rule_adaptive_max_module(call: Call) -> Scale:
    nd = 1 if isinstance(call.module, nn.AdaptiveMaxPool1d) else 2
    return adaptive_max_pool(call, call.only(), call.module.output_size, nd)


def _f_avg_pool(nd):
    def rule(call: Call) -> Scale:
        return avg_pool(call, call.only(), call.get(1, "kernel_size"), call.get(2, "stride"),
                        call.get(3, "padding", 0), call.get(4, "ceil_mode", False),
                        call.get(5, "count_include_pad", True),
                        call.get(6, "divisor_override") if nd == 2 else None, nd)
    rule.__doc__ = avg_pool.__doc__
    return rule


def _f_max_pool(nd):
    def rule(call: Call) -> Scale:
        return max_pool(call, call.only(), call.get(1, "kernel_size"), call.get(2, "stride"),
                        call.get(3, "padding", 0), call.get(4, "dilation", 1),
                        call.get(5, "ceil_mode", False), nd)
    rule.__doc__ = max_pool.__doc__
    return rule


def _f_adaptive(fn, nd):
    def rule(call: Call) -> Scale:
        return fn(call, call.only(), call.get(1, "output_size"), nd)
    rule.__doc__ = fn.__doc__
    return rule


# ---------------------------------------------------------------- normalization, dropout
def rule_batchnorm(call: Call) -> Scale:
    """BatchNorm in eval is the diagonal affine map ``x * gamma / sqrt(var + eps) + shift``:
    constant max |gamma / sqrt(var + eps)| (differentiable in gamma). In training it
    normalizes by the batch (no fixed constant): refused."""
    m = call.module
    call.only()
    if m.training:
        call.fail("BatchNorm in train mode normalizes by the batch, which has no fixed "
                  "Lipschitz constant; call model.eval() first")
    if m.running_var is None:
        call.fail("BatchNorm without running statistics normalizes by the batch even in "
                  "eval mode: no fixed Lipschitz constant")
    with call.grad_params():
        scale = torch.rsqrt(m.running_var + m.eps)
        if m.weight is not None:
            scale = m.weight * scale
        return Scale(scale.abs().max())


def rule_no_constant(call: Call):
    """LayerNorm, GroupNorm, InstanceNorm, LocalResponseNorm divide by a statistic of the
    input itself: near a constant input the derivative is unbounded, so there is no global
    Lipschitz constant. Refused (a constant that holds on a domain can be given)."""
    call.fail(f"{type(call.module).__name__ if call.module is not None else call.target} "
              f"divides by the input's own statistics: it has no global Lipschitz constant; "
              f"give one valid for your inputs with constants=")


def dropout(call: Call, p: float, training: bool) -> Scale:
    """Dropout in training multiplies kept entries by 1/(1-p) (constant 1/(1-p); p = 1 gives
    0); in eval it is the identity."""
    call.only()
    if not training:
        return Scale(1.0, row=False)
    if p >= 1:
        return Scale(0.0, note="train mode, p = 1")
    return Scale(1.0 / (1.0 - p), note="train mode: 1/(1-p)")


def rule_dropout_module(call: Call) -> Scale:
    m = call.module
    if isinstance(m, (nn.AlphaDropout, nn.FeatureAlphaDropout)) and m.training:
        call.fail("alpha dropout in train mode: give its constant with constants=")
    return dropout(call, m.p, m.training)


def rule_f_dropout(call: Call) -> Scale:
    return dropout(call, call.get(1, "p", 0.5), call.get(2, "training", True))


# ---------------------------------------------------------------- activations, identities
def rule_activation_module(call: Call) -> Scale:
    """Elementwise ``f``: constant max |f'| (constants.activation_constant, each with its
    derivation)."""
    call.only()
    return Scale(K.activation_constant(call.module))


def _const(c: Union[float, Callable[[Call], float]], row=True, doc=""):
    def rule(call: Call) -> Scale:
        call.only()
        return Scale(c(call) if callable(c) else c, row=row)
    rule.__doc__ = doc
    return rule


ISOMETRY = _const(1.0, row=False, doc="A reshape, permutation, restriction (slicing) or "
                  "dtype cast: norm-preserving or norm-decreasing, constant 1.")
ONE_LIPSCHITZ = _const(1.0, doc="A 1-Lipschitz pointwise map (projection onto an interval "
                       "(clamp), |x|, -x): constant 1.")


def _slope(i: int, key: str, default: float):
    def c(call: Call) -> float:
        return max(1.0, abs(float(call.get(i, key, default))))
    return c


def rule_softmax(call: Call) -> Scale:
    """softmax's Jacobian diag(p) - p p^T is PSD with eigenvalues <= max p_i <= 1:
    constant 1 (log_softmax is refused: its Jacobian I - 1 p^T has norm up to sqrt(n))."""
    call.only()
    return Scale(1.0)


def rule_getitem(call: Call) -> Scale:
    """Basic indexing (ints, slices, None, ...) selects entries: a restriction, constant 1.
    Items of a split/chunk tuple likewise. Advanced indexing may repeat entries: refused."""
    base, idx = call.args[0], call.args[1]
    if call.dep(1, "index"):
        call.fail("indexing by an input-dependent tensor")
    if isinstance(base, (tuple, list)):
        return Scale(1.0, row=False)
    items = idx if isinstance(idx, tuple) else (idx,)
    for it in items:
        if not (it is None or it is Ellipsis or isinstance(it, (int, slice))):
            call.fail("advanced indexing (tensors or lists) can repeat entries: give its "
                      "constant with constants=")
    return Scale(1.0, row=False)


def rule_repeat(call: Call) -> Scale:
    """expand/repeat/broadcast copies every entry out.numel / in.numel times: sqrt of that."""
    x = call.only(0, "self")
    return Scale(math.sqrt(call.out.numel() / max(x.numel(), 1)))


def rule_pad(call: Call) -> Scale:
    """Padding copies entries: zero/constant padding embeds (constant 1); reflect/replicate/
    circular padding repeats entries; constant sqrt(max multiplicity), counted by padding the
    index ranges themselves."""
    x = call.only()
    pad = list(call.get(1, "pad"))
    mode = call.get(2, "mode", "constant")
    if mode == "constant":
        return Scale(1.0, row=False)
    c = 1
    for i in range(len(pad) // 2):
        dim = x.dim() - 1 - i
        n = x.shape[dim]
        idx = torch.arange(n, dtype=torch.float64).view(1, 1, n)
        padded = F.pad(idx, (pad[2 * i], pad[2 * i + 1]), mode=mode)
        c *= int(torch.bincount(padded.flatten().long(), minlength=n).max())
    return Scale(math.sqrt(c))


def rule_interpolate(call: Call) -> Scale:
    """Nearest upsampling by integer factors copies every entry prod(factor) times:
    sqrt(prod factor). Other modes/sizes: refused."""
    x = call.only()
    mode = call.get(3, "mode", "nearest") if call.module is None else call.module.mode
    out = call.out
    if mode != "nearest" or any(o % n for o, n in zip(out.shape[2:], x.shape[2:])):
        call.fail(f"interpolation mode {mode!r} to size {tuple(out.shape[2:])} from "
                  f"{tuple(x.shape[2:])}: give its constant with constants=")
    return Scale(math.sqrt(out.numel() / x.numel()))


# ---------------------------------------------------------------- arithmetic
def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _abs_max(c) -> float:
    if isinstance(c, torch.Tensor):
        return float(c.detach().abs().max()) if c.numel() else 0.0
    return abs(float(c))


def rule_add(call: Call, sign: float = 1.0) -> Affine:
    """``a + alpha b`` (and ``-``): the sum of the parts' constants, ``L_a + |alpha| L_b``;
    constant summands shift (constant 0)."""
    alpha = abs(float(call.kwargs.get("alpha", call.args[2] if len(call.args) > 2 else 1)))
    coefs: Dict[Any, float] = {}
    for i, c in ((0, 1.0), (1, alpha)):
        n = call.node(i, ("input", "other")[i])
        if call.is_dep(n):
            coefs[n] = coefs.get(n, 0.0) + c
    return Affine(coefs)


def rule_mul(call: Call) -> Scale:
    """``x * c`` with ``c`` a number or a tensor that does not depend on the input: a
    diagonal scaling (broadcast), constant max |c|. A product of two input-dependent tensors
    has no global constant: refused."""
    a, b = call.dep(0, "input"), call.dep(1, "other")
    if a and b:
        call.fail("a product of two input-dependent tensors has no global Lipschitz constant")
    c = call.get(1, "other") if a else call.get(0, "input")
    return Scale(_abs_max(c))


def rule_div(call: Call) -> Scale:
    """``x / c`` with ``c`` a nonzero number or input-independent tensor without zeros:
    constant max |1/c|. Division by zero (inf/nan outputs), by the input, or with a rounding
    mode (a step function): refused."""
    if call.dep(1, "other"):
        call.fail("division by an input-dependent tensor has no global Lipschitz constant")
    if call.get(2, "rounding_mode") is not None:
        call.fail("division with a rounding mode is a step function: not Lipschitz")
    call.only()
    c = call.get(1, "other")
    if isinstance(c, torch.Tensor):
        if bool((c == 0).any()):
            call.fail("division by a tensor with zeros (inf/nan outputs): no constant")
        return Scale(float((1.0 / c.detach().double().abs()).max()))
    if float(c) == 0.0:
        call.fail("division by zero (inf/nan outputs): no Lipschitz constant")
    return Scale(1.0 / abs(float(c)))


def rule_cat(call: Call) -> Stack:
    """Concatenation ``[a; b]``: ``||[da; db]||^2 = ||da||^2 + ||db||^2``, so
    ``L <= sqrt(L_a^2 + L_b^2)``; constant pieces add nothing."""
    return Stack(call.deps())


def _reduced(call: Call, x: torch.Tensor) -> int:
    dims = call.get(1, "dim")
    if dims is None or dims == [] or dims == ():
        return x.numel()
    dims = dims if isinstance(dims, (list, tuple)) else (dims,)
    n = 1
    for d in set(dd % x.dim() for dd in dims):
        n *= x.shape[d]
    return n


def rule_sum(call: Call) -> Scale:
    """Summing n entries is ``x -> 1^T x`` on each group of n: norm ||1|| = sqrt(n)
    (n = the product of the reduced dims' sizes; over everything: numel)."""
    x = call.only(0, "input")
    return Scale(math.sqrt(_reduced(call, x)))


def rule_mean(call: Call) -> Scale:
    """The mean of n entries is the sum / n: constant sqrt(n) / n = 1 / sqrt(n)."""
    x = call.only(0, "input")
    return Scale(1.0 / math.sqrt(_reduced(call, x)))


def rule_independent(call: Call):
    """Shapes, sizes, dtypes: do not depend on the input's values."""
    return INDEPENDENT


def rule_getattr(call: Call):
    """``x.shape`` / ``x.dtype`` / ... are independent of the values; ``x.T``/``x.mT`` are
    permutations."""
    attr = call.args[1]
    if attr in ("shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"):
        return INDEPENDENT
    if attr in ("T", "mT", "data", "real"):
        return Scale(1.0, row=False)
    call.fail(f"attribute {attr!r} of an input-dependent tensor")


def rule_batch_norm_f(call: Call) -> Scale:
    """F.batch_norm with running statistics and training=False: as BatchNorm in eval."""
    call.only()
    if call.get(5, "training", False):
        call.fail("batch_norm with training=True normalizes by the batch: no constant")
    var, w, eps = call.get(2, "running_var"), call.get(3, "weight"), call.get(7, "eps", 1e-5)
    if var is None:
        call.fail("batch_norm without running statistics: no constant")
    scale = torch.rsqrt(var + eps)
    if w is not None:
        scale = w * scale
    return Scale(scale.abs().max())


# ---------------------------------------------------------------- the table
MODULE_RULES: Dict[type, Callable[[Call], Term]] = {
    nn.Linear: rule_linear,
    nn.Conv1d: rule_conv_module, nn.Conv2d: rule_conv_module,
    nn.ConvTranspose1d: rule_conv_module, nn.ConvTranspose2d: rule_conv_module,
    nn.AvgPool1d: rule_avg_pool_module, nn.AvgPool2d: rule_avg_pool_module,
    nn.AdaptiveAvgPool1d: rule_adaptive_avg_module, nn.AdaptiveAvgPool2d: rule_adaptive_avg_module,
    nn.MaxPool1d: rule_max_pool_module, nn.MaxPool2d: rule_max_pool_module,
    nn.AdaptiveMaxPool1d: rule_adaptive_max_module, nn.AdaptiveMaxPool2d: rule_adaptive_max_module,
    nn.BatchNorm1d: rule_batchnorm, nn.BatchNorm2d: rule_batchnorm,
    nn.LayerNorm: rule_no_constant, nn.GroupNorm: rule_no_constant,
    nn.InstanceNorm1d: rule_no_constant, nn.InstanceNorm2d: rule_no_constant,
    nn.LocalResponseNorm: rule_no_constant,
    nn.Dropout: rule_dropout_module, nn.Dropout1d: rule_dropout_module,
    nn.Dropout2d: rule_dropout_module, nn.AlphaDropout: rule_dropout_module,
    nn.FeatureAlphaDropout: rule_dropout_module,
    nn.Flatten: ISOMETRY, nn.Unflatten: ISOMETRY, nn.Identity: ISOMETRY,
    nn.PixelShuffle: ISOMETRY, nn.PixelUnshuffle: ISOMETRY,
    nn.Softmax: rule_softmax,
    nn.Upsample: rule_interpolate,
}
for _t in (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Hardtanh, nn.Softsign, nn.CELU, nn.Tanhshrink,
           nn.Hardsigmoid, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU, nn.Softplus, nn.GELU,
           nn.SiLU, nn.Mish, nn.Hardswish):
    MODULE_RULES[_t] = rule_activation_module

FUNCTION_RULES: Dict[Any, Callable[[Call], Term]] = {
    F.linear: rule_f_linear,
    operator.matmul: rule_f_matmul, torch.matmul: rule_f_matmul, torch.mm: rule_f_matmul,
    F.conv1d: _f_conv(1, False), F.conv2d: _f_conv(2, False),
    F.conv_transpose1d: _f_conv(1, True), F.conv_transpose2d: _f_conv(2, True),
    F.avg_pool1d: _f_avg_pool(1), F.avg_pool2d: _f_avg_pool(2),
    F.max_pool1d: _f_max_pool(1), F.max_pool2d: _f_max_pool(2),
    F.adaptive_avg_pool1d: _f_adaptive(adaptive_avg_pool, 1),
    F.adaptive_avg_pool2d: _f_adaptive(adaptive_avg_pool, 2),
    F.adaptive_max_pool1d: _f_adaptive(adaptive_max_pool, 1),
    F.adaptive_max_pool2d: _f_adaptive(adaptive_max_pool, 2),
    F.dropout: rule_f_dropout, F.dropout1d: rule_f_dropout, F.dropout2d: rule_f_dropout,
    torch.dropout: rule_f_dropout,
    F.batch_norm: rule_batch_norm_f,
    F.layer_norm: rule_no_constant, F.group_norm: rule_no_constant,
    F.instance_norm: rule_no_constant,
    operator.add: rule_add, operator.iadd: rule_add, torch.add: rule_add,
    operator.sub: rule_add, operator.isub: rule_add, torch.sub: rule_add,
    torch.subtract: rule_add,
    operator.mul: rule_mul, operator.imul: rule_mul, torch.mul: rule_mul,
    torch.multiply: rule_mul,
    operator.truediv: rule_div, operator.itruediv: rule_div, torch.div: rule_div,
    torch.true_divide: rule_div, torch.divide: rule_div,
    operator.neg: ONE_LIPSCHITZ, torch.neg: ONE_LIPSCHITZ, operator.pos: ISOMETRY,
    torch.abs: ONE_LIPSCHITZ, operator.abs: ONE_LIPSCHITZ,
    torch.clamp: ONE_LIPSCHITZ, torch.clip: ONE_LIPSCHITZ, F.hardtanh: ONE_LIPSCHITZ,
    torch.cat: rule_cat, torch.concat: rule_cat, torch.concatenate: rule_cat,
    torch.stack: rule_cat, torch.hstack: rule_cat, torch.vstack: rule_cat,
    torch.sum: rule_sum, torch.mean: rule_mean,
    torch.flatten: ISOMETRY, torch.reshape: ISOMETRY, torch.squeeze: ISOMETRY,
    torch.unsqueeze: ISOMETRY, torch.permute: ISOMETRY, torch.transpose: ISOMETRY,
    torch.swapaxes: ISOMETRY, torch.movedim: ISOMETRY, torch.clone: ISOMETRY,
    torch.split: ISOMETRY, torch.chunk: ISOMETRY, torch.unbind: ISOMETRY,
    torch.tensor_split: ISOMETRY, F.pixel_shuffle: ISOMETRY, F.pixel_unshuffle: ISOMETRY,
    operator.getitem: rule_getitem, getattr: rule_getattr,
    F.pad: rule_pad, F.interpolate: rule_interpolate,
    F.softmax: rule_softmax, torch.softmax: rule_softmax,
    F.relu: _const(1.0), torch.relu: _const(1.0), F.relu_: _const(1.0), F.relu6: _const(1.0),
    torch.tanh: _const(1.0), F.tanh: _const(1.0), torch.sigmoid: _const(0.25),
    F.sigmoid: _const(0.25), F.softplus: _const(1.0), F.softsign: _const(1.0),
    F.leaky_relu: _const(_slope(1, "negative_slope", 0.01)),
    F.elu: _const(_slope(1, "alpha", 1.0)), F.celu: _const(1.0),
    F.gelu: _const(lambda c: K.gelu_constant(c.get(1, "approximate", "none"))),
    F.silu: _const(lambda c: K.silu_constant()), F.mish: _const(lambda c: K.mish_constant()),
    F.hardswish: _const(1.5), F.hardsigmoid: _const(1.0 / 6),
}

_METHOD_FROM_FUNCTION = {
    "add": torch.add, "add_": torch.add, "sub": torch.sub, "sub_": torch.sub,
    "mul": torch.mul, "mul_": torch.mul, "div": torch.div, "div_": torch.div,
    "neg": torch.neg, "abs": torch.abs, "clamp": torch.clamp, "clip": torch.clip,
    "clamp_": torch.clamp, "sum": torch.sum, "mean": torch.mean, "softmax": torch.softmax,
    "relu": torch.relu, "relu_": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
    "matmul": torch.matmul, "mm": torch.mm, "split": torch.split, "chunk": torch.chunk,
    "unbind": torch.unbind,
}
METHOD_RULES: Dict[str, Callable[[Call], Term]] = {
    k: FUNCTION_RULES[v] for k, v in _METHOD_FROM_FUNCTION.items()}
for _m in ("view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze",
           "unsqueeze", "clone", "view_as", "reshape_as", "to", "float", "double", "type_as",
           "detach", "swapaxes", "movedim", "unflatten"):
    METHOD_RULES[_m] = ISOMETRY
for _m in ("size", "dim", "numel", "type", "get_device", "element_size", "stride"):
    METHOD_RULES[_m] = rule_independent
for _m in ("expand", "expand_as", "repeat"):
    METHOD_RULES[_m] = rule_repeat


def module_rule(m: nn.Module) -> Optional[Callable[[Call], Term]]:
    """The rule of a module: by its exact type; a subclass that keeps its base's forward
    (e.g. lipkern.nn's SpectralConv2d, parametrized classes, spectral_norm_model's layers,
    whose forward computes the base layer with the normalized weight) gets the base's rule;
    a subclass with its own forward has no rule (its forward may compute anything)."""
    from torch.nn.utils import parametrize
    for cls in type(m).__mro__:
        rule = MODULE_RULES.get(cls)
        if rule is not None:
            return rule
        if cls is type(m) and parametrize.is_parametrized(m):
            continue  # the class torch.nn.utils.parametrize made: same forward as its base
        if "forward" in cls.__dict__ and not _same_layer_forward(cls):
            return None
    return None


def _same_layer_forward(cls) -> bool:
    f = cls.__dict__["forward"]
    return getattr(f, "__module__", "") == "lipkern.nn.model"  # spectral_norm_model's layers
