"""The Triton v2 conv forward (triton_kernels/v2_conv.py) in its step mode (one launch per
step, the launch boundary as the barrier) under TRITON_INTERPRET=1, with 1, 2 and 3
programs per layer, against lipkern.reference: every layer kind and shape class the plan
covers, both variants, warm start, tol, and the v1 fallback for what it does not cover.

Tolerances: tests/layers.py's rule (error against float64 <= 2x the float32 reference's own
error + 1e-5 x scale). Shapes are tiny: the interpreter runs ~0.1 s per layer and step.
"""
import logging
import os

import pytest
import torch

import lipkern
from lipkern import ConvSpec, reference as ref
from lipkern.layout import initial_u, initial_x, layout_for

from layers import assert_close_rule, leaf, make_weights

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="the step-mode tests run under the Triton interpreter (CPU)")

v2_conv = pytest.importorskip("lipkern.triton_kernels.v2_conv")
from lipkern.triton_kernels import v2_plan  # noqa: E402

# every shape class the plan covers, on odd sizes, plus two layers it routes to v1
V2_LAYERS = [
    ((6, 3, 3, 3), ConvSpec((7, 5), padding=1)),                    # 3x3 s1, 3 input channels
    ((5, 4, 3, 3), ConvSpec((6, 5), stride=2, padding=1)),          # 3x3 s2: 4 parity classes
    ((4, 4, 3, 3), ConvSpec((5, 6), padding=1, padding_mode="circular")),
    ((3, 4, 3, 3), ConvSpec(4, stride=2, padding=1, transposed=True, output_padding=1)),
    ((5, 3, 4, 4), ConvSpec(7, stride=2, padding=1)),               # 4x4 s2 (DCGAN/SNGAN)
    ((17, 5, 1, 1), ConvSpec((3, 4), stride=2)),                    # 1x1 s2 shortcut, cout 17
    ((4, 3, 5), ConvSpec(11, padding=2)),                           # conv1d (1x5)
    ((3, 2, 3, 3), ConvSpec(5, padding=1, dilation=2)),             # dilated
]
V1_LAYERS = [
    ((7, 5), None),                                                 # dense: v1 (no dense v2)
    ((6, 1, 3, 3), ConvSpec(5, padding=1, groups=3)),               # grouped: v1
]


def _layout(ws, specs):
    return layout_for(tuple(tuple(w.shape) for w in ws), tuple(specs))


def _start(layout, sn, seed=5):
    g = torch.Generator().manual_seed(seed)
    x0 = initial_x(layout, torch.device("cpu"), torch.float32, g)
    u0 = initial_u(layout, torch.device("cpu"), torch.float32, g) if sn else None
    return x0, u0


def _state(layout, x0, u0):
    return lipkern.PowerIterState(x0, torch.zeros(layout.total_y) if u0 is None else u0,
                                  layout.meta)


def _check(ws, specs, n_iters, G, variant="power", tol=None, precision="ieee"):
    """v2 launcher (step mode, G programs per layer) vs the fp64 and fp32 references from the
    same start vectors; returns the launcher's outputs."""
    layout = _layout(ws, specs)
    sn = variant == "spectral_norm"
    x0, u0 = _start(layout, sn)
    sig, lip, loglip, x, u = v2_conv.forward(ws, x0, u0, layout, n_iters, 1e-12,
                                             -1.0 if tol is None else tol, precision,
                                             mode="step", programs_per_layer=G)
    plan, _ = v2_conv.forward.last
    assert plan.mode == "step" and set(plan.programs) == {G}
    st = _state(layout, x0, u0)
    kw = dict(n_iters=n_iters, variant=variant, tol=tol)
    r64 = ref.power_iter([w.double() for w in ws], specs, state=st.to(torch.float64), **kw)
    r32 = ref.power_iter(ws, specs, state=st, **kw)
    for name, got, w64, w32 in (("sigmas", sig, r64.sigmas, r32.sigmas),
                                ("lipschitz", lip, r64.lipschitz, r32.lipschitz),
                                ("log_lipschitz", loglip, r64.log_lipschitz, r32.log_lipschitz),
                                ("x", x, r64.state.x, r32.state.x),
                                ("u", u, r64.state.u, r32.state.u)):
        if name == "log_lipschitz" and not torch.isfinite(w64):
            # eval mode's u0^T A x0 can be <= 0: log L is then -inf (or NaN) alike
            assert got.isnan() == w64.isnan() and (got.isnan() or got == w64)
            continue
        assert_close_rule(f"G={G} {variant} {name}", got, w64, w32)
    return sig, x, u, plan


@pytest.mark.parametrize("G", [1, 2, 3])
def test_every_shape_class_and_the_v1_rest(G):
    entries = V2_LAYERS + V1_LAYERS if G == 3 else V2_LAYERS
    ws, specs = make_weights(entries, seed=1)
    _, _, _, plan = _check(ws, specs, 1, G)
    assert plan.v2_layers == tuple(range(len(V2_LAYERS)))
    assert len(plan.classes) == len(V2_LAYERS)
    if G == 3:
        assert plan.v1_layers == (8, 9)
        assert "dense" in plan.v1_reasons[0] and "groups=3" in plan.v1_reasons[1]


