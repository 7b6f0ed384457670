"""Host time of one lipkern call and of a spectral_norm_model step (CPU or GPU).

Layers are tiny (100 x 16x16 by default), so the arithmetic is negligible and the time per
call is what is not kernel work: argument checks, packing, the registered op's dispatch,
autograd bookkeeping, per-layer Python. On a GPU the device is drained after each call, and
the time measured is the host's (launches are asynchronous). ``--profile`` prints the
cProfile functions with the most own time.

    python bench/bench_host_time.py                  # every row, median of --reps
    python bench/bench_host_time.py --profile call_grouped_fb
"""
from __future__ import annotations

import argparse
import cProfile
import copy
import pstats
import statistics
import sys
import time

import torch

import lipkern


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def host_us(fn, device, reps, warmup=5):
    for _ in range(warmup):
        fn()
    _sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        _sync(device)
    ts.sort()
    return statistics.median(ts) * 1e6, ts[len(ts) // 5] * 1e6, ts[4 * len(ts) // 5] * 1e6


def cases(device, layers, width, batch):
    g = torch.Generator().manual_seed(0)
    ws = [(torch.randn(width, width, generator=g) / width ** 0.5).to(device).requires_grad_()
          for _ in range(layers)]
    out = {}
    for backend in lipkern.available_backends(device):
        if backend == "triton" and device.type == "cpu":
            continue  # the interpreter's time is not host time
        st = lipkern.fused_power_iter(ws, n_iters=2, backend=backend).state
        kw = dict(n_iters=1, state=st, check_finite=False, backend=backend)

        def fwd(kw=kw):
            with torch.no_grad():
                lipkern.fused_power_iter(ws, **kw)

        def fb(kw=kw):
            r = lipkern.fused_power_iter(ws, **kw)
            torch.autograd.grad(r.log_lipschitz, ws)

        def nfb(kw=kw):
            r = lipkern.fused_normalize(ws, **kw)
            torch.autograd.grad(sum(w.sum() for w in r.weights), ws)
        out[f"call_{backend}_fwd"] = fwd
        out[f"call_{backend}_fb"] = fb
        out[f"normalize_{backend}_fb"] = nfb
    torch.manual_seed(0)
    seq = []
    for _ in range(layers):
        seq += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    base = torch.nn.Sequential(*seq[:-1]).to(device)
    x = torch.randn(batch, width, device=device)

    def step_of(model):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()
        return step
    out["model_plain_step"] = step_of(copy.deepcopy(base))
    strategies = ["auto", "scaled_outputs", "fused_weights"]
    for s in strategies:
        try:
            m = lipkern.nn.spectral_norm_model(copy.deepcopy(base), x, strategy=s)
        except (ValueError, TypeError) as e:
            print(f"# strategy {s}: skipped ({e})")
            continue
        out[f"model_{s}_step"] = step_of(m)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=100)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--only", default=None, help="comma list of row names")
    p.add_argument("--profile", default=None, help="a row name: print its cProfile top 25")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    print(f"# host time: {a.layers} layers of {a.width}x{a.width} on {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = cases(device, a.layers, a.width, a.batch)
    if a.profile:
        fn = rows[a.profile]
        for _ in range(5):
            fn()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(50):
            fn()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
        return 0
    names = a.only.split(",") if a.only else list(rows)
    print("| row | median us | p20 us | p80 us |\n|---|---:|---:|---:|")
    for n in names:
        med, p20, p80 = host_us(rows[n], device, a.reps)
        print(f"| {n} | {med:.0f} | {p20:.0f} | {p80:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
