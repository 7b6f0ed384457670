"""The fused power iteration sharded across ``torch.distributed`` ranks.

Every rank holds every weight (as under DistributedDataParallel); layers are split across the
ranks of the group by cost (largest first, each to the least-loaded rank: the same split on
every rank, no communication), each rank runs :func:`lipkern.fused_power_iter` on its share,
and the sigmas are gathered with an autograd-aware collective so every rank gets all sigmas,
the product and the log-product.

Gradients: the gather's backward all-reduces (sums) the gradient of the gathered sigmas over
the ranks, so the rank owning layer l receives ``sum_r dLoss_r/dsigma_l`` and produces
``sum_r dLoss_r/dW_l``; the other ranks produce no gradient for W_l. DistributedDataParallel
then averages: ``mean_r grad_r(W_l) = (1/R) sum_r dLoss_r/dW_l``, which is exactly the
single-process gradient when every rank adds the same regularizer (and the usual
average of the data losses). Use with DDP::

    model = DDP(net)
    weights = [m.weight for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    res = lipkern.distributed.fused_power_iter(weights, specs, state=state, n_iters=1)
    loss = task_loss + 0.1 * res.log_lipschitz     # same regularizer on every rank
    loss.backward()                                # DDP averages: single-process gradient
    state = res.state

Every rank must call this with the same layers, in the same order, and call backward on a
loss that uses the result (the backward all-reduce is a collective). A rank that owns no
layers (fewer layers than ranks) still joins both collectives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from . import power_iter as _single
from .layout import PowerIterState, initial_x, layout_for, weight_shapes
from .reference import bound_from_sigmas
from .result import PowerIterResult
from .spec import ConvSpec
from .validate import check_scalars, check_specs, check_weights, compute_dtype

__all__ = ["fused_power_iter", "assign_layers", "ShardedState"]


@dataclass(frozen=True)
class ShardedState:
    """Warm-start state of a sharded call: this rank's packed vectors (None if it owns no
    layer) and the split they belong to."""
    local: Optional[PowerIterState]
    owners: Tuple[int, ...]
    meta: Tuple[int, ...]


def assign_layers(costs: Sequence[float], world: int) -> Tuple[int, ...]:
    """Owner rank of each layer: largest first, each to the least-loaded rank (ties to the
    lowest rank). Deterministic, so every rank computes the same split."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return tuple(owners)


class _GatherSigmas(torch.autograd.Function):
    """(m,) per rank -> (world * m,) on every rank; backward: all-reduce of the gradient and
    this rank's slice of it (so each slice gets the sum over ranks)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group, world: int, rank: int):
        ctx.group, ctx.rank, ctx.m = group, rank, local.numel()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.m:(ctx.rank + 1) * ctx.m], None, None, None


def fused_power_iter(weights: Sequence[torch.Tensor],
                     specs: Optional[Sequence[Optional[ConvSpec]]] = None, *, group=None,
                     state: Optional[ShardedState] = None, n_iters: int = 5,
                     eps: float = 1e-12, tol: Optional[float] = None, backend: str = "auto",
                     generator: Optional[torch.Generator] = None,
                     check_finite: bool = True) -> PowerIterResult:
    """:func:`lipkern.fused_power_iter` sharded over the process group ``group`` (default:
    the world). Same arguments and results (``sigmas`` (L,), ``lipschitz``,
    ``log_lipschitz`` on every rank, differentiable); ``state`` is a :class:`ShardedState`.
    With the same ``generator`` seed on every rank the cold start equals the single-process
    one, so results match :func:`lipkern.fused_power_iter` exactly."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("lipkern.distributed needs an initialized torch.distributed process "
                         "group (dist.init_process_group); use lipkern.fused_power_iter "
                         "in a single process")
    weights = check_weights(weights)
    specs = check_specs(specs, len(weights))
    check_scalars(n_iters, eps, tol, backend, generator)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    layout = layout_for(weight_shapes(weights), specs)
    device, cdtype = weights[0].device, compute_dtype(weights[0].dtype)
    costs = [g.w_numel * g.oh * g.ow * (2 * n_iters + 1) for g in layout.geoms]
    owners = assign_layers(costs, world)
    if state is not None:
        if not isinstance(state, ShardedState):
            raise TypeError("state must be the .state of an earlier "
                            "lipkern.distributed.fused_power_iter result")
        if state.meta != layout.meta or state.owners != owners:
            raise ValueError("state was computed for different layers or a different split "
                             "(world size); pass state=None")
    mine = [i for i in range(len(weights)) if owners[i] == rank]
    counts = [owners.count(r) for r in range(world)]
    m = max(counts)

    local_state = None
    if mine:
        if state is not None:
            start = state.local
        else:  # the single-process cold start, restricted to this rank's layers
            x0 = initial_x(layout, device, cdtype, generator)
            sub = layout_for(tuple(tuple(weights[i].shape) for i in mine),
                             tuple(specs[i] for i in mine))
            start = PowerIterState(torch.cat([x0[layout.x_slice(i)] for i in mine]),
                                   torch.zeros(sub.total_y, device=device, dtype=cdtype),
                                   sub.meta)
        res = _single.fused_power_iter([weights[i] for i in mine], [specs[i] for i in mine],
                                       state=start, n_iters=n_iters, eps=eps, tol=tol,
                                       backend=backend, check_finite=check_finite)
        local, local_state = res.sigmas, res.state
        if len(mine) < m:
            local = torch.cat([local, local.new_zeros(m - len(mine))])
    else:
        if state is None and generator is not None:
            initial_x(layout, device, cdtype, generator)  # keep generators in step
        # joins the collectives; requires grad so that its backward (a collective) runs too
        sdtype = torch.float64 if cdtype == torch.float64 else torch.float32
        local = torch.zeros(m, device=device, dtype=sdtype, requires_grad=True)
    gathered = _GatherSigmas.apply(local, group, world, rank)
    # gathered[r * m + j] is the j-th layer of rank r: put them back in layer order
    position = [0] * len(weights)
    seen = [0] * world
    for i, r in enumerate(owners):
        position[i] = r * m + seen[r]
        seen[r] += 1
    sigmas = gathered[torch.tensor(position, device=gathered.device)]
    lip, log_lip = bound_from_sigmas(sigmas)
    return PowerIterResult(sigmas, lip, log_lip, ShardedState(local_state, owners, layout.meta))
