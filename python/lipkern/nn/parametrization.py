"""``lipkern.nn.spectral_norm``: a drop-in for ``torch.nn.utils.parametrizations.spectral_norm``.

``mode="matrix"`` reproduces torch's parametrization exactly: the same buffers (``_u`` left,
``_v`` right), the same 15 iterations at registration from the same random draws, per
training-mode forward ``n_power_iterations`` of ``u = normalize(W v), v = normalize(W^H u)``,
``sigma = u^T W v`` with u and v held constant, eval-mode forwards that do not update, the same
``dim`` rules (ConvTranspose: 1) and state_dict keys (a state_dict saved with torch's loads into
lipkern's and back). Where torch's breaks, this one does not:

* no ``out=`` ops, and under ``torch.func.vmap`` the buffers are not written (a batched
  update cannot go into an unbatched buffer), so ``functional_call`` over stacked weights works;
* the vectors are re-normalized before use, so vectors shrunk or averaged by checkpoint surgery
  give the same sigma as unit ones;
* under autocast the iteration and sigma are float32.

``mode="operator"`` divides a conv weight by its conv *operator's* sigma at ``input_size``
(given, or taken from the first forward), computed by :func:`lipkern.fused_power_iter`: a truly
1-Lipschitz layer, which torch's reshaped-kernel normalization is not. Its buffers hold the
operator's vectors (``_u`` output space, ``_v`` input space, flattened).
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from ..layout import PowerIterState, layout_for
from ..power_iter import fused_power_iter
from ..reference import divide
from ..spec import ConvSpec

__all__ = ["spectral_norm", "SpectralNorm"]

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)


def _in_vmap(t: torch.Tensor) -> bool:
    try:
        return torch._C._functorch.is_batchedtensor(t)
    except AttributeError:  # pragma: no cover - older torch
        return False


class SpectralNorm(nn.Module):
    """The parametrization registered by :func:`spectral_norm` (``parametrizations.<name>.0``).

    Args: weight (any ndim >= 1), n_power_iterations (> 0), dim (the output dimension), eps,
    mode ("matrix" or "operator"), spec (the ConvSpec of operator mode; None until known),
    other_sizes (operator mode, an input of another spatial size than ``spec``'s: "error"
    raises ValueError, "recompute" normalizes by that size's own operator sigma, its vectors
    kept per size in memory -- not in the state_dict, which holds the registered size's).
    """

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, dim: int = 0,
                 eps: float = 1e-12, mode: str = "matrix", spec: Optional[ConvSpec] = None,
                 coeff: Optional[float] = None, other_sizes: str = "error"):
        super().__init__()
        if other_sizes not in OTHER_SIZES:
            raise ValueError(f"other_sizes must be one of {OTHER_SIZES}, got {other_sizes!r}")
        self.other_sizes = other_sizes
        self._sizes: dict = {}  # other_sizes="recompute": size -> (spec, u, v), not saved
        self._active = None     # that size while its forward runs (None: the registered one)
        ndim = weight.ndim
        if dim >= ndim or dim < -ndim:
            raise IndexError(f"Dimension out of range (expected to be in range of "
                             f"[-{ndim}, {ndim - 1}] but got {dim})")
        if n_power_iterations <= 0:
            raise ValueError(f"Expected n_power_iterations to be positive, but got "
                             f"n_power_iterations={n_power_iterations}")
        if mode not in ("matrix", "operator"):
            raise ValueError(f"mode must be 'matrix' or 'operator', got {mode!r}")
        if coeff is not None and (isinstance(coeff, bool) or not isinstance(coeff, (int, float))
                                  or not 0 < coeff < float("inf")):
            raise ValueError(f"coeff must be None or a finite float > 0, got {coeff!r}")
        self.coeff = None if coeff is None else float(coeff)  # W * min(1, coeff / sigma)
        self.dim = dim if dim >= 0 else dim + ndim
        self.eps = eps
        self.mode = mode
        self.spec = spec
        self.n_power_iterations = n_power_iterations
        if mode == "operator":
            if ndim not in (3, 4):
                raise ValueError("mode='operator' needs a Conv1d/Conv2d or ConvTranspose weight")
            # vectors are created on the first forward, when the input size is known
            self.register_buffer("_u", torch.empty(0, dtype=weight.dtype, device=weight.device))
            self.register_buffer("_v", torch.empty(0, dtype=weight.dtype, device=weight.device))
            if spec is not None:
                self._init_operator(weight, spec)
        elif ndim > 1:
            weight_mat = self._reshape_weight_to_matrix(weight)
            h, w = weight_mat.size()
            # the same draws, in the same order, as torch's: equal seeds give equal vectors
            u = weight_mat.new_empty(h).normal_(0, 1)
            v = weight_mat.new_empty(w).normal_(0, 1)
            self.register_buffer("_u", F.normalize(u, dim=0, eps=self.eps))
            self.register_buffer("_v", F.normalize(v, dim=0, eps=self.eps))
            self._power_method(_upcast(weight_mat), 15)

    # ------------------------------------------------------------ matrix mode (torch's)
    def _reshape_weight_to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        if self.dim != 0:
            weight = weight.permute(self.dim, *(d for d in range(weight.dim()) if d != self.dim))
        return weight.flatten(1)

    @torch.no_grad()
    def _power_method(self, weight_mat: torch.Tensor, n_power_iterations: int):
        """torch's update on ``weight_mat`` (float32 for bf16/fp16 weights: the vectors
        iterate in float32 and are stored in the buffers' dtype, as the fused op does)."""
        # shrunk/averaged vectors: renormalize
        u = F.normalize(self._u.to(weight_mat.dtype), dim=0, eps=self.eps)
        v = F.normalize(self._v.to(weight_mat.dtype), dim=0, eps=self.eps)
        for _ in range(n_power_iterations):
            u = F.normalize(torch.mv(weight_mat, v), dim=0, eps=self.eps)
            v = F.normalize(torch.mv(weight_mat.H, u), dim=0, eps=self.eps)
        self._store(u, v)
        return u, v

    def _store(self, u: torch.Tensor, v: torch.Tensor) -> None:
        """Write the vectors back in place (DDP broadcasts into these very buffers), except
        under vmap, where a batched value cannot go into an unbatched buffer."""
        if _in_vmap(u) and not _in_vmap(self._u):
            return
        self._u.copy_(u)
        self._v.copy_(v)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.mode == "operator":
            return self._forward_operator(weight)
        if weight.ndim == 1:
            return F.normalize(weight, dim=0, eps=self.eps)
        with torch.autocast(weight.device.type, enabled=False):
            w32 = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
            weight_mat = self._reshape_weight_to_matrix(w32)
            if self.training:
                u, v = self._power_method(weight_mat, self.n_power_iterations)
            else:
                u = F.normalize(self._u, dim=0, eps=self.eps)
                v = F.normalize(self._v, dim=0, eps=self.eps)
            # fresh tensors, never the buffers: a later in-place update (the next training
            # forward, or DDP's buffer broadcast) cannot touch what autograd saved
            u = u.clone(memory_format=torch.contiguous_format).to(w32.dtype)
            v = v.clone(memory_format=torch.contiguous_format).to(w32.dtype)
            sigma = torch.vdot(u, torch.mv(weight_mat, v))
            return (w32 / _scale(sigma, getattr(self, "coeff", None))).to(weight.dtype)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # operator mode before its first forward has empty vectors (their size needs the input
        # size): take the checkpoint's, so a model can be restored before it ever runs; the
        # first forward checks them against the input size then
        if self.mode == "operator" and self._v.numel() == 0:
            for name in ("_u", "_v"):
                t = state_dict.get(prefix + name)
                if isinstance(t, torch.Tensor) and t.dim() == 1:
                    self._buffers[name] = torch.empty_like(t, dtype=self._buffers[name].dtype,
                                                           device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # ------------------------------------------------------------ operator mode
    def _init_operator(self, weight: torch.Tensor, spec: ConvSpec) -> None:
        self.spec = spec
        res = fused_power_iter([weight.detach()], [spec], n_iters=15, eps=self.eps,
                               check_finite=False, variant="spectral_norm")
        self._u = res.state.u.to(weight.dtype)
        self._v = res.state.x.to(weight.dtype)

    def _forward_operator(self, weight: torch.Tensor) -> torch.Tensor:
        if self.spec is None and getattr(self, "_registering", False):
            return weight  # register_parametrization's shape/dtype check, before any input
        if self.spec is None:
            raise RuntimeError("mode='operator' needs the input size: pass input_size= to "
                               "spectral_norm, or run one forward of the module first")
        if self._v.numel() == 0:
            self._init_operator(weight, self.spec)
        if self._active is not None:  # other_sizes="recompute", another input size
            return self._forward_other_size(weight, *self._active)
        layout = layout_for((tuple(weight.shape),), (self.spec,))
        g = layout.geoms[0]
        if self._v.numel() != g.x_numel or self._u.numel() != g.y_numel:
            raise ValueError(f"spectral_norm(mode='operator'): the vectors _v ({self._v.numel()}) "
                             f"and _u ({self._u.numel()}) do not fit input size "
                             f"{self.spec.input_size} ({g.x_numel} and {g.y_numel} entries): "
                             f"a state_dict saved at another input size?")
        meta = layout.meta
        state = PowerIterState(self._v.float(), self._u.float(), meta)
        res = fused_power_iter([weight], [self.spec], state=state,
                               n_iters=self.n_power_iterations if self.training else 0,
                               eps=self.eps, check_finite=False, variant="spectral_norm")
        if self.training:
            self._store(res.state.u.to(self._u.dtype), res.state.x.to(self._v.dtype))
        return _divide_scaled(weight, res.sigmas[0], getattr(self, "coeff", None))

    def _forward_other_size(self, weight: torch.Tensor, size, spec: ConvSpec) -> torch.Tensor:
        entry = self._sizes.get(size)
        if entry is None:  # first use of this size: torch's 15 warm-up iterations
            res = fused_power_iter([weight.detach()], [spec], n_iters=15, eps=self.eps,
                                   check_finite=False, variant="spectral_norm")
            entry = self._sizes[size] = res.state
        res = fused_power_iter([weight], [spec], state=entry,
                               n_iters=self.n_power_iterations if self.training else 0,
                               eps=self.eps, check_finite=False, variant="spectral_norm")
        if self.training and not _in_vmap(res.state.x):
            self._sizes[size] = res.state
        return _divide_scaled(weight, res.sigmas[0], getattr(self, "coeff", None))

    # ------------------------------------------------------------ operator mode: input sizes
    def _lipkern_install(self, module: nn.Module) -> None:
        """Operator mode: the forward pre-hook that captures the input size on the first
        forward and checks it on every later one (re-installed after pickle/deepcopy)."""
        if self.mode == "operator":
            module.register_forward_pre_hook(self._check_input)
            module.register_forward_hook(self._end_forward, always_call=True)

    def _end_forward(self, module: nn.Module, args, output) -> None:
        self._active = None  # reads of the weight outside a forward: the registered size

    def _check_input(self, module: nn.Module, args) -> None:
        size = input_spatial_size(module, args[0])
        if self.spec is None:
            self.spec = _spec_from_module(module, size)
            return
        self._active = None
        if size == tuple(self.spec.input_size):
            return
        if self.other_sizes == "error":
            check_input_size(module, args[0], self.spec,
                             " Pass other_sizes='recompute' to spectral_norm to normalize each "
                             "size by its own sigma, or register with that input_size.")
        self._active = (size, _spec_from_module(module, size))


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _scale(sigma: torch.Tensor, coeff: Optional[float]) -> torch.Tensor:
    """The divisor: sigma, or max(sigma / coeff, 1) (soft normalization, coeff=)."""
    return sigma if coeff is None else torch.clamp_min(sigma / coeff, 1.0)


def _divide_scaled(weight: torch.Tensor, sigma: torch.Tensor, coeff: Optional[float]):
    """weight / _scale(sigma, coeff), in float32 for bf16/fp16 weights (reference.divide)."""
    return divide(weight, _scale(sigma, coeff))


def _reduce_parametrized(self, protocol):
    """Pickle a module parametrized by lipkern as its original class plus its state (torch's
    injected class refuses to pickle). The state is applied after the object exists, so a
    reference cycle back to the module (a spectral_norm_model group) survives pickle and
    deepcopy; hooks of this module (operator mode's one-shot input capture) are dropped."""
    base = type(self).__bases__[0]
    state = {k: v for k, v in self.__dict__.items() if k != "_forward_pre_hooks"}
    state["_forward_pre_hooks"] = OrderedDict(
        (k, h) for k, h in self._forward_pre_hooks.items()
        if getattr(h, "__module__", None) != __name__)
    return _new_parametrized, (base,), state


def _new_parametrized(base):
    module = base.__new__(base)
    parametrize._inject_new_class(module)
    make_picklable(module)
    return module


def _setstate_parametrized(self, state):
    type(self).__bases__[0].__setstate__(self, state)
    for name in self.parametrizations:
        parametrize._inject_property(self, name)
        for p in self.parametrizations[name]:
            if hasattr(p, "_lipkern_install"):  # spectral_norm_model's layers
                p._lipkern_install(self)


def make_picklable(module: nn.Module) -> None:
    """Give a parametrized ``module``'s injected class pickling and deep-copying."""
    type(module).__reduce_ex__ = _reduce_parametrized
    type(module).__setstate__ = _setstate_parametrized


OTHER_SIZES = ("error", "recompute")


def input_spatial_size(module: nn.Module, x: torch.Tensor) -> Tuple[int, ...]:
    """The spatial size a conv module sees in ``x``, batched or not: (H, W) of (N, C, H, W)
    or (C, H, W) for 2-d convs, (1, L) of (N, C, L) or (C, L) for 1-d ones."""
    one_d = isinstance(module, (nn.Conv1d, nn.ConvTranspose1d))
    need = (2, 3) if one_d else (3, 4)
    if x.dim() not in need:
        raise ValueError(f"{type(module).__name__} expects a {need[0]}-D (unbatched) or "
                         f"{need[1]}-D (batched) input, got shape {tuple(x.shape)}")
    return (1, int(x.shape[-1])) if one_d else (int(x.shape[-2]), int(x.shape[-1]))


def check_input_size(module: nn.Module, x: torch.Tensor, spec: ConvSpec, hint: str = "",
                     name: Optional[str] = None) -> None:
    """ValueError unless ``x`` has the spatial size ``spec`` was registered for (``name``:
    the layer's name in its model, for the message)."""
    size = input_spatial_size(module, x)
    if size != tuple(spec.input_size):
        where = "" if name is None else f" (layer {name!r})"
        raise ValueError(f"input: {type(module).__name__}{where} is normalized with "
                         f"mode='operator' "
                         f"for input size {tuple(spec.input_size)}, got an input of spatial "
                         f"size {size}; the operator's sigma depends on the size.{hint}")


def _spec_from_module(module: nn.Module, input_size) -> ConvSpec:
    # a 1-D conv is a 2-D one on a (1, L) input with a (1, k) kernel: a height of stride and
    # dilation 1 and of padding and output padding 0
    one_d = isinstance(module, (nn.Conv1d, nn.ConvTranspose1d))
    lift = (lambda v, h: (h, v[0])) if one_d else (lambda v, h: tuple(v))
    size = input_size
    if one_d and isinstance(input_size, (tuple, list, torch.Size)) and len(input_size) == 1:
        size = int(input_size[0])
    size = (1, size) if one_d and isinstance(size, int) else size
    pad = module.padding if isinstance(module.padding, str) else lift(module.padding, 0)
    transposed = isinstance(module, _TRANSPOSED)
    return ConvSpec(size, stride=lift(module.stride, 1), padding=pad,
                    dilation=lift(module.dilation, 1), groups=module.groups,
                    padding_mode=module.padding_mode, transposed=transposed,
                    output_padding=lift(module.output_padding, 0) if transposed else 0)


def _spatial_size(module: nn.Module, input_size):
    """``input_size`` as the spatial size: (H, W) (or L for 1-D convs) as given, or DUE's
    (C, H, W) with C checked against the layer's input channels."""
    two_d = isinstance(module, (nn.Conv2d, nn.ConvTranspose2d))
    if two_d and isinstance(input_size, (tuple, list, torch.Size)) and len(input_size) == 3:
        if int(input_size[0]) != module.in_channels:
            raise ValueError(f"input_size={tuple(input_size)} reads as (C, H, W), but the layer "
                             f"has {module.in_channels} input channels: pass (H, W), the spatial "
                             f"size of its input, or (C, H, W) with C = {module.in_channels}")
        return tuple(int(v) for v in input_size[1:])
    if two_d and isinstance(input_size, (tuple, list, torch.Size)) and len(input_size) != 2:
        raise ValueError(f"input_size must be (H, W), an int, or (C, H, W) for a 2-D conv, "
                         f"got {tuple(input_size)!r}")
    return input_size


def warn_if_zero(name: str, weight: torch.Tensor, coeff: Optional[float]) -> None:
    """Warn at registration that an all-zero weight has no normalized value: sigma is 0 and
    ``W / sigma`` is 0 / 0 (NaN from the first training forward, as with torch's
    spectral_norm) unless nonzero weights are loaded before it. ``coeff`` (soft
    normalization, ``W * min(1, coeff / sigma)``) keeps a zero weight zero: no warning."""
    if coeff is None and weight.device.type != "meta" and weight.numel() and \
            not bool(weight.detach().any()):
        warnings.warn(f"{name} is all zeros: its spectral norm is 0 and W / sigma = 0 / 0 "
                      f"gives NaN from the first training forward (as torch's spectral_norm "
                      f"does) unless nonzero weights are loaded first; initialize it before "
                      f"normalizing, or pass coeff= (soft normalization keeps a zero weight "
                      f"zero)", UserWarning, stacklevel=3)


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1,
                  eps: float = 1e-12, dim: Optional[int] = None, *, mode: str = "matrix",
                  input_size: Union[None, int, Tuple[int, ...]] = None,
                  coeff: Optional[float] = None, other_sizes: str = "error") -> nn.Module:
    """Spectral normalization of ``module.<name>``: same signature, defaults, buffers and
    results as ``torch.nn.utils.parametrizations.spectral_norm`` in ``mode="matrix"``;
    ``mode="operator"`` divides a conv weight by the sigma of the conv operator at
    ``input_size`` (spatial size (H, W) of the module's input, or (C, H, W) as DUE passes
    it, C checked; taken from the first forward when None, batched or unbatched). Before that
    first forward the layer can load a state_dict (its vectors take the checkpoint's size).
    A later input of another spatial size raises ValueError (that size's operator has another
    sigma) unless ``other_sizes="recompute"``: then each size is normalized by its own
    operator sigma, its vectors kept per size in memory. ``coeff``: soft normalization as in
    invertible ResNets / DUE, ``W * min(1, coeff / sigma)``. Returns the module. Remove with
    ``torch.nn.utils.parametrize.remove_parametrizations``.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")
    if dim is None:
        dim = 1 if isinstance(module, _TRANSPOSED) else 0
    spec = None
    if mode == "operator":
        if not isinstance(module, _CONV):
            raise ValueError(f"mode='operator' applies to Conv1d/Conv2d/ConvTranspose1d/2d, "
                             f"got {type(module).__name__} (use mode='matrix' for Linear)")
        if input_size is not None:
            spec = _spec_from_module(module, _spatial_size(module, input_size))
    warn_if_zero(name, weight, coeff)
    param = SpectralNorm(weight, n_power_iterations, dim, eps, mode, spec, coeff, other_sizes)
    param._registering = True
    try:
        parametrize.register_parametrization(module, name, param)
    finally:
        param._registering = False
    # torch refuses to pickle parametrized modules (its injected class raises in
    # __getstate__, and cannot be imported by pickle anyway): rebuild ours on load instead
    make_picklable(module)
    param._lipkern_install(module)  # operator mode: input-size capture and check
    return module
