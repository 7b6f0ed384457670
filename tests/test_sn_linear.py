"""lipkern::sn_linear (the CPU Linear layer with its power iteration folded into its own
matmul) against lipkern.reference.sn_linear, torch's spectral_norm and the exact SVD.
Outputs start NaN-poisoned (conftest: LIPKERN_POISON_OUTPUTS)."""
import pytest
import torch
import torch.nn.functional as F

import lipkern
from lipkern import reference
from lipkern.ops.sn_linear import available, sn_linear

pytestmark = pytest.mark.skipif(not available(), reason="lipkern._C is not built")

# float32: one GEMM + the power iteration in a different summation order than torch's mv;
# float64: rounding only
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _close(got, want, dtype, k=1):
    """got (dtype) against the float64 want: rtol, and atol relative to want's scale (a
    float32 result is a sum of many float32 terms)."""
    tol = TOL[dtype]
    scale = max(float(want.detach().abs().max()), 1.0) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=tol["rtol"] * k,
                               atol=tol["atol"] * k * scale)


def _case(out, inp, lead, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g, dtype=torch.float64) / inp ** 0.5
    x = torch.randn(*lead, inp, generator=g, dtype=torch.float64)
    b = torch.randn(out, generator=g, dtype=torch.float64) if bias else None
    # unnormalized vectors, as checkpoint surgery leaves them: both sides renormalize
    u = 3 * torch.randn(out, generator=g, dtype=torch.float64)
    v = 0.5 * torch.randn(inp, generator=g, dtype=torch.float64)
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(x), cast(w), cast(b), cast(u), cast(v)


