"""Second order (create_graph=True: gradient penalties, R1, WGAN-GP) against DESIGN's rule:
x and u are constants of sigma's derivative at every order, so sigma = u^T A(W) x.

* gradgradcheck in float64 where the rule is the exact derivative: torch's update with
  n_iters=0 from a given state (x and u then do not depend on W at all), through
  fused_power_iter (sigmas, product, log-sum) and fused_normalize (W / sigma);
* every backend's second-order gradient of the default update against the reference's (the
  same x, u), Triton included (float32, interpreted);
* a gradient-penalty training step through lipkern.nn against torch's per-layer
  spectral_norm, every strategy, on a conv critic and an MLP.
"""
import pytest
import torch

import lipkern
from lipkern import reference as ref

from layers import MIXED, assert_close_rule, leaf, make_weights

HAS_EXT = lipkern.backends.load_ext() is not None
ENTRIES = [((4, 3), None), ((2, 2, 2, 2), lipkern.ConvSpec(3, padding=1)),
           ((2, 3, 2, 2), lipkern.ConvSpec(2, stride=2, transposed=True)),
           ((3, 1, 2), lipkern.ConvSpec(4, groups=3, padding_mode="circular", padding=1)),
           ((3, 2, 2, 2), None)]


def _skip_unavailable(backend, dtype=torch.float32):
    why = lipkern.backends._why_not(backend, torch.device("cpu"), dtype)
    if why:
        pytest.skip(why)


def _fixed_state(ws, specs, dtype):
    r = ref.power_iter(ws, specs, n_iters=3, variant="spectral_norm",
                       generator=torch.Generator().manual_seed(1))
    return lipkern.PowerIterState(r.state.x.to(dtype), r.state.u.to(dtype), r.state.meta)


@pytest.mark.parametrize("fn", ["power_iter", "normalize"])
@pytest.mark.parametrize("backend", ["torch", "cpp", "grouped"])
def test_gradgradcheck_float64(backend, fn):
    _skip_unavailable(backend, torch.float64)
    ws, specs = make_weights(ENTRIES, torch.float64, seed=8)
    state = _fixed_state(ws, specs, torch.float64)
    kw = dict(state=state, n_iters=0, variant="spectral_norm", backend=backend)

    def f(*w):
        if fn == "power_iter":
            r = lipkern.fused_power_iter(list(w), specs, **kw)
            return r.sigmas, r.lipschitz, r.log_lipschitz
        r = lipkern.fused_normalize(list(w), specs, **kw)
        return tuple(r.weights) + (r.sigmas,)
    assert torch.autograd.gradgradcheck(f, leaf(ws), atol=1e-6, rtol=1e-4)


def _second_order(fn, ws, specs, probes, **kw):
    """A gradient-penalty shaped loss: g = dLoss1/dW (create_graph), then Loss2 = sum <P, g>^2
    style terms; returns d Loss2 / dW."""
    ws = leaf(ws)
    if fn == "power_iter":
        r = getattr(lipkern, "fused_power_iter") if "backend" in kw else ref.power_iter
        r = r(ws, specs, **kw)
        loss1 = (probes[-1][:len(ws)].to(r.sigmas) * r.sigmas).sum() \
            + 1e-2 * r.lipschitz + 0.3 * r.log_lipschitz
    else:
        r = (lipkern.fused_normalize if "backend" in kw else ref.normalize)(ws, specs, **kw)
        loss1 = sum((p.to(w) * w).sum() for p, w in zip(probes, r.weights)) \
            + (probes[-1][:len(ws)].to(r.sigmas) * r.sigmas).sum()
    gs = torch.autograd.grad(loss1, ws, create_graph=True)
    loss2 = sum(((g.double() * p.double()).sum()) ** 2 for g, p in zip(gs, probes))
    return torch.autograd.grad(loss2, ws)


