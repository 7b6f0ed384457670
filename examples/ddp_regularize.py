"""The bound as a regularizer under DistributedDataParallel, the power iteration sharded.

    python examples/ddp_regularize.py [--world 2]

Spawns WORLD CPU processes (gloo). Each rank computes a share of the layers' sigmas;
lipkern.distributed gathers them with autograd-aware collectives, so after DDP averages the
gradients every rank holds exactly the single-process gradient.
"""
import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import lipkern


def worker(rank, world, store):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(32, 32), nn.ReLU())],
                        nn.Linear(32, 4))
    model = nn.parallel.DistributedDataParallel(net)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 32, generator=g), torch.randn(64, 4, generator=g)
    state = None
    for step in range(10):
        res = lipkern.distributed.fused_power_iter(
            [m.weight for m in linears], n_iters=1 if state else 5, state=state,
            generator=torch.Generator().manual_seed(2) if state is None else None)
        state = res.state
        loss = nn.functional.mse_loss(model(x[rank::world]), y[rank::world]) \
            + 0.05 * res.log_lipschitz
        opt.zero_grad()
        loss.backward()            # DDP averages; lipkern's gather all-reduces the sigma grads
        opt.step()
        if rank == 0:
            print(f"step {step}  bound {float(res.lipschitz.detach()):.4f}  "
                  f"(layers per rank: {[res.state.owners.count(r) for r in range(world)]})")
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(worker, args=(a.world, os.path.join(d, "store")), nprocs=a.world,
                           start_method="spawn")
