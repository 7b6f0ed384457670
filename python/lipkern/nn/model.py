"""``lipkern.nn.spectral_norm_model``: spectral normalization of every Linear/Conv of a model,
all sigmas of one forward in ONE fused call.

Per layer it is :func:`lipkern.nn.spectral_norm` (torch's parametrization): the same buffers
and state_dict keys (``<layer>.parametrizations.weight.original``, ``...weight.0._u``,
``...weight.0._v``), the same random draws and 15 warm-up iterations at registration, per
training forward ``n_power_iterations`` of torch's update, none in eval, and
``sigma = u^T W v``. What changes is where the work runs: a forward pre-hook on the model runs
:func:`lipkern.fused_power_iter` (``variant="spectral_norm"``) once for all layers, and each
layer's parametrization divides by its entry. The vectors of all layers live in two packed
buffers; each layer's ``_u``/``_v`` buffers are views into them, so ``load_state_dict``,
DDP's buffer broadcast and checkpoint tools read and write the packed storage directly.

Differences from per-layer spectral_norm, all deliberate:

* a layer called twice in one model forward is normalized once (as under
  ``torch.nn.utils.parametrize.cached()``); a weight read outside a model forward is
  normalized on its own (the per-layer path, with the same train/eval rules);
* how the work is laid out (``strategy``; the same function and gradient every way; each
  strategy is one class in :mod:`lipkern.nn.strategies`):
  "mixed" (the default on the CPU for models with convs) -- one fused call without autograd
  gives every sigma and vector; per layer and input shape, a layer whose output has at
  least as many elements as its weight divides its weight (the call's sigma with the
  gradient of u^T A(W) x, :mod:`lipkern.nn.divided_weight`), any other scales its outputs
  as in "scaled_outputs"; every layer divides in a forward whose input requires grad;
  "fused_weights" (the default on CUDA with Triton) -- the one fused launch also writes
  every ``W / sigma`` (:func:`lipkern.fused_normalize`), each layer runs its own op on it,
  and one more launch returns every weight gradient: a model's normalization costs two
  launches per training step instead of ~20 small kernels per layer;
  "scaled_outputs" -- the one fused call gives the sigmas and each layer computes
  ``layer(x; W) / sigma + b`` (:mod:`lipkern.nn.scaled_layer`) at O(output) instead of two
  weight-sized passes and allocations per step. Layers the scaled path cannot take (string
  ``padding='same'``, ``output_size=`` of transposed convs, autocast) use the weight
  parametrization (division by the fused call's sigma);
  "inline" (the default on the CPU for Linear-only models) -- no separate call: each layer
  is one ``lipkern::sn_linear`` (:mod:`lipkern.ops.sn_linear`) whose power iteration rides
  in its own matmul (float32 at up to 32 rows of input on AVX-512: one sweep over the
  weight computes both; otherwise it runs right after the GEMM, on the weight still hot in
  cache), and whose sigma gradient rides in its weight-gradient GEMM. On a CPU the separate call's extra DRAM pass over every
  weight is the largest remaining cost (100 x 512^2 fp32: ~4 ms); here it is gone. This is
  the one strategy with one op per layer rather than one per model; float32/float64
  weights outside autocast (else that forward takes "scaled_outputs");
* ``cache_eval=True``: eval forwards reuse the sigmas (and vectors) of the first eval forward
  until a weight or a vector changes or the model goes back to training: zero power
  iterations per eval forward. Gradients still reach the weights through the layers (the
  cached sigma is a constant there, as eval-mode u and v are anyway).
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch.utils.weak import WeakIdKeyDictionary

from ..backends import load_ext
from ..layout import Layout, PowerIterState, layout_for
from ..power_iter import fused_power_iter
from ..spec import ConvSpec
from ..validate import compute_dtype
from .parametrization import (_CONV, _TRANSPOSED, _spec_from_module, check_input_size,
                              input_spatial_size, make_picklable, warn_if_zero)
from .divided_weight import divided, scale_of
from .strategies import STRATEGIES, Inline, Strategy, make_strategies, store_state

__all__ = ["spectral_norm_model", "remove_spectral_norm_model", "sigmas", "SpectralNormGroup",
           "GroupedSpectralNorm", "DEFAULT_TYPES", "SUPPORTED_TYPES"]

DEFAULT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
SUPPORTED_TYPES = DEFAULT_TYPES + (nn.ConvTranspose1d, nn.ConvTranspose2d)
_ATTR = "_lipkern_spectral_norm"


class GroupedSpectralNorm(nn.Module):
    """The parametrization of one layer of a :class:`SpectralNormGroup`
    (``<layer>.parametrizations.weight[0]``): buffers ``_u`` (rows / output space) and ``_v``
    (columns / input space) are views into the group's packed vectors."""

    def __init__(self, group: "SpectralNormGroup", index: int, u: torch.Tensor,
                 v: torch.Tensor):
        super().__init__()
        self.group = group  # a plain object: not a submodule, not in the state_dict
        self.index = index
        self.register_buffer("_u", u)
        self.register_buffer("_v", v)
        self._registering = False

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self._registering:  # register_parametrization's shape/dtype check
            return weight
        return self.group.normalized(self.index, weight)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def extra_repr(self) -> str:
        return f"index={self.index}"

    def _lipkern_install(self, module: nn.Module) -> None:
        """Route the layer's forward through the group (called at registration and when a
        pickled or deep-copied model is rebuilt)."""
        type(module).forward = _grouped_forward


