"""lipkern::sn_linear (the CPU Linear layer with its power iteration folded into its own
matmul) against lipkern.reference.sn_linear, torch's spectral_norm and the exact SVD.
Outputs start NaN-poisoned (conftest: LIPKERN_POISON_OUTPUTS)."""
import pytest
import torch
import torch.nn.functional as F

import lipkern
from lipkern import reference
from lipkern.ops.sn_linear import available, linear, sn_linear

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


# bad layer inputs both ops reject alike (weight (3, 4), x (2, 4), bias (3,))
BAD_LAYER = [
    (dict(weight=torch.randn(3, 4, 1)), ValueError, "weight must be 2-D"),
    (dict(weight=torch.randn(3, 4).half()), TypeError, "weight must be float32 or float64"),
    (dict(x=torch.randn(2, 5)), ValueError, r"x must have shape \(\.\.\., 4\)"),
    (dict(x=torch.randn(2, 4).double()), TypeError, "x is torch.float64"),
    (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_LAYER + [
    (dict(u=torch.randn(4)), ValueError, r"u must have shape \(3,\)"),
    (dict(v=torch.randn(3)), ValueError, r"v must have shape \(4,\)"),
    (dict(bias=torch.randn(4)), ValueError, r"bias must have shape \(3,\)"),
    (dict(weight=torch.tensor([[1.0, float("nan"), 0, 0]] * 3)), ValueError, "NaN or Inf"),
    (dict(n_iters=-1), ValueError, "n_iters must be an int >= 0"),
    (dict(eps=0.0), ValueError, "eps must be a float > 0"),
])
def test_bad_input_names_the_argument(kwargs, exc, match):
    args = dict(x=torch.randn(2, 4), weight=torch.randn(3, 4), bias=torch.randn(3),
                u=torch.randn(3), v=torch.randn(4), n_iters=1, eps=1e-12)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        sn_linear(**args)


def test_exported():
    assert lipkern.sn_linear is sn_linear


# ---------------------------------------------------------------- the one-sweep kernel
def _has_avx512():
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


# batch rows around the kernel's chunks of 8 and its 32-row limit; (out, in): a single
# row, an odd last row (the two-row blocks), in not a multiple of 16 (masked tails), rows
# not a multiple of the four-row axpy, and a layer above the threading threshold
SKINNY_B = [1, 7, 8, 9, 16, 17, 32, 33]
SKINNY_SHAPES = [(1, 1), (3, 17), (33, 100), (300, 260)]


@pytest.mark.parametrize("skinny", ["1", "0"])
@pytest.mark.parametrize("n_iters", [0, 1, 2])
@pytest.mark.parametrize("out,inp", SKINNY_SHAPES)
@pytest.mark.parametrize("rows", SKINNY_B)
def test_one_sweep_and_gemm_paths_match_the_reference(rows, out, inp, n_iters, skinny,
                                                      monkeypatch):
    """float32 takes the one-sweep kernel (csrc/cpu/skinny.h) up to 32 rows of x on AVX-512
    CPUs, else MKL's GEMM then a pass (LIPKERN_SN_LINEAR_SKINNY=0 forces the latter): both
    against the float64 reference, values and all three gradients."""
    monkeypatch.setenv("LIPKERN_SN_LINEAR_SKINNY", skinny)
    x, w, b, u, v = _case(out, inp, (rows,), torch.float32, seed=rows * 7 + out + n_iters)
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = [t.double().clone().requires_grad_() for t in (x, w, b)]
    y, s, un, vn = sn_linear(*args, u, v, n_iters)
    yr, sr, ur, vr = reference.sn_linear(*ref, u.double(), v.double(), n_iters)
    for a, c in ((y, yr), (s, sr), (un, ur), (vn, vr)):
        _close(a, c, torch.float32, k=2)
    g = torch.randn_like(yr)
    # the gradients are sums that can cancel to ~0 (a 1x1 weight's is exactly 0): float32
    # error is relative to the size of the summands: |g|^T |x| / sigma, |g| |W| / sigma and
    # the sigma term's |g| . |z| / sigma^2 |u| |v| (large where n_iters = 0 leaves sigma small)
    x2, g2 = x.double().reshape(-1, inp).abs(), g.reshape(-1, out).abs()
    z2 = (x.double().reshape(-1, inp) @ w.double().t()).abs()
    sig = abs(float(sr))
    terms = max(float((g2.t() @ x2).max()) / sig, float((g2 @ w.double().abs()).max()) / sig,
                float(g2.sum(0).max()),
                float((g2 * z2).sum()) / sig ** 2 * float(ur.abs().max() * vr.abs().max()))
    for a, c in zip(torch.autograd.grad(y, args, g.float()), torch.autograd.grad(yr, ref, g)):
        torch.testing.assert_close(a.double(), c, rtol=4e-5, atol=4e-6 * max(terms, 1.0))


@pytest.mark.skipif(not _has_avx512(), reason="the one-sweep kernel needs AVX-512F")
def test_one_sweep_kernel_is_the_float32_small_batch_path(monkeypatch):
    """The two paths sum in different orders, so on an AVX-512 CPU their float32 outputs
    differ in the last bits: proof that the default is the one-sweep kernel (and that the
    switch above tests two different kernels)."""
    x, w, b, u, v = _case(256, 256, (8,), torch.float32, seed=11)
    monkeypatch.setenv("LIPKERN_SN_LINEAR_SKINNY", "1")
    y1 = sn_linear(x, w, b, u, v, 1)[0]
    monkeypatch.setenv("LIPKERN_SN_LINEAR_SKINNY", "0")
    y0 = sn_linear(x, w, b, u, v, 1)[0]
    assert not torch.equal(y1, y0)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- lipkern::linear
@pytest.mark.parametrize("skinny", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", [(), (0,), (1,), (9,), (2, 17), (40,)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear(lead, dtype, bias, skinny, monkeypatch):
    """lipkern::linear (the benchmark's equal-matmul baseline) is F.linear: values and the
    three gradients, on both kernel paths."""
    monkeypatch.setenv("LIPKERN_SN_LINEAR_SKINNY", skinny)
    x, w, b, _, _ = _case(35, 37, lead, dtype, seed=len(lead) + 3 * bias, bias=bias)
    args = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    ref = [t.double().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = linear(*args)
    yr = F.linear(*ref)
    assert y.shape == yr.shape and y.dtype == dtype
    _close(y, yr, dtype)
    g = torch.randn_like(yr)
    need = [t for t in args if t is not None]
    for a, c in zip(torch.autograd.grad(y, need, g.to(dtype)),
                    torch.autograd.grad(yr, [t for t in ref if t is not None], g)):
        _close(a, c, dtype)


def test_linear_gradcheck_opcheck_and_compile():
    x, w, b, _, _ = _case(6, 5, (3,), torch.float64, seed=5)
    args = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(linear, args)
    torch.library.opcheck(torch.ops.lipkern.linear.default, [t.float() for t in args])
    torch.library.opcheck(torch.ops.lipkern.linear.default, (x.detach(), w.detach(), None))
    f = torch.compile(lambda *a: linear(*a).square().sum(), fullgraph=True,
                      backend="aot_eager")
    xs = [t.detach().float().requires_grad_() for t in args]
    xe = [t.detach().float().requires_grad_() for t in args]
    got, want = f(*xs), F.linear(*xe).square().sum()
    torch.testing.assert_close(got, want)
    for a, c in zip(torch.autograd.grad(got, xs), torch.autograd.grad(want, xe)):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("kwargs,exc,match", BAD_LAYER + [
    (dict(bias=torch.randn(4)), ValueError, r"bias must have shape \(3,\)"),
    (dict(bias=[0.0] * 3), TypeError, "bias must be a torch.Tensor or None"),
])
def test_linear_bad_input_names_the_argument(kwargs, exc, match):
    args = dict(x=torch.randn(2, 4), weight=torch.randn(3, 4), bias=torch.randn(3))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        linear(**args)


def test_vectors_that_require_grad_and_no_bias():
    """u and v are not differentiable inputs: with no bias, the third tensor input is u, and
    the op must not hand it the bias gradient (needs_input_grad counts tensors only)."""
    x, w, _, u, v = _case(6, 5, (3,), torch.float64, seed=9, bias=False)
    x, w, u, v = (t.requires_grad_() for t in (x, w, u, v))
    y = sn_linear(x, w, None, u, v, 1)[0]
    y.square().sum().backward()
    assert x.grad is not None and w.grad is not None and u.grad is None and v.grad is None
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    reference.sn_linear(xr, wr, None, u.detach(), v.detach(), 1)[0].square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wr.grad)
