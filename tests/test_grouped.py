"""backend="grouped" (lipkern.ops.grouped) where its batching matters: buckets of several
layers, interleaved in the call, one geometry from different weight shapes; tol per layer
inside one bucket; the number of convolutions per call; torch.compile. Every backend test of
tests/test_power_iter.py, test_normalize.py and test_op.py also runs it (one layer per
bucket there: MIXED has no repeated geometry)."""
import pytest
import torch

import lipkern
from lipkern import ConvSpec
from lipkern import reference as ref
from lipkern.layout import layout_for
from lipkern.ops.grouped import plan_for

from layers import assert_close_rule, leaf, make_weights

CONV = ((4, 3, 3, 3), ConvSpec(6, padding=1))
CIRC_T = ((3, 2, 3, 3), ConvSpec(4, stride=2, padding=1, transposed=True, output_padding=1))
GROUPS = ((6, 2, 3, 3), ConvSpec((5, 7), padding=1, dilation=(1, 2), groups=2,
                                 padding_mode="circular"))
DENSE = ((7, 5), None)
# interleaved repeats (gather/scatter through runs), one dense geometry from a matrix and a
# reshaped kernel of another shape, a conv1d beside the same conv2d geometry
BUCKETED = [CONV, CONV, DENSE, CONV, CIRC_T, DENSE, GROUPS, DENSE, CIRC_T, GROUPS,
            ((5, 27), None), ((5, 3, 3, 3), None),
            ((4, 3, 5), ConvSpec(11, padding=2)), ((4, 3, 1, 5), ConvSpec((1, 11), padding=(0, 2)))]
TOY = [((8, 8, 3, 3), ConvSpec(8, padding=1))] * 5  # one bucket: the packed state is its own


def _layout(ws, specs):
    return layout_for(tuple(tuple(w.shape) for w in ws), tuple(specs))


def test_plan_buckets_by_geometry():
    ws, specs = make_weights(BUCKETED, seed=0)
    plan = plan_for(_layout(ws, specs))
    sizes = sorted(bk.size for bk in plan.buckets)
    # CONV x3, DENSE x3, CIRC_T x2, GROUPS x2, the 5x27 pair, the conv1d/conv2d pair
    assert sizes == [2, 2, 2, 2, 3, 3]
    assert len(plan.runs) == 11 and not plan.single
    toy = plan_for(_layout(*make_weights(TOY)))
    assert toy.single and toy.buckets[0].block.groups == 5


def _check(ws, specs, c, variant, n_iters=3, **kw):
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    outs = {}
    for name, fn, wl in (("grouped", lipkern.fused_power_iter, ws),
                         ("ref64", ref.power_iter, [w.double() for w in ws]),
                         ("ref32", ref.power_iter, ws)):
        wl = leaf(wl)
        extra = dict(backend="grouped") if name == "grouped" else {}
        r = fn(wl, specs, n_iters=n_iters, generator=gen(), variant=variant, **extra, **kw)
        loss = (c.to(r.sigmas.dtype) * r.sigmas).sum() + 1e-3 * r.lipschitz
        if variant == "power":  # spectral_norm's u^T A x may be <= 0 before convergence
            loss = loss + 0.5 * r.log_lipschitz
        loss.backward()
        outs[name] = (r, [w.grad for w in wl])
    (r, g), (r64, g64), (r32, g32) = outs["grouped"], outs["ref64"], outs["ref32"]
    for name in ("sigmas", "lipschitz", "log_lipschitz"):
        assert_close_rule(name, getattr(r, name), getattr(r64, name), getattr(r32, name))
    assert_close_rule("state.x", r.state.x, r64.state.x, r32.state.x)
    assert_close_rule("state.u", r.state.u, r64.state.u, r32.state.u)
    for i in range(len(ws)):
        assert g[i].dtype == ws[i].dtype and g[i].shape == ws[i].shape
        assert_close_rule(f"grad[{i}] {tuple(ws[i].shape)}", g[i], g64[i], g32[i])
    return r


