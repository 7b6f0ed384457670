"""Shared inputs of the distributed tests (imported by the test and by its workers)."""
import torch
import torch.nn as nn

from layers import MIXED, make_weights


def _mixed():
    ws, specs = make_weights(MIXED[:7], torch.float32, seed=3)
    return ws, specs, 3


def _few():
    ws, specs = make_weights(MIXED[:1], torch.float32, seed=4)
    return ws, specs, 3


CASES = {"mixed": _mixed, "few": _few, "warm": _mixed}


def loss_of(res):
    c = torch.linspace(0.5, 1.5, res.sigmas.numel())
    return (c * res.sigmas).sum() + 1e-3 * res.lipschitz + 0.5 * res.log_lipschitz


def ddp_model():
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 3))


def ddp_data():
    g = torch.Generator().manual_seed(12)
    return torch.randn(12, 6, generator=g), torch.randn(12, 3, generator=g)


def train_two_steps(net, forward, x, y, bound):
    """The DDP scenario's loop: 2 SGD steps of mse + 0.1 log L, warm-started bound.
    forward: the (possibly DDP-wrapped) model; bound(weights, state, generator) -> result."""
    opt = torch.optim.SGD(forward.parameters(), lr=0.1)
    state = None
    for _ in range(2):
        opt.zero_grad()
        res = bound([net[0].weight, net[2].weight, net[4].weight], state=state, n_iters=2,
                    generator=torch.Generator().manual_seed(7) if state is None else None)
        loss = nn.functional.mse_loss(forward(x), y) + 0.1 * res.log_lipschitz
        loss.backward()
        opt.step()
        state = res.state
    return [p.detach().clone() for p in net.parameters()]
