"""lipkern.distributed across 2 and 3 gloo processes on the CPU, against one process:
values on every rank, and the mean over ranks of the weight gradients (what DDP's averaging
produces) equal to the single-process gradients."""
import os
import subprocess
import sys

import pytest
import torch

import lipkern
from dist_cases import CASES, ddp_data, ddp_model, loss_of, train_two_steps

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT = 240  # seconds for a whole multi-process run: a hang fails the test, not CI


def _run(scenario, world, tmp_path):
    out = subprocess.run([sys.executable, os.path.join(HERE, "dist_worker.py"), scenario,
                          str(world), str(tmp_path)], capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr[-4000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _single(scenario):
    ws, specs, n_iters = CASES[scenario]()
    ws = [w.requires_grad_() for w in ws]
    res = lipkern.fused_power_iter(ws, specs, n_iters=n_iters,
                                   generator=torch.Generator().manual_seed(5))
    if scenario == "warm":
        res = lipkern.fused_power_iter(ws, specs, n_iters=1, state=res.state)
    loss_of(res).backward()
    return res, [w.grad for w in ws]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("scenario", ["mixed", "few", "warm"])
def test_sharded_matches_single_process(scenario, world, tmp_path):
    ranks = _run(scenario, world, tmp_path)
    res, grads = _single(scenario)
    for out in ranks:  # every rank has every sigma and the bound
        torch.testing.assert_close(out["sigmas"], res.sigmas.detach(), rtol=1e-6, atol=0)
        torch.testing.assert_close(out["lipschitz"], res.lipschitz.detach(), rtol=1e-6, atol=0)
        torch.testing.assert_close(out["log_lipschitz"], res.log_lipschitz.detach(), rtol=1e-6,
                                   atol=1e-7)
    for i, g in enumerate(grads):
        mean = torch.stack([out["grads"][i] for out in ranks]).mean(0)
        torch.testing.assert_close(mean, g, rtol=1e-5, atol=1e-7)


def test_layer_assignment_balances_cost():
    owners = lipkern.distributed.assign_layers([10, 1, 1, 9, 1, 1], 2)
    load = [sum(c for c, o in zip([10, 1, 1, 9, 1, 1], owners) if o == r) for r in (0, 1)]
    assert sorted(load) == [11, 12]
    assert lipkern.distributed.assign_layers([5.0], 3) == (0,)


def test_needs_a_process_group():
    with pytest.raises(ValueError, match="initialized torch.distributed process group"):
        lipkern.distributed.fused_power_iter([torch.randn(3, 3)])


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_training_matches_one_process(world, tmp_path):
    ranks = _run("ddp", world, tmp_path)
    net = ddp_model()
    x, y = ddp_data()
    want = train_two_steps(net, net, x, y, lipkern.fused_power_iter)
    for out in ranks:
        for p, q in zip(out["params"], want):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_spectral_norm_two_forwards_one_backward_under_ddp(tmp_path):
    """torch's spectral_norm fails here (an in-place update of a tensor autograd saved);
    lipkern's must not, and its vectors stay identical on every rank."""
    (tmp_path / "t").mkdir()
    (tmp_path / "l").mkdir()
    torch_ranks = _run("sn_torch", 2, tmp_path / "t")
    ours = _run("sn_lipkern", 2, tmp_path / "l")
    assert all(r["error"] is None for r in ours), [r["error"] for r in ours]
    for a, b in zip(ours[0]["u"], ours[1]["u"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # what torch does, for the record (not asserted: it may be fixed upstream)
    print("torch's spectral_norm under DDP:", [r["error"] for r in torch_ranks])


def test_spectral_norm_model_under_ddp_keeps_vectors_identical(tmp_path):
    """Two forwards before one backward, 2 steps, buffers broadcast: every rank ends with the
    same vectors and parameters, and no in-place error."""
    ranks = _run("sn_model", 2, tmp_path)
    for key in ("u", "v", "params"):
        for a, b in zip(ranks[0][key], ranks[1][key]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
