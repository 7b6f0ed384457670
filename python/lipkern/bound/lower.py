"""``report.lower``: the largest local Jacobian norm at given inputs, a true lower bound.

For a model ``F`` differentiable at ``x``, ``||J_F(x)||_2 <= Lip(F)``; power iteration on
``J^T J`` (``J v`` by jvp, ``J^T w`` by vjp) gives unit vectors ``v`` with ``||J v|| <=
||J||``, so the result is below the local norm, hence below the global constant, for any
number of iterations (rounding aside: ~1e-6 relative in float32). The batch is one input of
the batch map (block diagonal over samples for per-sample models): its norm is the largest
over the samples."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


def local_lower_bound(model: nn.Module, inputs, *, n_iters: int = 20,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """max over the batch ``inputs`` of ``||J_model(x)||_2`` from below (0-d, detached).

    Random ops (dropout in train mode) draw the same masks in every evaluation (the RNG is
    re-seeded), so the map whose Jacobian is taken is one fixed map."""
    xs = inputs if isinstance(inputs, tuple) else (inputs,)
    xs = tuple(x.detach() for x in xs)
    seed = int(torch.randint(0, 2 ** 62, (), generator=generator))
    devices = [x.device for x in xs if x.device.type == "cuda"]

    def f(*z):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return model(*z)

    with torch.enable_grad():
        _, vjp = torch.func.vjp(f, *xs)
        v = tuple(torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
                  for x in xs)
        best = torch.zeros((), dtype=xs[0].dtype, device=xs[0].device)
        for _ in range(n_iters + 1):
            nv = torch.sqrt(sum(t.square().sum() for t in v))
            if not bool(nv > 0):
                break
            v = tuple(t / nv for t in v)
            _, jv = torch.func.jvp(f, xs, v)
            best = torch.maximum(best, jv.detach().norm())
            v = tuple(t.detach() for t in vjp(jv))
    return best.detach()