def _plist(module: nn.Module):
    """``module.parametrizations.weight`` by direct dict lookups: nn.Module.__getattr__ and
    ModuleList indexing cost ~1 us each, per layer per forward."""
    return module._modules["parametrizations"]._modules["weight"]


def _grouped_forward(self, input):
    p = _plist(self)._modules["0"]
    return p.group.layer_forward(p.index, self, input)


_OTHER_SIZE_HINT = (" spectral_norm_model(mode='operator') takes inputs of the example_input's "
                    "sizes only (per layer, lipkern.nn.spectral_norm(..., other_sizes="
                    "'recompute') takes others).")
_STEPS = WeakIdKeyDictionary()  # weight of a normalized layer -> torch.optim steps on it
_TRACKED = [0]  # bumped when a weight joins _STEPS (optimizers then rescan their params)
_PER_OPTIMIZER = WeakIdKeyDictionary()  # optimizer -> (signature, its weights in _STEPS)
_STEP_HOOK: list = []


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    """After any torch.optim step: one more step on each normalized weight it holds (its
    list found once per optimizer and set of tracked weights: O(those weights) per step)."""
    groups = optimizer.param_groups
    sig = (_TRACKED[0],) + tuple((id(g["params"]), len(g["params"])) for g in groups)
    entry = _PER_OPTIMIZER.get(optimizer)
    if entry is None or entry[0] != sig:
        mine = [p for g in groups for p in g["params"] if p in _STEPS]
        entry = _PER_OPTIMIZER[optimizer] = (sig, mine)
    for p in entry[1]:
        _STEPS[p] += 1


def install_step_counter() -> None:
    """Count torch.optim steps on normalized weights (a hook installed once per process, at
    the first normalized model: importing lipkern installs nothing). A fused optimizer step
    (``fused=True``: measured for Adam, AdamW, SGD) writes the weights without bumping their
    version counters, so the cache keys carry this count too."""
    if not _STEP_HOOK:
        from torch.optim.optimizer import register_optimizer_step_post_hook
        _STEP_HOOK.append(register_optimizer_step_post_hook(_count_optimizer_step))


def optimizer_steps(w: torch.Tensor) -> int:
    """torch.optim steps taken on ``w`` since it was first asked about (tracked from then)."""
    n = _STEPS.get(w)
    if n is None:
        install_step_counter()
        n = _STEPS[w] = 0
        _TRACKED[0] += 1
    return n