@pytest.mark.parametrize("n_iters,G", [(0, 2), (1, 3)])
def test_spectral_norm_variant(n_iters, G):
    """torch's update (both vectors; n_iters=0 is eval mode's u0^T A x0)."""
    ws, specs = make_weights(V2_LAYERS[:5], seed=2)
    _check(ws, specs, n_iters, G, variant="spectral_norm")


def test_layers_of_one_class_share_a_branch():
    ws, specs = make_weights([V2_LAYERS[0]] * 3 + [V2_LAYERS[5]], seed=3)
    _, _, _, plan = _check(ws, specs, 1, 2)
    assert len(plan.classes) == 2 and plan.layer_class == (0, 0, 0, 1)


def test_warm_start_continues_the_iteration():
    ws, specs = make_weights(V2_LAYERS[2:4], seed=4)
    layout = _layout(ws, specs)
    x0, _ = _start(layout, False)
    _, _, _, x1, u1 = v2_conv.forward(ws, x0, None, layout, 1, 1e-12, -1.0,
                                      mode="step", programs_per_layer=3)
    sig, _, _, x2, _ = v2_conv.forward(ws, x1, None, layout, 1, 1e-12, -1.0,
                                       mode="step", programs_per_layer=3)
    want = ref.power_iter([w.double() for w in ws], specs, n_iters=2,
                          state=_state(layout, x0, None).to(torch.float64))
    torch.testing.assert_close(sig.double(), want.sigmas, rtol=2e-5, atol=0)
    torch.testing.assert_close(x2.double(), want.state.x, rtol=0, atol=2e-5)


@pytest.mark.parametrize("G", [2, 3])
def test_tol_stops_each_layer_like_the_reference(G):
    """Two layers of ONE class stop at different iterations (per-layer done flags), decided
    alike by every member. 1x1 convs of diagonal channel maps: the operator's singular
    values are the diagonal, so the estimate converges at the known rate (s2/s1)^2 per
    iteration and the stopping step is far from a rounding-sensitive borderline."""
    ws = [torch.diag(torch.tensor([3.0, 1.0, 0.5]))[:, :, None, None],    # stops after ~4
          torch.diag(torch.tensor([3.0, 2.9, 0.5]))[:, :, None, None]]    # runs all 12
    specs = [ConvSpec((2, 3))] * 2
    layout = _layout(ws, specs)
    x0 = torch.ones(layout.total_x)
    sig, _, _, x, _ = v2_conv.forward(ws, x0, None, layout, 12, 1e-12, 1e-4,
                                      mode="step", programs_per_layer=G)
    st = _state(layout, x0, None).to(torch.float64)
    want = ref.power_iter([w.double() for w in ws], specs, state=st, n_iters=12, tol=1e-4)
    full = ref.power_iter([w.double() for w in ws], specs, state=st, n_iters=12)
    torch.testing.assert_close(sig.double(), want.sigmas, rtol=1e-5, atol=0)
    torch.testing.assert_close(x.double(), want.state.x, rtol=0, atol=1e-5)
    assert (x[:6].double() - full.state.x[:6]).abs().max() > 1e-7  # the fast layer stopped


def test_tf32_rounded_operands_stay_within_the_rounding_bound():
    """precision="tf32" rounds the packed weights and stored vectors to tf32 (the interpreter
    then multiplies them in fp32, exactly as the tensor core would): each operand moves by
    <= 2^-11 relative, so sigma by < 1e-3 relative; the fp32 accumulators keep the norms."""
    ws, specs = make_weights(V2_LAYERS[:2], seed=6)
    layout = _layout(ws, specs)
    x0, _ = _start(layout, False)
    sig, _, _, _, _ = v2_conv.forward(ws, x0, None, layout, 2, 1e-12, -1.0, "tf32",
                                      mode="step", programs_per_layer=2)
    want = ref.power_iter([w.double() for w in ws], specs, n_iters=2,
                          state=_state(layout, x0, None).to(torch.float64)).sigmas
    err = ((sig.double() - want) / want).abs().max()
    assert 0 < err < 1e-3


def test_zero_weight_gives_zero_sigma():
    ws = [torch.zeros(4, 3, 3, 3), torch.randn(3, 4, 3, 3)]
    specs = [ConvSpec(5, padding=1), ConvSpec(5, padding=1)]
    layout = _layout(ws, specs)
    x0, _ = _start(layout, False)
    sig, lip, loglip, x, u = v2_conv.forward(ws, x0, None, layout, 2, 1e-12, -1.0,
                                             mode="step", programs_per_layer=2)
    assert sig[0] == 0 and lip == 0 and loglip == float("-inf")
    assert torch.isfinite(x).all() and torch.isfinite(u).all() and sig[1] > 0


