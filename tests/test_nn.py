"""lipkern.nn.spectral_norm against torch.nn.utils.parametrizations.spectral_norm."""
import copy
import io

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations, parametrize

import lipkern
from lipkern.reference import exact_sigma
from lipkern import ConvSpec

MAKERS = {
    "linear": lambda: nn.Linear(7, 5),
    "conv1d": lambda: nn.Conv1d(3, 4, 3),
    "conv2d": lambda: nn.Conv2d(3, 6, 3, padding=1),
    "convT2d": lambda: nn.ConvTranspose2d(4, 3, 3, stride=2),
}
INPUTS = {"linear": (2, 7), "conv1d": (2, 3, 9), "conv2d": (2, 3, 6, 6), "convT2d": (2, 4, 5, 5)}


def _pair(kind, seed=0, dim=None, n=1):
    torch.manual_seed(seed)
    a = parametrizations.spectral_norm(MAKERS[kind](), n_power_iterations=n, dim=dim)
    torch.manual_seed(seed)
    b = lipkern.nn.spectral_norm(MAKERS[kind](), n_power_iterations=n, dim=dim)
    return a, b


@pytest.mark.parametrize("dim", [None, 1])
@pytest.mark.parametrize("kind", list(MAKERS))
def test_matches_torch_in_train_and_eval(kind, dim):
    a, b = _pair(kind, seed=3, dim=dim, n=2)
    x = torch.randn(INPUTS[kind], generator=torch.Generator().manual_seed(1))
    for step in range(3):
        ya, yb = a(x), b(x)
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
        ya.square().sum().backward()
        yb.square().sum().backward()
        ga = a.parametrizations.weight.original.grad
        gb = b.parametrizations.weight.original.grad
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)
    for key in ("_u", "_v"):
        torch.testing.assert_close(getattr(b.parametrizations.weight[0], key),
                                   getattr(a.parametrizations.weight[0], key), rtol=1e-5,
                                   atol=1e-6)
    a.eval(), b.eval()
    u = b.parametrizations.weight[0]._u.clone()
    torch.testing.assert_close(b.weight, a.weight, rtol=1e-5, atol=1e-6)
    b(x)
    assert torch.equal(b.parametrizations.weight[0]._u, u)  # eval does not update


def test_state_dicts_load_both_ways_and_removal_works():
    a, b = _pair("conv2d", seed=4)
    assert list(a.state_dict()) == list(b.state_dict())
    assert "parametrizations.weight.0._u" in b.state_dict()
    torch.manual_seed(9)
    c = lipkern.nn.spectral_norm(nn.Conv2d(3, 6, 3, padding=1))
    c.load_state_dict(a.state_dict())           # torch's checkpoint -> lipkern
    a.eval(), c.eval()
    torch.testing.assert_close(c.weight, a.weight)
    torch.manual_seed(9)
    d = parametrizations.spectral_norm(nn.Conv2d(3, 6, 3, padding=1))
    d.load_state_dict(b.state_dict())           # lipkern's checkpoint -> torch
    b.eval(), d.eval()
    torch.testing.assert_close(d.weight, b.weight)
    w = b.weight.detach().clone()
    parametrize.remove_parametrizations(b, "weight")
    assert not parametrize.is_parametrized(b) and torch.equal(b.weight.detach(), w)


def test_deepcopy_and_torch_save_of_a_normalized_model():
    torch.manual_seed(5)
    m = nn.Sequential(lipkern.nn.spectral_norm(nn.Linear(4, 6)), nn.ReLU(),
                      lipkern.nn.spectral_norm(nn.Conv1d(1, 2, 3)))
    x = torch.randn(3, 4)
    m[0](x).sum().backward()
    m2 = copy.deepcopy(m)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m3 = torch.load(buf, weights_only=False)
    for other in (m2, m3):
        other.eval()
    m.eval()
    torch.testing.assert_close(m2[0].weight, m[0].weight)
    torch.testing.assert_close(m3[0].weight, m[0].weight)


def test_autocast_normalizes_in_float32():
    _, b = _pair("linear", seed=6)
    b.eval()
    plain = b.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = b.weight
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, plain)


