"""Side-by-side benchmark of per-layer spectral norms + network bound, forward and backward.

Every provider runs on the same weights and start vectors. Rows: median with p20/p80, speedup
over the naive loop, achieved GFLOP/s, and the floor (FLOPs at the measured peak of a large
matmul on this device). Markdown table on stdout; rows appended as JSON lines to
bench/results/power_iter.jsonl (device, versions and date in every row).

    python bench/bench_power_iter.py                       # toy workload, short default
    python bench/bench_power_iter.py --workload mlp --mode both --reps 20
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import lipkern
from lipkern import ConvSpec

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---------------------------------------------------------------- workloads
def workload(name: str, device, scale: str):
    """(weights, specs, n_iters, warm) for a named workload. scale="cpu" shrinks the toy
    workload to the CPU size of issue 3 (20 conv 3x3 32->32 at 16x16)."""
    g = torch.Generator().manual_seed(0)

    def conv(cout, cin, k=3):
        return torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5

    if name == "toy":
        c, hw = (32, 16) if scale == "cpu" else (64, 32)
        ws = [conv(c, c) for _ in range(20)]
        specs = [ConvSpec(hw, padding=1) for _ in ws]
        n_iters, warm = 5, False
    elif name == "resnet18":
        ws, specs = [conv(64, 3)], [ConvSpec(32, padding=1)]
        size = 32
        for cin, cout, stride in [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]:
            for block in range(2):
                s = stride if block == 0 else 1
                ci = cin if block == 0 else cout
                ws += [conv(cout, ci), conv(cout, cout)]
                specs += [ConvSpec(size, stride=s, padding=1), ConvSpec(size // s, padding=1)]
                if s != 1 or ci != cout:
                    ws.append(conv(cout, ci, 1))
                    specs.append(ConvSpec(size, stride=s))
                size //= s
        ws.append(torch.randn(10, 512, generator=g) / 512 ** 0.5)
        specs.append(None)
        n_iters, warm = 5, False
    elif name == "mlp":
        width = 256 if scale == "cpu" else 512
        layers = 64 if scale == "cpu" else 100
        ws = [torch.randn(width, width, generator=g) / width ** 0.5 for _ in range(layers)]
        specs = [None] * layers
        n_iters, warm = 1, True
    else:
        raise ValueError(f"unknown workload {name!r}")
    return [w.to(device) for w in ws], specs, n_iters, warm


def flops(ws, specs, n_iters, mode):
    """Multiply-adds x 2 of the iteration: (2 n_iters + 1) operator applications forward,
    one weight-gradient pass backward."""
    total_f = total_b = 0
    for w, s in zip(ws, specs):
        if s is None:
            per = 2 * w.numel()
        else:
            g = lipkern.spec.resolve_geometry(tuple(w.shape), s, "w")
            per = 2 * g.w_numel * g.oh * g.ow  # C's output pixels, either direction
        total_f += (2 * n_iters + 1) * per
        total_b += per
    return {"forward": total_f, "backward": total_b, "both": total_f + total_b}[mode]


# ---------------------------------------------------------------- providers
def _op(w, s):
    """(A, A^T) as plain torch functions of a batched input (the user's own code)."""
    if s is None:
        return (lambda x: x @ w.t()), (lambda y: y @ w)
    if s.transposed:
        raise NotImplementedError
    pad = s.padding
    return (lambda x: F.conv2d(x, w, stride=s.stride, padding=pad, dilation=s.dilation,
                               groups=s.groups),
            lambda y, size: F.conv_transpose2d(
                y, w, stride=s.stride, padding=pad, dilation=s.dilation, groups=s.groups,
                output_padding=tuple(
                    sz + 2 * p - d * (k - 1) - 1 - (o - 1) * st for sz, p, d, k, o, st in zip(
                        size, pad, s.dilation, w.shape[2:], y.shape[2:], s.stride))))


def naive(ws, specs, x0s, n_iters):
    """Per layer: n_iters x (A, A^T, normalize), then ||A x||; autograd through it all."""
    sig = []
    for w, s, x in zip(ws, specs, x0s):
        if s is None:
            for _ in range(n_iters):
                x = (x @ w.t()) @ w
                x = x / x.norm()
            sig.append((x @ w.t()).norm())
        else:
            fwd, adj = _op(w, s)
            for _ in range(n_iters):
                x = adj(fwd(x), x.shape[2:])
                x = x / x.norm()
            sig.append(fwd(x).norm())
    sig = torch.stack(sig)
    return sig, sig.prod()


def grouped(ws, specs, x0s, n_iters):
    """Layers of equal shape and spec concatenated into one grouped conv / batched matmul."""
    buckets = {}
    for i, (w, s) in enumerate(zip(ws, specs)):
        buckets.setdefault((tuple(w.shape), s), []).append(i)
    sig = [None] * len(ws)
    for (shape, s), idx in buckets.items():
        G = len(idx)
        if s is None:
            W = torch.stack([ws[i] for i in idx])            # (G, m, n)
            x = torch.stack([x0s[i] for i in idx]).unsqueeze(-1)
            for _ in range(n_iters):
                x = W.transpose(1, 2) @ (W @ x)
                x = x / x.norm(dim=(1, 2), keepdim=True)
            out = (W @ x).norm(dim=(1, 2))
        else:
            K = torch.cat([ws[i] for i in idx])                 # (G*cout, cin/g, kh, kw)
            sg = ConvSpec(s.input_size, s.stride, s.padding, s.dilation, s.groups * G)
            fwd, adj = _op(K, sg)
            x = torch.cat([x0s[i] for i in idx], dim=1)         # (1, G*cin, h, w)
            for _ in range(n_iters):
                x = adj(fwd(x), x.shape[2:])
                x = x / x.reshape(G, -1).norm(dim=1).repeat_interleave(
                    x.shape[1] // G).view(1, -1, 1, 1)
            out = fwd(x).reshape(G, -1).norm(dim=1)
        for j, i in enumerate(idx):
            sig[i] = out[j]
    sig = torch.stack(sig)
    return sig, sig.prod()


def make_torch_sn(ws, n_iters):
    """torch.nn.utils.parametrizations.spectral_norm on every layer (matrix mode: for convs
    it normalizes the reshaped kernel, a different and smaller sigma)."""
    mods = []
    for w in ws:
        m = torch.nn.Linear(1, 1, bias=False) if w.dim() == 2 else \
            torch.nn.Conv2d(1, 1, 1, bias=False)
        m.weight = torch.nn.Parameter(w.detach().clone())
        mods.append(torch.nn.utils.parametrizations.spectral_norm(
            m, n_power_iterations=n_iters).to(w.device))

    def run():
        return [m.weight for m in mods]
    return run, [m.parametrizations.weight.original for m in mods]


def make_orthogonium(leaves, specs):
    """orthogonium's get_conv_sv (Gram iteration, a certified upper bound) on every conv,
    differentiable (detach=False); convs only."""
    from orthogonium.layers.conv.singular_values.get_sv import get_conv_sv
    if any(s is None or s.transposed for s in specs):
        raise ValueError("orthogonium's bound applies to (non-transposed) conv layers only")

    class _Conv:  # what get_conv_sv reads of a layer
        def __init__(self, w, s):
            self.weight, self.stride, self.padding_mode = w, s.stride, s.padding_mode
            self.groups = s.groups

    layers = [_Conv(w, s) for w, s in zip(leaves, specs)]

    def run():
        sig = torch.stack([get_conv_sv(c, n_iter=4, return_stab_rank=False, detach=False,
                                       imsize=s.input_size[0]) for c, s in zip(layers, specs)])
        return sig, sig.prod()
    return run


def make_deel(ws, specs):
    """deel-torchlip's SpectralConv2d / SpectralLinear normalization of every layer (spectral
    norm + Bjorck orthonormalization + the lconv coefficient), recomputed per step as in
    training: the per-step cost a deel-torchlip user pays for 1-Lipschitz layers."""
    from deel.torchlip import SpectralConv2d, SpectralLinear
    mods = []
    for w, s in zip(ws, specs):
        if s is None:
            m = SpectralLinear(w.shape[1], w.shape[0], bias=False)
        else:
            m = SpectralConv2d(w.shape[1] * s.groups, w.shape[0], tuple(w.shape[-2:]),
                               stride=s.stride, padding=s.padding, bias=False)
        with torch.no_grad():
            m.parametrizations.weight.original.copy_(w)
        mods.append(m.to(w.device))

    def run():
        return [m.weight for m in mods]
    return run, [m.parametrizations.weight.original for m in mods]


def make_cudagraph(fn, params, mode):
    """fn (forward, and backward unless mode == 'forward') captured in one CUDA graph and
    replayed: what an expert does to remove launch overhead. Returns a callable with fn's
    return convention (sigmas, product) whose backward already ran inside the replay."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA graphs need a GPU")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm up on a side stream, as torch.cuda.graphs requires
            out = fn()
            if mode != "forward":
                torch.autograd.grad(out[1], params, allow_unused=True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fn()
        if mode != "forward":
            static_grads = torch.autograd.grad(static[1], params, allow_unused=True)  # noqa: F841

    class Replayed(tuple):
        pass

    def run():
        graph.replay()
        return Replayed((static[0].detach(), static[1].detach()))
    return run


# ---------------------------------------------------------------- timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, reps, warmup):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return statistics.median(times), q(0.2), q(0.8)


def peak_gflops(device, dtype=torch.float32):
    n = 2048 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    med, _, _ = timeit(lambda: a @ a, device, 10, 3)
    return 2 * n ** 3 / med / 1e9


def versions():
    v = {"torch": torch.__version__, "python": platform.python_version(),
         "lipkern": lipkern.__version__}
    try:
        import triton
        v["triton"] = triton.__version__
    except ImportError:
        pass
    return v


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_bandwidth_gbs(device):
    """Measured copy bandwidth (read + write bytes / time) of a buffer larger than the
    last-level cache."""
    n = (256 if device.type == "cuda" else 64) * 2 ** 20 // 4
    a = torch.empty(n, device=device)
    b = torch.empty_like(a)
    med, _, _ = timeit(lambda: b.copy_(a), device, 10, 2)
    return 2 * 4 * n / med / 1e9


def launch_latency_us(device):
    """Time of one tiny launch (GPU kernel, or CPU op dispatch), back to back."""
    t = torch.zeros(1, device=device)
    med, _, _ = timeit(lambda: [t.add_(1) for _ in range(100)], device, 10, 2)
    return med / 100 * 1e6


def min_bytes(ws, mode):
    """Every weight read once (forward) and every gradient written once (backward)."""
    w = sum(x.numel() * x.element_size() for x in ws)
    return {"forward": w, "backward": w, "both": 2 * w}[mode]


def setup_inputs(ws, specs, n_iters, warm, device):
    """Start vectors shared by every provider (and the warm state for warm workloads)."""
    lay = lipkern.layout.layout_for(tuple(tuple(w.shape) for w in ws), tuple(specs))
    x0 = lipkern.layout.initial_x(lay, device, torch.float32, torch.Generator().manual_seed(1))
    x0s = []
    for i, (w, s) in enumerate(zip(ws, specs)):
        x = x0[lay.x_slice(i)]
        x = x / x.norm()
        x0s.append(x if s is None else x.view(1, -1, *s.input_size))
    state = lipkern.PowerIterState(x0, torch.zeros(lay.total_y, device=device), lay.meta)
    if warm:  # residual-flow style: vectors carried over from the previous step
        state = lipkern.fused_power_iter(ws, specs, state=state, n_iters=10).state
        x0s = [state.x[lay.x_slice(i)].view_as(x0s[i]) for i in range(len(ws))]
    return x0s, state


def default_providers(device):
    names = ["naive", "grouped", "torch_sn", "lipkern", "lipkern_grouped", "lipkern_torch"]
    # optional installs (pip install -e ".[bench]"); orthogonium only when asked for: its Gram
    # iteration took 19 s for the 20 toy layers on the CPU (lipkern: 14 ms)
    for mod, name in (("deel.torchlip", "deel_torchlip"),):
        try:
            __import__(mod)
            names.append(name)
        except ImportError:
            pass
    if device.type == "cuda":
        names += ["grouped_compile", "grouped_cudagraph", "lipkern_cuda"]
    return names


def measure(ws, specs, n_iters, warm, names, device, mode, reps, warmup, trace=None,
            graph=False):
    """Time every provider on the same weights and start vectors, round-robin (one rep of each
    in turn, so drift in the machine's speed lands on all alike). Returns rows (dicts).
    On CUDA each rep is also timed on the device (CUDA events around the step: device time
    from the first to the last kernel, "device_ms", beside the wall time). ``graph``: every
    provider that can be captured is timed as a CUDA-graph replay of its step instead."""
    x0s, state = setup_inputs(ws, specs, n_iters, warm, device)
    leaves = [w.detach().clone().requires_grad_() for w in ws]

    def provider(name):
        if name == "naive":
            return lambda: naive(leaves, specs, x0s, n_iters), leaves
        if name == "grouped":
            return lambda: grouped(leaves, specs, x0s, n_iters), leaves
        if name == "grouped_compile":
            f = torch.compile(grouped)
            return lambda: f(leaves, specs, x0s, n_iters), leaves
        if name == "grouped_cudagraph":
            return make_cudagraph(lambda: grouped(leaves, specs, x0s, n_iters), leaves,
                                  mode), leaves
        if name == "torch_sn":
            return make_torch_sn(ws, n_iters)
        if name == "orthogonium":
            return make_orthogonium(leaves, specs), leaves
        if name == "deel_torchlip":
            return make_deel(ws, specs)
        if name.startswith("lipkern"):
            be = {"lipkern": "auto", "lipkern_torch": "torch", "lipkern_triton": "triton",
                  "lipkern_cpp": "cpp", "lipkern_cuda": "cuda",
                  "lipkern_grouped": "grouped"}[name]

            def run():
                r = lipkern.fused_power_iter(leaves, specs, state=state, n_iters=n_iters,
                                             backend=be, check_finite=False)
                return r.sigmas, r.lipschitz
            return run, leaves
        raise ValueError(f"unknown provider {name!r}")

    def make_step(fn, params, graphed):
        def step():
            out = fn()
            if mode == "forward" or graphed:
                return out
            loss = out[1] if isinstance(out, tuple) else sum(w.sum() for w in out)
            return torch.autograd.grad(loss, params, allow_unused=True)
        return step

    steps = {}
    for name in names:
        try:
            fn, params = provider(name)
            if graph and name != "grouped_cudagraph":
                fn = make_cudagraph(fn, params, mode)
                steps[name] = (fn, fn)  # the replay runs forward (and backward) already
            else:
                steps[name] = (fn, make_step(fn, params, name == "grouped_cudagraph"))
            for _ in range(max(1, warmup)):
                steps[name][1]()
            _sync(device)
        except Exception as e:  # a provider that cannot run here is reported, not fatal
            print(f"# {name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:150]})")
            steps.pop(name, None)
    times = {name: [] for name in steps}
    dev_times = {name: [] for name in steps}
    fwd_times = {name: [] for name in steps}
    cuda = device.type == "cuda"
    for _ in range(reps):
        for name, (fn, step) in steps.items():
            if cuda:
                ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                ev0.record()
            t0 = time.perf_counter()
            step()
            if cuda:
                ev1.record()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            if cuda:
                dev_times[name].append(ev0.elapsed_time(ev1) * 1e-3)
            if mode == "backward":  # reported as (forward + backward) - forward
                t0 = time.perf_counter()
                fn()
                _sync(device)
                fwd_times[name].append(time.perf_counter() - t0)
    if trace:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for name, (_, step) in steps.items():
                if name.startswith("lipkern"):
                    step()
            _sync(device)
        prof.export_chrome_trace(trace)
        print(f"# profiler trace of the lipkern providers written to {trace}")

    rows = []
    for name, (fn, _) in steps.items():
        ts = sorted(times[name])
        q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]  # noqa: E731
        med, p20, p80 = statistics.median(ts), q(0.2), q(0.8)
        if mode == "backward":
            if name == "grouped_cudagraph":  # forward and backward replay as one graph
                med = p20 = p80 = float("nan")
            else:
                fmed = statistics.median(fwd_times[name])
                med, p20, p80 = med - fmed, p20 - fmed, p80 - fmed
        out = fn()
        sig = out[0].detach() if isinstance(out, tuple) else None
        dev = statistics.median(dev_times[name]) * 1e3 if dev_times[name] else None
        rows.append(dict(provider=name + ("+graph" if graph else ""), median_ms=med * 1e3,
                         p20_ms=p20 * 1e3, p80_ms=p80 * 1e3, device_ms=dev,
                         sigmas=None if sig is None else sig.cpu().tolist()))
    return rows


def print_table(rows, fl, nbytes, peak, bw, lat_us, launches):
    base = next((r["median_ms"] for r in rows if r["provider"] in ("naive", "naive+graph")),
                None)
    floors = {"compute": fl / (peak * 1e9) * 1e3, "bytes": nbytes / (bw * 1e9) * 1e3,
              "launch": launches * lat_us * 1e-3}
    floor_ms = max(floors.values())
    print(f"# floor {floor_ms:.3f} ms = max(FLOPs {fl / 1e9:.3f} G at the measured matmul peak "
          f"{peak:.0f} GFLOP/s: {floors['compute']:.3f} ms; bytes {nbytes / 1e6:.1f} MB at "
          f"the measured {bw:.0f} GB/s: {floors['bytes']:.3f} ms; {launches} launch(es) of "
          f"{lat_us:.1f} us: {floors['launch']:.3f} ms)")
    print("| provider | median ms | p20 ms | p80 ms | device ms | speedup vs naive | GFLOP/s | "
          "GB/s | x floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        sp = base / r["median_ms"] if base else float("nan")
        sec = r["median_ms"] * 1e-3
        r.update(speedup=sp, gflops=fl / sec / 1e9 if sec > 0 else float("nan"),
                 gbs=nbytes / sec / 1e9 if sec > 0 else float("nan"),
                 x_floor=r["median_ms"] / floor_ms)
        dev = "-" if r.get("device_ms") is None else f"{r['device_ms']:.3f}"
        print(f"| {r['provider']} | {r['median_ms']:.3f} | {r['p20_ms']:.3f} | "
              f"{r['p80_ms']:.3f} | {dev} | {sp:.2f} | {r['gflops']:.1f} | {r['gbs']:.1f} | "
              f"{r['x_floor']:.1f} |")
    return floor_ms


def sweep_configs(scale):
    counts = [1, 4, 16, 64] if scale == "full" else [1, 4, 16]
    widths = [64, 128] if scale == "full" else [16, 32]
    hw = 32 if scale == "full" else 8
    return [(n, c, hw) for c in widths for n in counts]


def sweep_workload(n, c, hw):
    g = torch.Generator().manual_seed(n * 1000 + c)
    ws = [torch.randn(c, c, 3, 3, generator=g) * (2.0 / (9 * c)) ** 0.5 for _ in range(n)]
    return ws, [ConvSpec(hw, padding=1) for _ in ws], 5, False


def progress(i, total, label):
    width = 30
    done = int(width * i / total)
    sys.stdout.write(f"\r# [{'#' * done}{'.' * (width - done)}] {i}/{total} {label:<24}")
    sys.stdout.flush()
    if i == total:
        sys.stdout.write("\n")


def plot_sweep(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# --plot needs matplotlib (pip install matplotlib); no plot written")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for (c, prov), pts in sorted(_group_sweep(rows).items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{prov}, width {c}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("layers")
    ax.set_ylabel("speedup over the naive loop")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"# plot written to {path}")


def _group_sweep(rows):
    out = {}
    for r in rows:
        if r["provider"].split("+")[0] != "naive":
            out.setdefault((r["width"], r["provider"]), []).append((r["n_layers"], r["speedup"]))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="toy", choices=["toy", "resnet18", "mlp", "sweep"])
    p.add_argument("--mode", default="both", choices=["forward", "backward", "both"])
    p.add_argument("--device", default="auto")
    p.add_argument("--scale", default="auto", choices=["auto", "cpu", "full"],
                   help="cpu: the shrunk CPU sizes; auto: cpu on CPU, full on GPU")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--providers", default="auto",
                   help="comma list of naive,grouped,torch_sn,grouped_compile,"
                        "grouped_cudagraph,deel_torchlip,orthogonium,lipkern,lipkern_torch,"
                        "lipkern_triton,lipkern_cpp,lipkern_cuda,lipkern_grouped (auto: what "
                        "runs here)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 rep, no warmup")
    p.add_argument("--plot", default=None, help="sweep: write a PNG of speedup vs layers")
    p.add_argument("--trace", default=None, help="write a torch.profiler trace (JSON)")
    p.add_argument("--graph", action="store_true",
                   help="time every provider as a CUDA-graph replay of its step (GPU only)")
    p.add_argument("--out", default=os.path.join(RESULTS, "power_iter.jsonl"))
    p.add_argument("--no-save", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.reps, a.warmup = 1, 0

    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if a.device == "auto" else a.device))
    if a.graph and device.type != "cuda":
        print(f"# --graph times CUDA-graph replays and needs a CUDA device; this run is on "
              f"{device.type}: nothing measured", file=sys.stderr)
        return None
    scale = a.scale if a.scale != "auto" else ("full" if device.type == "cuda" else "cpu")
    vers = versions()
    names = default_providers(device) if a.providers == "auto" else a.providers.split(",")
    peak, bw, lat = peak_gflops(device), peak_bandwidth_gbs(device), launch_latency_us(device)
    print(f"# device: {device_name(device)}; " + ", ".join(f"{k} {v}" for k, v in vers.items()))

    if a.workload == "sweep":
        configs = sweep_configs(scale)
        if a.quick:
            configs = configs[:2]
        rows = []
        for i, (n, c, hw) in enumerate(configs):
            progress(i, len(configs), f"{n} layers, width {c}")
            ws, specs, n_iters, warm = sweep_workload(n, c, hw)
            ws = [w.to(device) for w in ws]
            got = measure(ws, specs, n_iters, warm, names, device, a.mode, a.reps, a.warmup)
            base = next(r["median_ms"] for r in got
                        if r["provider"].split("+")[0] == "naive")
            for r in got:
                r.update(n_layers=n, width=c, hw=hw, speedup=base / r["median_ms"],
                         workload="sweep", sigmas=None)
            rows += got
        progress(len(configs), len(configs), "done")
        print(f"# sweep: conv 3x3, width x width at {configs[0][2]}x{configs[0][2]}, "
              f"5 iterations, mode={a.mode}; speedup over the naive loop")
        naive = next(r["provider"] for r in rows if r["provider"].split("+")[0] == "naive")
        provs = [n for n in dict.fromkeys(r["provider"] for r in rows) if n != naive]
        print("| layers | width | naive ms | " + " | ".join(provs) + " |")
        print("|---:|---:|---:|" + "---:|" * len(provs))
        for (n, c, _) in configs:
            sub = {r["provider"]: r for r in rows if r["n_layers"] == n and r["width"] == c}
            print(f"| {n} | {c} | {sub[naive]['median_ms']:.2f} | " + " | ".join(
                f"{sub[q]['speedup']:.2f}x" if q in sub else "-" for q in provs) + " |")
        if a.plot:
            plot_sweep(rows, a.plot)
    else:
        ws, specs, n_iters, warm = workload(a.workload, device, scale)
        print(f"# lipkern bench: {a.workload} ({scale} scale), {len(ws)} layers, {n_iters} "
              f"iters{' (warm start)' if warm else ''}, mode={a.mode}")
        rows = measure(ws, specs, n_iters, warm, names, device, a.mode, a.reps, a.warmup,
                       trace=a.trace, graph=a.graph)
        fl = flops(ws, specs, n_iters, a.mode)
        nbytes = min_bytes(ws, a.mode)
        floor_ms = print_table(rows, fl, nbytes, peak, bw, lat,
                               launches=1 if a.mode != "both" else 2)
        sig_ref = next((r["sigmas"] for r in rows if r["provider"] == "naive"), None)
        lk = next((r for r in rows if r["provider"].startswith("lipkern") and r["sigmas"]),
                  None)
        if lk is not None:
            sig = torch.tensor(lk["sigmas"])
            print(f"\n# lipkern ({lk['provider']}): per-layer sigma estimates after {n_iters} "
                  f"iterations (conv layers: the true operator norm at their input size)")
            print("  " + " ".join(f"{s:.4f}" for s in sig.tolist()))
            print(f"# network Lipschitz upper bound (product): {float(sig.prod()):.6g}  "
                  f"(log {float(sig.log().sum()):.4f})")
            if sig_ref is not None:
                ref = torch.tensor(sig_ref)
                print(f"# max relative difference from the naive loop's sigmas: "
                      f"{float(((sig - ref) / ref).abs().max()):.2e}")
        for r in rows:
            r.update(workload=a.workload, scale=scale, n_layers=len(ws), n_iters=n_iters,
                     gflop=fl / 1e9, mbytes=nbytes / 1e6, floor_ms=floor_ms)

    if not a.no_save:
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with open(a.out, "a") as f:
            for r in rows:
                f.write(json.dumps(dict(date=stamp, device=device_name(device), **vers,
                                        mode=a.mode, peak_gflops=peak, peak_gbs=bw,
                                        launch_us=lat, **dict(r, sigmas=None))) + "\n")
        print(f"# rows appended to {os.path.relpath(a.out)}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
