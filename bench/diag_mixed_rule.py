"""Where "mixed" should scale a layer's outputs rather than divide its weight (issue 16).

    python bench/diag_mixed_rule.py [--reps N]

For every distinct conv/linear layer of the four benchmark conv nets (at the batch sizes of
bench_convnets.py), one-layer training steps (forward + backward) of the layer alone, round
robin: plain, spectral_norm_model "mixed" forced to divide the weight, and forced to scale
the outputs. Prints each layer's out_numel / w_numel and the two overheads over plain; the
threshold of Mixed (SCALE_OUTPUTS_BELOW) is where the sign of (divide - scale) flips.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_convnets  # noqa: E402
import lipkern  # noqa: E402
from lipkern.nn.strategies import out_numel  # noqa: E402


def layer_shapes():
    """(layer, input shape) for every distinct normalized layer of the four models."""
    seen, out = set(), []
    for name, (build, batch, _) in bench_convnets.CONVNETS.items():
        torch.manual_seed(0)
        model = build()
        shapes = {}

        def hook(m, a):
            shapes.setdefault(m, tuple(a[0].shape))
        hs = [m.register_forward_pre_hook(hook) for m in bench_convnets._layers(model)]
        with torch.no_grad():
            model.eval()(torch.randn(batch, 3, 32, 32))
        for h in hs:
            h.remove()
        for m, shp in shapes.items():
            key = (repr(m), shp)
            if key not in seen:
                seen.add(key)
                out.append((m, shp))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    print(f"{'layer':58s} {'input':>18s} {'out/w':>8s} {'divide ms':>10s} {'scale ms':>9s}")
    for layer, shp in layer_shapes():
        x = torch.randn(shp, requires_grad=False)
        plain = copy.deepcopy(layer)
        models = {"plain": plain}
        for label, below in (("divide", 0.0), ("scale", float("inf"))):
            m = lipkern.nn.spectral_norm_model(nn.Sequential(copy.deepcopy(layer)),
                                               strategy="mixed")
            m._lipkern_spectral_norm.strategies["mixed"].scale_below = below
            models[label] = m
        steps = {k: (lambda m=m: m(x).square().mean().backward()) for k, m in models.items()}
        for f in steps.values():
            f()
        t = {k: [] for k in steps}
        for _ in range(args.reps):
            for k, f in steps.items():
                t0 = time.perf_counter()
                f()
                t[k].append(time.perf_counter() - t0)
        over = {k: statistics.median([a - b for a, b in zip(t[k], t["plain"])]) * 1e3
                for k in ("divide", "scale")}
        ratio = out_numel(layer, x) / layer.weight.numel()
        print(f"{repr(layer)[:58]:58s} {str(shp):>18s} {ratio:8.2f} {over['divide']:+10.2f} "
              f"{over['scale']:+9.2f}")


if __name__ == "__main__":
    main()
