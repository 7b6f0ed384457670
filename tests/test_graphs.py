"""CUDA graphs and host syncs on the GPU (all marked ``gpu``: skipped without one).

A warm-started, ``check_finite=False`` call must (1) make no host sync
(``torch.cuda.set_sync_debug_mode("error")``), (2) be capturable in ``torch.cuda.graph``
after one eager call (the layer and pointer tables are cached then: the Triton launcher's
``_tables`` / ``_pointer_table``; ``grouped`` has none), with replay equal to eager, and
(3) run under ``torch.compile(mode="reduce-overhead")`` (cudagraph trees). The CPU half of
(1) is tests/test_host_sync.py.
"""
import copy

import pytest
import torch

import lipkern

from layers import MIXED, make_weights

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ["grouped", "triton", "cuda"]


def _skip_unless(backend):
    why = lipkern.backends._why_not(backend, torch.device("cuda"), torch.float32)
    if why:
        pytest.skip(why)


def _setup(backend, seed=0):
    ws, specs = make_weights(MIXED, torch.float32, "cuda", seed=seed)
    ws = [w.requires_grad_() for w in ws]
    state = lipkern.fused_power_iter(ws, specs, n_iters=3, backend=backend,
                                     generator=torch.Generator().manual_seed(0)).state
    return ws, specs, state


def _power_step(ws, specs, state, backend):
    r = lipkern.fused_power_iter(ws, specs, state=state, n_iters=2, backend=backend,
                                 check_finite=False)
    loss = r.sigmas.sum() + r.lipschitz + r.log_lipschitz
    grads = torch.autograd.grad(loss, ws)
    return (r.sigmas, r.log_lipschitz, r.state.x, r.state.u) + tuple(grads)


def _normalize_step(ws, specs, state, backend):
    r = lipkern.fused_normalize(ws, specs, state=state, n_iters=1, backend=backend,
                                check_finite=False, variant="spectral_norm")
    loss = sum((w * w).sum() for w in r.weights) + r.sigmas.sum()
    grads = torch.autograd.grad(loss, ws)
    return (r.sigmas, r.state.x, r.state.u) + tuple(r.weights) + tuple(grads)


def _capture(fn):
    """Warm up on a side stream (as torch.cuda.graphs requires), capture fn, replay once;
    returns (replayed outputs, the graph)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fn()
    graph.replay()
    torch.cuda.synchronize()
    return static, graph


@pytest.mark.parametrize("step", [_power_step, _normalize_step], ids=["power_iter", "normalize"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_host_sync(backend, step):
    _skip_unless(backend)
    if step is _normalize_step and backend == "cuda":
        pytest.skip("fused_normalize on 'cuda' is the power_iter op plus divisions")
    ws, specs, state = _setup(backend)
    step(ws, specs, state, backend)  # tables built, kernels compiled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(ws, specs, state, backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("step", [_power_step, _normalize_step], ids=["power_iter", "normalize"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_graph_replay_equals_eager(backend, step, request):
    _skip_unless(backend)
    if backend == "cuda":  # expected to fail until the binding caches its tables
        request.applymarker(pytest.mark.xfail(
            reason="csrc/cuda/power_iter_binding.cpp copies the layer and pointer tables "
                   "host->device on every call (device_table): a pageable copy cannot be "
                   "captured; cache them by value as the Triton launcher does", strict=False))
    ws, specs, state = _setup(backend, seed=1)
    eager = step(ws, specs, state, backend)
    replayed, graph = _capture(lambda: step(ws, specs, state, backend))
    for i, (a, b) in enumerate(zip(replayed, eager)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"output {i}")
    # a second replay after new weights are copied in follows them (the graph reads the
    # weights where they live, no stale copy)
    with torch.no_grad():
        for w in ws:
            w.mul_(2.0)
    graph.replay()
    eager2 = step(ws, specs, state, backend)
    torch.testing.assert_close(replayed[0], eager2[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["grouped", "triton"])
def test_compile_reduce_overhead(backend):
    _skip_unless(backend)
    ws, specs, state = _setup(backend, seed=2)
    eager = _power_step(ws, specs, state, backend)
    compiled = torch.compile(_power_step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # cudagraph trees record on the second or third call
        got = compiled(ws, specs, state, backend)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _mlp(width=64, depth=8):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1]).cuda()


@pytest.mark.parametrize("strategy", ["fused_weights", "scaled_outputs"])
def test_spectral_norm_model_step_in_a_graph(strategy):
    """fwd + bwd + SGD of a spectral_norm_model MLP captured once, replayed 3 times: the
    same parameters and power-iteration vectors as 3 eager steps."""
    _skip_unless("triton")
    x = torch.randn(8, 64, device="cuda")
    eager_net = lipkern.nn.spectral_norm_model(_mlp(), x, strategy=strategy)
    graph_net = copy.deepcopy(eager_net)
    opt_e = torch.optim.SGD(eager_net.parameters(), lr=1e-2)
    opt_g = torch.optim.SGD(graph_net.parameters(), lr=1e-2)

    def step(net, opt):
        opt.zero_grad(set_to_none=False)
        net(x).square().mean().backward()
        opt.step()

    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up steps: the same number on both copies
        for _ in range(2):
            step(graph_net, opt_g)
            step(eager_net, opt_e)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_g.zero_grad(set_to_none=False)
        graph_net(static_x).square().mean().backward()
        opt_g.step()
    for _ in range(3):  # capture ran nothing: 2 + 3 steps on both copies
        graph.replay()
        step(eager_net, opt_e)
    torch.cuda.synchronize()
    sd_e, sd_g = eager_net.state_dict(), graph_net.state_dict()
    for k in sd_e:
        torch.testing.assert_close(sd_g[k], sd_e[k], rtol=1e-4, atol=1e-6, msg=k)
