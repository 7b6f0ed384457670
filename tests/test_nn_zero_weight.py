"""All-zero weights and extreme scales in lipkern.nn (the numeric contract of issue 15 for the
layers): with ``coeff`` a zero weight stays zero on every strategy and mode, values and
gradients those of the unnormalized layer (no 0 / 0); without it, registration warns (W / sigma
has no value at W = 0; NaN from the first training forward, as with torch's spectral_norm);
lipkern::divided_backward keeps its scalars in range at sigma 1e-30..1e30 (float32) and
1e-200..1e200 (float64); operator mode on 1-D convs is the dense operator's norm."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import lipkern

HAS_EXT = lipkern.backends.load_ext() is not None


def _net(dtype=torch.float64):
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                      nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4), nn.Tanh(),
                      nn.Linear(4, 1)).to(dtype)
    with torch.no_grad():
        m[2].weight.zero_()  # a zero-initialized conv (residual flows, Glow's ZeroConv2d)
        m[7].weight.zero_()  # and a zero-initialized head
    return m


def _originals(m):
    return [mod.parametrizations.weight.original if hasattr(mod, "parametrizations")
            else mod.weight for mod in (m[0], m[2], m[5], m[7])]


def _value_and_grads(m, x, second_order):
    xx = x.clone().requires_grad_(second_order)
    y = m(xx).square().sum()
    if second_order:  # a gradient penalty: the input gradient differentiated again
        gx, = torch.autograd.grad(y, xx, create_graph=True)
        y = y + gx.square().sum()
    ws = _originals(m)
    return y.detach(), torch.autograd.grad(y, ws)


@pytest.mark.parametrize("mode", ["matrix", "operator"])
@pytest.mark.parametrize("strategy", ["auto", "mixed", "scaled_outputs", "fused_weights",
                                      "per_layer"])
def test_zero_weight_with_coeff_is_the_unnormalized_layer(strategy, mode):
    """coeff far above every sigma: W * min(1, coeff / sigma) = W for every layer, the zero
    ones (sigma 0) included, so values and gradients (first and second order) equal the
    unnormalized model's; no warning. Before: "fused_weights" gave NaN (W / 0 * 0)."""
    if strategy in ("mixed", "fused_weights") and not HAS_EXT and mode == "operator":
        pytest.skip("needs the C++ extension")
    plain = _net()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    m = copy.deepcopy(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if strategy == "per_layer":
            for i in (0, 2):
                lipkern.nn.spectral_norm(m[i], mode=mode, coeff=1e3,
                                         **({"input_size": (6, 6)} if mode == "operator" else {}))
            for i in (5, 7):
                lipkern.nn.spectral_norm(m[i], coeff=1e3)
        else:
            kw = {"example_input": x[:1], "mode": "operator"} if mode == "operator" else {}
            lipkern.nn.spectral_norm_model(m, strategy=strategy, coeff=1e3, **kw)
    sig = lipkern.nn.sigmas(m) if strategy != "per_layer" else None
    for second_order in (False, True):
        want_y, want_g = _value_and_grads(plain, x, second_order)
        got_y, got_g = _value_and_grads(m, x, second_order)
        torch.testing.assert_close(got_y, want_y, rtol=1e-12, atol=0)
        for g, w in zip(got_g, want_g):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)
    if sig is not None:
        assert float(sig["2"]) == 0.0 and float(sig["7"]) == 0.0


@pytest.mark.parametrize("strategy", ["auto", "fused_weights"])
def test_zero_weight_with_small_coeff_gives_finite_gradients(strategy):
    """coeff below the nonzero layers' sigmas: those are scaled, the zero layers stay zero and
    their gradients are the unnormalized layer's gradient at that point (finite, nonzero)."""
    m = _net()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    lipkern.nn.spectral_norm_model(m, strategy=strategy, coeff=0.05)
    y, grads = _value_and_grads(m, x, second_order=False)
    assert torch.isfinite(y)
    for g in grads:
        assert torch.isfinite(g).all()
    assert grads[3].abs().max() > 0  # the zero head learns


def test_zero_weight_without_coeff_warns_at_registration():
    """Without coeff W / sigma has no value at W = 0: spectral_norm_model and spectral_norm
    say so, naming the weight; a nonzero model registers silently."""
    with pytest.warns(UserWarning, match=r"2\.weight is all zeros"):
        lipkern.nn.spectral_norm_model(_net())
    with pytest.warns(UserWarning, match="weight is all zeros"):
        lipkern.nn.spectral_norm(_net()[2])
    ok = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lipkern.nn.spectral_norm_model(ok)
        lipkern.nn.spectral_norm(nn.Linear(3, 2))


