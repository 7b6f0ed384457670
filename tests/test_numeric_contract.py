"""The numeric contract of lipkern.reference (N1-N5), on every backend and layer kind:
sigmas right from 1e-30 to 1e30 in float32 (float64 wider) against the float64 reference
and the exact SVD of the scaled weights, zero weights, zero / non-finite / strided warm-start
states, a NaN sigma's log. Fuzz-style: fresh random weights per seed, one call per case (the
Triton cases run interpreted: shapes tiny)."""
import math

import pytest
import torch

import lipkern
from lipkern import reference as ref
from lipkern.layout import fallback_vector

from layers import make_weights

KINDS = [((7, 5), None),                                               # dense
         ((5, 3, 3, 3), None),                                         # reshaped kernel
         ((4, 3, 3, 3), lipkern.ConvSpec((5, 4), padding=1)),          # conv operator
         ((3, 2, 3, 3), lipkern.ConvSpec(3, stride=2, padding=1, transposed=True,
                                         output_padding=1))]           # transposed conv
BACKENDS = ["torch", "cpp", "triton", "grouped"]
SCALES32 = [1e-30, 3e-7, 1.0, 1.9e12, 1e30]
SCALES64 = [1e-150, 1e-30, 1e30, 1e150]


def _skip_unavailable(backend, dtype=torch.float32):
    why = lipkern.backends._why_not(backend, torch.device("cpu"), dtype)
    if why:
        pytest.skip(why)


