"""spectral_norm_model on the conv nets people train (issue 16): the "mixed" strategy against
torch's spectral_norm (values, gradients, two forwards before one backward, a gradient
penalty), torch.compile graph and recompile counts, and the options research code uses
(coeff, sigmas, operator state_dict before the first forward, AveragedModel, (C, H, W) input
sizes, old-API checkpoints)."""
import copy
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm as torch_sn

import lipkern
from lipkern.nn import sigmas, spectral_norm_model

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import models  # noqa: E402

TYPES = (nn.Conv2d, nn.Linear)


def _critic(seed=0):
    """SNGAN's critic at a quarter of its width: early convs with outputs far larger than
    their weights (divided), late ones the reverse (scaled), at 16x16."""
    torch.manual_seed(seed)
    return models.SNGANCritic(ch=8)


def _torch_model(base, **kw):
    m = copy.deepcopy(base)
    torch.manual_seed(1)
    for layer in m.modules():
        if isinstance(layer, TYPES):
            torch_sn(layer, **kw)
    return m


def _ours(base, **kw):
    m = copy.deepcopy(base)
    torch.manual_seed(1)
    return spectral_norm_model(m, **kw)


def _gp_loss(model, x, fake):
    """WGAN-GP's critic loss: three forwards and a penalty differentiated again."""
    alpha = torch.linspace(0, 1, x.shape[0]).view(-1, 1, 1, 1)
    xh = (alpha * x + (1 - alpha) * fake).requires_grad_(True)
    g, = torch.autograd.grad(model(xh).sum(), xh, create_graph=True)
    gp = (g.flatten(1).norm(dim=1) - 1).square().mean()
    return model(fake).mean() - model(x).mean() + 10 * gp


def _d_loss(model, x, fake):  # hinge: two forwards before one backward
    return F.relu(1 - model(x)).mean() + F.relu(1 + model(fake)).mean()


def _steps(model, loss_fn, steps=2, seed=3, size=32):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(3, 3, size, size, generator=g)
        fake = torch.randn(3, 3, size, size, generator=g)
        opt.zero_grad()
        loss = loss_fn(model, x, fake)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        opt.step()
    return out


def _assert_same_steps(got, want, rtol=1e-4, atol=1e-6):
    for (lg, gg), (lw, gw) in zip(got, want):
        torch.testing.assert_close(lg, lw, rtol=rtol, atol=atol)
        for a, b in zip(gg, gw):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _vectors(model):
    return {k: v for k, v in model.state_dict().items() if k.endswith(("_u", "_v"))}


# ---------------------------------------------------------------- "mixed" against torch
@pytest.mark.parametrize("loss_fn", [_d_loss, _gp_loss], ids=["d_step", "gp_step"])
def test_mixed_default_matches_torch_spectral_norm(loss_fn):
    base = _critic()
    ours = _ours(base)
    group = ours._lipkern_spectral_norm
    assert group.resolved_strategy() == "mixed"
    want_m = _torch_model(base)
    _assert_same_steps(_steps(ours, loss_fn), _steps(want_m, loss_fn))
    choices = set(group.strategies["mixed"].choice.values())
    assert choices == {True, False}  # both kinds of layer in this model
    for k, v in _vectors(want_m).items():
        torch.testing.assert_close(_vectors(ours)[k], v, rtol=1e-4, atol=1e-6)


def test_scaled_outputs_gradient_penalty_matches_torch():
    """strategy="scaled_outputs" under create_graph: ScaledLayerExact's second backward."""
    base = _critic()
    _assert_same_steps(_steps(_ours(base, strategy="scaled_outputs"), _gp_loss),
                       _steps(_torch_model(base), _gp_loss))


@pytest.mark.parametrize("scale_below", [0.0, float("inf")], ids=["all_divide", "all_scale"])
def test_mixed_rule_changes_cost_not_result(scale_below):
    base = _critic()
    want = _steps(_ours(base), _gp_loss)
    m = _ours(base, strategy="mixed")
    m._lipkern_spectral_norm.strategies["mixed"].scale_below = scale_below
    _assert_same_steps(_steps(m, _gp_loss), want)