@pytest.mark.skipif(not HAS_EXT, reason="needs the C++ extension")
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e-30), (torch.float32, 1e30),
                                         (torch.float64, 1e-200), (torch.float64, 1e200)])
@pytest.mark.parametrize("unit", [False, True], ids=["rank1", "unit"])
def test_divided_backward_at_extreme_scales(dtype, scale, unit):
    """g / s - <g, W> / s^2 D for W and s scaled by 1e-30..1e30 (float32) and 1e-200..1e200
    (float64), against float64 on the unscaled problem: s^2 leaves double's range at 1e+-160,
    so the kernel divides twice. Before: the rank-one term was lost (c = -0) at 1e200."""
    g0 = torch.Generator().manual_seed(5)
    shape = (16, 8, 3, 3)
    w1 = torch.randn(shape, generator=g0, dtype=torch.float64)
    g = torch.randn(shape, generator=g0, dtype=torch.float64)
    u = torch.randn(16, generator=g0, dtype=torch.float64)
    x = torch.randn(72, generator=g0, dtype=torch.float64)
    D = torch.randn(shape, generator=g0, dtype=torch.float64) if unit else \
        torch.outer(u, x).view(shape)
    s1 = 0.37
    want1 = g / s1 - (g * w1).sum() / s1 ** 2 * D  # the answer at scale 1; at scale t: / t
    got = torch.ops.lipkern.divided_backward(
        g.to(dtype), (w1 * scale).to(dtype), torch.tensor(s1 * scale, dtype=dtype),
        u.to(dtype), x.to(dtype), D.to(dtype) if unit else None)
    assert torch.isfinite(got).all()
    err = ((got.double() * scale) - want1).abs().max() / want1.abs().max()
    assert err < (1e-5 if dtype == torch.float32 else 1e-12), err


def _dense_sigma(layer, shape):
    """The exact operator norm of a conv layer's linear part on inputs of ``shape``."""
    x0 = torch.zeros(shape, dtype=torch.float64)
    lin = lambda x: layer(x) - layer(x0)  # noqa: E731
    jac = torch.autograd.functional.jacobian(lin, x0)
    return torch.linalg.matrix_norm(jac.reshape(lin(x0).numel(), x0.numel()), ord=2)


@pytest.mark.parametrize("layer", [
    lambda: nn.Conv1d(4, 6, 5, padding=2), lambda: nn.Conv1d(4, 6, 3),
    lambda: nn.Conv1d(4, 6, 3, stride=2, dilation=2, padding=1),
    lambda: nn.Conv1d(4, 6, 3, padding=1, padding_mode="circular"),
    lambda: nn.ConvTranspose1d(6, 4, 4, 2, 1), lambda: nn.ConvTranspose1d(6, 4, 3, 2, 1, 1)],
    ids=["pad2", "pad0", "stride2_dil2", "circular", "transposed", "transposed_outpad"])
def test_conv1d_operator_mode_is_the_true_norm(layer):
    """Operator mode on 1-D convs (any padding, transposed with output padding): the sigma
    after many iterations equals the dense operator's largest singular value (from below), whole-model
    and per layer (input_size an int or a 1-tuple). Before: every padding but 1 and every
    ConvTranspose1d raised at registration (the height of the 2-D lift padded by 1)."""
    torch.manual_seed(0)
    plain = layer().double()
    shape = (1, plain.in_channels, 12)
    want = _dense_sigma(plain, shape)
    m = nn.Sequential(copy.deepcopy(plain))
    lipkern.nn.spectral_norm_model(m, torch.randn(shape, dtype=torch.float64),
                                   mode="operator", n_power_iterations=3000,
                                   types=(type(plain),))
    # (near-degenerate top singular values here: 3000 iterations to 1e-4)
    got = lipkern.nn.sigmas(m)["0"]
    assert got <= want * (1 + 1e-12) and got >= want * (1 - 1e-4), (got, want)
    for size in (12, (12,)):
        one = lipkern.nn.spectral_norm(copy.deepcopy(plain), mode="operator", input_size=size,
                                       n_power_iterations=3000)
        one(torch.randn(shape, dtype=torch.float64))
        w = one.weight
        lin = plain.weight.detach()
        assert torch.allclose(w * want, lin, rtol=1e-4, atol=1e-9)  # W / sigma, sigma exact
