"""Train a small conv net with its Lipschitz bound in the loss; the bound shrinks.

    python examples/regularize.py [--steps 30]

One fused power-iteration call per step (warm-started from the last step's vectors), the
bound read off the model's graph by lipkern.lipschitz_bound, differentiable like any loss.
"""
import argparse

import torch
import torch.nn as nn

import lipkern


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--weight", type=float, default=1.0, help="coefficient of log L")
    a = p.parse_args(argv)
    plain = train(a.steps, 0.0, quiet=True)
    print(f"without the regularizer: Lipschitz bound {plain[0]:.4f} -> {plain[-1]:.4f}")
    history = train(a.steps, a.weight)
    print(f"with {a.weight} * log L in the loss: Lipschitz bound {history[0]:.4f} -> "
          f"{history[-1]:.4f}")
    return history


def train(steps, weight, quiet=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))
    state, history = None, []
    for step in range(steps):
        rep = lipkern.lipschitz_bound(model, x[:1], n_iters=5 if state is None else 1,
                                      state=state, check_finite=False)
        state = rep.state
        task = nn.functional.cross_entropy(model(x), y)
        loss = task + weight * rep.log_bound       # log L: scale-free, never overflows
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(rep.bound.detach()))
        if not quiet and (step % 5 == 0 or step == steps - 1):
            print(f"step {step:3d}  task loss {float(task.detach()):.4f}  Lipschitz bound "
                  f"{float(rep.bound.detach()):.4f}")
    if not quiet:
        print(rep)
    return history


if __name__ == "__main__":
    main()
