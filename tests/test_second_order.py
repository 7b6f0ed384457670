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
@pytest.mark.parametrize("backend", ["torch", "cpp"])
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
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
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