def test_public_api_routes_to_v2_and_logs_the_path(monkeypatch, caplog):
    """LIPKERN_TRITON_V2=1: fused_power_iter(backend="triton") runs v2 for the conv layers
    and v1 for the rest, says so in the debug log, and its gradients (the v1 backward) match
    the reference; precision is ignored on CPU tensors."""
    monkeypatch.setenv("LIPKERN_TRITON_V2", "1")
    entries = V2_LAYERS[:2] + V1_LAYERS[:1]
    ws, specs = make_weights(entries, seed=7)
    c = torch.tensor([0.3, 0.7, 0.2])
    caplog.set_level(logging.DEBUG, logger="lipkern.triton_v2")
    out = {}
    for name, fn, wts in (("v2", lipkern.fused_power_iter, ws),
                          ("r64", ref.power_iter, [w.double() for w in ws]),
                          ("r32", ref.power_iter, ws)):
        lw = leaf(wts)
        kw = dict(backend="triton", precision="tf32") if name == "v2" else {}
        r = fn(lw, specs, n_iters=2, generator=torch.Generator().manual_seed(3), **kw)
        ((c.to(r.sigmas.dtype) * r.sigmas).sum() + r.log_lipschitz).backward()
        out[name] = (r, [w.grad for w in lw])
    assert "triton v2 (step" in caplog.text and "v1: 2 (dense" in caplog.text
    assert "precision ieee" in caplog.text  # tf32 asked for, ignored on CPU tensors
    (r, g), (r64, g64), (r32, g32) = out["v2"], out["r64"], out["r32"]
    assert_close_rule("sigmas", r.sigmas, r64.sigmas, r32.sigmas)
    assert_close_rule("state.x", r.state.x, r64.state.x, r32.state.x)
    for i in range(len(ws)):
        assert_close_rule(f"grad[{i}]", g[i], g64[i], g32[i])


def test_bad_precision_is_a_value_error():
    ws, specs = make_weights(V2_LAYERS[:1])
    with pytest.raises(ValueError, match="precision"):
        lipkern.fused_power_iter(ws, specs, backend="torch", precision="fp16")


def test_persistent_mode_with_one_program_per_layer(monkeypatch):
    """The barrier path under the interpreter: with G = 1 a layer's group is one program, so
    the in-kernel barrier cannot deadlock even though programs run one after another; it
    checks the counter arithmetic (target G * barriers) and the hang guard stays down. The
    G > 1 barrier needs a GPU (bench/gpu_session.sh)."""
    monkeypatch.setattr(v2_plan, "device_desc",
                        lambda device: v2_plan.DeviceDesc(64, "fake", cooperative=True))
    v2_conv.plan_for.cache_clear()
    try:
        ws, specs = make_weights(V2_LAYERS[:2], seed=8)
        layout = _layout(ws, specs)
        x0, _ = _start(layout, False)
        sig, _, _, _, _ = v2_conv.forward(ws, x0, None, layout, 1, 1e-12, -1.0,
                                          mode="persistent", programs_per_layer=1,
                                          spin_limit=1000)
        plan, _ = v2_conv.forward.last
        assert plan.mode == "persistent" and not v2_conv.hang_flag()
        want = ref.power_iter([w.double() for w in ws], specs, n_iters=1,
                              state=_state(layout, x0, None).to(torch.float64)).sigmas
        torch.testing.assert_close(sig.double(), want, rtol=2e-5, atol=0)
    finally:
        v2_conv.plan_for.cache_clear()


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_sigma_scales_from_tiny_to_huge(scale):
    """N1/N3: sigma of c*W is c*sigma(W) for c = 1e-30 and 1e30 (float64 sums of squares,
    floors relative to max|W|), in both variants."""
    ws, specs = make_weights(V2_LAYERS[:1], seed=9)
    layout = _layout(ws, specs)
    for sn in (False, True):
        x0, u0 = _start(layout, sn)
        base = v2_conv.forward(ws, x0, u0, layout, 1, 1e-12, -1.0, mode="step",
                               programs_per_layer=2)[0]
        got = v2_conv.forward([w * scale for w in ws], x0, u0, layout, 1, 1e-12, -1.0,
                              mode="step", programs_per_layer=2)[0]
        torch.testing.assert_close(got.double() / scale, base.double(), rtol=1e-5, atol=0)


def test_zero_and_nan_start_vectors_use_the_fallback():
    """N4: an all-zero or non-finite x0 becomes lipkern.layout.fallback_vector, as in the
    reference; decided alike by the 3 members of each layer."""
    ws, specs = make_weights(V2_LAYERS[2:4], seed=10)
    layout = _layout(ws, specs)
    x0 = torch.zeros(layout.total_x)
    x0[layout.x_slice(1)] = float("nan")
    sig, _, _, x, _ = v2_conv.forward(ws, x0, None, layout, 1, 1e-12, -1.0, mode="step",
                                      programs_per_layer=3)
    want = ref.power_iter([w.double() for w in ws], specs, n_iters=1,
                          state=_state(layout, x0, None).to(torch.float64))
    torch.testing.assert_close(sig.double(), want.sigmas, rtol=2e-5, atol=0)
    torch.testing.assert_close(x.double(), want.state.x, rtol=0, atol=2e-5)