@pytest.mark.parametrize("fn", ["power_iter", "normalize"])
@pytest.mark.parametrize("variant", ["power", "spectral_norm"])
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", "grouped"])
def test_second_order_matches_reference(backend, variant, fn):
    _skip_unavailable(backend)
    entries = MIXED[:2] + MIXED[3:5] + MIXED[8:9]  # dense, reshaped, conv, transposed conv
    ws, specs = make_weights(entries, torch.float32, seed=3)
    g = torch.Generator().manual_seed(5)
    probes = [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in ws] \
        + [torch.rand(8, generator=g, dtype=torch.float64)]
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    kw = dict(n_iters=2, variant=variant)
    got = _second_order(fn, ws, specs, probes, backend=backend, generator=gen(), **kw)
    want64 = _second_order(fn, [w.double() for w in ws], specs, probes, generator=gen(), **kw)
    ref32 = _second_order(fn, ws, specs, probes, generator=gen(), **kw)
    assert any(float(t.abs().max()) > 0 for t in want64)
    for i, (a, b, c) in enumerate(zip(got, want64, ref32)):
        assert_close_rule(f"d2[{i}]", a, b, c)


# ---------------------------------------------------------------- lipkern.nn: gradient penalty
import torch.nn as nn  # noqa: E402
from torch.nn.utils.parametrizations import spectral_norm as torch_sn  # noqa: E402


def _conv_critic(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.LeakyReLU(0.2),
                         nn.Conv2d(6, 4, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 1))


def _mlp_critic(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 1))


def _gp_steps(model, shape, dtype, steps=2, seed=3):
    """WGAN-GP critic steps: loss = mean D(x) + 10 * (||dD/dx|| - 1)^2 (create_graph=True)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(steps):
        x = torch.randn(4, *shape, generator=g).to(dtype).requires_grad_()
        opt.zero_grad()
        out = model(x)
        (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        penalty = 10 * (gx.flatten(1).norm(dim=1) - 1).square().mean()
        (out.mean() + penalty).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return grads


def _per_layer(model, fn, **kw):
    torch.manual_seed(1)  # the same draws, in model order, as spectral_norm_model
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fn(m, **kw)
    return model


STRATEGY_PATHS = [("auto", "inline"), ("auto", "scaled_outputs"), ("torch", "scaled_outputs"),
                  ("triton", "fused_weights"), ("auto", "per_layer")]


@pytest.mark.parametrize("critic", ["conv", "mlp"])
@pytest.mark.parametrize("backend,strategy", STRATEGY_PATHS)
def test_gradient_penalty_step_matches_torch(backend, strategy, critic):
    """Two WGAN-GP steps against torch's per-layer spectral_norm: float64 where the backend
    has it (then equal to ~1e-15), float32 Triton by the rule of tests/layers.py (torch's own
    float32 penalty gradient is 5e-4 off its float64 one on the MLP: ill-conditioned)."""
    _skip_unavailable("cpp" if backend == "auto" else backend)
    make, shape = (_conv_critic, (3, 8, 8)) if critic == "conv" else (_mlp_critic, (5,))
    if strategy == "inline" and critic == "conv":
        pytest.skip("strategy='inline' is Linear-only")
    dtype = torch.float32 if backend == "triton" else torch.float64
    want64 = _gp_steps(_per_layer(make().double(), torch_sn), shape, torch.float64)
    want32 = _gp_steps(_per_layer(make(), torch_sn), shape, torch.float32)
    if strategy == "per_layer":
        model = _per_layer(make().to(dtype), lipkern.nn.spectral_norm)
    else:
        model = make().to(dtype)
        torch.manual_seed(1)
        model = lipkern.nn.spectral_norm_model(model, backend=backend, strategy=strategy)
    got = _gp_steps(model, shape, dtype)
    for k, (step_got, s64, s32) in enumerate(zip(got, want64, want32)):
        for i, (a, b, c) in enumerate(zip(step_got, s64, s32)):
            assert_close_rule(f"step {k} param {i}", a, b, c)


def test_sn_linear_gradgradcheck_float64():
    """lipkern::sn_linear with n_iters=0 (u, v given: the rule is then the exact derivative)."""
    if not HAS_EXT:
        pytest.skip("lipkern._C not built")
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((3, 4), (5, 4), (5,)))
    u, v = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(4, generator=g,
                                                                       dtype=torch.float64)

    def f(x, w, b):
        return lipkern.ops.sn_linear.sn_linear(x, w, b, u, v, 0)[0]
    assert torch.autograd.gradgradcheck(f, leaf([x, w, b]), atol=1e-6, rtol=1e-4)