def test_shrunk_or_averaged_vectors_give_the_same_weight():
    _, b = _pair("conv2d", seed=7)
    b.eval()
    want = b.weight.detach().clone()
    p = b.parametrizations.weight[0]
    with torch.no_grad():
        p._u.mul_(0.5)
        p._v.mul_(0.25)
    torch.testing.assert_close(b.weight, want, rtol=1e-6, atol=1e-7)


def test_vmap_functional_call_over_stacked_weights():
    torch.manual_seed(8)
    m = lipkern.nn.spectral_norm(nn.Linear(5, 4, bias=False))
    ws = torch.randn(3, 4, 5)
    x = torch.randn(2, 5)
    key = "parametrizations.weight.original"

    def f(w):
        return torch.func.functional_call(m, {key: w}, (x,))
    got = torch.vmap(f)(ws)
    u0 = m.parametrizations.weight[0]._u.clone()
    v0 = m.parametrizations.weight[0]._v.clone()
    for i in range(3):
        with torch.no_grad():
            m.parametrizations.weight[0]._u.copy_(u0)
            m.parametrizations.weight[0]._v.copy_(v0)
        torch.testing.assert_close(got[i], f(ws[i]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("given", [True, False])
def test_operator_mode_makes_the_conv_operator_1_lipschitz(given):
    torch.manual_seed(10)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    lipkern.nn.spectral_norm(conv, mode="operator", n_power_iterations=50,
                             input_size=(6, 6) if given else None)
    x = torch.randn(1, 3, 6, 6)
    for _ in range(10):
        conv(x)
    conv.eval()
    sigma = exact_sigma(conv.weight.detach(), ConvSpec(6, padding=1))
    assert abs(float(sigma) - 1.0) < 1e-4
    # torch's reshaped normalization leaves the operator norm far from 1
    torch.manual_seed(10)
    t = parametrizations.spectral_norm(nn.Conv2d(3, 4, 3, padding=1), n_power_iterations=50)
    t.eval()
    assert abs(float(exact_sigma(t.weight.detach(), ConvSpec(6, padding=1))) - 1.0) > 0.05


def test_bad_arguments():
    with pytest.raises(ValueError, match="has no parameter or buffer with name 'w'"):
        lipkern.nn.spectral_norm(nn.Linear(2, 2), name="w")
    with pytest.raises(ValueError, match="mode='operator' applies to Conv"):
        lipkern.nn.spectral_norm(nn.Linear(2, 2), mode="operator")
    with pytest.raises(ValueError, match="n_power_iterations to be positive"):
        lipkern.nn.spectral_norm(nn.Linear(2, 2), n_power_iterations=0)


def test_lipschitz_layers_have_constant_one():
    torch.manual_seed(11)
    lin = lipkern.nn.SpectralLinear(6, 4)
    lin(torch.randn(2, 6))
    lin.eval()
    assert abs(float(exact_sigma(lin.weight.detach())) - 1) < 1e-5
    conv = lipkern.nn.SpectralConv2d(2, 3, 3, padding=1, input_size=(5, 5), n_power_iterations=30)
    x = torch.randn(1, 2, 5, 5)
    for _ in range(5):
        conv(x)
    conv.eval()
    assert abs(float(exact_sigma(conv.weight.detach(), ConvSpec(5, padding=1))) - 1) < 1e-4
    for pool, size in ((lipkern.nn.ScaledAvgPool2d(2), 4), (lipkern.nn.ScaledAvgPool2d(3, 1, 1), 5)):
        k = pool.kernel_size if isinstance(pool.kernel_size, int) else pool.kernel_size[0]
        w = torch.full((1, 1, k, k), 1.0 / (k * k), dtype=torch.float64)
        spec = ConvSpec(size, stride=pool.stride, padding=pool.padding)
        scale = pool._scale((size, size))
        assert abs(float(exact_sigma(w, spec)) * scale - 1) < 1e-6
        y = pool(torch.ones(1, 1, size, size))
        torch.testing.assert_close(y, nn.functional.avg_pool2d(
            torch.ones(1, 1, size, size), k, pool.stride, pool.padding) * scale)
