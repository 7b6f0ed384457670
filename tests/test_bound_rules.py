"""lipschitz_bound on the cases that used to fail or lie (issue 17), one rule at a time:
the certified ``upper`` is never below a sampled Jacobian norm, and exact constants are
exact."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lipkern
from lipkern.bound import local_lower_bound
from lipkern.reference import exact_sigma

GEN = lambda: torch.Generator().manual_seed(0)  # noqa: E731


def _report(model, x, **kw):
    kw.setdefault("n_iters", 200)
    return lipkern.lipschitz_bound(model, x, generator=GEN(), **kw)


def _sampled(model, x, n=2, iters=40):
    """Local Jacobian norms at a few random points (power iteration, from below)."""
    return [float(local_lower_bound(model, torch.randn_like(x), n_iters=iters,
                                    generator=torch.Generator().manual_seed(i)))
            for i in range(n)]


def _holds(model, x, **kw):
    r = _report(model, x, inputs=x, **kw)
    for s in _sampled(model, x):
        assert s <= float(r.upper) * (1 + 1e-5), (s, float(r.upper))
    assert float(r.lower) <= float(r.upper) * (1 + 1e-5)
    return r


class AddAlpha(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(6, 6)

    def forward(self, x):
        return torch.add(x, self.f(x), alpha=5)


def test_add_alpha_counts():
    torch.manual_seed(0)
    m = AddAlpha()
    r = _holds(m, torch.randn(2, 6))
    want = 1 + 5 * exact_sigma(m.f.weight)
    torch.testing.assert_close(r.estimate.double(), want.detach(), rtol=1e-4, atol=0)


class Residual(nn.Module):
    """Untraceable (data-dependent branch) and not a chain: a residual and a scaling."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > -1e9:
            return 10 * (x + self.f(x))
        return x


class FunctionBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > -1e9:
            x = self.a(x)
        return self.b(torch.exp(x))


@pytest.mark.parametrize("cls", [Residual, FunctionBetween])
def test_chain_fallback_refuses_non_chains(cls):
    with pytest.raises(ValueError, match="cannot trace this model.*not a chain"):
        lipkern.lipschitz_bound(cls(), torch.randn(2, 4))


class FDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(5, 5)

    def forward(self, x):
        return F.dropout(self.f(x), p=0.75, training=self.training)


def test_functional_dropout_in_training_is_scaled():
    torch.manual_seed(1)
    m = FDropout()
    r = _report(m.train(), torch.randn(2, 5))
    torch.testing.assert_close(r.estimate.double(), 4 * exact_sigma(m.f.weight).detach(),
                               rtol=1e-4, atol=0)
    r = _report(m.eval(), torch.randn(2, 5))
    torch.testing.assert_close(r.estimate.double(), exact_sigma(m.f.weight).detach(),
                               rtol=1e-4, atol=0)


def _conv_net():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2,
                         padding=1), nn.Flatten(), nn.Linear(3 * 3 * 3, 2))


@pytest.mark.parametrize("how", ["torch_sn", "weight_norm", "lipkern_sn", "sn_model"])
def test_parametrized_modules_use_the_parametrized_weight(how):
    torch.manual_seed(2)
    m = _conv_net()
    x = torch.randn(2, 2, 6, 6)
    P = torch.nn.utils.parametrizations
    for i in (0, 2, 4):
        if how == "torch_sn":
            P.spectral_norm(m[i])
        elif how == "weight_norm":
            P.weight_norm(m[i])
        elif how == "lipkern_sn":
            lipkern.nn.spectral_norm(m[i])
    if how == "sn_model":
        lipkern.nn.spectral_norm_model(m, x)
    m.eval()
    r = _holds(m, x, n_iters=1500)  # normalized layers: close top singular values
    want = 1.0
    specs = [lipkern.ConvSpec(6, padding=1), lipkern.ConvSpec(6, stride=2, padding=1), None]
    for i, s in zip((0, 2, 4), specs):
        want = want * exact_sigma(m[i].weight, s)
    torch.testing.assert_close(r.estimate.double(), want.detach(), rtol=1e-3, atol=0)
    r.upper.backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert len(grads) >= 3 and all(torch.isfinite(g).all() for g in grads)


