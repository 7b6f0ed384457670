"""Spectral normalization on the conv nets people train (issue 16), per training step.

    python bench/bench_spectral_norm.py --workload convnets      (the done-criterion run)

Models (bench/models.py, the public shapes): the SNGAN CNN critic and ResDiscriminator32
(32x32, D steps), WideResNet-10-2 and -16-4 as in DUE (32x32, classifier steps). Steps:
  d_step   hinge loss on D(real) and D(fake): two forwards before one backward, SGD
  gp_step  WGAN-GP: D(fake) - D(real) + 10 (||d D(x_hat)/d x_hat|| - 1)^2, the penalty
           differentiated again (create_graph=True): three forwards, double backward
  clf_step cross-entropy, one forward, one backward, SGD
Providers, one process, round-robin (every rep times each provider once, in turn), same
weights and inputs:
  plain            the unnormalized model
  torch_sn         torch.nn.utils.parametrizations.spectral_norm on every layer (matrix)
  lk_per_layer     lipkern.nn.spectral_norm on every layer (matrix)
  lipkern          lipkern.nn.spectral_norm_model, strategy "auto" (matrix)
  lk_scaled        strategy "scaled_outputs" (every layer scales its outputs; the old default)
  lk_divided       strategy "mixed" with every layer dividing its weight
  lk_op            spectral_norm_model(mode="operator"), strategy "auto": the conv operator
                   (power_iteration "auto" = "per_update" there: one iteration per update)
  lk_update        spectral_norm_model(power_iteration="per_update") (matrix)
  lk_op_forward    operator mode with power_iteration="per_forward" (torch's rule)
  lk_op_per_layer  lipkern.nn.spectral_norm(mode="operator") on every conv
  plain_compiled, lipkern_compiled  (--compile; not for gp_step: a compiled graph refuses
                   double backward) torch.compile(model), inductor
Overhead = the median over reps of (provider's step - plain's step in the same rep): paired,
so the machine's drift cancels. Verdict per model (issue 16's done criterion): matrix --
lipkern's overhead below torch_sn's; operator -- lk_op's overhead at most
max(2 x torch_sn's overhead, 10% of plain's step).
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import lipkern
import models

CONVNETS = {  # name: (builder, batch, steps)
    "sngan": (models.SNGANCritic, 16, ("d_step", "gp_step")),
    "resd32": (models.ResDiscriminator32, 8, ("d_step", "gp_step")),
    "wrn10_2": (models.wrn_10_2, 16, ("clf_step",)),
    "wrn16_4": (models.wrn_16_4, 8, ("clf_step",)),
}
TYPES = (nn.Conv2d, nn.Linear)


def _layers(model):
    return [m for m in model.modules() if isinstance(m, TYPES)]


def _input_sizes(model, x):
    sizes = {}

    def hook(m, a):
        sizes.setdefault(m, tuple(a[0].shape[1:]))
    hs = [m.register_forward_pre_hook(hook) for m in _layers(model)]
    with torch.no_grad():
        model.eval()(x)
    model.train()
    for h in hs:
        h.remove()
    return sizes


def providers(base, x, compiled=False):
    """name -> the normalized copy of base (``compiled``: also plain and lipkern under
    torch.compile, inductor)."""
    def per_layer(fn, **kw):
        m = copy.deepcopy(base)
        for layer in _layers(m):
            fn(layer, **kw)
        return m

    def op_per_layer():
        m = copy.deepcopy(base)
        sizes = _input_sizes(m, x)
        for layer in _layers(m):
            if isinstance(layer, nn.Conv2d):
                lipkern.nn.spectral_norm(layer, mode="operator", input_size=sizes[layer][1:])
            else:
                lipkern.nn.spectral_norm(layer)
        return m

    def divided():
        m = lipkern.nn.spectral_norm_model(copy.deepcopy(base), strategy="mixed")
        m._lipkern_spectral_norm.strategies["mixed"].scale_below = 0.0
        return m

    snm = lipkern.nn.spectral_norm_model
    out = {
        "plain": lambda: copy.deepcopy(base),
        "torch_sn": lambda: per_layer(torch.nn.utils.parametrizations.spectral_norm),
        "lk_per_layer": lambda: per_layer(lipkern.nn.spectral_norm),
        "lipkern": lambda: snm(copy.deepcopy(base)),
        "lk_scaled": lambda: snm(copy.deepcopy(base), strategy="scaled_outputs"),
        "lk_divided": divided,
        "lk_op": lambda: snm(copy.deepcopy(base), x[:1], mode="operator"),
        # one power iteration per weight update (the forwards of a step share the call)
        "lk_update": lambda: snm(copy.deepcopy(base), power_iteration="per_update"),
        # operator mode with torch's rule (an iteration every training forward)
        "lk_op_forward": lambda: snm(copy.deepcopy(base), x[:1], mode="operator",
                                     power_iteration="per_forward"),
        "lk_op_per_layer": op_per_layer,
    }
    if compiled:
        out["plain_compiled"] = lambda: torch.compile(copy.deepcopy(base))
        out["lipkern_compiled"] = lambda: torch.compile(snm(copy.deepcopy(base)))
    return out


def make_step(kind, model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    fake = torch.randn_like(x)
    if kind == "clf_step":
        def step():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    elif kind == "d_step":
        def step():  # two forwards before one backward (hinge loss)
            opt.zero_grad()
            (F.relu(1 - model(x)).mean() + F.relu(1 + model(fake)).mean()).backward()
            opt.step()
    else:
        alpha = torch.rand(x.shape[0], 1, 1, 1)

        def step():  # WGAN-GP
            opt.zero_grad()
            xh = (alpha * x + (1 - alpha) * fake).requires_grad_(True)
            g, = torch.autograd.grad(model(xh).sum(), xh, create_graph=True)
            gp = (g.flatten(1).norm(dim=1) - 1).square().mean()
            (model(fake).mean() - model(x).mean() + 10 * gp).backward()
            opt.step()
    return step


def measure(name, kind, reps, warmup, batch=None, compiled=False, clock="wall", only=None):
    """One (model, step) row; ``only``: provider names to time (plain always runs: the
    overheads are paired against it)."""
    build, default_batch, _ = CONVNETS[name]
    batch = batch or default_batch
    torch.manual_seed(0)
    base = build()
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    steps, errors = {}, {}
    for pname, make in providers(base, x, compiled and kind != "gp_step").items():
        if only is not None and pname != "plain" and pname not in only:
            continue
        try:
            torch.manual_seed(1)
            f = make_step(kind, make(), x, y)
            for _ in range(warmup):
                f()
            steps[pname] = f
        except Exception as e:  # a provider that cannot run this step: reported, not timed
            errors[pname] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    # "thread": CPU time of this thread (with --threads 1 all the work runs on it): on a
    # shared machine wall time mostly measures the other processes
    now = time.thread_time if clock == "thread" else time.perf_counter
    times = {n: [] for n in steps}
    for _ in range(reps):
        for n, f in steps.items():
            t0 = now()
            f()
            times[n].append(now() - t0)
    plain = times["plain"]
    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    over = {n: statistics.median([a - b for a, b in zip(t, plain)]) * 1e3
            for n, t in times.items()}
    return dict(workload=name, step=kind, batch=batch, layers=len(_layers(base)),
                median_ms=med, overhead_ms=over, errors=errors, reps=reps, clock=clock,
                threads=torch.get_num_threads())


def verdict(row):
    """Issue 16's done criterion for one (model, step) row: (matrix ok, operator ok, text)."""
    o, plain = row["overhead_ms"], row["median_ms"]["plain"]
    if "torch_sn" not in o or "lipkern" not in o:
        return False, False, "not measured: " + str(row["errors"])
    m_ok = o["lipkern"] < o["torch_sn"]
    limit = max(2 * o["torch_sn"], 0.1 * plain)
    op_ok = "lk_op" in o and o["lk_op"] <= limit
    text = (f"matrix {'PASS' if m_ok else 'FAIL'} (lipkern {o['lipkern']:+.1f} ms vs torch "
            f"{o['torch_sn']:+.1f} ms); operator {'PASS' if op_ok else 'FAIL'} (lk_op "
            f"{o.get('lk_op', float('nan')):+.1f} ms <= {limit:.1f} ms)")
    if "lk_op_forward" in o:
        text += (f"; operator per_forward {'PASS' if o['lk_op_forward'] <= limit else 'FAIL'} "
                 f"({o['lk_op_forward']:+.1f} ms)")
    return m_ok, op_ok, text


def print_row(row, strategy):
    print(f"\n{row['workload']} {row['step']}: {row['layers']} normalized layers, batch "
          f"{row['batch']}, {row['reps']} reps; lipkern = strategy {strategy!r}")
    print(f"{'provider':16s} {'step ms':>9s} {'overhead ms':>12s} {'% of plain':>11s}")
    plain = row["median_ms"]["plain"]
    for n, t in row["median_ms"].items():
        ov = row["overhead_ms"][n]
        print(f"{n:16s} {t:9.1f} {ov:+12.1f} {100 * ov / plain:+10.1f}%")
    for n, e in row["errors"].items():
        print(f"{n:16s} {'(cannot run: ' + e + ')'}")
    print("verdict:", verdict(row)[2])


def resolved(name):
    torch.manual_seed(0)
    m = lipkern.nn.spectral_norm_model(CONVNETS[name][0]())
    return m._lipkern_spectral_norm.resolved_strategy()
