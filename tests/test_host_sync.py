"""No host synchronisation in a ``check_finite=False`` call.

On a GPU a read of a device value on the host (``.item()``, ``float()``, ``bool()``,
``.tolist()``, ``nonzero``) waits for the device and breaks CUDA-graph capture. On the CPU
nothing waits, but the same reads go through the same aten ops (``_local_scalar_dense``
under item/float/bool/tolist, ``nonzero``, ``is_nonzero``), so the profiler, which also
records the ops inside lipkern's Python kernels, shows them: none may appear. The GPU
counterpart (``torch.cuda.set_sync_debug_mode("error")`` and graph capture) is in
tests/test_graphs.py.
"""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import lipkern

from layers import MIXED, leaf, make_weights

SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero",
            "aten::equal", "aten::allclose")
HAS_EXT = lipkern.backends.load_ext() is not None


def host_reads(fn):
    """Names of the aten ops run by fn that read a tensor's value on the host."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name in SYNC_OPS]


def test_the_probe_sees_a_host_read():
    """The check can fail: check_finite=True reads one flag on the host (its documented
    sync), and so does a plain .item()."""
    ws, specs = make_weights(MIXED[:4], seed=0)
    assert host_reads(lambda: lipkern.fused_power_iter(ws, specs, check_finite=True,
                                                       backend="grouped"))
    assert host_reads(lambda: torch.ones(2).sum().item())


def _backends():
    # not "torch": that backend is the reference's per-layer loop, which reads max|W| (N1)
    # and each start vector's norm (N4) on the host by design (lipkern.reference)
    out = ["grouped"]
    if HAS_EXT:
        out.append("cpp")
    return out


@pytest.mark.parametrize("op", ["power_iter", "normalize"])
@pytest.mark.parametrize("variant", ["power", "spectral_norm"])
@pytest.mark.parametrize("backend", _backends())
def test_no_host_read_in_a_training_step(backend, variant, op):
    """Forward (warm-started, as in training) and backward of every output."""
    ws, specs = make_weights(MIXED, seed=1)
    ws = leaf(ws)
    fn = lipkern.fused_power_iter if op == "power_iter" else lipkern.fused_normalize
    state = fn(ws, specs, n_iters=1, backend=backend, variant=variant,
               generator=torch.Generator().manual_seed(0)).state

    out = []
    fwd = host_reads(lambda: out.append(fn(ws, specs, state=state, n_iters=2, backend=backend,
                                           variant=variant, check_finite=False)))
    assert fwd == []
    r = out[0]
    if op == "power_iter":
        loss = r.sigmas.sum() + r.lipschitz + r.log_lipschitz
    else:
        loss = sum((w * w).sum() for w in r.weights) + r.sigmas.sum()
    bwd = host_reads(loss.backward)
    if backend == "cpp":
        # the C++ CPU kernel reads the two upstream scalar gradients (grad_lipschitz,
        # grad_log_lipschitz: CPU tensors, a memory read with no device to wait for;
        # csrc/cpu/power_iter.cpp); the CUDA kernels take them as device pointers
        assert set(bwd) <= {"aten::item", "aten::_local_scalar_dense"} and len(bwd) <= 4, bwd
    else:
        assert bwd == []


@pytest.mark.parametrize("backend", ["grouped"] + (["cpp"] if HAS_EXT else []))
def test_tol_is_decided_without_a_host_read(backend):
    """tol stops layers on the device (the torch backend, the reference's per-layer loop,
    reads each estimate on the host: not part of this promise)."""
    ws, specs = make_weights(MIXED, seed=2)
    state = lipkern.fused_power_iter(ws, specs, n_iters=1, backend=backend,
                                     generator=torch.Generator().manual_seed(0)).state
    assert host_reads(lambda: lipkern.fused_power_iter(
        ws, specs, state=state, n_iters=6, tol=1e-3, backend=backend,
        check_finite=False)) == []


def test_auto_choice_and_explain_do_not_touch_values():
    """Choosing the backend reads shapes only (memoized per layout)."""
    ws, specs = make_weights(MIXED, seed=3)
    state = lipkern.fused_power_iter(ws, specs, generator=torch.Generator().manual_seed(0)).state
    assert host_reads(lambda: lipkern.fused_power_iter(ws, specs, state=state, n_iters=1,
                                                       check_finite=False)) == []
    assert host_reads(lambda: lipkern.explain(ws, specs)) == []


@pytest.mark.parametrize("strategy", ["auto", "scaled_outputs", "fused_weights"])
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_no_host_read_in_a_spectral_norm_model_step(model, strategy):
    torch.manual_seed(0)
    if model == "mlp":
        net, x = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(4)]), \
            torch.randn(8, 32)
    else:
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv2d(8, 8, 3, padding=1, stride=2))
        x = torch.randn(2, 3, 8, 8)
    net = lipkern.nn.spectral_norm_model(net, x, strategy=strategy)
    net(x).sum().backward()  # first step: layer tables built

    def step():
        net(x).sum().backward()
    assert host_reads(step) == []