def _gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("variant", ["power", "spectral_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_sigma_at_every_scale(backend, dtype, variant):
    """sigma(c W) = c sigma(W): every scale against the float64 reference on W and the exact
    SVD of c W (the same iterations, so the only error is rounding: measured <= 3e-6
    relative in float32; 1e-4 allowed)."""
    _skip_unavailable(backend, dtype)
    seed = 101 + BACKENDS.index(backend)
    base, specs = make_weights(KINDS, torch.float64, seed=seed)
    n_iters = 6
    want = ref.power_iter(base, specs, n_iters=n_iters, generator=_gen(), variant=variant)
    # the iteration converges from below: sigma_6 <= exact, and within 35% here
    exact = torch.stack([ref.exact_sigma(w, s) for w, s in zip(base, specs)])
    assert bool((want.sigmas <= exact * (1 + 1e-12)).all())
    for c in SCALES32 if dtype == torch.float32 else SCALES64:
        ws = [(w * c).to(dtype) for w in base]
        r = lipkern.fused_power_iter(ws, specs, n_iters=n_iters, backend=backend,
                                     generator=_gen(), variant=variant)
        exact_c = torch.stack([ref.exact_sigma(w, s) for w, s in zip(ws, specs)])
        got = r.sigmas.double() / c
        assert torch.isfinite(got).all(), (c, got)
        rel = ((got - want.sigmas) / want.sigmas).abs().max()
        assert rel <= 1e-4, f"scale {c:g}: sigma/c off by {float(rel):.2g}"
        assert bool((r.sigmas.double() <= exact_c * (1 + 1e-4)).all()), c
        assert math.isclose(float(r.log_lipschitz), float(want.sigmas.log().sum())
                            + len(ws) * math.log(c), rel_tol=1e-5, abs_tol=1e-4)
        for v in (r.state.x, r.state.u):  # the vectors stay unit per layer, finite
            assert torch.isfinite(v).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalized_weight_at_tiny_and_huge_scales(backend):
    """fused_normalize at sigma 3e-7 and 1e30: W / sigma has the same operator norm as at
    scale 1 (the issue's sigma 3.1e-7 came back as 5.6e-58, a weight of norm 1e51)."""
    _skip_unavailable(backend)
    base, specs = make_weights(KINDS[:3], torch.float64, seed=7)
    one = lipkern.fused_normalize([w.float() for w in base], specs, n_iters=4,
                                  backend=backend, generator=_gen())
    for c in (3e-7, 1e-30, 1e30):
        r = lipkern.fused_normalize([(w * c).float() for w in base], specs, n_iters=4,
                                    backend=backend, generator=_gen())
        for a, b in zip(r.weights, one.weights):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", ["power", "spectral_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weights_give_zero_sigma_and_no_nan(backend, variant):
    _skip_unavailable(backend)
    ws, specs = make_weights(KINDS, torch.float32, seed=3)
    ws[1] = torch.zeros_like(ws[1])
    ws[2] = torch.zeros_like(ws[2])
    r = lipkern.fused_power_iter(ws, specs, n_iters=3, backend=backend, generator=_gen(),
                                 variant=variant)
    assert float(r.sigmas[1]) == 0 and float(r.sigmas[2]) == 0
    assert bool((r.sigmas[[0, 3]] > 0).all())
    assert float(r.lipschitz) == 0 and float(r.log_lipschitz) == float("-inf")
    assert torch.isfinite(r.state.x).all() and torch.isfinite(r.state.u).all()


@pytest.mark.parametrize("bad", ["zero", "nan", "inf"])
@pytest.mark.parametrize("variant", ["power", "spectral_norm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_or_nonfinite_warm_start_uses_the_fallback(backend, variant, bad):
    """N4: an all-zero or non-finite state vector is replaced by fallback_vector, the same
    one on every backend (not sigma 0 / NaN)."""
    _skip_unavailable(backend)
    ws, specs = make_weights(KINDS, torch.float32, seed=5)
    st = lipkern.fused_power_iter(ws, specs, n_iters=1, backend="torch", generator=_gen(),
                                  variant=variant).state
    fill = {"zero": 0.0, "nan": float("nan"), "inf": float("inf")}[bad]
    lay = lipkern.layout.layout_for(tuple(tuple(w.shape) for w in ws), tuple(specs))
    x = st.x.clone()
    x[lay.x_slice(1)] = fill  # one layer's x
    u = st.u.clone()
    u[lay.y_slice(2)] = fill  # another layer's u (read by torch's update with n_iters=0)
    state = lipkern.PowerIterState(x, u, st.meta)
    for n_iters in (0, 2):
        if n_iters == 0 and variant == "power":
            continue
        r = lipkern.fused_power_iter(ws, specs, state=state, n_iters=n_iters, backend=backend,
                                     variant=variant, check_finite=False)
        want = ref.power_iter([w.double() for w in ws], specs, n_iters=n_iters,
                              variant=variant, state=state.to(torch.float64))
        # (eval mode's u0^T A x0 may be negative for a vector that is not a singular vector)
        assert bool((r.sigmas != 0).all()) and torch.isfinite(r.sigmas).all()
        torch.testing.assert_close(r.sigmas.double(), want.sigmas, rtol=1e-5, atol=0)
    fb = fallback_vector(5)
    assert fb.tolist() == fallback_vector(5).tolist() and float(fb.abs().min()) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_sigma_logs_as_nan(backend):
    """N5: with check_finite=False a NaN weight gives a NaN sigma, and log_lipschitz NaN,
    not -inf."""
    _skip_unavailable(backend)
    ws, specs = make_weights(KINDS[:2], torch.float32, seed=9)
    ws[0][0, 0] = float("nan")
    r = lipkern.fused_power_iter(ws, specs, n_iters=2, backend=backend, generator=_gen(),
                                 check_finite=False)
    assert math.isnan(float(r.sigmas[0])) and math.isnan(float(r.log_lipschitz))
    rr = ref.power_iter(ws, specs, n_iters=2, generator=_gen(), check_finite=False)
    assert math.isnan(float(rr.log_lipschitz))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_expanded_states(backend):
    """A state whose vectors are strided or expanded (stride-0) views gives the result of
    their contiguous copies (the Triton backend read them as flat buffers)."""
    _skip_unavailable(backend)
    ws, specs = make_weights(KINDS, torch.float32, seed=13)
    st = lipkern.fused_power_iter(ws, specs, n_iters=1, backend="torch", generator=_gen(),
                                  variant="spectral_norm").state
    wide_x = torch.stack([st.x, -st.x], 1)  # st.x as a stride-2 view
    wide_u = torch.stack([st.u, -st.u], 1)
    cases = [lipkern.PowerIterState(wide_x[:, 0], wide_u[:, 0], st.meta),
             lipkern.PowerIterState(torch.ones(1).expand(st.x.numel()),
                                    torch.ones(1).expand(st.u.numel()), st.meta)]
    for state in cases:
        assert not state.x.is_contiguous()
        for variant in ("power", "spectral_norm"):
            for n_iters in (0, 2):
                if n_iters == 0 and variant == "power":
                    continue
                kw = dict(n_iters=n_iters, variant=variant)
                r = lipkern.fused_power_iter(ws, specs, state=state, backend=backend, **kw)
                dense = lipkern.PowerIterState(state.x.contiguous(), state.u.contiguous(),
                                               state.meta)
                want = ref.power_iter(ws, specs, state=dense, **kw)
                torch.testing.assert_close(r.sigmas, want.sigmas, rtol=2e-5, atol=0)


# ---------------------------------------------------------------- operator-mode input sizes
import torch.nn as nn  # noqa: E402

from lipkern.layout import layout_for  # noqa: E402


def _conv(seed=0, **kw):
    torch.manual_seed(seed)
    return nn.Conv2d(3, 4, 3, padding=1, **kw)


def _operator_sigma(module, size):
    spec = lipkern.ConvSpec(size, padding=module.padding)
    return float(ref.exact_sigma(module.weight, spec))


@pytest.mark.parametrize("batched", [True, False])
def test_operator_mode_captures_the_input_size(batched):
    """The issue: a first unbatched (C, H, W) input captured (1, W), and the '1-Lipschitz'
    layer had operator norm 1.94."""
    m = lipkern.nn.spectral_norm(_conv(), mode="operator", n_power_iterations=40)
    x = torch.randn(2, 3, 6, 5) if batched else torch.randn(3, 6, 5)
    m(x)
    assert tuple(m.parametrizations.weight[0].spec.input_size) == (6, 5)
    assert _operator_sigma(m, (6, 5)) == pytest.approx(1, rel=1e-3)


def test_operator_mode_refuses_or_recomputes_other_sizes():
    m = lipkern.nn.spectral_norm(_conv(), mode="operator", input_size=(6, 5))
    m(torch.randn(2, 3, 6, 5))
    with pytest.raises(ValueError, match="other_sizes='recompute'"):
        m(torch.randn(2, 3, 7, 7))
    with pytest.raises(ValueError, match="spatial size"):
        m(torch.randn(3, 8, 8))
    r = lipkern.nn.spectral_norm(_conv(), mode="operator", input_size=(6, 5),
                                 other_sizes="recompute", n_power_iterations=30)
    v_before = r.parametrizations.weight[0]._v.clone()
    x = torch.randn(2, 3, 7, 7)
    r(x)
    r.eval()  # no update: the weight read below is the one the forward used
    out = r(x)
    p = r.parametrizations.weight[0]
    w77 = p._forward_other_size(r.parametrizations.weight.original, (7, 7),
                                lipkern.ConvSpec((7, 7), padding=1))
    assert float(ref.exact_sigma(w77, lipkern.ConvSpec((7, 7), padding=1))) == \
        pytest.approx(1, rel=1e-3)
    torch.testing.assert_close(out, nn.functional.conv2d(x, w77, r.bias, padding=1))
    torch.testing.assert_close(p._v, v_before)  # the registered size's state untouched
    r.train()
    r(torch.randn(1, 3, 6, 5))
    assert _operator_sigma(r, (6, 5)) == pytest.approx(1, rel=1e-2)
    with pytest.raises(ValueError, match="other_sizes"):
        lipkern.nn.spectral_norm(_conv(), mode="operator", other_sizes="resize")


def test_operator_mode_whole_model_sizes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3))
    lipkern.nn.spectral_norm_model(model, torch.randn(3, 6, 5), mode="operator")  # unbatched
    group = model[0].parametrizations.weight[0].group
    assert [tuple(s.input_size) for s in group.specs] == [(6, 5), (6, 5)]
    assert model(torch.randn(3, 6, 5)).shape == (2, 4, 3)
    with pytest.raises(ValueError, match="spatial size"):
        model(torch.randn(1, 3, 7, 7))


@pytest.mark.parametrize("spec", [lipkern.ConvSpec((5, 9)), lipkern.ConvSpec(9, stride=(2, 1)),
                                  lipkern.ConvSpec(9, dilation=(2, 1)),
                                  lipkern.ConvSpec(9, padding=(1, 0))])
def test_conv1d_spec_with_a_first_entry_raises(spec):
    with pytest.raises(ValueError, match="Conv1d kernel"):
        lipkern.fused_power_iter([torch.randn(4, 3, 3)], [spec])


# ---------------------------------------------------------------- smaller ones
def test_names_as_one_string():
    torch.manual_seed(0)
    layers = [nn.Linear(4, 4) if i in (0, 2, 20) else nn.Identity() for i in range(21)]
    model = nn.Sequential(*layers)
    lipkern.nn.spectral_norm_model(model, names="20", strategy="scaled_outputs")
    done = [i for i in (0, 2, 20)
            if torch.nn.utils.parametrize.is_parametrized(model[i], "weight")]
    assert done == [20]


def test_sn_linear_without_features_raises():
    if lipkern.backends.load_ext() is None:
        pytest.skip("lipkern._C not built")
    from lipkern.ops.sn_linear import sn_linear
    with pytest.raises(ValueError, match="empty"):
        sn_linear(torch.randn(3, 0), torch.randn(4, 0), None, torch.randn(4), torch.randn(0))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_ops_refuse_an_inconsistent_layer_table(backend):
    """The internal ops validate the table against their tensors (the C++ op segfaulted)."""
    _skip_unavailable(backend)
    ws = [torch.randn(4, 3, 3, 3)]
    lay = layout_for(((4, 3, 3, 3),), (lipkern.ConvSpec(5, padding=1),))
    x0 = torch.randn(lay.total_x)
    call = (lambda m, x: torch.ops.lipkern.power_iter_ext(ws, x, None, m, 2, 1e-12, -1.0)) \
        if backend == "cpp" else \
        (lambda m, x: torch.ops.lipkern.power_iter(ws, x, None, m, 2, 1e-12, -1.0, "torch"))
    for field, value in ((7, 50), (1, 1000), (4, 9)):  # oh, x_off, h
        bad = list(lay.meta)
        bad[field] = value
        with pytest.raises((ValueError, RuntimeError)):
            call(bad, x0)
    with pytest.raises((ValueError, RuntimeError)):
        call(list(lay.meta), x0[:-3])  # x0 shorter than the table says


# ---------------------------------------------------------------- the inline Linear op
@pytest.mark.parametrize("rows", [3, 40], ids=["sweep", "gemm"])  # <= 32 rows: skinny sweep
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_sn_linear_sigma_at_every_scale(dtype, rows):
    """lipkern::sn_linear (strategy "inline", the CPU default for Linear-only models) at
    scales 1e-30..1e30: sigma within 1e-4 of the float64 reference after 40 warm steps
    (before the fix: 0 below ~1e-19 and NaN above ~1e19), the output W x / sigma finite."""
    from lipkern.ops.sn_linear import sn_linear
    if lipkern.backends.load_ext() is None:
        pytest.skip("the compiled extension is not built")
    g = _gen()
    w0 = torch.randn(9, 13, generator=g, dtype=torch.float64)
    x = torch.randn(rows, 13, generator=g, dtype=torch.float64)
    for scale in (1e-30, 1e-20, 1e-9, 1.0, 1e9, 1e20, 1e30):
        w = (w0 * scale).to(dtype)
        u = torch.randn(9, generator=g, dtype=dtype)
        v = torch.randn(13, generator=g, dtype=dtype)
        ur, vr = u.double(), v.double()
        for _ in range(40):
            y, sigma, u, v = sn_linear(x.to(dtype), w, None, u, v, n_iters=1)
            _, sr, ur, vr = ref.sn_linear(x, w.double(), None, ur, vr, n_iters=1)
        assert torch.isfinite(y).all(), scale
        assert float(sigma) == pytest.approx(float(sr), rel=1e-4), scale
        exact = float(ref.exact_sigma(w))
        assert float(sigma) == pytest.approx(exact, rel=1e-3), scale
