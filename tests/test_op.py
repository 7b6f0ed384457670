"""The registered ops: opcheck, gradcheck through the op, torch.compile, launch counts."""
import pytest
import torch

import lipkern
from lipkern.layout import initial_u, initial_x, layout_for
from lipkern.ops.power_iter import power_iter_backward_op, power_iter_op

HAS_EXT = lipkern.backends.load_ext() is not None

from conftest import DEVICES
from layers import MIXED, leaf, make_weights


def _op_args(entries, dtype, device, backend, n_iters=2, tol=-1.0, variant="power"):
    """Arguments of lipkern::power_iter: (weights, x0, u0, meta, n_iters, eps, tol, backend)."""
    ws, specs = make_weights(entries, dtype, device, seed=3)
    lay = layout_for(tuple(tuple(w.shape) for w in ws), tuple(specs))
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(0)
    x0 = initial_x(lay, torch.device(device), cd, gen)
    u0 = initial_u(lay, torch.device(device), cd, gen) if variant == "spectral_norm" else None
    return ([w.requires_grad_() for w in ws], x0, u0, list(lay.meta), n_iters, 1e-12, tol,
            backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["power", "spectral_norm"])
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.float64),
                                           ("grouped", torch.float32), ("triton", torch.float32)])
def test_opcheck(backend, dtype, device, variant):
    why = lipkern.backends._why_not(backend, torch.device(device), dtype)
    if why:
        pytest.skip(why)
    args = _op_args(MIXED[3:9], dtype, device, backend, variant=variant)
    torch.library.opcheck(power_iter_op, args)
    ws, x0, u0, meta, *_ = args
    sig, _, _, x, u = power_iter_op(*args)
    bargs = (x.detach(), u.detach(), sig.detach(), torch.ones_like(sig.detach()),
             torch.ones((), dtype=sig.dtype, device=device), None, meta, backend, dtype)
    torch.library.opcheck(power_iter_backward_op, bargs)


@pytest.mark.parametrize("variant", ["power", "spectral_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_compiled_op(dtype, variant):
    if not HAS_EXT:
        pytest.skip("lipkern._C not built")
    ws, x0, u0, meta, n_iters, eps, tol, _ = _op_args(MIXED[3:9], dtype, "cpu", "cpp",
                                                      variant=variant)
    args = (ws, x0, u0, meta, n_iters, eps, tol)
    torch.library.opcheck(torch.ops.lipkern.power_iter_ext.default, args)
    sig, _, _, x, u = torch.ops.lipkern.power_iter_ext(*args)
    bargs = (x.detach(), u.detach(), sig.detach(), None, torch.ones((), dtype=sig.dtype),
             torch.ones((), dtype=sig.dtype), meta, dtype)
    torch.library.opcheck(torch.ops.lipkern.power_iter_ext_backward.default, bargs)


def test_extension_is_built():
    """CI installs with the extension: a silently failed build must not pass as green."""
    import os
    if os.environ.get("LIPKERN_BUILD_EXT", "auto") == "0":
        pytest.skip("LIPKERN_BUILD_EXT=0")
    assert HAS_EXT, lipkern.backends._ext_missing()


@pytest.mark.parametrize("variant", ["power", "spectral_norm"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_through_the_op_fp64(backend, variant):
    if backend == "cpp" and not HAS_EXT:
        pytest.skip("lipkern._C not built")
    _gradcheck_through_the_op(backend, variant)


def _gradcheck_through_the_op(backend, variant="power"):
    entries = [((4, 3), None), ((2, 2, 2, 2), lipkern.ConvSpec(3, padding=1)),
               ((2, 3, 2, 2), lipkern.ConvSpec(2, stride=2, transposed=True)),
               ((3, 1, 2), lipkern.ConvSpec(4, groups=3, padding_mode="circular", padding=1))]
    ws, specs = make_weights(entries, torch.float64, seed=8)

    def f(*ws):
        r = lipkern.fused_power_iter(list(ws), specs, n_iters=300, backend=backend,
                                     generator=torch.Generator().manual_seed(0),
                                     variant=variant)
        return r.sigmas, r.lipschitz, r.log_lipschitz

    assert torch.autograd.gradcheck(f, [w.requires_grad_() for w in ws], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "cpp", "grouped"])
def test_torch_compile_fullgraph_forward_and_backward(backend):
    if backend == "cpp" and not HAS_EXT:
        pytest.skip("lipkern._C not built")
    ws, specs = make_weights(MIXED[:9], torch.float32, seed=4)
    state = lipkern.fused_power_iter(ws, specs, n_iters=2, backend=backend,
                                     generator=torch.Generator().manual_seed(0)).state

    def step(ws, state):
        r = lipkern.fused_power_iter(ws, specs, state=state, n_iters=1, backend=backend)
        return r.sigmas, r.log_lipschitz

    eager_ws, comp_ws = leaf(ws), leaf(ws)
    s_e, l_e = step(eager_ws, state)
    (s_e.sum() + l_e).backward()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s_c, l_c = compiled(comp_ws, state)
    (s_c.sum() + l_c).backward()
    torch.testing.assert_close(s_c, s_e)
    torch.testing.assert_close(l_c, l_e)
    for a, b in zip(comp_ws, eager_ws):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_one_launch_forward_and_one_backward_on_gpu(backend, monkeypatch):
    """Forward: exactly one kernel for all layers and the product; backward: one kernel (plus
    at most the ones autograd itself launches, e.g. to fill the seed gradient)."""
    from lipkern.triton_kernels import power_iter as k
    monkeypatch.setattr(k, "POISON_OUTPUTS", False)  # the harness's NaN fills are kernels too
    why = lipkern.backends._why_not(backend, torch.device("cuda"), torch.float32)
    if why:
        pytest.skip(why)
    ws, specs = make_weights(MIXED, torch.float32, "cuda", seed=5)
    ws = leaf(ws)
    r = lipkern.fused_power_iter(ws, specs, backend=backend, check_finite=False)  # warm up
    r.lipschitz.backward()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    def kernels(prof):
        return [e.name for e in prof.events() if e.device_type.name == "CUDA"
                and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        r = lipkern.fused_power_iter(ws, specs, state=r.state, backend=backend,
                                     check_finite=False)
        torch.cuda.synchronize()
    fwd = kernels(prof)
    assert len(fwd) == 1 and "power_iter_fwd" in fwd[0], fwd
    loss = r.lipschitz
    for w in ws:  # no accumulation into the warm-up's .grad (one add kernel per weight)
        w.grad = None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        loss.backward()
        torch.cuda.synchronize()
    bwd = kernels(prof)
    assert sum("power_iter_bwd" in k for k in bwd) == 1 and len(bwd) <= 2, bwd


@pytest.mark.gpu
def test_torch_compile_triton_backend_on_gpu():
    ws, specs = make_weights(MIXED, torch.float32, "cuda", seed=6)
    state = lipkern.fused_power_iter(ws, specs, backend="triton").state

    def step(ws, state):
        r = lipkern.fused_power_iter(ws, specs, state=state, n_iters=1, backend="triton")
        return r.log_lipschitz

    a, b = leaf(ws), leaf(ws)
    step(a, state).backward()
    torch.compile(step, fullgraph=True)(b, state).backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)
