"""Spectral normalization per training step: what a user pays for it, side by side.

    python bench/bench_spectral_norm.py [--workload mlp|critic|all] [--batch N] [--reps N]
    python bench/bench_spectral_norm.py --workload convnets   (issue 16: four conv nets, D
        steps, gradient-penalty steps, matrix and operator mode; see bench_convnets.py)

Providers (same model weights, same inputs, same run, round-robin timed):
  plain       the unnormalized model
  torch_sn    torch.nn.utils.parametrizations.spectral_norm on every layer
  deel        deel-torchlip SpectralLinear / SpectralConv2d (if installed; note it also
              orthonormalizes (Bjorck) -- a different, costlier normalization)
  lipkern     lipkern.nn.spectral_norm_model, strategy "auto": "fused_weights" on CUDA (one
              fused launch per forward writes every W / sigma); on the CPU "inline" for the
              Linear-only MLP (each layer's power iteration inside its own op, no separate
              pass over the weights) and "scaled_outputs" for the critic
  lipkern_scaled  strategy="scaled_outputs": one fused call per forward for the sigmas, the
              layers scale their outputs (the CPU default before "inline")
  plain_lk    (where lipkern runs "inline") the unnormalized model with its Linear layers on
              lipkern's matmul (lipkern::linear: sn_linear without the normalization). At
              small batch that matmul beats MKL's GEMM on some CPUs, so "lipkern - plain"
              counts a matmul gain as a cheaper normalization; "lipkern - plain_lk" is the
              normalization's own cost, at equal matmuls, and is the figure quoted.

The figure that matters is the overhead: step time minus plain's step time. Workloads: a
100-layer MLP of width 512 (ReLU), and an SNGAN-style CIFAR critic (Miyato et al. 2018:
3x3/4x4 convs 64-128-256-512, LeakyReLU 0.1, linear head) on 32x32 inputs.
Prints a table and appends JSON rows to bench/results/spectral_norm.jsonl.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lipkern  # noqa: E402
from bench_power_iter import device_name, versions  # noqa: E402
import bench_convnets  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "spectral_norm.jsonl")


def mlp(depth=100, width=512):
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def sngan_critic():
    act = lambda: nn.LeakyReLU(0.1)  # noqa: E731
    chans = [(3, 64, 3, 1), (64, 64, 4, 2), (64, 128, 3, 1), (128, 128, 4, 2),
             (128, 256, 3, 1), (256, 256, 4, 2), (256, 512, 3, 1)]
    layers = []
    for cin, cout, k, s in chans:
        layers += [nn.Conv2d(cin, cout, k, s, padding=1), act()]
    layers += [nn.Flatten(), nn.Linear(512 * 4 * 4, 1)]
    return nn.Sequential(*layers)


WORKLOADS = {"mlp": (mlp, lambda b: torch.randn(b, 512)),
             "critic": (sngan_critic, lambda b: torch.randn(b, 3, 32, 32))}
DEFAULT_BATCH = {"mlp": 8, "critic": 16}


def _layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def make_torch_sn(base):
    m = copy.deepcopy(base)
    for layer in _layers(m):
        torch.nn.utils.parametrizations.spectral_norm(layer)
    return m


def make_lipkern(base):
    return lipkern.nn.spectral_norm_model(copy.deepcopy(base))


def make_deel(base):
    """The same architecture from deel-torchlip's layers, weights copied in."""
    from deel.torchlip import SpectralConv2d, SpectralLinear
    m = copy.deepcopy(base)
    for name, layer in list(m.named_children()):
        if isinstance(layer, nn.Linear):
            new = SpectralLinear(layer.in_features, layer.out_features)
        elif isinstance(layer, nn.Conv2d):
            new = SpectralConv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                 stride=layer.stride, padding=layer.padding)
        else:
            continue
        with torch.no_grad():
            new.parametrizations.weight.original.copy_(layer.weight)
            new.bias.copy_(layer.bias)
        setattr(m, name, new)
    return m


class LkLinear(nn.Linear):
    """nn.Linear whose forward runs lipkern's matmul (lipkern::linear), nothing else."""

    def forward(self, x):
        return torch.ops.lipkern.linear.default(x, self.weight, self.bias)


def make_plain_lk(base):
    m = copy.deepcopy(base)
    for layer in m.modules():
        if type(layer) is nn.Linear:
            layer.__class__ = LkLinear
    return m


