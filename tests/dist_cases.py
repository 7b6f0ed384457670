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