class SpectralNormGroup:
    """All normalized layers of one model and their packed power-iteration state.

    Attributes: ``modules`` (the L layers, model order), ``names`` (their qualified names),
    ``specs`` (None: the weight as torch's matrix; ConvSpec: the conv operator), ``dims``
    (torch's ``dim``: 1 for transposed convs in matrix mode), ``layout`` (packing of the
    vectors), ``u``/``v`` (packed (total_y,) / (total_x,) buffers in the weights' dtype),
    ``strategies`` (one :class:`~lipkern.nn.strategies.Strategy` per name; the group picks
    one per forward and delegates the layers' work to it).
    """

    def __init__(self, modules: Sequence[nn.Module], names: Sequence[str],
                 specs: Sequence[Optional[ConvSpec]], dims: Sequence[int],
                 n_power_iterations: int, eps: float, backend: str, cache_eval: bool,
                 strategy: str = "auto", coeff: Optional[float] = None,
                 per_update: bool = False):
        self.modules = list(modules)
        self.names = list(names)
        self.specs = tuple(specs)
        self.dims = tuple(dims)
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        self.backend = backend
        self.cache_eval = cache_eval
        self.strategy = strategy
        self.coeff = coeff  # None: W / sigma; else W * min(1, coeff / sigma)
        self.per_update = per_update  # power_iteration="per_update" (spectral_norm_model)
        self.last_sigmas: Optional[torch.Tensor] = None  # (L,) of the latest fused call
        self.layout: Optional[Layout] = None
        self.u: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.views: List[Tuple[torch.Tensor, torch.Tensor]] = []  # each layer's (_u, _v)
        self.tiled = False
        self.all_linear = all(isinstance(m, nn.Linear) and s is None and d == 0
                              for m, s, d in zip(modules, specs, dims))
        self.conv_args = [_conv_args(m) for m in self.modules]  # False: division path
        self.fast = [c is not False for c in self.conv_args]
        self.strategies = make_strategies()
        self.active: Optional[Strategy] = None  # the strategy of the forward in progress
        self.input_grad = False  # this forward's model input requires grad
        self.calls = 0  # fused calls made (for tests and curious users)

    # ------------------------------------------------------------ the layers
    def plists(self) -> list:
        """Every layer's ``parametrizations.weight`` (cached: fixed while the group lives;
        deepcopy and pickle copy the cache along with the modules)."""
        pl = self.__dict__.get("_plists")
        if pl is None:
            pl = self._plists = [_plist(m) for m in self.modules]
        return pl

    def params(self) -> List[GroupedSpectralNorm]:
        return [pl._modules["0"] for pl in self.plists()]

    def originals(self) -> List[torch.Tensor]:
        return [_original(pl) for pl in self.plists()]

    def op_weight(self, i: int, w: torch.Tensor) -> torch.Tensor:
        """Layer i's weight as the fused op reads it (torch's matrix: ``dim`` first)."""
        return w if self.dims[i] == 0 else w.movedim(self.dims[i], 0)

    def operator_layout(self) -> Tuple[List[int], List[int], List[int], Optional[Tuple]]:
        """(indices, meta, w_numel per layer, span) of the conv-operator layers alone, for
        one C++ backward call over them; ``span``: (x slice, u slice) of the packed vectors
        when those layers are consecutive (their vectors are then one view, no copy), else
        None. Cached: fixed while the group lives."""
        op = self.__dict__.get("_operator_layout")
        if op is None:
            from ..layout import _build
            idx = [i for i, s in enumerate(self.specs) if s is not None]
            geoms = tuple(self.layout.geoms[i] for i in idx)
            lay = self.layout
            span = None
            if idx and idx == list(range(idx[0], idx[-1] + 1)):
                span = (slice(lay.x_slice(idx[0]).start, lay.x_slice(idx[-1]).stop),
                        slice(lay.y_slice(idx[0]).start, lay.y_slice(idx[-1]).stop))
            op = self._operator_layout = (idx, list(_build(geoms).meta),
                                          [g.w_numel for g in geoms], span)
        return op

    # ------------------------------------------------------------ packed vectors
    def pack(self, us: Sequence[torch.Tensor], vs: Sequence[torch.Tensor]) -> None:
        """Concatenate per-layer vectors into the packed buffers and make each layer's
        ``_u``/``_v`` a view into them."""
        self.u = torch.cat([u.reshape(-1) for u in us])
        self.v = torch.cat([v.reshape(-1) for v in vs])
        lay = self.layout
        self.views = []
        for i, p in enumerate(self.params()):
            p._buffers["_u"] = self.u[lay.y_slice(i)]
            p._buffers["_v"] = self.v[lay.x_slice(i)]
            self.views.append((p._buffers["_u"], p._buffers["_v"]))
        # whether the layers' vectors tile the packed buffers in layer order (then an
        # "inline" forward stores all its new vectors with one cat + copy_ per side)
        self.tiled = all(
            sum(t.numel() for t in bufs) == whole.numel() and
            [t.storage_offset() for t in bufs] ==
            [sum(b.numel() for b in bufs[:k]) + whole.storage_offset()
             for k in range(len(bufs))]
            for bufs, whole in (([u for u, _ in self.views], self.u),
                                ([v for _, v in self.views], self.v)))

    def _ensure_packed(self, params: List[GroupedSpectralNorm]) -> None:
        """``module.to()``/``.double()`` or ``load_state_dict(assign=True)`` replace buffers
        with fresh tensors: re-pack whenever a layer's buffer is no longer our view (an
        identity test per layer: in-place writes such as load_state_dict keep the views)."""
        for p, (u, v) in zip(params, self.views):
            if p._buffers["_u"] is not u or p._buffers["_v"] is not v:
                self.pack([q._buffers["_u"] for q in params], [q._buffers["_v"] for q in params])
                return

    # ------------------------------------------------------------ one fused call
    def run(self, weights, state_v, state_u, specs, n_iters, fn=fused_power_iter):
        """One fused call (torch's update) from the given packed vectors."""
        cdtype = compute_dtype(weights[0].dtype)
        meta = layout_for(tuple(tuple(w.shape) for w in weights), specs).meta
        state = PowerIterState(state_v.to(cdtype), state_u.to(cdtype), meta)
        return fn(weights, specs, state=state, n_iters=n_iters, eps=self.eps,
                  backend=self.backend, check_finite=False, variant="spectral_norm")

    def count_call(self) -> None:
        """One more fused call (not counted under torch.compile: a Python int that changes
        every call would be a guard, and so a recompilation every step)."""
        if not torch.compiler.is_compiling():
            self.calls += 1

    def cache_key(self, originals) -> Tuple:
        """What a kept result (cache_eval, power_iteration="per_update") is valid for: every
        weight's and vector's version counter and storage, the torch.optim steps that
        updated each weight (a fused optimizer -- ``fused=True`` -- writes the weights
        without bumping their versions) and inference mode (its tensors cannot be reused
        outside it)."""
        return (tuple((w._version, w.data_ptr(), w.dtype, w.device, optimizer_steps(w))
                      for w in originals),
                self.u._version, self.v._version, self.u.data_ptr(), self.v.data_ptr(),
                torch.is_inference_mode_enabled())

    def strategy_for(self, w: torch.Tensor) -> Strategy:
        """The strategy a forward on weights like ``w`` starts with: the one forced by
        ``strategy=``, or for "auto" the first whose ``applies`` holds."""
        if self.strategy != "auto":
            return self.strategies[self.strategy]
        for s in self.strategies.values():
            if s.applies(self, w):
                return s
        return self.strategies["scaled_outputs"]

    def resolved_strategy(self) -> str:
        """The name of the strategy a training forward runs now (for tables and logs)."""
        w = self.originals()[0]
        s = self.strategy_for(w)
        if isinstance(s, Inline) and not s.runs(self, w):
            s = self.strategies["scaled_outputs"]
        return s.name

    # ------------------------------------------------------------ a model forward
    def begin_forward(self) -> None:
        """The model's forward pre-hook: the strategy's per-forward work (for all but
        "inline": every sigma of this forward in one fused call)."""
        params = self.params()
        training = params[0].training
        if any(p.training != training for p in params):
            self.active = None  # mixed train/eval layers: each takes the per-layer path
            return
        self._ensure_packed(params)
        originals = self.originals()
        self.active = self.strategy_for(originals[0]).prepare(self, originals, training)

    def end_forward(self) -> None:
        """The model's forward hook (also after an exception): the strategy stores its new
        vectors; later weight reads outside a forward take the per-layer path."""
        active, self.active = self.active, None
        if active is not None:
            active.store(self)

    def layer_forward(self, i: int, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Layer i's forward, as the forward's strategy runs it (outside a model forward: the
        layer's own forward on its per-layer normalized weight)."""
        if self.specs[i] is not None:  # operator mode: sigma is for the registered size
            check_input_size(module, x, self.specs[i], _OTHER_SIZE_HINT, self.names[i])
        active = self.active
        if active is None:
            return type(module).__bases__[0].forward(module, x)
        return active.layer_forward(self, i, module, x)

    # ------------------------------------------------------------ per layer
    def normalized(self, i: int, weight: torch.Tensor) -> torch.Tensor:
        """Layer i's normalized weight: as the forward's strategy gives it, or outside a
        model forward the per-layer computation (same train/eval rules as spectral_norm)."""
        if self.active is not None:
            return self.active.weight(self, i, weight)
        return self.per_layer(i, weight)

    def per_layer(self, i: int, weight: torch.Tensor) -> torch.Tensor:
        """Layer i's weight normalized on its own (its own fused call)."""
        p = self.modules[i].parametrizations.weight[0]
        training = p.training
        u, v = p._buffers["_u"], p._buffers["_v"]
        res = self.run([self.op_weight(i, weight)], v, u, (self.specs[i],),
                       self.n_power_iterations if training else 0)
        if training:
            store_state(res.state, v, u)
        return divided(weight, scale_of(res.sigmas[0], self.coeff))

    # ------------------------------------------------------------ hooks (picklable)
    def pre_hook(self, module, args):
        # a forward whose input wants a gradient (gradient penalty, R1, attacks) is likely
        # to be differentiated twice: strategy "mixed" then divides every layer's weight
        self.input_grad = torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        self.begin_forward()

    def post_hook(self, module, args, output):
        self.end_forward()


def _original(plist) -> torch.Tensor:
    """``ParametrizationList.original`` (a parameter, or a buffer for a non-parameter)."""
    t = plist._parameters.get("original")
    return t if t is not None else plist.original


def _conv_args(m: nn.Module):
    """aten.convolution arguments of a layer (None for Linear), or False where ScaledLayer
    does not apply (string padding other than 'valid', a transposed conv's output_size)."""
    if isinstance(m, nn.Linear):
        return None
    n = len(m.kernel_size)
    padding = m.padding
    if isinstance(padding, str):
        if padding != "valid":
            return False
        padding = (0,) * n
    if m.padding_mode != "zeros":
        padding = (0,) * n  # the input is padded by F.pad first
    transposed = isinstance(m, _TRANSPOSED)
    return (tuple(m.stride), tuple(padding), tuple(m.dilation), transposed,
            tuple(m.output_padding) if transposed else (0,) * n, m.groups)


def _select(model: nn.Module, types, names) -> List[Tuple[str, nn.Module]]:
    if types is None:
        types = DEFAULT_TYPES
    types = tuple(types) if isinstance(types, (list, tuple)) else (types,)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, SUPPORTED_TYPES)):
            raise TypeError(f"types: {t!r} is not one of (or a subclass of) "
                            f"{[c.__name__ for c in SUPPORTED_TYPES]}")
    if names is not None and not callable(names):
        wanted = {names} if isinstance(names, str) else set(names)  # a str is one name
    out = []
    for qname, m in model.named_modules():
        if not isinstance(m, types):
            continue
        if names is not None and not (names(qname, m) if callable(names) else qname in wanted):
            continue
        out.append((qname, m))
    if names is not None and not callable(names):
        missing = wanted - {q for q, _ in out}
        if missing:
            raise ValueError(f"names: {sorted(missing)} are not layers of the selected types "
                             f"in this model")
    if not out:
        raise ValueError("model has no layer to normalize (types="
                         f"{[t.__name__ for t in types]}, names={names!r})")
    return out