def providers(include_deel=True, device="cpu"):
    out = {"plain": lambda b: copy.deepcopy(b), "torch_sn": make_torch_sn,
           "lipkern": make_lipkern}
    out["lipkern_scaled"] = lambda b: lipkern.nn.spectral_norm_model(
        copy.deepcopy(b), strategy="scaled_outputs")
    # backend="grouped": the fused call as one grouped conv / batched matmul per bucket
    out["lipkern_grouped"] = lambda b: lipkern.nn.spectral_norm_model(
        copy.deepcopy(b), backend="grouped")
    if include_deel:
        try:
            import deel.torchlip  # noqa: F401
            out["deel"] = make_deel
        except ImportError:
            print("(deel-torchlip not installed: pip install '.[bench]' to compare with it)")
    return out


def step_fn(model, x):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return step


def measure(workload, batch, reps, warmup, include_deel=True, device="cpu"):
    make_model, make_x = WORKLOADS[workload]
    torch.manual_seed(0)
    base = make_model().to(device)
    x = make_x(batch).to(device)
    models = {name: make(base) for name, make in providers(include_deel, device).items()}
    measure.strategy = resolved_strategy(models["lipkern"])
    if measure.strategy == "inline":
        models["plain_lk"] = make_plain_lk(base)
    steps = {name: step_fn(m, x) for name, m in models.items()}
    for f in steps.values():
        for _ in range(warmup):
            f()
    if getattr(measure, "graph", False):  # --graph: each step captured once, replayed
        steps = {n: graph_step(f) for n, f in steps.items()}
    times = {n: [] for n in steps}
    dev = {n: [] for n in steps}  # device time per step (CUDA events), GPU only
    for _ in range(reps):  # round-robin: this machine's speed drifts
        for n, f in steps.items():
            if device != "cpu":
                torch.cuda.synchronize()
                ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
                ev[0].record()
            t0 = time.perf_counter()
            f()
            if device != "cpu":
                ev[1].record()
                torch.cuda.synchronize()
                dev[n].append(ev[0].elapsed_time(ev[1]))
            times[n].append(time.perf_counter() - t0)
    measure.device_ms = {n: statistics.median(t) for n, t in dev.items() if t}
    launches = {n: count_launches(f, device) for n, f in steps.items()}
    return {n: statistics.median(t) * 1e3 for n, t in times.items()}, \
        {n: min(t) * 1e3 for n, t in times.items()}, len(_layers(base)), launches


def graph_step(step):
    """``step`` (fwd + bwd + SGD) captured in one CUDA graph after warm-up on a side stream;
    returns the replay (the step's inputs and parameters are static: they stay in place)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def resolved_strategy(model):
    """What spectral_norm_model's strategy="auto" runs for this model's weights."""
    return model._lipkern_spectral_norm.resolved_strategy()


def count_launches(step, device):
    """Work items of one training step: CUDA kernels on a GPU, aten ops on the CPU (what the
    overhead is made of when the layers are small)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device != "cpu" else [])
    with profile(activities=acts) as prof:
        step()
        if device != "cpu":
            torch.cuda.synchronize()
    if device != "cpu":
        return sum(1 for e in prof.events() if e.device_type.name == "CUDA"
                   and "memcpy" not in e.name.lower() and "memset" not in e.name.lower())
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def print_table(workload, batch, n_layers, med, best, launches, device):
    plain = med["plain"]
    torch_over = med["torch_sn"] - plain
    unit = "kernels" if device != "cpu" else "aten ops"
    print(f"\n{workload}: {n_layers} normalized layers, batch {batch} -- per training step "
          f"(fwd+bwd+SGD), median ms; lipkern = strategy {measure.strategy!r}")
    print(f"{'provider':14s} {'step ms':>9s} {'min ms':>9s} {'overhead ms':>12s} "
          f"{'torch overhead / this':>22s} {unit + '/step':>14s}")
    for n, t in med.items():
        over = t - plain
        ratio = "" if n in ("plain", "plain_lk") else f"{torch_over / over:21.2f}x" \
            if over > 0 else f"{'(none: faster)':>22s}"
        print(f"{n:14s} {t:9.2f} {best[n]:9.2f} {over:12.2f} {ratio:>22s} {launches[n]:14d}")
    eq = equal_matmul_overhead(med)
    if eq is not None:
        ratio = f"{torch_over / eq:.2f}x" if eq > 0 else "(none measured)"
        print(f"at equal matmuls (lipkern - plain_lk; plain_lk - plain = "
              f"{med['plain_lk'] - plain:+.2f} ms is the matmul's own difference): "
              f"lipkern overhead {eq:.2f} ms, torch overhead / this = {ratio}")


