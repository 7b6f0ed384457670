"""Worker for tests/test_distributed.py: `python dist_worker.py SCENARIO WORLD OUTDIR`
spawns WORLD gloo processes that each save their results to OUTDIR/rank{r}.pt."""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lipkern  # noqa: E402
from dist_cases import CASES, ddp_data, ddp_model, loss_of, train_two_steps  # noqa: E402


def worker(rank, world, scenario, outdir):
    dist.init_process_group("gloo", init_method=f"file://{outdir}/store", rank=rank,
                           world_size=world)
    torch.set_num_threads(1)
    out = {}
    if scenario in ("sn_torch", "sn_lipkern"):
        # two forwards before one backward, buffers broadcast at every forward
        torch.manual_seed(0)
        sn = (torch.nn.utils.parametrizations.spectral_norm if scenario == "sn_torch"
              else lipkern.nn.spectral_norm)
        net = nn.Sequential(sn(nn.Linear(6, 6)), nn.ReLU(), sn(nn.Linear(6, 2)))
        model = nn.parallel.DistributedDataParallel(net, broadcast_buffers=True)
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(rank))
        try:
            loss = model(x).square().sum() + model(2 * x).square().sum()
            loss.backward()
            out["error"] = None
        except RuntimeError as e:
            out["error"] = str(e).splitlines()[0]
        out["u"] = [net[i].parametrizations.weight[0]._u.clone() for i in (0, 2)]
    elif scenario == "sn_model":
        # spectral_norm_model under DDP: 2 steps, two forwards before one backward each
        torch.manual_seed(0)
        net = lipkern.nn.spectral_norm_model(
            nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)))
        model = nn.parallel.DistributedDataParallel(net, broadcast_buffers=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(2):
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(10 * step + rank))
            opt.zero_grad()
            (model(x).square().sum() + model(2 * x).square().sum()).backward()
            opt.step()
        out["u"] = [net[i].parametrizations.weight[0]._u.clone() for i in (0, 2)]
        out["v"] = [net[i].parametrizations.weight[0]._v.clone() for i in (0, 2)]
        out["params"] = [p.detach().clone() for p in net.parameters()]
    elif scenario == "ddp":
        net = ddp_model()
        model = nn.parallel.DistributedDataParallel(net)
        x, y = ddp_data()
        out["params"] = train_two_steps(net, model, x[rank::world], y[rank::world],
                                        lipkern.distributed.fused_power_iter)
    else:
        ws, specs, n_iters = CASES[scenario]()
        ws = [w.requires_grad_() for w in ws]
        res = lipkern.distributed.fused_power_iter(
            ws, specs, n_iters=n_iters, generator=torch.Generator().manual_seed(5))
        if scenario == "warm":
            res = lipkern.distributed.fused_power_iter(ws, specs, n_iters=1, state=res.state)
        loss_of(res).backward()
        out.update(sigmas=res.sigmas.detach(), lipschitz=res.lipschitz.detach(),
                   log_lipschitz=res.log_lipschitz.detach(),
                   grads=[w.grad if w.grad is not None else torch.zeros_like(w) for w in ws])
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    scenario, world, outdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    mp.start_processes(worker, args=(world, scenario, outdir), nprocs=world, join=True,
                       start_method="spawn")
