"""How the layers of a :class:`~lipkern.nn.model.SpectralNormGroup` use their sigmas: one
small class per strategy, one interface.

Every strategy computes the same function and gradient (spectral_norm's: ``W / sigma`` with
``sigma = u^T A v``, u and v held constant); they differ in where the work runs. A strategy
object belongs to one group and holds the state of the forward in progress:

* ``prepare(group, originals, training)``: the model's forward pre-hook, once per model
  forward; returns the strategy that runs this forward (itself, or another one when it cannot
  run this one: e.g. "inline" under autocast hands over to "scaled_outputs");
* ``layer_forward(group, i, module, x)``: layer i's forward;
* ``weight(group, i, w)``: layer i's normalized weight when something reads
  ``module.weight`` during the forward (a layer on the division path);
* ``store(group)``: the model's forward hook (also after an exception): the new vectors into
  the buffers, per-forward state dropped.

A new strategy is a new class here plus its name in :data:`STRATEGIES`; the group only calls
the four methods.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backends import choose_backend, load_ext, resolve_backend
from ..layout import PowerIterState
from ..result import PowerIterResult
from ..ops import sn_linear as _sn_linear  # noqa: F401  (registers lipkern::sn_linear's fakes)
from ..power_iter import fused_normalize
from .divided_weight import (ScaledLayerExact, divided, divided_fast, scale_of, sigma_fast,
                             sigma_of)
from .parametrization import _TRANSPOSED, _in_vmap
from .scaled_layer import ScaledLayer, dense_rank1, operator_rank1

__all__ = ["Strategy", "FusedSigmas", "ScaledOutputs", "FusedWeights", "Inline", "Mixed",
           "make_strategies", "STRATEGIES", "SCALE_OUTPUTS_BELOW"]

STRATEGIES = ("auto", "mixed", "fused_weights", "scaled_outputs", "inline")
_SN_LINEAR = torch.ops.lipkern.sn_linear.default if _sn_linear.available() else None


def base_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer class's own forward (it reads the parametrized, i.e. divided, weight)."""
    return type(module).__bases__[0].forward(module, x)


def bias(module: nn.Module) -> Optional[torch.Tensor]:
    b = module._parameters.get("bias", bias)
    return module.bias if b is bias else b  # not in _parameters: e.g. parametrized itself


def original(module: nn.Module) -> torch.Tensor:
    """``module.parametrizations.weight.original`` by direct dict lookups (the attribute
    chain runs three nn.Module.__getattr__: 4.1 us against 0.2, per layer and forward)."""
    pl = module._modules["parametrizations"]._modules["weight"]
    t = pl._parameters.get("original")
    return t if t is not None else pl.original


