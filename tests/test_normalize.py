"""lipkern.fused_normalize (W_l / sigma_l for every layer, lipkern::normalize on Triton) against
lipkern.reference.normalize: values, every gradient, every backend, dtype, variant and layer
kind; the rule of tests/layers.py (error <= 2x the reference's own error in the op's
precision + a floor)."""
import pytest
import torch

import lipkern
from lipkern import reference as ref
from lipkern.layout import initial_u, initial_x, layout_for
from lipkern.ops.normalize import normalize_backward_op, normalize_op

from conftest import DEVICES
from layers import MIXED, assert_close_rule, leaf, make_weights

BACKENDS = ["torch", "triton", "cpp", "cuda", "grouped"]


def _backend_ok(backend, device, dtype):
    why = lipkern.backends._why_not(backend, torch.device(device), dtype)
    if why:
        pytest.skip(why)


def _probes(ws, seed=7):
    """Fixed random directions: loss = sum_l <R_l, W_hat_l> (+ c . sigmas) makes G random."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(w.shape, generator=g, dtype=torch.float64) for w in ws]


def _run(fn, ws, specs, probes, c_sigma, **kw):
    ws = leaf(ws)
    r = fn(ws, specs, **kw)
    loss = sum((p.to(w.device, torch.float64) * w.double()).sum()
               for p, w in zip(probes, r.weights))
    if c_sigma is not None:
        loss = loss + (c_sigma.to(r.sigmas.device, r.sigmas.dtype) * r.sigmas).sum()
    loss.backward()
    return r, [w.grad for w in ws]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_sigmas", [False, True], ids=["weights", "weights+sigmas"])
@pytest.mark.parametrize("variant", ["power", "spectral_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, dtype, variant, use_sigmas, device):
    _backend_ok(backend, device, dtype)
    ws, specs = make_weights(MIXED, dtype, device, seed=31)
    probes = _probes(ws)
    c = torch.rand(len(ws), generator=torch.Generator().manual_seed(3),
                   dtype=torch.float64) if use_sigmas else None
    kw = dict(n_iters=2, variant=variant)
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    r, grads = _run(lipkern.fused_normalize, ws, specs, probes, c, backend=backend,
                    generator=gen(), **kw)
    r64, g64 = _run(ref.normalize, [w.double() for w in ws], specs, probes, c,
                    generator=gen(), **kw)
    r32, g32 = _run(ref.normalize, ws, specs, probes, c, generator=gen(), **kw)
    assert_close_rule("sigmas", r.sigmas, r64.sigmas, r32.sigmas)
    for i, w in enumerate(ws):
        assert r.weights[i].shape == w.shape and r.weights[i].dtype == w.dtype
        assert_close_rule(f"weights[{i}]", r.weights[i], r64.weights[i], r32.weights[i])
        assert grads[i].dtype == w.dtype and grads[i].shape == w.shape
        assert_close_rule(f"grad[{i}] {tuple(w.shape)}", grads[i], g64[i], g32[i])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n_iters", [0, 2])
@pytest.mark.parametrize("variant", ["power", "spectral_norm"])
def test_dense_only_calls(variant, n_iters, device):
    """A call whose layers are all dense compiles a kernel without the conv code (its own
    W^T u for eval-mode n_iters=0): both ops against the reference, same rule."""
    _backend_ok("triton", device, torch.float32)
    ws, specs = make_weights(MIXED[:3] + [((64, 200), None)], torch.float32, device, seed=36)
    probes = _probes(ws)
    c = torch.rand(len(ws), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    kw = dict(n_iters=n_iters, variant=variant)
    gen = lambda: torch.Generator().manual_seed(6)  # noqa: E731
    r, grads = _run(lipkern.fused_normalize, ws, specs, probes, c, backend="triton",
                    generator=gen(), **kw)
    r64, g64 = _run(ref.normalize, [w.double() for w in ws], specs, probes, c,
                    generator=gen(), **kw)
    r32, g32 = _run(ref.normalize, ws, specs, probes, c, generator=gen(), **kw)
    assert_close_rule("sigmas", r.sigmas, r64.sigmas, r32.sigmas)
    assert_close_rule("state.x", r.state.x, r64.state.x, r32.state.x)
    assert_close_rule("state.u", r.state.u, r64.state.u, r32.state.u)
    for i in range(len(ws)):
        assert_close_rule(f"weights[{i}]", r.weights[i], r64.weights[i], r32.weights[i])
        assert_close_rule(f"grad[{i}]", grads[i], g64[i], g32[i])
    p = lipkern.fused_power_iter(ws, specs, backend="triton", generator=gen(), **kw)
    assert_close_rule("power_iter sigmas", p.sigmas, r64.sigmas, r32.sigmas)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_writes_exactly_w_over_sigma(device):
    """The kernel's division is IEEE round-to-nearest (div_rn): bit-equal to torch's W / sigma
    for the sigma it returns, as torch's spectral_norm computes the normalized weight."""
    _backend_ok("triton", device, torch.float32)
    ws, specs = make_weights(MIXED, torch.float32, device, seed=32)
    r = lipkern.fused_normalize(ws, specs, n_iters=1, backend="triton",
                                generator=torch.Generator().manual_seed(0))
    for w, wh, s in zip(ws, r.weights, r.sigmas):
        assert torch.equal(wh, w / s)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["power", "spectral_norm"])
