"""Accuracy table: the sigma each provider reports for the conv layers of a workload, against
the true operator norm, as relative error (negative: below the true norm, i.e. not a bound).

    python bench/bench_accuracy.py --workload toy|resnet18 [--quick]

Providers: torch's spectral_norm quantity (the reshaped kernel's norm, what
torch.nn.utils.parametrizations.spectral_norm divides by), the reshaped norm times the
kernel size (a common "safe" correction), deel-torchlip and orthogonium when installed
(optional), and lipkern's operator mode after 1, 5 and 20 iterations. The reference is the
exact SVD of the dense operator where it fits in memory, else lipkern run to convergence
(1000 iterations, noted in the table). Markdown on stdout, JSON rows appended to
bench/results/accuracy.jsonl.
"""
import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lipkern  # noqa: E402
from bench_power_iter import RESULTS, device_name, versions, workload  # noqa: E402
from lipkern.reference import EXACT_MAX_ELEMENTS, exact_sigma  # noqa: E402
from lipkern.spec import resolve_geometry  # noqa: E402

EXACT_DIM = 4096  # exact SVD when the operator (per group) is at most this wide


def reference_sigmas(ws, specs, gen_seed=0):
    out, how = [], []
    for w, s in zip(ws, specs):
        g = resolve_geometry(tuple(w.shape), s, "w")
        if g.in_numel // g.groups <= EXACT_DIM and \
                g.in_numel * max(g.in_numel, g.out_numel) <= EXACT_MAX_ELEMENTS:
            out.append(float(exact_sigma(w.cpu(), s)))
            how.append("exact SVD")
        else:
            r = lipkern.fused_power_iter([w.double().cpu()], [s], n_iters=1000, tol=1e-12,
                                         generator=torch.Generator().manual_seed(gen_seed))
            out.append(float(r.sigmas[0]))
            how.append("1000 iterations")
    return torch.tensor(out, dtype=torch.float64), how


def optional_providers(ws, specs):
    """Estimates of the optional libraries, if installed (pip install -e ".[bench]"):

    * deel-torchlip: its Lipschitz convs rescale the reshaped kernel (spectral norm 1) by
      ``compute_lconv_coef`` (arXiv:2006.06520) and take the result as 1-Lipschitz, i.e. they
      use ``||reshaped|| / coef`` as the conv's constant;
    * orthogonium: ``get_conv_sv``, Gram iteration (Delattre et al. 2024), a certified upper
      bound of the operator norm (4 iterations, its default).
    """
    out = {}
    try:
        from deel.torchlip.utils.lconv_norm import compute_lconv_coef
        out["deel-torchlip (reshaped / lconv coef)"] = torch.stack([
            torch.linalg.matrix_norm(w.double().reshape(w.shape[0], -1), 2)
            / float(compute_lconv_coef(tuple(w.shape[-2:]), s.input_size, s.stride,
                                       s.padding_mode))
            for w, s in zip(ws, specs)])
    except ImportError:
        pass
    try:
        from orthogonium.layers.conv.singular_values.get_sv import get_conv_sv
        vals = []
        for w, s in zip(ws, specs):
            conv = torch.nn.Conv2d(w.shape[1] * s.groups, w.shape[0], tuple(w.shape[-2:]),
                                   stride=s.stride, padding=s.padding, groups=s.groups,
                                   padding_mode=s.padding_mode, bias=False)
            with torch.no_grad():
                conv.weight.copy_(w)
            vals.append(float(get_conv_sv(conv, n_iter=4, return_stab_rank=False,
                                          imsize=s.input_size[0])))
        out["orthogonium (Gram iteration bound, 4 it)"] = torch.tensor(vals,
                                                                        dtype=torch.float64)
    except ImportError:
        pass
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="toy", choices=["toy", "resnet18"])
    p.add_argument("--scale", default="cpu", choices=["cpu", "full"])
    p.add_argument("--quick", action="store_true", help="first 3 conv layers only")
    p.add_argument("--no-save", action="store_true")
    a = p.parse_args(argv)
    ws, specs, _, _ = workload(a.workload, torch.device("cpu"), a.scale)
    convs = [(w, s) for w, s in zip(ws, specs) if s is not None]
    if a.quick:
        convs = convs[:3]
    ws, specs = [w for w, _ in convs], [s for _, s in convs]
    print(f"# lipkern accuracy: {a.workload} ({a.scale} scale), {len(ws)} conv layers")
    print(f"# device: {device_name(torch.device('cpu'))}; "
          + ", ".join(f"{k} {v}" for k, v in versions().items()))
    truth, how = reference_sigmas(ws, specs)
    est = {}
    reshaped = torch.stack([torch.linalg.matrix_norm(w.double().reshape(w.shape[0], -1), 2)
                            for w in ws])
    est["torch spectral_norm (reshaped kernel)"] = reshaped
    # ||conv operator|| <= sqrt(kh * kw) * ||reshaped kernel|| (stride 1): the usual safe bound
    est["reshaped x sqrt(kh*kw) (a safe upper bound)"] = reshaped * torch.tensor(
        [(w.shape[-1] * w.shape[-2]) ** 0.5 for w in ws], dtype=torch.float64)
    for n in (1, 5, 20):
        r = lipkern.fused_power_iter(ws, specs, n_iters=n,
                                     generator=torch.Generator().manual_seed(1))
        est[f"lipkern operator, {n} it"] = r.sigmas.detach().double()
    optional = optional_providers(ws, specs)
    est.update(optional)
    missing = [name for name in ("deel-torchlip", "orthogonium")
               if not any(k.startswith(name) for k in optional)]
    print(f"# reference: {', '.join(sorted(set(how)))}")
    print("| provider | median rel. error | max rel. error | signed mean |")
    print("|---|---:|---:|---:|")
    rows = []
    for name, v in est.items():
        rel = (v - truth) / truth
        row = dict(provider=name, median_abs_rel=float(rel.abs().median()),
                   max_abs_rel=float(rel.abs().max()), mean_signed_rel=float(rel.mean()))
        rows.append(row)
        print(f"| {name} | {row['median_abs_rel']:.2e} | {row['max_abs_rel']:.2e} | "
              f"{row['mean_signed_rel']:+.2e} |")
    if missing:
        print(f"# not installed (optional providers): {', '.join(missing)}")
    if not a.no_save:
        os.makedirs(RESULTS, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with open(os.path.join(RESULTS, "accuracy.jsonl"), "a") as f:
            for r in rows:
                f.write(json.dumps(dict(date=stamp, workload=a.workload, scale=a.scale,
                                        n_layers=len(ws), reference=sorted(set(how)),
                                        **versions(), **r)) + "\n")
    return rows


if __name__ == "__main__":
    main()