class ShapeReads(nn.Module):
    """SNGAN-critic style: a pool with a kernel read off the shape, sums over dims, size()."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.l = nn.Linear(4, 1)

    def forward(self, x):
        h = F.relu(self.c(x))
        a = F.avg_pool2d(h, h.shape[-1])
        s = h.sum(dim=[2, 3])
        return self.l(a.view(x.size(0), -1) + s / 64.0)


def test_shape_reads_sum_and_runtime_pool_kernels():
    torch.manual_seed(3)
    m = ShapeReads()
    x = torch.randn(2, 3, 8, 8)
    r = _holds(m, x)
    sc = exact_sigma(m.c.weight, lipkern.ConvSpec(8, padding=1))
    # avg over 64 entries: 1/8; sum over 64 entries then / 64: 8 / 64
    want = sc * (1 / 8 + 8 / 64) * exact_sigma(m.l.weight)
    torch.testing.assert_close(r.estimate.double(), want.detach(), rtol=1e-4, atol=0)


class Reduce(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, x):
        if self.how == "sum":
            return x.sum(dim=(1, 3), keepdim=True)
        if self.how == "mean":
            return torch.mean(x, dim=-1)
        return x.sum()


@pytest.mark.parametrize("how,n", [("sum", 3 * 5), ("mean", 5), ("all", 2 * 3 * 4 * 5)])
def test_sum_and_mean_have_their_exact_operator_constants(how, n):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    r = _report(Reduce(how), x)
    want = math.sqrt(n) if how != "mean" else 1 / math.sqrt(n)
    assert abs(float(r.upper) - want) <= 1e-12 * want
    # exact: a direction that attains it (all ones on one reduced group)
    j = torch.func.jacrev(Reduce(how))(x).reshape(-1, x.numel())
    assert abs(float(torch.linalg.matrix_norm(j, 2)) - want) <= 1e-12 * want


class Divide(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        return x / self.c


def test_division():
    with pytest.raises(ValueError, match="division by zero"):
        lipkern.lipschitz_bound(Divide(0.0), torch.randn(2, 3))
    r = _report(Divide(-4.0), torch.randn(2, 3))
    assert abs(float(r.upper) - 0.25) < 1e-7

    class ByInput(nn.Module):
        def forward(self, x):
            return 1.0 / x
    with pytest.raises(ValueError, match="no global Lipschitz|input-dependent"):
        lipkern.lipschitz_bound(ByInput(), torch.randn(2, 3))


def test_float64_deep_model_is_float64_and_does_not_overflow():
    torch.manual_seed(4)
    layers = []
    for _ in range(200):
        lin = nn.Linear(4, 4).double()
        with torch.no_grad():
            lin.weight.mul_(1000.0)
        layers += [lin, nn.ReLU()]
    m = nn.Sequential(*layers)
    r = lipkern.lipschitz_bound(m, torch.randn(1, 4, dtype=torch.float64), n_iters=30)
    assert r.log_upper.dtype == torch.float64 and r.log_estimate.dtype == torch.float64
    want = sum(float(torch.log(exact_sigma(m[i].weight))) for i in range(0, 400, 2))
    assert want > 1000  # e^1000 overflows float64 as well: the logs are what is compared
    assert math.isfinite(float(r.log_upper)) and float(r.log_upper) >= want - 1e-9
    # 30 iterations: a few layers are ~1e-5 below their sigma (an estimate, from below)
    assert want - 0.05 < float(r.log_estimate) <= want + 1e-9


def test_unknown_function_and_method_are_named_and_can_be_given():
    class Erf(nn.Module):
        def forward(self, x):
            return torch.erf(x).cumsum(-1)
    with pytest.raises(ValueError, match=r"function erf .*no Lipschitz rule.*constants="):
        lipkern.lipschitz_bound(Erf(), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"method \.cumsum\(\).*no Lipschitz rule"):
        lipkern.lipschitz_bound(Erf(), torch.randn(2, 3), constants={torch.erf: 1.13})
    r = lipkern.lipschitz_bound(Erf(), torch.randn(2, 3),
                                constants={torch.erf: 2 / math.sqrt(math.pi), "cumsum": 3.0})
    assert abs(float(r.upper) - 3 * 2 / math.sqrt(math.pi)) < 1e-6


def test_layernorm_and_groupnorm_are_refused_with_a_reason():
    for mod in (nn.LayerNorm(4), nn.GroupNorm(2, 4)):
        x = torch.randn(2, 4) if isinstance(mod, nn.LayerNorm) else torch.randn(2, 4, 3, 3)
        with pytest.raises(ValueError, match="divides by the input's own statistics"):
            lipkern.lipschitz_bound(nn.Sequential(mod), x)


def test_products_of_input_dependent_tensors_are_refused():
    class Gate(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)
    with pytest.raises(ValueError, match="product of two input-dependent"):
        lipkern.lipschitz_bound(Gate(), torch.randn(2, 3))


def test_pools_padding_and_upsampling_constants_hold():
    torch.manual_seed(5)

    class Mix(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(2, 3, 3)

        def forward(self, x):
            h = F.pad(x, (1, 1, 1, 1), mode="reflect")
            h = F.max_pool2d(self.c(h), 3, stride=1, padding=1)
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            return F.adaptive_avg_pool2d(h, 2).flatten(1)
    _holds(Mix(), torch.randn(2, 2, 6, 6))


def test_report_table_shows_estimate_certified_and_gap():
    torch.manual_seed(6)
    m = _conv_net()
    r = _report(m, torch.randn(1, 2, 6, 6))
    text = str(r)
    assert "estimate" in text and "certified" in text and "gap" in text
    for row in r.layers:
        assert float(row.upper) >= float(row.estimate) * (1 - 1e-6)
    nb = lipkern.lipschitz_bound(m, torch.randn(1, 2, 6, 6), certify=False)
    assert nb.upper is None
    with pytest.raises(ValueError, match="no certified bound"):
        nb.bound
