"""lipkern.lipschitz_bound against independently computed constants, products and path sums."""

import pytest
import torch
import torch.nn as nn

import lipkern
from lipkern import ConvSpec
from lipkern.bound import activation_constant
from lipkern.reference import exact_sigma

N_ITERS = 400  # converged on these small layers: the bound equals the exact one to ~1e-6
RTOL = 1e-4


def _bound(model, x, **kw):
    return lipkern.lipschitz_bound(model, x, n_iters=N_ITERS,
                                   generator=torch.Generator().manual_seed(0), **kw)


def _bn(c, seed):
    bn = nn.BatchNorm2d(c)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.1)
    return bn


def test_sequential_conv_net_is_the_product_of_exact_constants():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), _bn(6, 1), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(6, 5, 3, stride=2, padding=1, padding_mode="circular"),
                      nn.GELU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(5, 7),
                      nn.Tanh(), nn.Linear(7, 3)).eval()
    r = _bound(m, torch.randn(2, 3, 8, 8))
    bn = m[1]
    want = (exact_sigma(m[0].weight, ConvSpec(8, padding=1))
            * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs().max().double()
            * 1.0 * 1.0
            * exact_sigma(m[4].weight, ConvSpec(4, stride=2, padding=1, padding_mode="circular"))
            * activation_constant(nn.GELU())
            * exact_sigma(torch.full((1, 1, 2, 2), 0.25), ConvSpec(2, stride=2))
            * exact_sigma(m[8].weight) * 1.0 * exact_sigma(m[10].weight))
    assert r.method == "torch.fx"
    torch.testing.assert_close(r.estimate.double(), want.detach(), rtol=RTOL, atol=0)
    torch.testing.assert_close(r.log_estimate.double(), want.detach().log(), rtol=RTOL, atol=1e-6)
    assert [row.kind for row in r.layers][:4] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    text = str(r)
    assert "Lipschitz upper bound (certified)" in text and "Conv2d" in text and "(2, 3, 8, 8)" in text


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 6))

    def forward(self, x):
        return x + self.f(x)


