"""Layer descriptions: :class:`ConvSpec` (what the user writes) and :class:`LayerGeom`
(the resolved integer geometry every backend walks).

Every layer is reduced to one linear map ``C`` in conv form,

    C : (cin, h, w) -> (cout, oh, ow),   weight K of shape (cout, cin // g, kh, kw),

and a flag saying whether the layer's operator is ``A = C`` (dense matrices, reshaped kernels,
convolutions) or ``A = C^T`` (transposed convolutions, whose adjoint is a convolution with the
same settings). A dense ``W`` (m, n) is ``C`` with cout=m, cin=n and every spatial size 1.
sigma(A) = sigma(C) either way; only which space the iteration vector lives in changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple, Union

IntPair = Union[int, Tuple[int, int]]

KIND_DENSE = 0   # dense matrix, or a conv kernel reshaped to (cout, -1)
KIND_CONV = 1    # A = C, the conv operator at the given input size
KIND_CONV_T = 2  # A = C^T, a transposed-conv operator

PADDING_MODES = ("zeros", "circular")


def _pair(value, name: str, *, minimum: int) -> Tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"ConvSpec.{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        value = (value, value)
    if not (isinstance(value, (tuple, list)) and len(value) in (1, 2)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"ConvSpec.{name} must be an int or a pair of ints, got {value!r}")
    value = tuple(value) * (2 // len(value))
    if min(value) < minimum:
        raise ValueError(f"ConvSpec.{name} must be >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class ConvSpec:
    """How to read a 3-D/4-D weight as the true operator of a convolution layer.

    Args:
        input_size: spatial size of the layer's input, ``(H, W)`` or an int (Conv1d: the
            length, or ``(1, L)``). For ``transposed=True`` it is the ConvTranspose's input.
        stride, padding, dilation: ints or pairs as in ``torch.nn.Conv2d``; ``padding`` may
            also be ``"valid"`` (0) or ``"same"`` (stride 1 and an even total padding only).
        groups: as in ``torch.nn.Conv2d``. sigma is the max over the groups' sigmas.
        padding_mode: ``"zeros"`` or ``"circular"`` (conv only). ``"reflect"`` and
            ``"replicate"`` are refused: their adjoints are not implemented.
        transposed: the weight belongs to a ``ConvTranspose`` layer, layout
            ``(C_in, C_out // groups, kh, kw)``; the operator is ``conv_transpose2d``.
        output_padding: as in ``torch.nn.ConvTranspose2d``; must be < stride.
    """

    input_size: IntPair
    stride: IntPair = 1
    padding: Union[IntPair, str] = 0
    dilation: IntPair = 1
    groups: int = 1
    padding_mode: str = "zeros"
    transposed: bool = False
    output_padding: IntPair = 0

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "input_size", _pair(self.input_size, "input_size", minimum=1))
        set_(self, "stride", _pair(self.stride, "stride", minimum=1))
        set_(self, "dilation", _pair(self.dilation, "dilation", minimum=1))
        if isinstance(self.padding, str):
            if self.padding not in ("valid", "same"):
                raise ValueError(f"ConvSpec.padding must be an int, a pair, 'valid' or 'same', "
                                 f"got {self.padding!r}")
            if self.padding == "valid":
                set_(self, "padding", (0, 0))
        else:
            set_(self, "padding", _pair(self.padding, "padding", minimum=0))
        set_(self, "output_padding", _pair(self.output_padding, "output_padding", minimum=0))
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"ConvSpec.groups must be a positive int, got {self.groups!r}")
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(
                f"ConvSpec.padding_mode={self.padding_mode!r} is not supported: use one of "
                f"{PADDING_MODES} (the adjoint of reflect/replicate padding is not implemented)")
        if not isinstance(self.transposed, bool):
            raise TypeError(f"ConvSpec.transposed must be a bool, got {self.transposed!r}")
        if self.transposed and self.padding_mode != "zeros":
            raise ValueError("ConvSpec: transposed convolutions support padding_mode='zeros' "
                             "only (as torch.nn.ConvTranspose2d)")
        if self.transposed and self.padding == "same":
            raise ValueError("ConvSpec.padding='same' is not defined for transposed convs")
        if self.output_padding != (0, 0) and not self.transposed:
            raise ValueError("ConvSpec.output_padding is only meaningful with transposed=True")
        if any(op >= s for op, s in zip(self.output_padding, self.stride)):
            raise ValueError(f"ConvSpec.output_padding {self.output_padding} must be smaller "
                             f"than stride {self.stride}")


class LayerGeom(NamedTuple):
    """Resolved integer geometry of one layer (see the module docstring)."""
    kind: int
    cin: int
    h: int
    w: int
    cout: int
    oh: int
    ow: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    dh: int
    dw: int
    groups: int
    circular: int

    @property
    def in_numel(self) -> int:
        """Size of C's input space, cin * h * w."""
        return self.cin * self.h * self.w

    @property
    def out_numel(self) -> int:
        """Size of C's output space, cout * oh * ow."""
        return self.cout * self.oh * self.ow

    @property
    def w_numel(self) -> int:
        """Elements of the weight, cout * (cin // groups) * kh * kw."""
        return self.cout * (self.cin // self.groups) * self.kh * self.kw

    @property
    def x_numel(self) -> int:
        """Size of the iteration vector x (the operator A's input space)."""
        return self.out_numel if self.kind == KIND_CONV_T else self.in_numel

    @property
    def y_numel(self) -> int:
        """Size of A's output space (where u lives)."""
        return self.in_numel if self.kind == KIND_CONV_T else self.out_numel


def _out_len(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _check_1d(spec: ConvSpec, name: str) -> None:
    """A Conv1d kernel reads one entry of each pair: accept an int (both entries equal) or
    the lifted form (1, L) / (1, s) / (0, p) of lipkern.nn, refuse anything else rather than
    ignore its first entry."""
    neutral = dict(input_size=1, stride=1, dilation=1, padding=0, output_padding=0)
    for field, n in neutral.items():
        v = getattr(spec, field)
        if isinstance(v, str):
            continue
        if v[0] != v[1] and v[0] != n:
            raise ValueError(f"{name} is a Conv1d kernel but its ConvSpec.{field} is {v}: "
                             f"give one int (or ({n}, value))")


def resolve_geometry(shape: Tuple[int, ...], spec: Optional[ConvSpec], name: str) -> LayerGeom:
    """Geometry of the weight ``shape`` (2-D, 3-D or 4-D) under ``spec``.

    Raises ValueError naming ``name`` for any setting the operator cannot have."""
    if spec is None:
        m = shape[0]
        n = 1
        for d in shape[1:]:
            n *= d
        return LayerGeom(KIND_DENSE, n, 1, 1, m, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0)
    if len(shape) == 2:
        raise ValueError(f"{name} is a 2-D (dense) weight but its spec is a ConvSpec; "
                         f"pass None for dense layers")
    if len(shape) == 3:  # Conv1d kernel (cout, cin/g, k): a conv2d over a (1, L) input
        _check_1d(spec, name)
        shape = (shape[0], shape[1], 1, shape[2])
        spec_in = (1, spec.input_size[1])
        stride, dil = (1, spec.stride[1]), (1, spec.dilation[1])
        pad = spec.padding if isinstance(spec.padding, str) else (0, spec.padding[1])
        opad = (0, spec.output_padding[1])
    else:
        spec_in, stride, dil, pad, opad = (spec.input_size, spec.stride, spec.dilation,
                                           spec.padding, spec.output_padding)
    k0, k1, kh, kw = shape
    g = spec.groups
    if k0 % g:
        raise ValueError(f"{name}: dim 0 ({k0}) is not divisible by ConvSpec.groups={g}")
    if pad == "same":
        tot = [d * (k - 1) for d, k in zip(dil, (kh, kw))]
        if stride != (1, 1) or any(t % 2 for t in tot):
            raise ValueError(f"{name}: padding='same' needs stride 1 and dilation * (kernel "
                             f"size - 1) even, e.g. an odd kernel size (got kernel {(kh, kw)}, "
                             f"dilation {tuple(dil)}, stride {tuple(stride)}): the padding "
                             f"would be asymmetric, which is not supported")
        pad = (tot[0] // 2, tot[1] // 2)
    circ = int(spec.padding_mode == "circular")
    if spec.transposed:
        # A = conv_transpose2d(x, K) maps (k0, ih, iw) -> (k1*g, H, W); A^T = C, the conv2d
        # with weight K (k0 out, k1 in per group) from (k1*g, H, W) to (k0, ih, iw).
        oh, ow = spec_in
        h = (oh - 1) * stride[0] - 2 * pad[0] + dil[0] * (kh - 1) + opad[0] + 1
        w = (ow - 1) * stride[1] - 2 * pad[1] + dil[1] * (kw - 1) + opad[1] + 1
        if h < 1 or w < 1:
            raise ValueError(f"{name}: ConvSpec gives an empty transposed-conv output "
                             f"({h}x{w}); padding too large for input_size {spec_in}")
        geom = LayerGeom(KIND_CONV_T, k1 * g, h, w, k0, oh, ow, kh, kw, *stride, *pad, *dil,
                         g, 0)
        assert _out_len(h, kh, stride[0], pad[0], dil[0]) == oh
        assert _out_len(w, kw, stride[1], pad[1], dil[1]) == ow
        return geom
    h, w = spec_in
    if circ and (pad[0] > h or pad[1] > w):
        raise ValueError(f"{name}: circular padding {pad} larger than the input {spec_in}")
    oh = _out_len(h, kh, stride[0], pad[0], dil[0])
    ow = _out_len(w, kw, stride[1], pad[1], dil[1])
    if oh < 1 or ow < 1:
        raise ValueError(f"{name}: ConvSpec.input_size {spec_in} (padded by {pad}) is smaller "
                         f"than the dilated kernel {(dil[0] * (kh - 1) + 1, dil[1] * (kw - 1) + 1)}")
    return LayerGeom(KIND_CONV, k1 * g, h, w, k0, oh, ow, kh, kw, *stride, *pad, *dil, g, circ)
