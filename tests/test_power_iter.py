"""lipkern.fused_power_iter, every backend, against lipkern.reference.

Tolerance rule (flash-attention's): a backend's error against the float64 reference is at most
2x the error of the reference itself run in float32 on the same inputs, plus a floor of
FLOOR x the result's scale for outputs the float32 reference happens to hit exactly.
"""
import pytest
import torch

import lipkern
from lipkern import ConvSpec, reference as ref

from conftest import DEVICES
from layers import MIXED, assert_close_rule as _assert_close_rule, leaf, make_weights

BACKENDS = ["torch", "triton", "cpp", "cuda", "grouped"]


def _run(fn, ws, specs, coefs, **kw):
    """Forward + backward of loss = c0 . sigmas + c1 * lipschitz + c2 * log_lipschitz."""
    ws = leaf(ws)
    r = fn(ws, specs, **kw)
    loss = (coefs[0] * r.sigmas).sum() + coefs[1] * r.lipschitz + coefs[2] * r.log_lipschitz
    loss.backward()
    return r, [w.grad for w in ws]


def _backend_ok(backend, device, dtype):
    why = lipkern.backends._why_not(backend, torch.device(device), dtype)
    if why:
        pytest.skip(why)


def _coefs(L, dtype=torch.float64, seed=11):
    g = torch.Generator().manual_seed(seed)
    # small c1: the product of 12 sigmas is ~1e8, keep its gradient on the others' scale
    return torch.rand(L, generator=g, dtype=dtype), 1e-8, 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_layers_match_reference(backend, dtype, device):
    _backend_ok(backend, device, dtype)
    ws, specs = make_weights(MIXED, dtype, device, seed=1)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    r = _check_against_reference(backend, ws, specs, device, gen, _coefs(len(ws)),
                                 ("sigmas", "lipschitz", "log_lipschitz"), n_iters=3)
    assert r.sigmas.dtype == torch.float32 and r.sigmas.device.type == device


def _check_against_reference(backend, ws, specs, device, gen, c, outputs, **kw):
    """Forward + backward on the backend, the fp64 reference and the reference in the op's
    own precision (fp32 iteration, gradients in the weights' dtype); the rule above on
    ``outputs``, both state vectors and every gradient. Returns the backend's result."""
    r, grads = _run(lipkern.fused_power_iter, ws, specs, (c[0].to(device).float(), *c[1:]),
                    backend=backend, generator=gen(), **kw)
    r64, g64 = _run(ref.power_iter, [w.double() for w in ws], specs,
                    (c[0].to(device), *c[1:]), generator=gen(), **kw)
    r32, g32 = _run(ref.power_iter, ws, specs, (c[0].to(device).float(), *c[1:]),
                    generator=gen(), **kw)
    for name in outputs:
        _assert_close_rule(name, getattr(r, name), getattr(r64, name), getattr(r32, name))
    _assert_close_rule("state.x", r.state.x, r64.state.x, r32.state.x)
    _assert_close_rule("state.u", r.state.u, r64.state.u, r32.state.u)
    for i, (g, gw, gr) in enumerate(zip(grads, g64, g32)):
        assert g.dtype == ws[i].dtype and g.shape == ws[i].shape
        _assert_close_rule(f"grad[{i}] {tuple(ws[i].shape)}", g, gw, gr)
    return r


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_iters", [0, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_spectral_norm_variant_matches_reference(backend, dtype, n_iters, device):
    """variant="spectral_norm" (torch's update, sigma = u^T A x with u of the last half-step;
    n_iters=0 is torch's eval mode): every backend against the reference, same rule."""
    _backend_ok(backend, device, dtype)
    ws, specs = make_weights(MIXED, dtype, device, seed=21)
    gen = lambda: torch.Generator().manual_seed(6)  # noqa: E731
    # log_lipschitz left out: before convergence u^T A x may be <= 0 (log -> -inf)
    r = _check_against_reference(backend, ws, specs, device, gen, _coefs(len(ws), seed=12),
                                 ("sigmas", "lipschitz"), n_iters=n_iters,
                                 variant="spectral_norm")
    if n_iters == 0:  # eval mode leaves the (normalized) vectors as they were
        lay = lipkern.layout.layout_for(tuple(tuple(w.shape) for w in ws), tuple(specs))
        x0 = lipkern.layout.initial_x(lay, torch.device(device), torch.float32, gen())
        for i in range(len(ws)):
            xi = x0[lay.x_slice(i)]
            torch.testing.assert_close(r.state.x[lay.x_slice(i)], xi / xi.norm())