def divide(weight: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """weight / sigma, in float32 for half-precision weights (as spectral_norm does)."""
    if weight.dtype in (torch.float16, torch.bfloat16):
        return (weight.float() / sigma.float()).to(weight.dtype)
    return weight / sigma.to(weight.dtype)


def store_state(state: PowerIterState, v: torch.Tensor, u: torch.Tensor) -> None:
    """A training forward's vectors into the buffers, in place (DDP broadcasts into them),
    except under vmap, where a batched value cannot go into an unbatched buffer."""
    if not _in_vmap(state.x):
        with torch.no_grad():
            v.copy_(state.x)
            u.copy_(state.u)


class Strategy:
    """The interface (module docstring). ``name`` is what ``strategy=`` calls it."""

    name = ""

    def applies(self, group, w: torch.Tensor) -> bool:
        """Whether ``strategy="auto"`` picks this one for weights like ``w``."""
        return False

    def prepare(self, group, originals: List[torch.Tensor], training: bool) -> "Strategy":
        raise NotImplementedError

    def layer_forward(self, group, i: int, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return base_forward(module, x)

    def weight(self, group, i: int, w: torch.Tensor) -> torch.Tensor:
        return group.per_layer(i, w)

    def store(self, group) -> None:
        pass


class FusedSigmas:
    """One fused call's result, split per layer once (3 ops, not 3 per layer): ``sigmas``
    (L,), possibly differentiable; ``sigma_list`` (detached 0-d), ``u_list``/``x_list`` (the
    vectors of sigma = u^T A x).

    ``unit(i)``: dsigma_i/dW_i of an operator-mode layer (flat, the op's layout, compute
    dtype), taken from ONE backward call of the C++ kernel with unit coefficients for every
    conv-operator layer of this forward, made at the first request (in the backward) and
    kept for the others; None where that call does not apply (see ``packed_ok``) -- the
    layer then computes its own (``reference.weight_grad``, a one-sample conv weight
    gradient per layer). u and x are constants, so this is the same constant tensor either
    way, and every derivative order stays exact."""

    def __init__(self, group, sigmas: torch.Tensor, state: PowerIterState):
        sizes = group.__dict__.get("_split_sizes")
        if sizes is None:  # fixed while the group lives (its layout is)
            sizes = group._split_sizes = ([g.y_numel for g in group.layout.geoms],
                                          [g.x_numel for g in group.layout.geoms])
        self.sigmas = sigmas
        group.last_sigmas = sigmas.detach()  # for lipkern.nn.sigmas(model)
        self.sigma_list = sigmas.detach().unbind(0)
        self.u_list = state.u.split(sizes[0])
        self.x_list = state.x.split(sizes[1])
        self.group, self.state = group, state
        self.packed = packed_ok(group, state.x)
        self._units: Optional[dict] = None

    def unit(self, i: int):
        """A callable giving layer i's dsigma/dW (flat) from the shared call, or None."""
        if not self.packed or self.group.specs[i] is None:
            return None
        return lambda: self.units()[i]

    def units(self) -> dict:
        if self._units is None:
            self._units = operator_unit_grads(self.group, self.state, self.x_list,
                                              self.u_list)
        return self._units


def packed_ok(group, x: torch.Tensor) -> bool:
    """Whether the operator layers' sigma gradients come from one C++ backward call: the
    compiled extension, CPU float tensors, backend "auto" or "cpp" (an explicit "torch"
    keeps the reference's per-layer ops), eager (a Python cache filled during the backward
    is no part of a traced graph), not under vmap."""
    return (group.backend in ("auto", "cpp") and bool(group.operator_layout()[0])
            and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and not torch.compiler.is_compiling() and not _in_vmap(x)
            and load_ext() is not None)


def operator_unit_grads(group, state, x_list, u_list) -> dict:
    """{layer: dsigma/dW (flat, compute dtype)} of every conv-operator layer: the C++
    backward (``power_iter_ext_backward``, all layers in one call, threads across layers)
    with unit coefficients on the operator layers' vectors. Measured (1 thread, this CPU):
    ResDiscriminator32's 10 convs 5.2 ms against 5.8 ms for ten conv2d_weight calls,
    WRN-16-4's 16 convs 11.5 against 14.8, the SNGAN critic's 7 convs 2.9 against 5.9
    (bench/NOTES.md, issue 16)."""
    idx, meta, sizes, span = group.operator_layout()
    if span is not None:  # consecutive layers: views of the packed vectors (a cat of
        # ResDiscriminator32's ~1 MB of vectors per side cost 0.3 ms, measured)
        x, u = state.x[span[0]].detach(), state.u[span[1]].detach()
    else:
        x = torch.cat([x_list[i] for i in idx]).detach()
        u = torch.cat([u_list[i] for i in idx]).detach()
    ones = x.new_ones(len(idx))
    with torch.no_grad():
        packed = torch.ops.lipkern.power_iter_ext_backward(x, u, ones, ones, None, None, meta,
                                                           x.dtype)
    return dict(zip(idx, packed.split(sizes)))


def divided_by_call_sigma(group, cur: "FusedSigmas", i: int, w: torch.Tensor) -> torch.Tensor:
    """Layer i's ``W / scale_of(sigma)`` with the fused call's sigma (``cur``) and the gradient
    of ``u^T A(W) x`` with the call's vectors: nothing recomputed, exact at every order."""
    sigma = sigma_fast(group.layout.geoms[i], w, cur.sigma_list[i], cur.u_list[i],
                       cur.x_list[i], group.specs[i] is None, group.dims[i], cur.unit(i))
    return divided(w, scale_of(sigma, group.coeff))


class ScaledOutputs(Strategy):
    """One fused call gives every sigma; each layer computes ``layer(x; W) / sigma + b``
    (:class:`~lipkern.nn.scaled_layer.ScaledLayer`), with the sigma gradient folded into its
    weight-gradient GEMM. Layers it cannot take (string ``padding='same'``, a transposed
    conv's ``output_size=``, any layer under autocast) divide their weight by the fused
    call's sigma instead. Also serves ``cache_eval`` for every strategy that makes a fused
    call."""

    name = "scaled_outputs"

    def __init__(self):
        self.cur: Optional[FusedSigmas] = None
        self.scaled_ok = False  # this forward may use ScaledLayer
        self._eval_cache = None  # (key, sigmas, state) of cache_eval
        self._update_cache = None  # (key, FusedSigmas) of power_iteration="per_update"

    def applies(self, group, w):
        return True  # the fallback of "auto"

    def eval_cached(self, group, originals, training) -> bool:
        """Serve an eval forward from cache_eval's sigmas (recomputed when a weight or a
        vector changed); False where the cache does not apply (and then drop it)."""
        if training or not group.cache_eval or torch.compiler.is_compiling():
            self._eval_cache = None
            return False
        key = group.cache_key(originals)
        if self._eval_cache is None or self._eval_cache[0] != key:
            with torch.no_grad():
                res = group.run([group.op_weight(i, w) for i, w in enumerate(originals)],
                                group.v, group.u, group.specs, 0)
            group.count_call()
            self._eval_cache = (key, res.sigmas, res.state)
        self.scaled_ok = not torch.is_autocast_enabled(originals[0].device.type)
        self.cur = FusedSigmas(group, *self._eval_cache[1:])
        return True

    def update_cached(self, group, originals, training) -> bool:
        """power_iteration="per_update": serve a training forward from the previous training
        forward's result (its FusedSigmas: sigmas, vectors and the sigma gradients made in a
        backward) when every weight and both vector buffers are unchanged since that forward
        stored its vectors (same version counters and storage). False where it does not
        apply (and then a fused call runs)."""
        if not (training and group.per_update) or torch.compiler.is_compiling():
            return False
        c = self._update_cache
        if c is None or c[0] != group.cache_key(originals):
            return False
        self.scaled_ok = not torch.is_autocast_enabled(originals[0].device.type)
        self.cur = c[1]
        group.last_sigmas = c[1].sigmas.detach()
        return True

    def keep_for_update(self, group, originals, training) -> None:
        """After a training forward's fused call (without autograd through it) and the store
        of its vectors: keep the result for power_iteration="per_update"."""
        # (an eval forward leaves the vectors as they were; a compiled one changes their
        # versions, which the key of a kept result then no longer matches)
        if not (training and group.per_update) or torch.compiler.is_compiling():
            return
        self._update_cache = None
        if not self.cur.sigmas.requires_grad and not torch.is_inference_mode_enabled():
            self._update_cache = (group.cache_key(originals), self.cur)

    def prepare(self, group, originals, training):
        if self.eval_cached(group, originals, training):
            return self
        if self.update_cached(group, originals, training):
            return self
        self.scaled_ok = not torch.is_autocast_enabled(originals[0].device.type)
        n_iters = group.n_power_iterations if training else 0
        op_weights = [group.op_weight(i, w) for i, w in enumerate(originals)]
        # ScaledLayer carries every sigma's gradient itself: the op's own backward (a
        # weight-sized gradient per layer) is needed only for layers on the division path
        grad = torch.is_grad_enabled() and not (self.scaled_ok and all(group.fast))
        with torch.set_grad_enabled(grad):
            res = group.run(op_weights, group.v, group.u, group.specs, n_iters)
        group.count_call()
        if training:
            store_state(res.state, group.v, group.u)
        self.cur = FusedSigmas(group, res.sigmas, res.state)
        self.keep_for_update(group, originals, training)
        return self

    def layer_forward(self, group, i, module, x):
        conv = group.conv_args[i] if self.scaled_ok else False
        if conv is False:
            return base_forward(module, x)  # weight(): W / the fused call's sigma
        # exact second order in eager (gradient penalties); a compiled graph's backward
        # refuses double backward itself (AOTAutograd), and dynamo cannot trace one
        # Function's backward calling another's
        return self.scaled_forward(group, i, module, x, conv,
                                   exact=not torch.compiler.is_compiling())

    def scaled_forward(self, group, i, module, x, conv, exact=False):
        """``layer(x; W) / s + b`` with s = sigma (or ``max(sigma / coeff, 1)``); ``exact``:
        a backward that is itself differentiable (ScaledLayerExact)."""
        w = original(module)
        if conv is not None and x.dim() == w.dim() - 1:  # aten.convolution needs a batch dim
            return self.scaled_forward(group, i, module, x.unsqueeze(0), conv, exact).squeeze(0)
        cur = self.cur
        u, v, sigma = cur.u_list[i], cur.x_list[i], cur.sigma_list[i]
        unit = cur.unit(i)
        if group.coeff is not None:
            # d s / d sigma: 1/coeff above coeff, 0 below (the layer is then W itself);
            # folded into u, which the rank-one term is linear in
            factor = (sigma > group.coeff).to(u.dtype) / group.coeff
            u = u * factor
            sigma = scale_of(sigma, group.coeff)
            if unit is not None:
                unit = (lambda unit: lambda: unit() * factor)(unit)
        rank1 = (dense_rank1(u, v, group.dims[i]) if group.specs[i] is None
                 else operator_rank1(group.layout.geoms[i], u, v, unit))
        if conv is not None and module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        b = bias(module)
        if exact:
            geom, ui, xi, matrix = group.layout.geoms[i], cur.u_list[i], cur.x_list[i], \
                group.specs[i] is None

            def sigma_fn(w):
                return scale_of(sigma_of(geom, group.op_weight(i, w), ui, xi, matrix),
                                group.coeff)
            return ScaledLayerExact.apply(x, w, b, sigma, rank1, conv, sigma_fn)
        return ScaledLayer.apply(x, w, b, sigma, rank1, conv)

    def weight(self, group, i, w):
        cur = self.cur
        if cur.sigmas.requires_grad or not (torch.is_grad_enabled() and w.requires_grad):
            return divided(w, scale_of(cur.sigmas[i], group.coeff))
        # sigmas without autograd (the call ran without it: every layer was to scale, or a
        # per_update result kept from such a forward or a no-grad one): as "mixed" takes it
        with torch.autocast(w.device.type, enabled=False):
            return divided_by_call_sigma(group, cur, i, w)

    def store(self, group):
        self.cur = None


# where "mixed" scales a layer's outputs rather than dividing its weight: output elements per
# step below this many times the weight's elements (see the rule in Mixed's docstring and
# bench/NOTES.md, "Issue 16": one-layer steps flip sign between out/w 0.22 (scaling wins) and
# 0.44 (dividing wins, and on ResDiscriminator32 in 7 of 7 model runs), 2 threads)
SCALE_OUTPUTS_BELOW = 0.3


class Mixed(ScaledOutputs):
    """Per layer, the cheaper of the two ways to use one fused call's sigmas (the call itself
    without autograd):

    * divide the weight -- ``W / sigma``, the call's sigma with the gradient of
      ``u^T A(W) x`` (:mod:`lipkern.nn.divided_weight`), the layer's own op on it: O(weight)
      extra work per step, a few weight-sized passes;
    * scale the outputs -- ``layer(x; W) / sigma + b`` (ScaledLayer): O(output) extra work,
      a few passes over the activations (and one more activation kept for the backward).

    A conv early in a CNN has a tiny weight and a huge output (SNGAN's first conv: 1.7e3
    weights, 2e6 outputs at batch 32), a late one the reverse (its 3x3 512x256 weight 1.2e6,
    output 2.6e5): one rule for all layers loses on one end. The rule, from the measurements
    in bench/NOTES.md ("Issue 16"): scale the outputs iff
    ``out_numel < SCALE_OUTPUTS_BELOW * w_numel``, decided per layer and input shape (cached).
    ``strategy="auto"`` picks it on the CPU for every model but Linear-only ones ("inline").
    """

    name = "mixed"

    def __init__(self):
        super().__init__()
        self.choice: dict = {}  # (layer, input shape) -> scale the outputs?
        self.scale_below = SCALE_OUTPUTS_BELOW  # the rule's threshold (benchmarks vary it)

    def applies(self, group, w):
        return w.device.type == "cpu"

    def prepare(self, group, originals, training):
        if self.eval_cached(group, originals, training):
            return self
        if self.update_cached(group, originals, training):
            return self
        self.scaled_ok = not torch.is_autocast_enabled(originals[0].device.type)
        n_iters = group.n_power_iterations if training else 0
        op_weights = [group.op_weight(i, w) for i, w in enumerate(originals)]
        with torch.no_grad():  # every layer takes its sigma gradient itself
            res = direct_call(group, op_weights, n_iters)
            if res is None:
                res = group.run(op_weights, group.v, group.u, group.specs, n_iters)
        group.count_call()
        if training:
            store_state(res.state, group.v, group.u)
        self.cur = FusedSigmas(group, res.sigmas, res.state)
        self.keep_for_update(group, originals, training)
        return self

    def scales(self, group, i, x) -> bool:
        """Whether layer i scales its outputs for inputs shaped like ``x`` (never in a forward
        whose model input requires grad: a gradient penalty's second backward would
        recompute every scaled layer, measured +50-90% on SNGAN's GP step, bench/NOTES.md)."""
        if group.__dict__.get("input_grad"):
            return False
        if torch.compiler.is_compiling():  # a pure function of shapes: no dict to guard on
            return self.rule(group, i, x)
        key = (i, tuple(x.shape))
        c = self.choice.get(key)
        if c is None:
            c = self.choice[key] = self.rule(group, i, x)
        return c

    def rule(self, group, i, x) -> bool:
        return out_numel(group.modules[i], x) < \
            self.scale_below * group.layout.geoms[i].w_numel

    def layer_forward(self, group, i, module, x):
        conv = group.conv_args[i] if self.scaled_ok else False
        if conv is not False and self.scales(group, i, x):
            return self.scaled_forward(group, i, module, x, conv,
                                       exact=not torch.compiler.is_compiling())
        w = self.weight(group, i, original(module))
        if isinstance(module, nn.Linear):
            return F.linear(x, w, module.bias)
        if not isinstance(module, _TRANSPOSED):
            return module._conv_forward(x, w, module.bias)
        return base_forward(module, x)  # weight(): the same division

    def weight(self, group, i, w):
        cur = self.cur
        if self.scaled_ok and group.coeff is None and group.dims[i] == 0 and \
                w.dtype in (torch.float32, torch.float64) and \
                not torch.compiler.is_compiling():
            # the same function, a first-order backward with fewer weight passes (scaled_ok:
            # autocast is off, so no context to disable it: ~10 us per layer and forward)
            return divided_fast(group.layout.geoms[i], w, cur.sigma_list[i], cur.u_list[i],
                                cur.x_list[i], group.specs[i] is None, cur.unit(i))
        with torch.autocast(w.device.type, enabled=False):
            if group.coeff is None and group.dims[i] == 0 and \
                    w.dtype in (torch.float32, torch.float64) and \
                    not torch.compiler.is_compiling():
                return divided_fast(group.layout.geoms[i], w, cur.sigma_list[i],
                                    cur.u_list[i], cur.x_list[i], group.specs[i] is None,
                                    cur.unit(i))
            return divided_by_call_sigma(group, cur, i, w)


def direct_call(group, weights: List[torch.Tensor], n_iters: int) -> Optional[PowerIterResult]:
    """The fused call of a no-grad "mixed" forward straight into ``lipkern::power_iter_ext``
    (the C++ kernel), or None where :meth:`SpectralNormGroup.run` must take it (another
    backend, a dtype or device the kernel does not take as is, torch.compile, vmap).
    The same op, inputs and result as ``group.run``; skipped: fused_power_iter's per-call
    validation (the group's layout is fixed at registration, and the kernel checks every
    weight's size against it) and the Python layer of the op's autograd registration (no
    gradient is asked for here). Measured: ~0.15-0.3 ms of Python per model forward."""
    w = weights[0]
    if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.float64) or \
            torch.compiler.is_compiling() or _in_vmap(w) or _in_vmap(group.v):
        return None
    v, u = group.v, group.u
    if v.dtype != w.dtype or u.dtype != w.dtype or not (v.is_contiguous() and u.is_contiguous()):
        return None
    if choose_backend(group.backend, group.layout, w.device, w.dtype) != "cpp":
        return None
    with torch._C._AutoDispatchBelowAutograd():
        sigmas, lip, log_lip, x, u_new = torch.ops.lipkern.power_iter_ext(
            weights, v, u, group.layout.meta, n_iters, float(group.eps), -1.0)
    return PowerIterResult(sigmas, lip, log_lip, PowerIterState(x, u_new, group.layout.meta))


def out_numel(module: nn.Module, x: torch.Tensor) -> int:
    """Elements of the layer's output for input ``x`` (convs: from the stride, ignoring the
    few rows padding and kernel size add or remove -- a cost estimate, not a shape)."""
    if isinstance(module, nn.Linear):
        return x.numel() // max(module.in_features, 1) * module.out_features
    per_channel = x.numel() // max(module.in_channels, 1)
    stride = 1
    for s in module.stride:
        stride *= s
    if isinstance(module, _TRANSPOSED):
        return per_channel * module.out_channels * stride
    return per_channel * module.out_channels // stride


class FusedWeights(Strategy):
    """The fused call also writes every ``W / sigma`` (:func:`lipkern.fused_normalize`: one
    launch on the GPU, whose backward is one more), and each layer runs its own op on it: two
    launches per training step for the whole model, whatever its depth. ``strategy="auto"``
    picks it where the fused op is the Triton kernel on CUDA tensors."""

    name = "fused_weights"

    def __init__(self, scaled: ScaledOutputs):
        self.scaled = scaled  # serves cache_eval's eval forwards
        self.what: Optional[List[torch.Tensor]] = None  # this forward's W_l / sigma_l

    def applies(self, group, w):
        return w.device.type == "cuda" and \
            resolve_backend(group.backend, w.device, w.dtype) == "triton"

    def prepare(self, group, originals, training):
        if self.scaled.eval_cached(group, originals, training):
            return self.scaled
        n_iters = group.n_power_iterations if training else 0
        op_weights = [group.op_weight(i, w) for i, w in enumerate(originals)]
        if group.coeff is None:
            # one launch writes every W_l / sigma_l; the layers run their own ops on them
            res = group.run(op_weights, group.v, group.u, group.specs, n_iters,
                            fused_normalize)
            what = res.weights
        else:  # W * min(1, coeff / sigma) as W / max(sigma / coeff, 1), as every strategy
            # does: never 0 / 0 -- a zero weight (sigma 0) stays zero, with the plain gradient
            res = group.run(op_weights, group.v, group.u, group.specs, n_iters)
            what = [divided(w, scale_of(s, group.coeff))
                    for w, s in zip(op_weights, res.sigmas.unbind(0))]
        group.count_call()
        if training:
            store_state(res.state, group.v, group.u)
        group.last_sigmas = res.sigmas.detach()
        self.what = [w if d == 0 else w.movedim(0, d) for w, d in zip(what, group.dims)]
        return self

    def layer_forward(self, group, i, module, x):
        if isinstance(module, nn.Linear):
            return F.linear(x, self.what[i], module.bias)
        if not isinstance(module, _TRANSPOSED):
            return module._conv_forward(x, self.what[i], module.bias)
        return base_forward(module, x)  # weight(): self.what[i]

    def weight(self, group, i, w):
        return self.what[i]

    def store(self, group):
        self.what = None


class Inline(Strategy):
    """No separate call: each layer is one ``lipkern::sn_linear``
    (:mod:`lipkern.ops.sn_linear`) whose power iteration rides in its own matmul and whose
    sigma gradient rides in its weight-gradient GEMM. Linear layers in matrix mode, CPU,
    float32/float64 outside autocast, no ``coeff``, the compiled extension built (else that
    forward runs "scaled_outputs"). ``strategy="auto"`` picks it for Linear-only models on the
    CPU with backend "auto" or "cpp"."""

    name = "inline"

    def __init__(self, scaled: ScaledOutputs):
        self.scaled = scaled
        self.originals: Optional[List[torch.Tensor]] = None
        self.n_iters = 0
        self.pending: dict = {}  # layer -> its new (u, v) in this forward
        self.sigmas: dict = {}

    def runs(self, group, w) -> bool:
        """Whether a forward on weights like ``w`` can run inline."""
        return (group.all_linear and group.coeff is None and w.device.type == "cpu"
                and w.dtype in (torch.float32, torch.float64)
                and not torch.is_autocast_enabled(w.device.type) and load_ext() is not None)

    def applies(self, group, w):
        return group.backend in ("auto", "cpp") and self.runs(group, w)

    def prepare(self, group, originals, training):
        if not self.runs(group, originals[0]):
            return self.scaled.prepare(group, originals, training)
        self.originals = originals
        self.n_iters = group.n_power_iterations if training else 0
        self.pending = {}
        self.sigmas = {}  # layer -> its sigma in this forward (for lipkern.nn.sigmas)
        return self

    def layer_forward(self, group, i, module, x):
        w = self.originals[i]
        if x.dtype != w.dtype or x.device != w.device or _in_vmap(x) or _in_vmap(w):
            return base_forward(module, x)  # weight(): the per-layer path
        first = self.pending.get(i)
        if first is None:
            (u, v), n_iters = group.views[i], self.n_iters
        else:  # called again in this forward: normalized once, with its new vectors
            (u, v), n_iters = first, 0
        y, sigma, u_new, v_new = _SN_LINEAR(x, w, bias(module), u, v, n_iters, group.eps)
        if n_iters:
            self.pending[i] = (u_new, v_new)
        self.sigmas[i] = sigma
        return y

    def store(self, group):
        """The new vectors into the layers' buffers: one ``_foreach_copy_`` per side for the
        whole model (skipped under vmap, as store_state)."""
        pending, self.pending = self.pending, {}
        self.originals = None
        sig, self.sigmas = self.sigmas, {}
        if len(sig) == len(group.views):  # every layer ran: this forward's sigmas
            group.last_sigmas = torch.stack([sig[i] for i in range(len(sig))]).detach()
        if not pending:
            return
        if group.tiled and len(pending) == len(group.views) and \
                not torch.compiler.is_compiling() and \
                list(pending) == list(range(len(pending))) and \
                not any(_in_vmap(uv[0]) for uv in pending.values()):
            # every layer ran once, in order: two cats and two copies for the whole model
            # (not under torch.compile: AOTAutograd rejects a write to the base of views that
            # are graph inputs)
            with torch.no_grad():
                group.u.copy_(torch.cat([uv[0] for uv in pending.values()]))
                group.v.copy_(torch.cat([uv[1] for uv in pending.values()]))
            return
        items = [(group.views[i], uv) for i, uv in pending.items() if not _in_vmap(uv[0])]
        if items:
            with torch.no_grad():
                torch._foreach_copy_([b[0] for b, _ in items], [uv[0] for _, uv in items])
                torch._foreach_copy_([b[1] for b, _ in items], [uv[1] for _, uv in items])


def make_strategies() -> dict:
    """One instance of every strategy for a new group, by name, in the order of ``auto``'s
    preference (the first whose ``applies`` holds; "scaled_outputs" applies everywhere)."""
    scaled = ScaledOutputs()
    return {"fused_weights": FusedWeights(scaled), "inline": Inline(scaled), "mixed": Mixed(),
            "scaled_outputs": scaled}