def test_mixed_second_order_gradgradcheck_float64():
    """The divided layers' sigma = u^T A(W) x is plain autograd: exact at every order."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                      nn.Linear(3 * 4 * 4, 2)).double()
    spectral_norm_model(m, strategy="mixed")
    m._lipkern_spectral_norm.strategies["mixed"].scale_below = 0.0  # every layer divides
    m.eval()  # fixed vectors: a function of the weights alone
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    w0 = m[0].parametrizations.weight.original

    def f(w):
        with torch.no_grad():
            w0.copy_(w.detach())  # the parametrization reads the original; route w through
        return torch.func.functional_call(
            m, {"0.parametrizations.weight.original": w}, (x,))
    w = w0.detach().clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(f, (w,), eps=1e-6, atol=1e-5)


def test_resnet_critic_and_wide_resnet_match_torch():
    torch.manual_seed(0)
    base = models.ResDiscriminator32(ndf=8)
    _assert_same_steps(_steps(_ours(base), _d_loss, size=16),
                       _steps(_torch_model(base), _d_loss, size=16))
    torch.manual_seed(0)
    wrn = models.WideResNet(10, 1)

    def clf(model, x, fake):
        return F.cross_entropy(model(x), torch.tensor([1, 2, 3]))
    # one step: torch's own second step differs by 7.2e-4 (max |grad| 0.21) between 1 and 2
    # threads (measured 2026-12-02; ours: 1.4e-7), after BatchNorm at batch 3 amplifies the
    # first update; the first step agrees to 1e-7 on both
    _assert_same_steps(_steps(_ours(wrn), clf, steps=1), _steps(_torch_model(wrn), clf, steps=1))


# ---------------------------------------------------------------- operator mode
def _per_layer_operator(base, x, **kw):
    """lipkern.nn.spectral_norm(mode="operator") on every conv (each its own fused call and
    autograd), Linear layers in matrix mode: the reference for spectral_norm_model's
    operator mode (the same draws: torch.manual_seed(1), layers in model order)."""
    m = copy.deepcopy(base)
    sizes = {}
    def hook(mod, args):
        sizes.setdefault(mod, tuple(args[0].shape[-2:]))
    hooks = [layer.register_forward_pre_hook(hook) for layer in m.modules()
             if isinstance(layer, nn.Conv2d)]
    with torch.no_grad():
        m.eval()(x)
    m.train()
    for h in hooks:
        h.remove()
    torch.manual_seed(1)
    for layer in m.modules():
        if isinstance(layer, nn.Conv2d):
            lipkern.nn.spectral_norm(layer, mode="operator", input_size=sizes[layer], **kw)
        elif isinstance(layer, nn.Linear):
            lipkern.nn.spectral_norm(layer, **kw)
    return m


@pytest.mark.parametrize("coeff", [None, 0.7])
@pytest.mark.parametrize("strategy", ["mixed", "scaled_outputs"])
@pytest.mark.parametrize("loss_fn", [_d_loss, _gp_loss], ids=["d_step", "gp_step"])
def test_operator_mode_matches_per_layer_operator_mode(loss_fn, strategy, coeff, monkeypatch):
    """spectral_norm_model(mode="operator"): values and gradients (two forwards before one
    backward; a gradient penalty's double backward) equal per-layer operator spectral_norm,
    with the conv layers' dsigma/dW taken from one C++ backward call per forward
    (strategies.operator_unit_grads, counted here) where the extension is built, both on
    divided and on scaled layers, with and without coeff."""
    from lipkern.nn import strategies
    calls = []

    def counted(*a):
        calls.append(1)
        return unit_grads(*a)
    unit_grads = strategies.operator_unit_grads
    monkeypatch.setattr(strategies, "operator_unit_grads", counted)
    base = _critic()
    x = torch.randn(1, 3, 32, 32)
    ours = _ours(base, example_input=x, mode="operator", strategy=strategy, coeff=coeff,
                 power_iteration="per_forward")  # the per-layer rule (the default is per_update)
    want = _per_layer_operator(base, x, coeff=coeff)
    _assert_same_steps(_steps(ours, loss_fn), _steps(want, loss_fn))
    for k, v in _vectors(want).items():
        torch.testing.assert_close(_vectors(ours)[k], v, rtol=1e-4, atol=1e-6)
    if lipkern.backends.load_ext() is not None:
        assert calls  # the shared call ran (one per forward whose sigma gradients were used)
    if strategy == "mixed" and loss_fn is _d_loss:
        assert set(ours._lipkern_spectral_norm.strategies["mixed"].choice.values()) == \
            {True, False}


@pytest.mark.skipif(lipkern.backends.load_ext() is None, reason="needs lipkern._C")
@pytest.mark.parametrize("mode", ["matrix", "operator"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_direct_call_is_the_groups_fused_call(mode, dtype):
    """strategies.direct_call (Mixed's no-grad fused call straight into the C++ op) gives
    bitwise the result of SpectralNormGroup.run, and declines another backend."""
    from lipkern.nn.strategies import direct_call
    base = _critic().to(dtype)
    x = torch.randn(1, 3, 32, 32, dtype=dtype)
    for backend, taken in (("auto", True), ("cpp", True), ("torch", False)):
        m = spectral_norm_model(copy.deepcopy(base), x, mode=mode, backend=backend)
        g = m._lipkern_spectral_norm
        ws = [g.op_weight(i, w) for i, w in enumerate(g.originals())]
        with torch.no_grad():
            got = direct_call(g, ws, 1)
            want = g.run(ws, g.v, g.u, g.specs, 1)
        assert (got is not None) == taken
        if taken:
            for a, b in ((got.sigmas, want.sigmas), (got.state.x, want.state.x),
                         (got.state.u, want.state.u)):
                assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("cpp", [True, False], ids=["cpp", "aten"])
@pytest.mark.parametrize("kind", ["matrix", "operator", "operator_unit"])
def test_divided_by_sigma_equals_the_composite_at_two_orders(kind, cpp, monkeypatch):
    """DividedBySigma (the divided layers' W / sigma with a leaner first-order backward:
    lipkern::divided_backward where the extension is built, else three ATen ops)
    against the composite divided(W, SigmaFromVectors) it replaces: float64, first-order
    gradient and the second-order terms (d/dW and d/dg of <grad, h>), to 1e-12."""
    from lipkern.nn import divided_weight
    from lipkern.nn.divided_weight import divided, divided_fast, sigma_fast
    if cpp and lipkern.backends.load_ext() is None:
        pytest.skip("needs lipkern._C")
    if not cpp:
        monkeypatch.setattr(divided_weight, "_divided_backward", lambda: None)
    from lipkern.layout import layout_for
    from lipkern.reference import weight_grad
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64)
    spec = None if kind == "matrix" else lipkern.ConvSpec(6, padding=1)
    geom = layout_for(((5, 3, 3, 3),), (spec,)).geoms[0]
    u = torch.randn(geom.y_numel, generator=g, dtype=torch.float64)
    x = torch.randn(geom.x_numel, generator=g, dtype=torch.float64)
    sigma = torch.tensor(1.7, dtype=torch.float64)
    matrix = spec is None
    unit = (lambda: weight_grad(geom, x, u)) if kind == "operator_unit" else None
    gy = torch.randn(w0.shape, generator=g, dtype=torch.float64)
    h = torch.randn(w0.shape, generator=g, dtype=torch.float64)
    out = []
    for fast in (True, False):
        w = w0.clone().requires_grad_()
        gyl = gy.clone().requires_grad_()
        y = divided_fast(geom, w, sigma, u, x, matrix, unit) if fast else \
            divided(w, sigma_fast(geom, w, sigma, u, x, matrix, 0, unit))
        first, = torch.autograd.grad(y, w, gy, retain_graph=True)  # first order
        gw, = torch.autograd.grad(y, w, gyl, create_graph=True)
        second = torch.autograd.grad((gw * h).sum(), (w, gyl))
        out.append((y.detach(), first, gw.detach(), *second))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(lipkern.backends.load_ext() is None, reason="needs lipkern._C")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7, 3, 3, 3), (300, 200), (256, 256, 3, 3)])
@pytest.mark.parametrize("unit", [False, True])
def test_divided_backward_op_against_float64(shape, dtype, unit):
    """lipkern::divided_backward = g / s - <g, W> / s^2 * D (D = u x^T, or the given
    weight-sized d) against float64 on fresh inputs, a strided g included, the same bits at
    1 and 2 threads (the dot is summed in fixed blocks), and refusals that name the input."""
    g0 = torch.Generator().manual_seed(11)
    w = torch.randn(shape, generator=g0, dtype=dtype)
    gt = torch.randn(shape[::-1], generator=g0, dtype=dtype)
    g = gt.permute(*reversed(range(len(shape))))  # not contiguous
    s = torch.tensor(0.37, dtype=dtype)
    rows, n = shape[0], w[0].numel()
    u = torch.randn(rows, generator=g0, dtype=dtype)
    x = torch.randn(n, generator=g0, dtype=dtype)
    d = torch.randn(shape, generator=g0, dtype=dtype) if unit else None
    D = d.double() if unit else torch.outer(u.double(), x.double()).view(shape)
    want = g.double() / 0.37 - (g.double() * w.double()).sum() / 0.37 ** 2 * D
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.lipkern.divided_backward(g, w, s, u, x, d)
        torch.set_num_threads(2)
        two = torch.ops.lipkern.divided_backward(g, w, s, u, x, d)
    finally:
        torch.set_num_threads(threads)
    assert one.dtype == dtype and one.shape == w.shape and torch.equal(one, two)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    err = (one.double() - want).abs().max() / want.abs().max()
    assert err < tol, err
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.lipkern.divided_backward(g, w, s.double() if dtype == torch.float32 else
                                           s.float(), u, x, d)
    if not unit:
        with pytest.raises(RuntimeError, match="u, x"):
            torch.ops.lipkern.divided_backward(g, w, s, u[1:], x, None)


# ---------------------------------------------------------------- torch.compile
def _count_compiles(model, x, calls=4):
    """(graphs compiled by dynamo, recompilations) over ``calls`` training steps."""
    from torch._dynamo.utils import counters
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend)
    for _ in range(calls):
        compiled(x).square().sum().backward()
    return len(graphs), sum(counters["recompiles"].values())


@pytest.mark.parametrize("strategy", ["auto", "scaled_outputs", "inline", "per_update"])
def test_compile_one_graph_no_recompile(strategy):
    """One graph, no recompilation (power_iteration="per_update" included: compiled forwards
    iterate per forward, the version check stays out of the graph)."""
    torch.manual_seed(0)
    kw = {}
    if strategy == "per_update":
        strategy, kw = "auto", dict(power_iteration="per_update")
    if strategy == "inline":
        if not lipkern.ops.sn_linear.available():
            pytest.skip("needs the compiled extension")
        model, x = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2)), torch.randn(3, 5)
    else:
        model, x = models.SNGANCritic(ch=2), torch.randn(2, 3, 32, 32)
    spectral_norm_model(model, strategy=strategy, **kw)
    graphs, recompiles = _count_compiles(model, x)
    assert (graphs, recompiles) == (1, 0)


def test_compile_gradient_penalty_refused_not_wrong():
    """Under torch.compile the scaled layers take the first-order ScaledLayer; the compiled
    graph refuses a double backward itself (AOTAutograd), so a gradient penalty raises
    rather than returning a wrong gradient."""
    torch.manual_seed(0)
    model = spectral_norm_model(models.SNGANCritic(ch=2))
    compiled = torch.compile(model, backend="aot_eager")
    xh = torch.randn(2, 3, 32, 32, requires_grad=True)
    # AOTAutograd's refusal: "does not currently support double backward" at the second
    # backward, or (after earlier compiles in the process) "donated buffers which requires
    # create_graph=False" at the first
    with pytest.raises(RuntimeError, match="double backward|create_graph=False"):
        g, = torch.autograd.grad(compiled(xh).sum(), xh, create_graph=True)
        g.square().sum().backward()


def test_compile_inductor_matches_eager():
    base = _critic()
    eager, comp = _ours(base), _ours(base)
    compiled = torch.compile(comp, backend="inductor")
    x = torch.randn(2, 3, 32, 32)
    for _ in range(2):
        ye, yc = eager(x), compiled(x)
        torch.testing.assert_close(yc, ye, rtol=1e-4, atol=1e-5)
        ye.sum().backward()
        yc.sum().backward()
    for a, b in zip(comp.parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- coeff
def _soft_reference(base, coeff, x):
    """W * min(1, coeff / sigma) per layer from torch's spectral_norm's sigma (the same
    vectors: its normalized weight times sigma gives W back)."""
    want = _torch_model(base)
    want(x)  # one training forward: the vectors move as ours do
    want.eval()
    ref = copy.deepcopy(base)
    for (_, lw), (_, lr) in zip(
            [(n, m) for n, m in want.named_modules() if isinstance(m, TYPES)],
            [(n, m) for n, m in ref.named_modules() if isinstance(m, TYPES)]):
        p = lw.parametrizations.weight
        w = p.original
        sigma = (w / lw.weight).flatten()[0]
        lr.weight = nn.Parameter(w * torch.clamp(coeff / sigma, max=1.0))
    return ref


@pytest.mark.parametrize("strategy", ["auto", "scaled_outputs", "mixed"])
@pytest.mark.parametrize("coeff", [0.5, 3.0])
def test_coeff_soft_normalization_value_and_gradient(strategy, coeff):
    base = _critic()
    x = torch.randn(2, 3, 32, 32)
    ref = _soft_reference(base, coeff, x)
    ours = _ours(base, coeff=coeff, strategy=strategy)
    ours(x)
    ours.eval()
    y = ours(x)
    torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-6)
    # gradient of the soft-normalized model against autograd through torch's formula
    want = _torch_model(base)
    want(x)
    want.eval()
    for p in want.modules():
        if isinstance(p, TYPES):
            p.parametrizations.weight[0].forward = _soft_forward(p.parametrizations.weight[0],
                                                                coeff)
    y.square().sum().backward()
    want(x).square().sum().backward()
    for a, b in zip(ours.parameters(), want.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def _soft_forward(param, coeff):
    plain = param.forward

    def forward(weight):
        sigma = (weight / plain(weight)).flatten()[0]  # u^T W v, differentiable
        return weight * torch.clamp(coeff / sigma, max=1.0)
    return forward


def test_coeff_per_layer_and_regimes():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight.mul_(10)  # sigma well above 1
    big = lipkern.nn.spectral_norm(copy.deepcopy(conv), coeff=1e6)  # below coeff: unchanged
    big.eval()
    torch.testing.assert_close(big.weight, conv.weight)
    soft = lipkern.nn.spectral_norm(copy.deepcopy(conv), coeff=2.0)
    soft.eval()
    s = lipkern.reference.exact_sigma(soft.weight.detach().double().flatten(1))
    assert abs(s.item() - 2.0) < 0.05  # 15 warm-up iterations: an estimate close to 2
    with pytest.raises(ValueError, match="coeff"):
        lipkern.nn.spectral_norm(nn.Linear(2, 2), coeff=0)
    with pytest.raises(ValueError, match="coeff"):
        spectral_norm_model(nn.Linear(2, 2), coeff=-1.0)


# ---------------------------------------------------------------- sigmas(model)
def test_sigmas_for_logging_without_recompute():
    base = _critic()
    ours, want = _ours(base), _torch_model(base)
    x = torch.randn(2, 3, 32, 32)
    ours(x)
    want(x)
    group = ours._lipkern_spectral_norm
    calls = group.calls
    got = sigmas(ours)
    assert group.calls == calls  # nothing recomputed
    want.eval()  # reading torch's weights in eval: the sigma of the same vectors, no update
    assert list(got) == [n for n, m in base.named_modules() if isinstance(m, TYPES)]
    for name, m in want.named_modules():
        if isinstance(m, TYPES):
            want_sigma = (m.parametrizations.weight.original / m.weight).flatten()[0]
            torch.testing.assert_close(got[name], want_sigma.detach(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="no spectral_norm_model"):
        sigmas(nn.Linear(2, 2))


# ---------------------------------------------------------------- checkpoints
def test_operator_layer_loads_state_dict_before_first_forward():
    torch.manual_seed(0)
    trained = lipkern.nn.spectral_norm(nn.Conv2d(3, 4, 3, padding=1), mode="operator")
    x = torch.randn(2, 3, 8, 8)
    trained(x)
    fresh = lipkern.nn.spectral_norm(nn.Conv2d(3, 4, 3, padding=1), mode="operator")
    fresh.load_state_dict(trained.state_dict())  # before any forward: no size mismatch
    trained.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x), trained(x))
    wrong = lipkern.nn.spectral_norm(nn.Conv2d(3, 4, 3, padding=1), mode="operator")
    wrong.load_state_dict(trained.state_dict())
    with pytest.raises(ValueError, match="do not fit input size"):
        wrong(torch.randn(1, 3, 6, 6))


def test_input_size_as_channels_height_width():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    a = lipkern.nn.spectral_norm(copy.deepcopy(conv), mode="operator", input_size=(3, 8, 8))
    b = lipkern.nn.spectral_norm(copy.deepcopy(conv), mode="operator", input_size=(8, 8))
    assert a.parametrizations.weight[0].spec == b.parametrizations.weight[0].spec
    with pytest.raises(ValueError, match=r"\(C, H, W\).*3 input channels"):
        lipkern.nn.spectral_norm(copy.deepcopy(conv), mode="operator", input_size=(4, 8, 8))
    with pytest.raises(ValueError, match="input_size must be"):
        lipkern.nn.spectral_norm(copy.deepcopy(conv), mode="operator", input_size=(1, 3, 8, 8))


def test_averaged_model_renormalizes_averaged_vectors():
    """swa_utils.AveragedModel(use_buffers=True) averages u and v too: no longer unit
    vectors. The averaged model divides by u^T W v of the renormalized averages."""
    from torch.optim.swa_utils import AveragedModel
    base = _critic()
    model = _ours(base)
    avg = AveragedModel(model, use_buffers=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(3):
        x = torch.randn(2, 3, 32, 32)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        avg.update_parameters(model)
    state = avg.module.state_dict()
    assert any(abs(v.norm().item() - 1) > 1e-4 for k, v in state.items()
               if k.endswith("_u"))  # the averages are not unit vectors
    avg.eval()
    x = torch.randn(2, 3, 32, 32)
    got = avg(x)
    # the same model from scratch with the averaged weights and renormalized vectors
    ref = _ours(base)
    ref.load_state_dict({k: F.normalize(v, dim=0) if k.endswith(("_u", "_v")) else v
                         for k, v in state.items()})
    ref.eval()
    torch.testing.assert_close(got, ref(x), rtol=1e-5, atol=1e-6)


def test_old_api_checkpoint_loader():
    base = _critic()
    old = copy.deepcopy(base)
    for m in old.modules():
        if isinstance(m, TYPES):
            torch.nn.utils.spectral_norm(m)  # the old API: weight_orig, weight_u, weight_v
    opt = torch.optim.SGD(old.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        old(torch.randn(2, 3, 32, 32)).square().mean().backward()
        opt.step()
    sd = old.state_dict()
    assert any(k.endswith("weight_orig") for k in sd)
    new = _ours(base)
    with pytest.raises(RuntimeError):
        new.load_state_dict(sd)  # the keys differ
    lipkern.nn.load_old_spectral_norm(new, sd)
    old.eval()
    new.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(new(x), old(x), rtol=1e-4, atol=1e-6)


def _d_loss_cat(model, x, fake):  # _d_loss with one forward of both halves
    out = model(torch.cat([x, fake]))
    return F.relu(1 - out[:x.shape[0]]).mean() + F.relu(1 + out[x.shape[0]:]).mean()


def _gp_loss_cat(model, x, fake):  # _gp_loss with one forward of the three batches
    alpha = torch.linspace(0, 1, x.shape[0]).view(-1, 1, 1, 1)
    xh = (alpha * x + (1 - alpha) * fake).requires_grad_(True)
    out = model(torch.cat([xh, fake, x]))
    n = x.shape[0]
    g, = torch.autograd.grad(out[:n].sum(), xh, create_graph=True)
    gp = (g.flatten(1).norm(dim=1) - 1).square().mean()
    return out[n:2 * n].mean() - out[2 * n:].mean() + 10 * gp


@pytest.mark.parametrize("mode", ["matrix", "operator"])
@pytest.mark.parametrize("losses", [(_d_loss, _d_loss_cat), (_gp_loss, _gp_loss_cat)],
                         ids=["d_step", "gp_step"])
def test_per_update_is_one_iteration_per_step(mode, losses):
    """power_iteration="per_update": the forwards of one step share one fused call (one
    power iteration per weight update), so two or three forwards per step give the values,
    gradients (second order included) and vectors of ONE concatenated forward per step with
    the torch rule; the fused calls are counted: one per step."""
    loss, loss_cat = losses
    base = _critic()
    x = torch.randn(1, 3, 32, 32)
    kw = dict(example_input=x, mode="operator") if mode == "operator" else {}
    # operator mode: the default ("auto") is per_update; matrix mode: asked for
    ours = _ours(base, **kw) if mode == "operator" else \
        _ours(base, power_iteration="per_update", **kw)
    want = _ours(base, power_iteration="per_forward", **kw)
    group = ours._lipkern_spectral_norm
    assert group.per_update and not want._lipkern_spectral_norm.per_update
    calls0 = group.calls
    got = _steps(ours, loss, steps=3)
    assert group.calls - calls0 == 3  # one per step, not one per forward
    _assert_same_steps(got, _steps(want, loss_cat, steps=3))
    for k, v in _vectors(want).items():
        torch.testing.assert_close(_vectors(ours)[k], v, rtol=1e-4, atol=1e-6)


def test_per_update_recomputes_after_any_change():
    """An in-place change of a weight, a loaded state_dict or a write into the vectors
    between two forwards starts a new fused call; eval forwards in between do not advance
    the vectors; per_forward (the matrix-mode default) calls every training forward."""
    base = _critic()
    m = _ours(base, power_iteration="per_update")
    group = m._lipkern_spectral_norm
    x = torch.randn(2, 3, 32, 32)
    c = group.calls
    y0 = m(x)
    assert torch.equal(m(x), y0) and group.calls == c + 1
    with torch.no_grad():
        next(p for n, p in m.named_parameters() if n.endswith("original")).mul_(1.5)
    m(x)
    assert group.calls == c + 2
    m.load_state_dict(m.state_dict())
    m(x)
    assert group.calls == c + 3
    m.eval()
    m(x)
    m.train()
    m(x)  # eval forwards left the vectors alone: the same update, no call
    assert group.calls == c + 4  # (the eval forward's own call)
    d = _ours(base)
    cd = d._lipkern_spectral_norm.calls
    d(x), d(x)
    assert d._lipkern_spectral_norm.calls == cd + 2
    e = _ours(base, example_input=x[:1], mode="operator", power_iteration="per_forward")
    ce = e._lipkern_spectral_norm.calls
    e(x[:1]), e(x[:1])
    assert e._lipkern_spectral_norm.calls == ce + 2
    with pytest.raises(ValueError, match="power_iteration must be"):
        _ours(base, power_iteration="per_step")


@pytest.mark.parametrize("kind", ["per_update", "cache_eval"])
@pytest.mark.parametrize("opt", ["adam_fused", "sgd_fused", "adam_foreach"])
def test_kept_sigmas_follow_fused_optimizer_steps(kind, opt):
    """A fused optimizer step (fused=True) writes the weights without bumping their version
    counters: the kept result (per_update's, cache_eval's) must still be dropped, so after
    every step the sigmas used are those of the new weights (against a fresh recomputation
    with the same vectors: the eval forward without cache). Before: per_update reused the
    first step's sigmas for the whole run with fused=True (37% off after 20 steps)."""
    base = _critic()
    x = torch.randn(2, 3, 32, 32)
    kw = dict(example_input=x[:1], mode="operator") if kind == "per_update" else \
        dict(cache_eval=True)
    m = _ours(base, **kw)
    fresh = _ours(base, **kw)
    fresh._lipkern_spectral_norm.cache_eval = False
    make = {"adam_fused": lambda p: torch.optim.Adam(p, lr=0.05, fused=True),
            "sgd_fused": lambda p: torch.optim.SGD(p, lr=0.5, fused=True),
            "adam_foreach": lambda p: torch.optim.Adam(p, lr=0.05, foreach=True)}[opt]
    o = make(m.parameters())
    group = m._lipkern_spectral_norm
    for _ in range(4):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
        if kind == "per_update":
            c = group.calls
            m(x)
            assert group.calls == c + 1  # the step changed the weights: a new call
            used = group.last_sigmas.clone()
            m.eval()  # fresh: the same vectors, sigma recomputed (no cache_eval)
            fresh.load_state_dict(m.state_dict())
            fresh.eval()
            fresh(x)
            torch.testing.assert_close(used, fresh._lipkern_spectral_norm.last_sigmas,
                                       rtol=1e-5, atol=0)
            m.train()
        else:
            m.eval()
            y = m(x)
            fresh.load_state_dict(m.state_dict())
            fresh.eval()
            torch.testing.assert_close(y, fresh(x), rtol=1e-5, atol=1e-6)
            m.train()


@pytest.mark.parametrize("mode", ["matrix", "operator"])
@pytest.mark.parametrize("first", ["no_grad", "inference_mode"])
def test_per_update_reuse_after_a_forward_without_autograd(mode, first):
    """per_update, strategy "scaled_outputs" with a layer that divides its weight (string
    padding 'same'): a training forward under no_grad (or inference_mode) keeps sigmas
    without autograd; the next training forward (reusing them after no_grad) must still
    give dsigma/dW: its gradients equal those of the eval forward at the same weights and
    vectors (sigma = u^T A(W) x recomputed with autograd). Before: the dividing layer's
    sigma was a constant there (gradients off by up to 8%), and after inference_mode the
    next forward raised."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same"), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 64, 1))
    x = torch.randn(2, 3, 8, 8)
    kw = dict(example_input=x[:1], mode="operator") if mode == "operator" else {}
    m = _ours(base, strategy="scaled_outputs", power_iteration="per_update", **kw)
    group = m._lipkern_spectral_norm
    with (torch.no_grad() if first == "no_grad" else torch.inference_mode()):
        m(x)
    c = group.calls
    y = m(x)
    assert group.calls == c + (first == "inference_mode")  # inference tensors not kept
    got = torch.autograd.grad(y.sum(), list(m.parameters()))
    m.eval()
    y_ref = m(x)
    want = torch.autograd.grad(y_ref.sum(), list(m.parameters()))
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    for g1, g2 in zip(got, want):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
