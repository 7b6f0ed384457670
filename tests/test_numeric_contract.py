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
BACKENDS = ["torch", "cpp", "triton"]
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
