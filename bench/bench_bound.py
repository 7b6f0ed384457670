"""Network bounds: certified per-layer upper bounds and the whole-model report.

    python bench/bench_bound.py --section certified [--workloads resnet18,toy,resnet18_224]
    python bench/bench_bound.py --section train [--n-iters 5] [--reps 5]

"certified": per layer, lipkern.certified_sigma (one call for all layers) vs the converged
power-iteration estimate (fused_power_iter, 300 iterations, tol 1e-7) and the exact circular
norm (reference.certified_sigma, SVD per frequency; the exact operator SVD where the dense
matrix fits); the time of certified_sigma against 50 iterations of fused_power_iter
(backend cpp) on the same layers, same run; the whole-network lipschitz_bound time
(estimate + certified upper); orthogonium's Gram bound as an optional provider on a few
layers (skipped when it is not installed). "train": lipschitz_bound (one fused call)
against the naive per-layer loop, forward + backward, same layers and start vectors.

Prints device and versions, markdown tables, and appends JSON rows to
bench/results/bound.jsonl.
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
    p.add_argument("--section", default="certified", choices=["certified", "train"])
    p.add_argument("--workloads", default="resnet18,toy")
    p.add_argument("--n-iters", type=int, default=5)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-save", action="store_true")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.section == "certified":
        return certified_section(a)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if a.device == "auto" else a.device))
    model = resnet18_cifar().to(device).eval()
    x = torch.randn(1, 3, 32, 32, device=device)
    print(f"# lipkern bench: bound of a ResNet-18 (CIFAR, 32x32), {a.n_iters} iterations, "
          f"forward + backward")
    print(f"# device: {device_name(device)}; "
          + ", ".join(f"{k} {v}" for k, v in versions().items()))

    first = lipkern.lipschitz_bound(model, x, n_iters=0, certify=False,
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
                                       check_finite=False, certify=False).log_estimate

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
    print(f"\n# {len(conv_ws)} linear layers; estimate {float(rep.estimate.detach()):.4g}, "
          f"certified upper {float(rep.upper.detach()):.4g} (graph: {rep.method})")
    if not a.no_save:
        os.makedirs(RESULTS, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with open(os.path.join(RESULTS, "bound.jsonl"), "a") as f:
            for r in rows:
                f.write(json.dumps(dict(date=stamp, device=device_name(device), **versions(),
                                        workload="resnet18_bound", n_iters=a.n_iters,
                                        **r)) + "\n")
    return rows


# ---------------------------------------------------------------- certified section
def _layers(name):
    """(label, model or None, example input, weights, specs) of a workload."""
    from bench_power_iter import workload
    if name in ("resnet18", "resnet18_224"):
        if name == "resnet18":
            model, x = resnet18_cifar().eval(), torch.randn(1, 3, 32, 32)
        else:
            sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
            from test_bound_models import ResNet18ImageNet
            model, x = ResNet18ImageNet(width=64, num_classes=1000).eval(), \
                torch.randn(1, 3, 224, 224)
        rep = lipkern.lipschitz_bound(model, x, n_iters=0, certify=False)
        fl = [(n, w.detach(), s) for n, w, s in rep.fused_layers
              if w.dim() == 4 and s is not None and w.shape[1] > 1]  # the convs, no pools
        return model, x, [n for n, _, _ in fl], [w for _, w, _ in fl], [s for _, _, s in fl]
    ws, specs, _, _ = workload("toy", torch.device("cpu"), "full")
    return None, None, [f"conv{i}" for i in range(len(ws))], ws, specs


def _timed(f):
    t0 = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t0


def _orthogonium(ws, specs, limit):
    """orthogonium's Gram-iteration bound (Delattre et al.) on the first ``limit`` layers:
    [(value, seconds)], or why it was skipped."""
    try:
        from orthogonium.layers.conv.singular_values import get_conv_sv
    except Exception as e:  # noqa: BLE001 - optional provider
        return None, f"skipped: orthogonium not installed ({type(e).__name__})"
    out = []
    for w, s in list(zip(ws, specs))[:limit]:
        layer = torch.nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), stride=s.stride,
                                padding=s.padding, bias=False)
        with torch.no_grad():
            layer.weight.copy_(w)
        v, t = _timed(lambda: get_conv_sv(layer, n_iter=6, imsize=s.input_size[0]))
        out.append((float(v[0] if isinstance(v, tuple) else v), t))
    return out, ""


def certified_section(a):
    print("# lipkern bench: certified per-layer bounds (certified_sigma) vs power iteration")
    print(f"# device: {device_name(torch.device('cpu'))}; "
          + ", ".join(f"{k} {v}" for k, v in versions().items()))
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for name in a.workloads.split(","):
        model, x, names, ws, specs = _layers(name)
        gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
        pi50 = lambda: lipkern.fused_power_iter(ws, specs, n_iters=50,  # noqa: E731
                                                backend="cpp", generator=gen())
        certs = {"cpp": lambda: lipkern.certified_sigma(ws, specs, backend="cpp",
                                                       generator=gen()),
                 "torch": lambda: lipkern.certified_sigma(ws, specs, backend="torch",
                                                         generator=gen())}
        pi50(), [f() for f in certs.values()]  # warm-up: MKL, oneDNN primitives, caches
        runs = {"pi50": [], "cpp": [], "torch": []}
        for _ in range(a.reps):  # round-robin, same inputs
            runs["pi50"].append(_timed(pi50)[1])
            for k, f in certs.items():
                cert_k, t = _timed(f)
                runs[k].append(t)
                if k == "cpp":
                    cert = cert_k
        t_pi50m = statistics.median(runs["pi50"])
        t_cert = statistics.median(runs["cpp"])
        t_cert_torch = statistics.median(runs["torch"])
        conv_iters = 300  # with tol=1e-7: a layer stops once its estimate moves < 1e-7
        est = lipkern.fused_power_iter(ws, specs, n_iters=conv_iters, tol=1e-7, backend="cpp",
                                       generator=gen()).sigmas
        exact = lipkern.reference.certified_sigma(ws, specs)
        print(f"\n## {name}: {len(ws)} convs\n")
        print("| layer | weight | input | converged estimate | exact circular | certified | "
              "certified / estimate |\n|---|---|---|---:|---:|---:|---:|")
        ratios = []
        for i, (n, w, s) in enumerate(zip(names, ws, specs)):
            r = float(cert[i]) / float(est[i])
            ratios.append(r)
            print(f"| {n} | {tuple(w.shape)} | {s.input_size} s{s.stride[0]} | "
                  f"{float(est[i]):.5g} | {float(exact[i]):.5g} | {float(cert[i]):.5g} | "
                  f"{r:.4f} |")
        line = dict(date=stamp, device=device_name(torch.device("cpu")), **versions(),
                    threads=torch.get_num_threads(), workload=f"certified_{name}",
                    n_layers=len(ws), certified_s=t_cert, certified_torch_s=t_cert_torch,
                    power_iter50_s=t_pi50m, runs_s=runs, reps=a.reps,
                    time_ratio=t_cert / t_pi50m, max_ratio_vs_estimate=max(ratios),
                    ratios=ratios, converged_iters=conv_iters,
                    certified_ge_exact_circular=bool((cert.double() >= exact * (1 - 1e-12)).all()))
        print(f"\n| {torch.get_num_threads()} threads, median of {a.reps} | seconds | / 50 power "
              f"iterations |\n|---|---:|---:|\n| fused_power_iter, 50 iterations (cpp) | "
              f"{t_pi50m:.3f} | 1.00 |\n| certified_sigma, backend cpp | {t_cert:.3f} | "
              f"{t_cert / t_pi50m:.2f} |\n| certified_sigma, backend torch | {t_cert_torch:.3f} | "
              f"{t_cert_torch / t_pi50m:.2f} |\n\nmax certified / converged estimate "
              f"{max(ratios):.4f}")
        if model is not None:
            rep, t_rep = _timed(lambda: lipkern.lipschitz_bound(model, x, n_iters=10,
                                                                generator=gen()))
            est_v, up_v = float(rep.estimate.detach()), float(rep.upper.detach())
            print(f"whole-network lipschitz_bound (trace + forward + 10 fused iterations + "
                  f"certified): {t_rep:.2f} s; estimate {est_v:.4g}, certified upper {up_v:.4g}")
            line.update(report_s=t_rep, estimate=est_v, upper=up_v)
        orth, why = _orthogonium(ws, specs, 2)
        print(f"orthogonium get_conv_sv: {why or orth}")
        line["orthogonium"] = why or orth
        rows.append(line)
    if not a.no_save:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "bound.jsonl"), "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return rows


if __name__ == "__main__":
    main()
