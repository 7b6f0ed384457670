"""lipkern.certified_sigma: never below the exact SVD, within its stated margin of the
reference (the exact circular norms), differentiable by the implicit rule."""
import math

import pytest
import torch

import lipkern
from lipkern import ConvSpec
from lipkern.certified import CERT_MARGIN
from lipkern.reference import certified_sigma as ref_certified
from lipkern.reference import exact_sigma

# (weight shape, spec): every kind the op takes, odd sizes
CASES = [
    ((5, 7), None),
    ((1, 1), None),
    ((4, 3, 3, 3), None),  # reshaped kernel (matrix)
    ((4, 3, 3, 3), ConvSpec(6, padding=1)),
    ((4, 3, 3, 3), ConvSpec(7, stride=2, padding=1)),
    ((3, 2, 3, 3), ConvSpec(5, stride=3, padding=2)),
    ((4, 3, 1, 1), ConvSpec(6, stride=2)),
    ((4, 3, 3, 3), ConvSpec(6, padding=1, padding_mode="circular")),
    ((4, 3, 3, 3), ConvSpec(6, stride=2, padding=1, padding_mode="circular")),
    ((4, 3, 3, 3), ConvSpec(7, stride=2, padding=1, padding_mode="circular")),
    ((4, 3, 3, 3), ConvSpec(3, padding=2, padding_mode="circular")),
    ((4, 3, 3, 3), ConvSpec(5, padding=2, dilation=2)),
    ((6, 2, 3, 3), ConvSpec(5, padding=1, groups=3)),
    ((3, 4, 3, 3), ConvSpec(5, stride=2, padding=1, transposed=True, output_padding=1)),
    ((4, 3, 5), ConvSpec((1, 9), stride=(1, 3), padding=(0, 2))),
    ((4, 3, 2, 3), ConvSpec((5, 6), stride=(2, 3), padding=(1, 0), dilation=(2, 1))),
    ((4, 3, 3, 3), ConvSpec(2, padding=3)),
    ((2, 3, 4, 4), ConvSpec(8, stride=4)),
]
IDS = [f"{s}-{'dense' if c is None else c}" for s, c in CASES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,spec", CASES, ids=IDS)
def test_at_least_the_exact_norm_and_within_margin_of_reference(shape, spec, dtype):
    g = torch.Generator().manual_seed(hash((shape, str(spec))) % 2 ** 31)
    w = torch.randn(shape, generator=g, dtype=dtype)
    b = lipkern.certified_sigma([w], [spec], generator=torch.Generator().manual_seed(1))
    assert b.dtype == dtype and b.shape == (1,)
    exact = float(exact_sigma(w, spec))
    ref = float(ref_certified([w], [spec])[0])
    assert ref >= exact * (1 - 1e-12), (ref, exact)  # the circular restriction bounds it
    assert float(b[0]) >= exact, (float(b[0]), exact)  # certified: never below
    # within the certificate's margin of the exact circular norm (estimates converged)
    assert float(b[0]) <= ref * math.sqrt(1 + CERT_MARGIN) * (1 + 1e-6), (float(b[0]), ref)


def test_exact_for_dense_and_divisible_circular_layers():
    torch.manual_seed(0)
    for w, s in [(torch.randn(6, 9, dtype=torch.float64), None),
                 (torch.randn(4, 3, 3, 3, dtype=torch.float64),
                  ConvSpec(8, stride=2, padding=1, padding_mode="circular"))]:
        ref = float(ref_certified([w], [s])[0])
        torch.testing.assert_close(ref, float(exact_sigma(w, s)), rtol=1e-10, atol=0)


def test_batched_layers_scale_and_zero():
    torch.manual_seed(1)
    ws = [torch.randn(4, 3, 3, 3), torch.zeros(5, 4), torch.randn(3, 3) * 1e-30,
          torch.randn(3, 3) * 1e30, torch.randn(4, 2, 3, 3).transpose(0, 1)]
    ss = [ConvSpec(5, padding=1), None, None, None, ConvSpec(4)]
    b = lipkern.certified_sigma(ws, ss)
    assert b.shape == (5,) and float(b[1]) == 0.0
    for i, (w, s) in enumerate(zip(ws, ss)):
        assert float(b[i]) >= float(exact_sigma(w, s)), i
        assert float(b[i]) <= float(ref_certified([w], [s])[0]) * 1.016 + 1e-300, i


def test_gradient_is_the_implicit_rule_and_matches_the_exact_sigma():
    """Where the bound is exact up to the margin (dense, circular), its gradient is the
    margin times the gradient of the exact sigma (autograd through the SVD)."""
    torch.manual_seed(2)
    for w, s in [(torch.randn(5, 4, dtype=torch.float64), None),
                 (torch.randn(3, 2, 3, 3, dtype=torch.float64),
                  ConvSpec(4, padding=1, padding_mode="circular"))]:
        w.requires_grad_(True)
        b = lipkern.certified_sigma([w], [s])[0]
        (gb,) = torch.autograd.grad(b, w)
        e = torch.linalg.matrix_norm(w, 2) if s is None else _circular_sigma(w, s)
        (ge,) = torch.autograd.grad(e, w)
        # the vectors come from power iteration (30 float64 steps on the best frequency):
        # measured agreement ~1e-7 relative; 1e-5 leaves room for slower gaps
        torch.testing.assert_close(gb, ge * (b.detach() / e.detach()), rtol=1e-5, atol=1e-7)


def _circular_sigma(w, s):
    """Differentiable exact circular-conv norm by the SVD of the FFT of the kernel."""
    n = s.input_size[0]
    k = torch.zeros(w.shape[0], w.shape[1], n, n, dtype=w.dtype)
    k = k + torch.nn.functional.pad(w, (0, n - w.shape[-1], 0, n - w.shape[-2]))
    a = torch.fft.fft2(k).permute(2, 3, 0, 1).reshape(-1, w.shape[0], w.shape[1])
    return torch.linalg.matrix_norm(a, 2).max()


def test_second_order_and_gradcheck():
    torch.manual_seed(3)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    s = ConvSpec(5, padding=1)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    # the value is piecewise (a certificate); its gradient is the implicit rule, linear in w
    (g,) = torch.autograd.grad(lipkern.certified_sigma([w], [s], generator=gen())[0], w,
                               create_graph=True)
    (g1,) = torch.autograd.grad(lipkern.certified_sigma([w], [s], generator=gen())[0], w)
    torch.testing.assert_close(g, g1)
    # s(W) = Re(u^H A(W) v) is linear in W (u, v constants): its second derivative is zero
    assert not g.requires_grad or torch.autograd.grad(g.sum(), w, allow_unused=True)[0] is None


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="weights must be a list"):
        lipkern.certified_sigma(torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"weights\[0\] contains NaN"):
        lipkern.certified_sigma([torch.full((2, 2), float("nan"))])
    with pytest.raises(ValueError, match="not implemented yet"):
        lipkern.certified_sigma([torch.randn(2, 2)], backend="cpp")
    with pytest.raises(ValueError, match=r"specs has 2 entries"):
        lipkern.certified_sigma([torch.randn(2, 2)], [None, None])
