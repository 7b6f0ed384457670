"""Network bound of a ResNet-18 (CIFAR shapes): lipkern.lipschitz_bound (one fused call)
against the naive per-layer loop, forward + backward, same layers and start vectors.

    python bench/bench_bound.py [--n-iters 5] [--reps 5]

Prints device and versions, a markdown table (median, p20/p80, speedup) and appends JSON rows
to bench/results/bound.jsonl.
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lipkern  # noqa: E402
from bench_power_iter import RESULTS, _sync, device_name, naive, versions  # noqa: E402
from models import resnet18_cifar  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-iters", type=int, default=5)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-save", action="store_true")
    a = p.parse_args(argv)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if a.device == "auto" else a.device))
    model = resnet18_cifar().to(device).eval()
    x = torch.randn(1, 3, 32, 32, device=device)
    print(f"# lipkern bench: bound of a ResNet-18 (CIFAR, 32x32), {a.n_iters} iterations, "
          f"forward + backward")
    print(f"# device: {device_name(device)}; "
          + ", ".join(f"{k} {v}" for k, v in versions().items()))

    first = lipkern.lipschitz_bound(model, x, n_iters=0,
                                    generator=torch.Generator().manual_seed(0))
    start = first.state  # the same start vectors for both providers
    lay = lipkern.layout.layout_from_meta(start.meta)
    conv_ws = [w for _, w, _ in first.fused_layers]  # the layers lipkern's fused call has
    specs = [s for _, _, s in first.fused_layers]
    x0s = []
    for i, (w, s) in enumerate(zip(conv_ws, specs)):
        v = start.x[lay.x_slice(i)]
        x0s.append(v if s is None else v.view(1, -1, *s.input_size))

    def run_naive():
        sig, _ = naive(conv_ws, specs, x0s, a.n_iters)
        return sig.log().sum()

    def run_lipkern():
        return lipkern.lipschitz_bound(model, x, n_iters=a.n_iters, state=start,
                                       check_finite=False).log_bound

    providers = {"naive": run_naive, "lipkern": run_lipkern}
    times = {k: [] for k in providers}
    for f in providers.values():
        f().backward()
    for _ in range(a.reps):
        for k, f in providers.items():
            model.zero_grad(set_to_none=True)
            _sync(device)
            t0 = time.perf_counter()
            f().backward()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["naive"])
    print("| provider | median ms | p20 ms | p80 ms | speedup vs naive |\n|---|---:|---:|---:|---:|")
    rows = []
    for k, ts in times.items():
        ts.sort()
        med = statistics.median(ts)
        q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]  # noqa: E731
        rows.append(dict(provider=k, median_ms=med * 1e3, p20_ms=q(0.2) * 1e3,
                         p80_ms=q(0.8) * 1e3))
        print(f"| {k} | {med * 1e3:.1f} | {q(0.2) * 1e3:.1f} | {q(0.8) * 1e3:.1f} | "
              f"{base / med:.2f} |")
    rep = lipkern.lipschitz_bound(model, x, n_iters=a.n_iters, state=start)
    print(f"\n# {len(conv_ws)} linear layers; bound {float(rep.bound.detach()):.4g} "
          f"(graph: {rep.method}, residual paths combined)")
    if not a.no_save:
        os.makedirs(RESULTS, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with open(os.path.join(RESULTS, "bound.jsonl"), "a") as f:
            for r in rows:
                f.write(json.dumps(dict(date=stamp, device=device_name(device), **versions(),
                                        workload="resnet18_bound", n_iters=a.n_iters,
                                        **r)) + "\n")
    return rows


if __name__ == "__main__":
    main()