SHAPES = [(7, 13, (5,)), (64, 48, (3, 4)), (300, 260, (8,)), (16, 9, ()), (5, 6, (0,))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_iters", [0, 1, 3])
@pytest.mark.parametrize("out,inp,lead", SHAPES)
def test_values_and_gradients_match_the_reference(out, inp, lead, n_iters, dtype):
    """y, sigma and the new vectors, then dL/dx, dL/dW, dL/db for a random upstream
    gradient, against the reference run in float64 (shapes: rows not a multiple of the
    kernel's 4-row blocks, above and below the threading threshold, 1-D and 3-D inputs, an
    empty batch)."""
    for bias in (True, False):
        x, w, b, u, v = _case(out, inp, lead, dtype, seed=out + inp + n_iters, bias=bias)
        args = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
        ref = [t.double().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
        y, s, un, vn = sn_linear(*args, u, v, n_iters)
        yr, sr, ur, vr = reference.sn_linear(*ref, u.double(), v.double(), n_iters)
        assert y.shape == yr.shape and y.dtype == dtype
        for a, c in ((y, yr), (s, sr), (un, ur), (vn, vr)):
            _close(a, c, dtype)
        assert not (s.requires_grad or un.requires_grad or vn.requires_grad)
        gy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        need = [t for t in args if t is not None]
        got = torch.autograd.grad(y, need, gy.to(dtype))
        want = torch.autograd.grad(yr, [t for t in ref if t is not None], gy)
        for a, c in zip(got, want):
            assert a.shape == c.shape
            _close(a, c, dtype, k=5)


def test_matches_torch_spectral_norm_forward_and_backward():
    """The same layer under torch.nn.utils.parametrizations.spectral_norm (training mode, one
    iteration): same output, weight gradient, bias gradient and updated vectors."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 24)
    torch.nn.utils.parametrizations.spectral_norm(lin)
    p = lin.parametrizations.weight[0]
    u0, v0 = p._u.clone(), p._v.clone()
    w = lin.parametrizations.weight.original.detach().clone().requires_grad_()
    b = lin.bias.detach().clone().requires_grad_()
    x = torch.randn(6, 40)
    y_t = lin(x)
    y, _, un, vn = sn_linear(x, w, b, u0, v0, 1)
    torch.testing.assert_close(y, y_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(un, p._u, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vn, p._v, rtol=1e-5, atol=1e-6)
    gy = torch.randn_like(y)
    gw_t, gb_t = torch.autograd.grad(y_t, (lin.parametrizations.weight.original, lin.bias), gy)
    gw, gb = torch.autograd.grad(y, (w, b), gy)
    torch.testing.assert_close(gw, gw_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb, gb_t, rtol=1e-5, atol=1e-6)


def test_converged_gradient_equals_the_exact_svd_gradient():
    """With u, v converged, spectral_norm's gradient (u, v held constant) is the true
    gradient of y = x W^T / sigma_max(W) + b: compared with autograd through torch.linalg's
    exact singular values, float64."""
    g = torch.Generator().manual_seed(7)
    q1, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(9, 9, generator=g, dtype=torch.float64))
    s = torch.tensor([3.0, 1.5, 1.0, 0.8, 0.5, 0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    w0 = q1[:, :9] @ torch.diag(s) @ q2.t()  # a clear spectral gap: 200 iterations converge
    x = torch.randn(4, 9, generator=g, dtype=torch.float64)
    b = torch.randn(12, generator=g, dtype=torch.float64)
    u, v = torch.ones(12, dtype=torch.float64), torch.ones(9, dtype=torch.float64)
    w = w0.clone().requires_grad_()
    y, sigma, _, _ = sn_linear(x, w, b, u, v, 200)
    we = w0.clone().requires_grad_()
    ye = F.linear(x, we / torch.linalg.svdvals(we)[0], b)
    torch.testing.assert_close(sigma, torch.linalg.svdvals(w0)[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(y, ye, rtol=1e-12, atol=1e-12)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(y, w, gy)[0],
                               torch.autograd.grad(ye, we, gy)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fn", ["op", "reference"])
def test_gradcheck_float64(fn):
    """n_iters=0: sigma = u^T W v with u, v inputs, so spectral_norm's rule is the exact
    derivative and torch.autograd.gradcheck applies (in x, W and b), to the op and to the
    reference alike."""
    x, w, b, u, v = _case(5, 4, (3,), torch.float64, seed=1)
    f = sn_linear if fn == "op" else reference.sn_linear
    torch.autograd.gradcheck(lambda x, w, b: f(x, w, b, u, v, 0)[0],
                             (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))


def test_opcheck():
    """Schema, fake kernel, autograd registration and torch.compile tracing of the op."""
    x, w, b, u, v = _case(6, 5, (3,), torch.float32, seed=2)
    torch.library.opcheck(torch.ops.lipkern.sn_linear.default,
                          (x.requires_grad_(), w.requires_grad_(), b, u, v, 1, 1e-12))
    torch.library.opcheck(torch.ops.lipkern.sn_linear.default, (x.detach(), w.detach(), None,
                                                                u, v, 0, 1e-12))


def test_inputs_are_not_modified_and_no_grad_runs():
    x, w, b, u, v = _case(8, 6, (2,), torch.float32, seed=3)
    before = [t.clone() for t in (x, w, b, u, v)]
    with torch.no_grad():
        y, s, un, vn = sn_linear(x, w, b, u, v, 2)
    with torch.inference_mode():
        y2 = sn_linear(x, w, b, u, v, 2)[0]
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    for a, c in zip((x, w, b, u, v), before):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(weight=torch.randn(3, 4, 1)), ValueError, "weight must be 2-D"),
    (dict(weight=torch.randn(3, 4).half()), TypeError, "weight must be float32 or float64"),
    (dict(x=torch.randn(2, 5)), ValueError, r"x must have shape \(\.\.\., 4\)"),
    (dict(x=torch.randn(2, 4).double()), TypeError, "x is torch.float64"),
    (dict(u=torch.randn(4)), ValueError, r"u must have shape \(3,\)"),
    (dict(v=torch.randn(3)), ValueError, r"v must have shape \(4,\)"),
    (dict(bias=torch.randn(4)), ValueError, r"bias must have shape \(3,\)"),
    (dict(weight=torch.tensor([[1.0, float("nan"), 0, 0]] * 3)), ValueError, "NaN or Inf"),
    (dict(n_iters=-1), ValueError, "n_iters must be an int >= 0"),
    (dict(eps=0.0), ValueError, "eps must be a float > 0"),
    (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
])
def test_bad_input_names_the_argument(kwargs, exc, match):
    args = dict(x=torch.randn(2, 4), weight=torch.randn(3, 4), bias=torch.randn(3),
                u=torch.randn(3), v=torch.randn(4), n_iters=1, eps=1e-12)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        sn_linear(**args)


def test_exported():
    assert lipkern.sn_linear is sn_linear
