"""Host time of the fused-weights path (GPU diagnostic; bench/NOTES.md):

1. lipkern::normalize alone, against a no-op op with the same 100-tensor list input (what the
   op registration costs, apart from our own launcher);
2. fused_normalize, forward and forward + backward;
3. a spectral_norm_model training step with Python's cyclic GC enabled, disabled and frozen.

    python bench/diag_host.py
"""
import copy
import gc
import os
import statistics
import sys
import time

from typing import List

import torch

import lipkern
from lipkern.layout import layout_for
from lipkern.ops.normalize import normalize_op

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_spectral_norm import mlp, step_fn  # noqa: E402


def host_ms(fn, n=30):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
    return statistics.median(ts) * 1e3


@torch.library.custom_op("lipkern_diag::noop", mutates_args=())
def noop(ws: List[torch.Tensor]) -> torch.Tensor:
    return ws[0].new_empty(1)


noop.register_fake(lambda ws: ws[0].new_empty(1))
noop.register_autograd(lambda ctx, g: [None] * ctx.n, setup_context=lambda ctx, inputs, output:
                       setattr(ctx, "n", len(inputs[0])))


def main():
    g = torch.Generator().manual_seed(0)
    ws = [(torch.randn(512, 512, generator=g) / 512 ** 0.5).cuda().requires_grad_()
          for _ in range(100)]
    lay = layout_for(tuple((512, 512) for _ in ws), (None,) * 100)
    args = (torch.randn(lay.total_x, device="cuda"), torch.randn(lay.total_y, device="cuda"),
            list(lay.meta), 1, 1e-12, -1.0)
    print(f"noop op, 100 inputs, grad:    {host_ms(lambda: noop(ws)):.3f} ms")
    with torch.no_grad():
        print(f"noop op, 100 inputs, no grad: {host_ms(lambda: noop(ws)):.3f} ms")
        print(f"normalize_op, no grad:        {host_ms(lambda: normalize_op(ws, *args)):.3f} ms")
    print(f"normalize_op, grad:           {host_ms(lambda: normalize_op(ws, *args)):.3f} ms")
    st = lipkern.fused_power_iter(ws, n_iters=2, variant="spectral_norm").state
    kw = dict(n_iters=1, state=st, variant="spectral_norm", check_finite=False)
    with torch.no_grad():
        print(f"fused_normalize fwd, no grad: {host_ms(lambda: lipkern.fused_normalize(ws, **kw)):.3f} ms")
    print(f"fused_normalize fwd, grad:    {host_ms(lambda: lipkern.fused_normalize(ws, **kw)):.3f} ms")

    def fb():
        r = lipkern.fused_normalize(ws, **kw)
        torch.autograd.grad(sum(w.sum() for w in r.weights[:1]) + r.weights[1].sum(), ws[:2])
    print(f"fused_normalize fwd+bwd:      {host_ms(fb):.3f} ms")
    torch.manual_seed(0)
    base = mlp().cuda()
    x = torch.randn(8, 512, device="cuda")
    steps = {"plain": step_fn(copy.deepcopy(base), x),
             "lipkern": step_fn(lipkern.nn.spectral_norm_model(copy.deepcopy(base)), x)}
    for mode in ("gc on", "gc off", "gc frozen"):
        if mode == "gc off":
            gc.disable()
        if mode == "gc frozen":
            gc.enable()
            gc.collect()
            gc.freeze()
        print(mode, {n: round(host_ms(f), 2) for n, f in steps.items()})


if __name__ == "__main__":
    main()