@pytest.mark.parametrize("variant", ["power", "spectral_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("entries", [BUCKETED, TOY], ids=["bucketed", "one_bucket"])
def test_buckets_match_reference(entries, dtype, variant):
    ws, specs = make_weights(entries, dtype, seed=1)
    c = torch.rand(len(ws), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _check(ws, specs, c, variant)


def test_non_contiguous_weights_and_state():
    ws, specs = make_weights(BUCKETED, seed=3)
    ws = [w.transpose(0, -1).contiguous().transpose(0, -1) for w in ws]  # same values, strided
    assert not all(w.is_contiguous() for w in ws)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    got = lipkern.fused_power_iter(ws, specs, n_iters=2, backend="grouped", generator=gen())
    want = ref.power_iter(ws, specs, n_iters=2, generator=gen())
    torch.testing.assert_close(got.sigmas, want.sigmas, rtol=1e-5, atol=0)
    st = got.state
    strided = lipkern.PowerIterState(torch.stack([st.x, st.x], 1)[:, 0],
                                     torch.stack([st.u, st.u], 1)[:, 0], st.meta)
    assert not strided.x.is_contiguous()
    a = lipkern.fused_power_iter(ws, specs, n_iters=1, state=strided, backend="grouped")
    b = ref.power_iter(ws, specs, n_iters=1, state=st)
    torch.testing.assert_close(a.sigmas, b.sigmas, rtol=1e-5, atol=0)


def test_tol_stops_layers_of_one_bucket_separately():
    """Two 3x3 matrices in one bucket: one converges fast (ratio 1/3), one slowly (2.9/3):
    the first keeps the x of its stopping step while the other iterates on."""
    ws = [torch.diag(torch.tensor([3.0, 1.0, 0.5])), torch.diag(torch.tensor([3.0, 2.9, 0.5])),
          torch.diag(torch.tensor([2.0, 0.1, 0.1]))]
    lay = _layout(ws, [None] * 3)
    assert len(plan_for(lay).buckets) == 1
    st = lipkern.PowerIterState(torch.ones(9), torch.zeros(9), lay.meta)
    got = lipkern.fused_power_iter(ws, state=st, n_iters=40, tol=1e-4, backend="grouped")
    want = ref.power_iter([w.double() for w in ws], state=st.to(torch.float64), n_iters=40,
                          tol=1e-4)
    torch.testing.assert_close(got.sigmas.double(), want.sigmas, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.state.x.double(), want.state.x, rtol=0, atol=1e-6)
    full = ref.power_iter([w.double() for w in ws], state=st.to(torch.float64), n_iters=40)
    assert (got.state.x[:3].double() - full.state.x[:3]).abs().max() > 1e-7  # stopped early


def _op_counts(fn):
    """aten ops run by fn (the profiler also sees those inside the op's Python kernel)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = {}
    for e in prof.events():
        counts[e.name] = counts.get(e.name, 0) + 1
    return counts


def test_one_convolution_per_bucket_and_phase():
    """The toy net's 5 layers are one bucket: (2 n_iters + 1) convolutions forward, one
    weight-gradient convolution backward -- not one per layer."""
    ws, specs = make_weights(TOY, seed=5)
    ws = leaf(ws)
    n_iters = 3
    out = []
    fwd = _op_counts(lambda: out.append(lipkern.fused_power_iter(
        ws, specs, n_iters=n_iters, backend="grouped", check_finite=False)))
    convs = fwd.get("aten::conv2d", 0) + fwd.get("aten::conv_transpose2d", 0)
    assert convs == 2 * n_iters + 1, fwd
    bwd = _op_counts(lambda: out[0].lipschitz.backward())
    assert bwd.get("aten::convolution_backward", 0) == 1, bwd
    assert bwd.get("aten::convolution", 0) == 0, bwd


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    ws, specs = make_weights(BUCKETED[:10], seed=6)
    state = lipkern.fused_power_iter(ws, specs, n_iters=2, backend="grouped",
                                     generator=torch.Generator().manual_seed(0)).state

    def step(ws, state):
        r = lipkern.fused_power_iter(ws, specs, state=state, n_iters=1, backend="grouped")
        return r.sigmas, r.log_lipschitz, r.state.x

    torch._dynamo.reset()
    eager_ws, comp_ws = leaf(ws), leaf(ws)
    s_e, l_e, x_e = step(eager_ws, state)
    (s_e.sum() + l_e).backward()
    s_c, l_c, x_c = torch.compile(step, fullgraph=True, backend=compile_backend)(comp_ws, state)
    (s_c.sum() + l_c).backward()
    torch.testing.assert_close(s_c, s_e)
    torch.testing.assert_close(l_c, l_e)
    torch.testing.assert_close(x_c, x_e)
    for a, b in zip(comp_ws, eager_ws):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("variant", ["power", "spectral_norm"])
def test_gradcheck_float64_through_buckets(variant):
    """fp64 gradients against finite differences, buckets of two. The rule holds x and u
    constant, the true derivative once converged: the state of a 300-iteration run warm-starts
    every evaluation (then sigma is stationary in x, so 2 iterations per evaluation measure
    dsigma/dW alone; tests/test_op.py runs 300 per evaluation on the torch/cpp backends)."""
    entries = [((3, 2), None), ((2, 2, 2, 2), ConvSpec(3, padding=1)), ((3, 2), None),
               ((2, 2, 2, 2), ConvSpec(3, padding=1)),
               ((2, 3, 2, 2), ConvSpec(2, stride=2, transposed=True)),
               ((3, 1, 2), ConvSpec(4, groups=3, padding_mode="circular", padding=1))]
    ws, specs = make_weights(entries, torch.float64, seed=8)
    state = lipkern.fused_power_iter(ws, specs, n_iters=300, backend="grouped", variant=variant,
                                     generator=torch.Generator().manual_seed(0)).state

    def f(*w):
        r = lipkern.fused_power_iter(list(w), specs, n_iters=2, state=state, backend="grouped",
                                     variant=variant)
        return r.sigmas, r.lipschitz
    assert torch.autograd.gradcheck(f, leaf(ws), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_normalize_divides_once_per_bucket_like_the_reference(dtype):
    """fused_normalize on grouped divides per bucket: bit-equal to reference.divide with the
    same sigmas, and the gradients match the reference's (rule of tests/layers.py)."""
    ws, specs = make_weights(BUCKETED + TOY, dtype, seed=9)
    probes = [torch.randn(w.shape, generator=torch.Generator().manual_seed(i),
                          dtype=torch.float64) for i, w in enumerate(ws)]
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    got = {}
    for name, fn, wl in (("grouped", lipkern.fused_normalize, ws),
                         ("ref64", ref.normalize, [w.double() for w in ws]),
                         ("ref32", ref.normalize, ws)):
        wl = leaf(wl)
        extra = dict(backend="grouped") if name == "grouped" else {}
        r = fn(wl, specs, n_iters=2, generator=gen(), variant="spectral_norm", **extra)
        sum((p * w.double()).sum() for p, w in zip(probes, r.weights)).backward()
        got[name] = (r, [w.grad for w in wl])
    r, grads = got["grouped"]
    for w, wh, s in zip(ws, r.weights, r.sigmas.unbind(0)):
        assert wh.dtype == w.dtype and torch.equal(wh, ref.divide(w, s))
    for i in range(len(ws)):
        assert_close_rule(f"grad[{i}]", grads[i], got["ref64"][1][i], got["ref32"][1][i])