def test_opcheck(variant, device):
    _backend_ok("triton", device, torch.float32)
    ws, specs = make_weights(MIXED[3:9], torch.float32, device, seed=33)
    lay = layout_for(tuple(tuple(w.shape) for w in ws), tuple(specs))
    gen = torch.Generator().manual_seed(0)
    x0 = initial_x(lay, torch.device(device), torch.float32, gen)
    u0 = initial_u(lay, torch.device(device), torch.float32, gen) \
        if variant == "spectral_norm" else None
    args = ([w.requires_grad_() for w in ws], x0, u0, list(lay.meta), 2, 1e-12, -1.0)
    torch.library.opcheck(normalize_op, args)
    sig, x, u, what = normalize_op(*args)
    gw = torch.randn(lay.total_w, device=device)
    for gs, g in ((torch.ones_like(sig), gw), (None, gw), (torch.ones_like(sig), None)):
        bargs = ([w.detach() for w in ws], x, u, sig.detach(), gs, g, list(lay.meta))
        torch.library.opcheck(normalize_backward_op, bargs)


def test_reference_gradcheck_float64():
    """The reference's gradient in fp64 against finite differences. The rule holds the vectors
    constant, which is the true derivative once the iteration has converged (then
    dsigma/dW = u x^T exactly): 300 iterations on small layers with a simple top singular
    value, as tests/test_reference.py does for the sigmas."""
    entries = [((4, 3), None), ((2, 2, 2, 2), lipkern.ConvSpec(3, padding=1)),
               ((2, 3, 2, 2), lipkern.ConvSpec(2, stride=2, transposed=True))]
    ws, specs = make_weights(entries, torch.float64, seed=8)

    def f(*w):
        r = ref.normalize(list(w), specs, n_iters=300,
                          generator=torch.Generator().manual_seed(0))
        return tuple(r.weights) + (r.sigmas,)
    assert torch.autograd.gradcheck(f, leaf(ws), atol=1e-6, rtol=1e-4)


def test_gradient_is_torch_spectral_norms():
    """The rule is torch's own: the gradient of spectral_norm's normalized weight with its
    vectors fixed (n_power_iterations=0 after a warm-up, so both use the same u and v)."""
    torch.manual_seed(0)
    lin = torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(9, 6))
    p = lin.parametrizations.weight[0]
    w = lin.parametrizations.weight.original.detach().clone().requires_grad_()
    lin.eval()  # no update: sigma = u^T W v with the buffers
    probe = torch.randn(6, 9)
    (probe * lin.weight).sum().backward()
    want = lin.parametrizations.weight.original.grad
    lay = layout_for(((6, 9),), (None,))
    state = lipkern.PowerIterState(p._v.clone(), p._u.clone(), lay.meta)
    r = lipkern.fused_normalize([w], state=state, n_iters=0, variant="spectral_norm",
                                backend="torch")
    (probe * r.weights[0]).sum().backward()
    torch.testing.assert_close(r.weights[0], lin.weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(w.grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_one_launch_each_way_on_gpu(monkeypatch):
    from lipkern.triton_kernels import power_iter as k
    monkeypatch.setattr(k, "POISON_OUTPUTS", False)  # the harness's NaN fills are kernels too
    ws, specs = make_weights(MIXED, torch.float32, "cuda", seed=35)
    ws = leaf(ws)
    probes = [p.float().cuda() for p in _probes(ws)]
    r = lipkern.fused_normalize(ws, specs, backend="triton", check_finite=False)
    sum((p * w).sum() for p, w in zip(probes, r.weights)).backward()  # warm up / compile
    for w in ws:
        w.grad = None
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    def kernels(prof):
        return [e.name for e in prof.events() if e.device_type.name == "CUDA"
                and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        r = lipkern.fused_normalize(ws, specs, state=r.state, backend="triton",
                                    check_finite=False)
        torch.cuda.synchronize()
    assert kernels(prof) == [k for k in kernels(prof) if "power_iter_fwd" in k] and \
        len(kernels(prof)) == 1, kernels(prof)
    loss = sum((p * w).sum() for p, w in zip(probes, r.weights))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loss.backward()
        torch.cuda.synchronize()
    assert sum("normalize_bwd" in k for k in kernels(prof)) == 1, kernels(prof)