class Branched(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.f = nn.Linear(5, 4)
        self.g = nn.Sequential(nn.Linear(5, 3), nn.Sigmoid(), nn.Linear(3, 4))

    def forward(self, x):
        a, b = self.f(x), self.g(x)
        if self.how == "cat":
            return torch.cat([a, b], dim=1)
        if self.how == "add":
            return a + b
        return 0.5 * a - b / 4


def test_residual_adds_one():
    torch.manual_seed(1)
    m = Residual()
    r = _bound(m, torch.randn(3, 6))
    lf = exact_sigma(m.f[0].weight) * exact_sigma(m.f[2].weight)
    torch.testing.assert_close(r.estimate.double(), (1 + lf).detach(), rtol=RTOL, atol=0)


@pytest.mark.parametrize("how", ["cat", "add", "scaled"])
def test_branches_combine_along_paths(how):
    torch.manual_seed(2)
    m = Branched(how)
    r = _bound(m, torch.randn(3, 5))
    lf = exact_sigma(m.f.weight)
    lg = exact_sigma(m.g[0].weight) * 0.25 * exact_sigma(m.g[2].weight)
    want = {"cat": torch.sqrt(lf ** 2 + lg ** 2), "add": lf + lg,
            "scaled": 0.5 * lf + 0.25 * lg}[how]
    torch.testing.assert_close(r.estimate.double(), want.detach(), rtol=RTOL, atol=0)


def test_bound_holds_and_is_differentiable():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ELU(alpha=1.5), nn.Conv2d(4, 2, 3),
                      nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    x = torch.randn(1, 2, 6, 6)
    r = _bound(m, x)
    with torch.no_grad():
        for _ in range(20):
            a, b = torch.randn(1, 2, 6, 6), torch.randn(1, 2, 6, 6) * 0.1
            assert (m(a + b) - m(a)).norm() <= r.estimate * b.norm() * (1 + 1e-5)
    r.estimate.backward()
    for p in (m[0].weight, m[2].weight, m[4].weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


ACTIVATIONS = [nn.ReLU(), nn.LeakyReLU(0.2), nn.LeakyReLU(3.0), nn.ELU(), nn.ELU(alpha=2.0),
               nn.Tanh(), nn.Sigmoid(), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU(),
               nn.Softplus(), nn.Softplus(beta=3.0), nn.Mish(), nn.Hardswish(), nn.CELU(0.5)]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=repr)
def test_activation_constants_are_the_max_derivative(act):
    x = torch.linspace(-20, 20, 800001, dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(act(x).sum(), x)
    grid_max = float(d.abs().max())
    c = activation_constant(act)
    assert c >= grid_max - 1e-9, (c, grid_max)  # a bound ...
    assert c <= grid_max * (1 + 1e-3) + 1e-9, (c, grid_max)  # ... and the tight one


def test_gelu_constant_closed_form():
    assert abs(activation_constant(nn.GELU()) - 1.1289039) < 1e-6


def test_unsupported_module_is_named_and_can_be_given():
    m = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"module '1' \(LayerNorm\): LayerNorm divides by the "
                       r"input's own statistics: it has no global Lipschitz constant; give one"):
        lipkern.lipschitz_bound(m, torch.randn(2, 4))
    r = lipkern.lipschitz_bound(m, torch.randn(2, 4), constants={"1": 3.0}, n_iters=N_ITERS)
    want = exact_sigma(m[0].weight) * 3.0 * exact_sigma(m[2].weight)
    torch.testing.assert_close(r.estimate.double(), want.detach(), rtol=RTOL, atol=0)
    r2 = lipkern.lipschitz_bound(m, torch.randn(2, 4), constants={nn.LayerNorm: 3.0},
                                 n_iters=N_ITERS)
    torch.testing.assert_close(r2.estimate, r.estimate, rtol=1e-5, atol=0)


def test_settings_without_a_constant_are_refused():
    with pytest.raises(ValueError, match=r"'0'.*BatchNorm in train mode"):
        lipkern.lipschitz_bound(nn.Sequential(nn.BatchNorm2d(3)).train(), torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"'0' \(Conv2d\): ConvSpec.padding_mode='reflect'"):
        lipkern.lipschitz_bound(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1,
                                                        padding_mode="reflect")),
                                torch.randn(1, 2, 5, 5))
    with pytest.raises(ValueError, match="product of two input-dependent"):
        class Sq(nn.Module):
            def forward(self, x):
                return x * x
        lipkern.lipschitz_bound(Sq(), torch.randn(2, 3))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        lipkern.lipschitz_bound(lambda x: x, torch.randn(2))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it; hooks read it as a chain."""

    def __init__(self):
        super().__init__()
        self.a, self.act, self.b = nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3)

    def forward(self, x):
        h = self.act(self.a(x))
        if h.sum() > -1e9:
            h = self.b(h)
        return h


def test_untraceable_sequential_model_falls_back_to_hooks():
    torch.manual_seed(4)
    m = Untraceable()
    r = _bound(m, torch.randn(2, 4))
    assert "hooks" in r.method
    want = exact_sigma(m.a.weight) * 0.25 * exact_sigma(m.b.weight)
    torch.testing.assert_close(r.estimate.double(), want.detach(), rtol=RTOL, atol=0)


def test_matrix_mode_uses_reshaped_kernels():
    torch.manual_seed(5)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    r = _bound(m, torch.randn(1, 3, 6, 6), mode="matrix")
    torch.testing.assert_close(r.estimate.double(), exact_sigma(m[0].weight).detach(), rtol=RTOL,
                               atol=0)


def test_conv1d_and_adaptive_pool_and_warm_state():
    torch.manual_seed(6)
    m = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(3 * 7, 2))
    r = _bound(m, torch.randn(2, 2, 7))
    want = exact_sigma(m[0].weight, ConvSpec(7, padding=1)) * exact_sigma(m[3].weight)
    torch.testing.assert_close(r.estimate.double(), want.detach(), rtol=RTOL, atol=0)
    r2 = lipkern.lipschitz_bound(m, torch.randn(2, 2, 7), n_iters=1, state=r.state)
    torch.testing.assert_close(r2.estimate, r.estimate, rtol=1e-5, atol=0)
    g = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    # this conv's top two singular values are close: converge it fully
    r3 = lipkern.lipschitz_bound(g, torch.randn(1, 1, 4, 4), n_iters=5000)
    want3 = exact_sigma(g[0].weight, ConvSpec(4, padding=1)) / 4.0  # mean of 16: 1/sqrt(16)
    torch.testing.assert_close(r3.estimate.double(), want3.detach(), rtol=RTOL, atol=0)
