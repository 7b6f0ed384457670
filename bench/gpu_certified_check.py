"""certified_sigma on a GPU (issue 17): every backend that runs there, on ResNet-18's convs.

    python bench/gpu_certified_check.py [--workloads resnet18,toy] [--reps 5] [--out DIR]

Checks, per workload: backend "torch" and "triton" on CUDA tensors each >= the exact
circular norms (lipkern.reference.certified_sigma, float64 SVD on the CPU) and within the
certificate's margin of them, the two backends equal to float32 rounding, the gradient
finite; then times both against 50 iterations of fused_power_iter (backend auto) on the same
layers, same process (CUDA events around each call). Prints a table, appends JSON rows to
DIR/certified_gpu.jsonl (default bench/results/). Exit status 1 when a check fails.
"""
import argparse
import datetime
import json
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lipkern  # noqa: E402
from bench_bound import _layers  # noqa: E402
from bench_power_iter import RESULTS, device_name, versions  # noqa: E402


def _time(f, reps):
    out, ts = None, []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = f()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return out, statistics.median(ts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default="resnet18,toy")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    dev = torch.device("cuda")
    print(f"# certified_sigma on {device_name(dev)}; "
          + ", ".join(f"{k} {v}" for k, v in versions().items()))
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    from lipkern.certified import CERT_MARGIN
    bad, rows = 0, []
    for name in a.workloads.split(","):
        _, _, _, ws, specs = _layers(name)
        exact = lipkern.reference.certified_sigma(ws, specs)
        wg = [w.to(dev) for w in ws]
        gen = lambda: torch.Generator(device="cpu").manual_seed(0)  # noqa: E731
        res, times = {}, {}
        for be in ("torch", "triton"):
            def f(be=be):
                return lipkern.certified_sigma(wg, specs, backend=be, generator=gen())
            f()
            res[be], times[be] = _time(f, a.reps)
        pi = lambda: lipkern.fused_power_iter(wg, specs, n_iters=50)  # noqa: E731
        pi()
        _, times["pi50"] = _time(pi, a.reps)
        for be, b in res.items():
            b = b.double().cpu()
            lo = bool((b >= exact * (1 - 1e-12)).all())
            hi = bool((b <= exact * math.sqrt(1 + CERT_MARGIN) * 1.01).all())
            print(f"{name} {be}: >= exact circular {lo}, within margin + 1% {hi}")
            bad += (not lo) + (not hi)
        same = bool(torch.allclose(res["torch"], res["triton"], rtol=1e-4, atol=0))
        bad += not same
        wr = [w.clone().requires_grad_() for w in wg]
        lipkern.certified_sigma(wr, specs, generator=gen()).log().sum().backward()
        finite = all(bool(torch.isfinite(w.grad).all()) for w in wr)
        bad += not finite
        print(f"{name}: backends agree {same}, gradient finite {finite}")
        print(f"| {name} | seconds | / 50 iterations |\n|---|---:|---:|")
        for k in ("pi50", "torch", "triton"):
            print(f"| {k} | {times[k]:.4f} | {times[k] / times['pi50']:.2f} |")
        rows.append(dict(date=stamp, device=device_name(dev), **versions(), workload=name,
                         times_s=times, agree=same, grad_finite=finite))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "certified_gpu.jsonl"), "a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