def equal_matmul_overhead(med):
    """lipkern's overhead over the unnormalized model on the same matmul, or None."""
    return med["lipkern"] - med["plain_lk"] if "plain_lk" in med else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="all",
                    choices=["all", *WORKLOADS, "convnets", *bench_convnets.CONVNETS])
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-deel", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (1 on a shared machine: idle OpenMP threads "
                         "of other processes' spin-waits inflate multi-threaded steps)")
    ap.add_argument("--clock", default="wall", choices=["wall", "thread"],
                    help="convnets: wall time, or this thread's CPU time (with --threads 1: "
                         "what to use on a shared machine)")
    ap.add_argument("--compile", action="store_true",
                    help="convnets: also time plain and lipkern under torch.compile (inductor)")
    ap.add_argument("--providers", default=None,
                    help="convnets: comma-separated providers to time besides plain (e.g. "
                         "torch_sn,lipkern,lk_op: a shorter run; the verdict needs those three)")
    ap.add_argument("--no-json", action="store_true")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--graph", action="store_true",
                    help="time each provider's step as a CUDA-graph replay (GPU only)")
    args = ap.parse_args(argv)
    if args.graph and args.device == "cpu":
        print("--graph times CUDA-graph replays and needs a CUDA device: nothing measured",
              file=sys.stderr)
        return None
    measure.graph = args.graph
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.workload == "convnets" or args.workload in bench_convnets.CONVNETS:
        return main_convnets(args)
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    for w in names:
        batch = args.batch or DEFAULT_BATCH[w]
        med, best, n_layers, launches = measure(w, batch, args.reps, args.warmup,
                                                not args.no_deel, args.device)
        print_table(w, batch, n_layers, med, best, launches, args.device)
        if getattr(measure, "device_ms", None):
            print("device ms per step (CUDA events" + (", graph replay" if args.graph else "")
                  + "): " + ", ".join(f"{n} {t:.3f}" for n, t in measure.device_ms.items()))
        if not args.no_json:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(dict(
                    bench="spectral_norm", workload=w, batch=batch, layers=n_layers,
                    median_ms=med, min_ms=best,
                    overhead_ms={n: med[n] - med["plain"] for n in med},
                    overhead_equal_matmul_ms=equal_matmul_overhead(med),
                    launches_per_step=launches, lipkern_strategy=measure.strategy,
                    device_ms=getattr(measure, "device_ms", {}), graph=args.graph,
                    launch_unit="cuda kernels" if args.device != "cpu" else "aten ops",
                    device=device_name(torch.device(args.device)), versions=versions(),
                    date=datetime.date.today().isoformat(), reps=args.reps)) + "\n")


def main_convnets(args):
    """Issue 16's run: every conv net and step, a table and a verdict each, JSON rows."""
    names = list(bench_convnets.CONVNETS) if args.workload == "convnets" else [args.workload]
    out = args.out if args.out != RESULTS else RESULTS.replace(".jsonl", "_convnets.jsonl")
    print(f"device: {device_name(torch.device('cpu'))}; versions: {versions()}")
    summary = []
    for w in names:
        strategy = bench_convnets.resolved(w)
        for kind in bench_convnets.CONVNETS[w][2]:
            row = bench_convnets.measure(w, kind, args.reps, args.warmup, args.batch,
                                         args.compile, args.clock,
                                         args.providers.split(",") if args.providers else None)
            bench_convnets.print_row(row, strategy)
            summary.append((w, kind, bench_convnets.verdict(row)[2]))
            if not args.no_json:
                os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
                with open(out, "a") as f:
                    f.write(json.dumps(dict(
                        bench="spectral_norm_convnets", lipkern_strategy=strategy, **row,
                        device=device_name(torch.device("cpu")), versions=versions(),
                        date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                            timespec="minutes"))) + "\n")
    print("\nverdicts (issue 16 done criterion):")
    for w, kind, text in summary:
        print(f"  {w:8s} {kind:8s} {text}")


if __name__ == "__main__":
    main()
