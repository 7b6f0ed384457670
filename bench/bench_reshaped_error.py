"""The reshaped-kernel error on real layers: how far torch's spectral_norm quantity (the norm
of the kernel reshaped to (C_out, -1)) is from the layer's true Lipschitz constant (the
operator norm of the convolution at its input size), for the conv shapes of the models users
normalize (SNGAN/DCGAN critics, CIFAR ResNet/WideResNet blocks, first RGB layers), at
PyTorch's default init, several seeds.

    python bench/bench_reshaped_error.py [--seeds 3] [--iters 300]

Error = (reshaped - operator) / operator: negative means the reshaped norm is BELOW the true
constant, i.e. a layer "normalized" by it has operator norm 1 / (1 + error) > 1. Operator
norms by lipkern's conv-operator power iteration in float64 (600 iterations, tol 1e-12; within 0.1% of
the exact SVD on the 8x8 layer; from below, so the errors are if anything understated). Markdown on stdout, JSON to
bench/results/reshaped_error.jsonl.
"""
import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lipkern  # noqa: E402
from lipkern.reference import exact_sigma  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# (name, in, out, kernel, stride, padding, input size)
LAYERS = [
    ("1x1, 64->128, 16x16 (ResNet shortcut)", 64, 128, 1, 1, 0, 16),
    ("3x3 s1, 64->64, 32x32 (ResNet/WRN block)", 64, 64, 3, 1, 1, 32),
    ("3x3 s1, 128->128, 16x16 (ResNet/WRN block)", 128, 128, 3, 1, 1, 16),
    ("3x3 s1, 8->8, 8x8 (small; exact SVD check)", 8, 8, 3, 1, 1, 8),
    ("3x3 s2, 64->128, 32x32 (ResNet downsample)", 64, 128, 3, 2, 1, 32),
    ("4x4 s2, 64->128, 32x32 (DCGAN/SNGAN critic)", 64, 128, 4, 2, 1, 32),
    ("4x4 s2, 128->256, 16x16 (DCGAN/SNGAN critic)", 128, 256, 4, 2, 1, 16),
    ("3x3 s1, 3->64, 32x32 (first RGB layer)", 3, 64, 3, 1, 1, 32),
    ("4x4 s2, 3->64, 64x64 (DCGAN first layer)", 3, 64, 4, 2, 1, 64),
]


def operator_sigma(w, spec, iters):
    r = lipkern.fused_power_iter([w.double()], [spec], n_iters=iters, tol=1e-12,
                                 generator=torch.Generator().manual_seed(0))
    return float(r.sigmas[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=600)
    ap.add_argument("--only", default="", help="comma-separated row indices of LAYERS")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch {torch.__version__}, lipkern backend {lipkern.backends.resolve_backend('auto', torch.device('cpu'), torch.float64)}, "
          f"{torch.get_num_threads()} threads, CPU, {datetime.date.today()}")
    rows = []
    print("\n| layer | reshaped error vs operator norm (per seed) |\n|---|---|")
    only = {int(i) for i in args.only.split(",") if i}
    for j, (name, cin, cout, k, s, p, n) in enumerate(LAYERS):
        if only and j not in only:
            continue
        errs = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            w = nn.Conv2d(cin, cout, k, stride=s, padding=p).weight.detach()
            spec = lipkern.ConvSpec(n, stride=s, padding=p)
            op = operator_sigma(w, spec, args.iters)
            if n <= 8:
                ex = float(exact_sigma(w, spec))
                assert abs(op - ex) <= 1e-3 * ex, (op, ex)  # converged to 0.1%
            reshaped = float(torch.linalg.matrix_norm(w.double().reshape(cout, -1), 2))
            errs.append((reshaped - op) / op)
        rows.append(dict(layer=name, cin=cin, cout=cout, kernel=k, stride=s, padding=p,
                         input=n, errors=errs))
        print(f"| {name} | " + ", ".join(f"{100 * e:+.1f}%" for e in errs) + " |", flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    out = dict(date=str(datetime.date.today()), torch=torch.__version__,
               machine="CPU (shared 2-core dev machine)", iters=args.iters, init="PyTorch default",
               rows=rows)
    with open(os.path.join(RESULTS, "reshaped_error.jsonl"), "a") as f:  # one run per line
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