@pytest.mark.parametrize("backend", ["torch", "cpp", "grouped"])
def test_spectral_norm_variant_float64_and_warm_start(backend):
    """fp64 to 1e-12 of the reference, and 2 + 1 warm-started iterations == 3 (the state
    carries both vectors)."""
    _backend_ok(backend, "cpu", torch.float64)
    ws, specs = make_weights(MIXED, torch.float64, seed=22)
    kw = dict(variant="spectral_norm")
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    r = lipkern.fused_power_iter(ws, specs, n_iters=3, backend=backend, generator=gen(), **kw)
    want = ref.power_iter(ws, specs, n_iters=3, generator=gen(), **kw)
    torch.testing.assert_close(r.sigmas, want.sigmas, rtol=1e-12, atol=1e-14)
    cold = lipkern.fused_power_iter(ws, specs, n_iters=2, backend=backend, generator=gen(),
                                    **kw)
    warm = lipkern.fused_power_iter(ws, specs, n_iters=1, state=cold.state, backend=backend,
                                    **kw)
    torch.testing.assert_close(warm.sigmas, r.sigmas, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(warm.state.u, r.state.u, rtol=1e-10, atol=1e-12)
    # n_iters=0 re-evaluates u^T A x of the state: the value of the call that made the state
    ev = lipkern.fused_power_iter(ws, specs, n_iters=0, state=r.state, backend=backend, **kw)
    torch.testing.assert_close(ev.sigmas, r.sigmas, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["torch", "cpp", "grouped"])
def test_float64_matches_reference(backend):
    _backend_ok(backend, "cpu", torch.float64)
    ws, specs = make_weights(MIXED, torch.float64, seed=2)
    c = _coefs(len(ws))
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    r, grads = _run(lipkern.fused_power_iter, ws, specs, c, n_iters=4, backend=backend,
                    generator=gen())
    r64, g64 = _run(ref.power_iter, ws, specs, c, n_iters=4, generator=gen())
    assert r.sigmas.dtype == torch.float64
    torch.testing.assert_close(r.sigmas, r64.sigmas, rtol=1e-12, atol=0)
    torch.testing.assert_close(r.lipschitz, r64.lipschitz, rtol=1e-12, atol=0)
    for g, gw in zip(grads, g64):
        torch.testing.assert_close(g, gw, rtol=1e-10, atol=1e-12)


# Convs whose column matrix exceeds the C++ kernel's slice (kColBytes, 512 KiB, in
# csrc/cpu/power_iter.cpp; kGradColBytes for the weight gradient): float64 3x3 at 24x24 is 41 KiB per input channel, so 20 channels
# run as slices of 12 + 8 (an uneven last slice) on the flat-shift path, the strided path,
# groups, circular padding and a transposed conv.
SLICED = [
    ((7, 20, 3, 3), ConvSpec(24, padding=1)),
    ((6, 17, 3, 3), ConvSpec(48, stride=2, padding=1)),
    ((6, 17, 3, 3), ConvSpec(48, stride=2, padding=1, groups=2)),   # cin 34, cig 17
    ((5, 20, 3, 3), ConvSpec(24, padding=1, padding_mode="circular")),
    ((6, 20, 3, 3), ConvSpec(24, padding=1, transposed=True)),     # C: 20 input channels
    # the weight gradient slices only past kGradColBytes (16 MiB): 128 x 9 x 48^2 doubles
    # are 21 MiB, slices of 98 + 30 channels
    ((2, 128, 3, 3), ConvSpec(48, padding=1)),
]


@pytest.mark.parametrize("variant", ["power", "spectral_norm"])
def test_convs_larger_than_one_column_slice(variant):
    """The cpp kernel builds its im2col columns in slices of input channels: the same
    sigmas, vectors and gradients as the reference (float64, to 1e-10)."""
    _backend_ok("cpp", "cpu", torch.float64)
    entries = [((s[0] * (2 if sp.groups == 2 else 1),) + s[1:], sp) for s, sp in SLICED]
    ws, specs = make_weights(entries, torch.float64, seed=23)
    c = _coefs(len(ws))
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    r, grads = _run(lipkern.fused_power_iter, ws, specs, c, n_iters=2, backend="cpp",
                    generator=gen(), variant=variant)
    r64, g64 = _run(ref.power_iter, ws, specs, c, n_iters=2, generator=gen(), variant=variant)
    torch.testing.assert_close(r.sigmas, r64.sigmas, rtol=1e-10, atol=0)
    torch.testing.assert_close(r.state.x, r64.state.x, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(r.state.u, r64.state.u, rtol=1e-8, atol=1e-12)
    for g, gw in zip(grads, g64):
        torch.testing.assert_close(g, gw, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_warm_start_continues_the_iteration(backend, device):
    _backend_ok(backend, device, torch.float32)
    ws, specs = make_weights(MIXED[::2], torch.float32, device, seed=3)
    gen = torch.Generator().manual_seed(1)
    cold = lipkern.fused_power_iter(ws, specs, n_iters=2, backend=backend, generator=gen)
    warm = lipkern.fused_power_iter(ws, specs, n_iters=1, state=cold.state, backend=backend)
    want = ref.power_iter([w.double() for w in ws], specs, n_iters=1,
                          state=cold.state.to(torch.float64))
    torch.testing.assert_close(warm.sigmas.double(), want.sigmas, rtol=2e-5, atol=0)
    # in exact arithmetic 2 + 1 iterations == 3 iterations
    three = lipkern.fused_power_iter(ws, specs, n_iters=3, backend=backend,
                                     generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(warm.sigmas, three.sigmas, rtol=2e-5, atol=0)
    assert not warm.state.x.requires_grad and warm.state.x.device.type == device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_tol_stops_each_layer_like_the_reference(backend, device):
    _backend_ok(backend, device, torch.float32)
    # diagonal matrices: the estimate converges at a known rate (ratio s2/s1 per step), so
    # the stopping step is far from a rounding-sensitive borderline
    ws = [torch.diag(torch.tensor([3.0, 1.0, 0.5])),      # fast: stops after a few steps
          torch.diag(torch.tensor([3.0, 2.9, 0.5])),      # slow: runs all n_iters
          torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0))]
    ws = [w.to(device) for w in ws]
    specs = [None, None, lipkern.ConvSpec(5, padding=1)]
    x0 = lipkern.PowerIterState(torch.ones(3 + 3 + 4 * 25, device=device),
                                torch.zeros(3 + 3 + 6 * 25, device=device),
                                lipkern.layout.layout_for(tuple(tuple(w.shape) for w in ws),
                                                          tuple(specs)).meta)
    got = lipkern.fused_power_iter(ws, specs, state=x0, n_iters=40, tol=1e-4, backend=backend)
    want = ref.power_iter([w.double() for w in ws], specs, state=x0.to(torch.float64),
                          n_iters=40, tol=1e-4)
    torch.testing.assert_close(got.sigmas.double(), want.sigmas, rtol=1e-5, atol=0)
    # the fast layer stopped early: its x is not the 40-iteration x
    full = ref.power_iter([w.double() for w in ws], specs, state=x0.to(torch.float64),
                          n_iters=40)
    assert (got.state.x[:3].double().cpu() - full.state.x[:3].cpu()).abs().max() > 1e-7
    torch.testing.assert_close(got.state.x.double(), want.state.x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_gives_zero_sigma_and_finite_gradients(backend, device):
    _backend_ok(backend, device, torch.float32)
    ws, specs = make_weights(MIXED[3:6], torch.float32, device, seed=4)
    ws[1] = torch.zeros_like(ws[1])
    ws = leaf(ws)
    r = lipkern.fused_power_iter(ws, specs, backend=backend,
                                 generator=torch.Generator().manual_seed(0))
    assert r.sigmas[1] == 0 and r.lipschitz == 0 and r.log_lipschitz == float("-inf")
    (r.sigmas.sum() + r.lipschitz + r.log_lipschitz).backward()
    for w in ws:
        assert torch.isfinite(w.grad).all()
    assert (ws[1].grad == 0).all()
    assert (r.state.u[r.state.u.isnan()]).numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_iterations_is_the_norm_of_A_x0(backend):
    _backend_ok(backend, "cpu", torch.float32)
    ws, specs = make_weights(MIXED[4:7], torch.float32, seed=5)
    r = lipkern.fused_power_iter(ws, specs, n_iters=0, backend=backend,
                                 generator=torch.Generator().manual_seed(2))
    x0 = lipkern.layout.initial_x(lipkern.layout.layout_for(
        tuple(tuple(w.shape) for w in ws), tuple(specs)), torch.device("cpu"), torch.float32,
        torch.Generator().manual_seed(2))
    lay = lipkern.layout.layout_for(tuple(tuple(w.shape) for w in ws), tuple(specs))
    for i, (w, g) in enumerate(zip(ws, lay.geoms)):
        x = x0[lay.x_slice(i)]
        want = ref.apply_op(g, w, x / x.norm()).norm()
        torch.testing.assert_close(r.sigmas[i], want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_iterates_in_float32(backend):
    _backend_ok(backend, "cpu", torch.float32)
    ws, specs = make_weights(MIXED[3:8], torch.float32, seed=6)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = lipkern.fused_power_iter(ws, specs, backend=backend, generator=gen())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = lipkern.fused_power_iter(ws, specs, backend=backend, generator=gen())
    assert auto.sigmas.dtype == torch.float32
    torch.testing.assert_close(auto.sigmas, plain.sigmas, rtol=1e-6, atol=0)


def test_generator_makes_the_start_reproducible():
    ws, specs = make_weights(MIXED[4:6], torch.float32, seed=7)
    a = lipkern.fused_power_iter(ws, specs, n_iters=1, generator=torch.Generator().manual_seed(3))
    b = lipkern.fused_power_iter(ws, specs, n_iters=1, generator=torch.Generator().manual_seed(3))
    c = lipkern.fused_power_iter(ws, specs, n_iters=1, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.sigmas, b.sigmas) and not torch.equal(a.sigmas, c.sigmas)


def test_defaults_need_only_a_list_of_weights():
    ws = [torch.randn(16, 8), torch.randn(8, 4, 3, 3)]
    r = lipkern.fused_power_iter(ws)
    assert r.sigmas.shape == (2,) and torch.isfinite(r.sigmas).all()
    exact = torch.stack([ref.exact_sigma(w) for w in ws]).float()
    assert (r.sigmas <= exact * (1 + 1e-5)).all() and (r.sigmas > 0.5 * exact).all()


def test_auto_picks_cpp_on_cpu_when_built():
    want = "cpp" if lipkern.backends.load_ext() is not None else "torch"
    for dt in (torch.float32, torch.float64, torch.bfloat16):
        assert lipkern.backends.resolve_backend("auto", torch.device("cpu"), dt) == want
    assert "torch" in lipkern.available_backends("cpu")