def _capture_input_sizes(model: nn.Module, targets, example_input) -> List[Optional[Tuple]]:
    """Run ``model(example_input)`` once in eval mode and no_grad, recording the spatial size
    of every target's input."""
    sizes: dict = {}
    handles = []
    for qname, m in targets:
        def hook(mod, args, qname=qname):
            # batched or unbatched input (an unbatched (C, H, W) once captured (W,))
            sizes.setdefault(qname, input_spatial_size(mod, args[0])
                             if isinstance(mod, _CONV) else None)
        handles.append(m.register_forward_pre_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    missing = [q for q, _ in targets if q not in sizes]
    if missing:
        raise ValueError(f"example_input: layers {missing} did not run in model(example_input); "
                         f"exclude them with names= or types=")
    return [sizes[q] for q, _ in targets]


def spectral_norm_model(model: nn.Module, example_input=None, *, n_power_iterations: int = 1,
                        eps: float = 1e-12,
                        types: Union[None, type, Sequence[type]] = None,
                        names: Union[None, Iterable[str], Callable[[str, nn.Module], bool]] = None,
                        mode: str = "matrix", cache_eval: bool = False,
                        backend: str = "auto", strategy: str = "auto",
                        coeff: Optional[float] = None,
                        power_iteration: str = "auto") -> nn.Module:
    """Spectrally normalize every selected layer of ``model`` in place, with ONE fused call
    (one ``lipkern::`` op) per model forward for all of them (strategy "inline", the CPU
    default for Linear-only models, instead folds each layer's iteration into its own op).
    Returns the model.

    Per layer this is :func:`lipkern.nn.spectral_norm` with the same arguments: the same
    values, gradients, buffers and state_dict keys as
    ``torch.nn.utils.parametrizations.spectral_norm`` (``mode="matrix"``).

    Args:
        model: any module; its forward pre-hook runs the fused call.
        example_input: a tensor (or tuple of positional inputs) for one forward; needed by
            ``mode="operator"`` to learn each conv's input size.
        n_power_iterations, eps: as in spectral_norm (per training forward; eval: none).
        types: layer classes to normalize (default Linear, Conv1d, Conv2d; ConvTranspose1d/2d
            are also supported, with torch's ``dim=1``).
        names: qualified names to normalize (an iterable, checked to exist) or a predicate
            ``f(name, module) -> bool``; None: every layer of ``types``.
        mode: "matrix" (torch's reshaped weight) or "operator" (convs divided by the sigma of
            the conv operator at their input size: truly 1-Lipschitz layers).
        cache_eval: reuse the eval-mode normalized weights across eval forwards (see module
            docstring: zero power iterations, no weight gradient in eval).
        backend: as in :func:`lipkern.fused_power_iter`.
        coeff: None (divide by sigma), or soft normalization as in invertible ResNets and
            DUE: each weight becomes ``W * min(1, coeff / sigma)`` (a layer with sigma below
            coeff is left as it is; gradients exact on both sides).
        strategy: how the layers use the fused call's sigmas (same values and gradients):
            "mixed" -- per layer, the cheaper of dividing the weight (the fused call's sigma
            with the gradient of u^T A(W) x) and scaling the outputs, by the size of the
            layer's output against its weight (every layer divides in a forward whose input
            requires grad)
            (:class:`lipkern.nn.strategies.Mixed`);
            "fused_weights" -- the fused kernel also writes every ``W / sigma``
            (:func:`lipkern.fused_normalize`) and each layer runs its own op on it: two
            launches per training step for the whole model, whatever its depth (the GPU
            choice: there the per-layer launches are the cost); "scaled_outputs" -- each layer
            computes ``layer(x; W) / sigma + b`` with the sigma gradient folded into its
            weight-gradient GEMM: no weight-sized tensor per step (the CPU choice: there
            weight-sized passes and fresh pages are the cost); "inline" -- Linear layers
            only, CPU: no separate call, each layer's power iteration runs inside its own
            op (:func:`lipkern.sn_linear`), in the same sweep over its weight as its
            matmul; "auto" --
            "fused_weights" where the fused op is the Triton kernel on CUDA tensors, "inline"
            for a Linear-only model on the CPU (backend "auto" or "cpp", the extension
            built, no coeff), "mixed" for any other model on the CPU, else "scaled_outputs".

        power_iteration: "auto" (the default: "per_forward" in matrix mode, "per_update" in
            operator mode), "per_forward" (torch's rule: ``n_power_iterations`` in every
            training forward) or "per_update": a training forward whose weights and vectors
            are those the previous training forward left (no optimizer step, no load, no
            in-place change since: their version counters) reuses that forward's sigmas,
            vectors and sigma gradients -- no fused call, no one-sample passes. The forwards
            of one step then see one normalized model, as with one concatenated batch (a GAN's
            D(real), D(fake) and the gradient penalty's D(x_hat)); the vectors advance once
            per update. Eager forwards of strategy "mixed" (the CPU default for conv models)
            and of "scaled_outputs" without autograd through the call; other strategies and
            compiled forwards iterate per forward. Writes through ``.data`` do not bump a
            tensor's version: after editing weights that way between two forwards of one
            update (e.g. weight clipping before the step's first forward rather than after
            ``optimizer.step()``), edit them in place under ``torch.no_grad()`` instead.
            Why "auto" differs by mode: matrix mode is torch's spectral_norm and keeps its
            rule; the conv operator's iteration costs three one-sample passes per conv
            (1/B of the convs' own work at batch B) and per forward would make a GAN's D
            step with two or three forwards pay that two or three times for one update
            (bench/NOTES.md, issue 16). The per-layer
            ``lipkern.nn.spectral_norm(mode="operator")`` iterates every training forward.

    Remove with :func:`remove_spectral_norm_model`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, _ATTR, None) is not None:
        raise ValueError("model already has spectral_norm_model applied; call "
                         "remove_spectral_norm_model(model) first")
    if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int) \
            or n_power_iterations <= 0:
        raise ValueError(f"n_power_iterations must be a positive int, got {n_power_iterations!r}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    if mode not in ("matrix", "operator"):
        raise ValueError(f"mode must be 'matrix' or 'operator', got {mode!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if power_iteration not in ("auto", "per_forward", "per_update"):
        raise ValueError("power_iteration must be 'auto', 'per_forward' or 'per_update', got "
                         f"{power_iteration!r}")
    if power_iteration == "auto":
        power_iteration = "per_update" if mode == "operator" else "per_forward"
    if coeff is not None and (isinstance(coeff, bool) or not isinstance(coeff, (int, float))
                              or not coeff > 0 or coeff == float("inf")):
        raise ValueError(f"coeff must be None or a finite float > 0, got {coeff!r}")
    if coeff is not None and strategy == "inline":
        raise ValueError("strategy='inline' does not take coeff= (lipkern::sn_linear divides by "
                         "sigma itself); use strategy='mixed' or 'auto'")
    targets = _select(model, types, names)
    first = targets[0][1].weight
    for qname, m in targets:
        if parametrize.is_parametrized(m, "weight"):
            raise ValueError(f"{qname}.weight is already parametrized (e.g. by spectral_norm); "
                             f"remove that first or exclude it with names=")
        w = m.weight
        if w.device != first.device or w.dtype != first.dtype:
            raise ValueError(f"{qname}.weight is {w.dtype} on {w.device} but "
                             f"{targets[0][0]}.weight is {first.dtype} on {first.device}: one "
                             f"fused call needs one dtype and device")
        if not torch.isfinite(w).all():
            raise ValueError(f"{qname}.weight contains NaN or Inf values")
        warn_if_zero(f"{qname}.weight", w, coeff)
    specs: List[Optional[ConvSpec]] = [None] * len(targets)
    if mode == "operator":
        if example_input is None:
            raise ValueError("mode='operator' needs example_input (one forward gives each "
                             "conv's input size)")
        sizes = _capture_input_sizes(model, targets, example_input)
        specs = [None if isinstance(m, nn.Linear) else _spec_from_module(m, size)
                 for (_, m), size in zip(targets, sizes)]
    dims = [1 if isinstance(m, _TRANSPOSED) and spec is None else 0
            for (_, m), spec in zip(targets, specs)]
    group = SpectralNormGroup([m for _, m in targets], [q for q, _ in targets], specs, dims,
                              n_power_iterations, eps, backend, cache_eval, strategy,
                              None if coeff is None else float(coeff),
                              per_update=power_iteration == "per_update")
    if strategy == "inline":
        if not group.all_linear:
            raise ValueError("strategy='inline' folds the power iteration into Linear layers' "
                             "own matmuls: every selected layer must be an nn.Linear (select "
                             "them with types=/names=, or use strategy='scaled_outputs')")
        if load_ext() is None:
            from ..backends import _ext_missing
            raise ValueError("strategy='inline' needs " + _ext_missing())
    weights = [group.op_weight(i, m.weight.detach()) for i, (_, m) in enumerate(targets)]
    group.layout = layout_for(tuple(tuple(w.shape) for w in weights), group.specs)
    us, vs = _initial_vectors(group, weights)
    # torch's 15 warm-up iterations, plus the training-mode forward that
    # register_parametrization runs once: all layers in one call
    with torch.no_grad():
        res = group.run(weights, torch.cat(vs), torch.cat(us), group.specs,
                         15 + n_power_iterations)
    group.last_sigmas = res.sigmas
    lay = group.layout
    us = [res.state.u[lay.y_slice(i)].to(first.dtype) for i in range(len(targets))]
    vs = [res.state.x[lay.x_slice(i)].to(first.dtype) for i in range(len(targets))]
    for i, (_, m) in enumerate(targets):
        param = GroupedSpectralNorm(group, i, us[i], vs[i])
        param._registering = True
        try:
            parametrize.register_parametrization(m, "weight", param)
        finally:
            param._registering = False
        make_picklable(m)
        param._lipkern_install(m)
    group.pack(us, vs)
    handles = (model.register_forward_pre_hook(group.pre_hook),
               model.register_forward_hook(group.post_hook, always_call=True))
    group.hook_ids = tuple(h.id for h in handles)
    setattr(model, _ATTR, group)
    return model


def _initial_vectors(group: SpectralNormGroup, weights):
    """Cold-start vectors drawn exactly as per-layer spectral_norm draws them, layer by
    layer in model order (so equal seeds give equal vectors): matrix mode u then v from
    ``normal_`` on the weight's device, operator mode x then u from the CPU generator."""
    us, vs = [], []
    lay = group.layout
    for i, w in enumerate(weights):
        g = lay.geoms[i]
        if group.specs[i] is None:
            mat = w.flatten(1)
            u = F.normalize(mat.new_empty(mat.shape[0]).normal_(0, 1), dim=0, eps=group.eps)
            v = F.normalize(mat.new_empty(mat.shape[1]).normal_(0, 1), dim=0, eps=group.eps)
        else:
            v = torch.randn(g.x_numel, dtype=torch.float32).to(w.device, w.dtype)
            u = torch.randn(g.y_numel, dtype=torch.float32).to(w.device, w.dtype)
        us.append(u)
        vs.append(v)
    return us, vs


def sigmas(model: nn.Module) -> dict:
    """The current sigma of every layer normalized by :func:`spectral_norm_model`, for
    logging: ``{qualified layer name: 0-d float32 tensor}``, the sigmas of the latest forward
    (at registration: of its warm-up iterations). Nothing is recomputed and nothing
    synchronizes (the tensors stay on the weights' device; ``.item()`` them to log). The
    values are the sigmas the layers were divided by (before ``coeff``); detached."""
    group = getattr(model, _ATTR, None)
    if group is None:
        raise ValueError("sigmas(model): model has no spectral_norm_model applied")
    return dict(zip(group.names, group.last_sigmas.unbind(0)))


def remove_spectral_norm_model(model: nn.Module, leave_parametrized: bool = True) -> nn.Module:
    """Undo :func:`spectral_norm_model`: remove the hooks and every layer's parametrization
    (``leave_parametrized=True`` keeps the current normalized weights, as torch's
    ``remove_parametrizations`` does)."""
    group = getattr(model, _ATTR, None)
    if group is None:
        raise ValueError("model has no spectral_norm_model to remove")
    for hid in group.hook_ids:
        model._forward_pre_hooks.pop(hid, None)
        model._forward_hooks.pop(hid, None)
        model._forward_hooks_always_called.pop(hid, None)
    for m in group.modules:
        del type(m).forward  # back to the class's own forward
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=leave_parametrized)
    delattr(model, _ATTR)
    return model
