"""Small forward + backward of every layer kind on every GPU backend, meant to run under
``compute-sanitizer --tool memcheck`` (bench/gpu_session.sh): an out-of-bounds read or write in
a kernel is reported there even when the numbers happen to come out right. Also checks the
numbers against the float64 reference, so it is useful on its own:

    python bench/gpu_smoke.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import lipkern  # noqa: E402
from layers import MIXED, make_weights  # noqa: E402


def main():
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    bad = 0
    for backend in ("triton", "cuda"):
        if backend not in lipkern.available_backends("cuda"):
            print(f"{backend}: not available here")
            continue
        for variant in ("power", "spectral_norm"):
            for dtype in (torch.float32, torch.bfloat16):
                ws, specs = make_weights(MIXED, dtype, "cuda", seed=3)
                ws = [w.requires_grad_() for w in ws]
                gen = torch.Generator().manual_seed(0)
                r = lipkern.fused_power_iter(ws, specs, n_iters=3, backend=backend,
                                             generator=gen, variant=variant)
                (r.sigmas.sum() + 1e-8 * r.lipschitz).backward()
                want = lipkern.reference.power_iter(
                    [w.detach().double() for w in ws], specs, n_iters=3, variant=variant,
                    generator=torch.Generator().manual_seed(0))
                err = float(((r.sigmas.detach().double() - want.sigmas).abs()
                             / want.sigmas.abs().clamp_min(1e-6)).max())
                finite = all(bool(torch.isfinite(w.grad).all()) for w in ws)
                ok = err < 1e-3 and finite
                bad += not ok
                print(f"{backend:6s} {variant:13s} {str(dtype):15s} max rel err {err:.2e} "
                      f"grads finite {finite} {'ok' if ok else 'FAIL'}")
    # lipkern.fused_normalize: the forward writing W / sigma, and its one-launch backward
    if "triton" in lipkern.available_backends("cuda"):
        for dtype in (torch.float32, torch.bfloat16):
            ws, specs = make_weights(MIXED, dtype, "cuda", seed=4)
            ws = [w.requires_grad_() for w in ws]
            r = lipkern.fused_normalize(ws, specs, n_iters=2, backend="triton",
                                        variant="spectral_norm",
                                        generator=torch.Generator().manual_seed(0))
            sum((wh.float() * (i + 1)).sum() for i, wh in enumerate(r.weights)).backward()
            want = lipkern.reference.normalize(
                [w.detach().double() for w in ws], specs, n_iters=2, variant="spectral_norm",
                generator=torch.Generator().manual_seed(0))
            err = max(float((a.double() - b).abs().max() / b.abs().max())
                      for a, b in zip(r.weights, want.weights))
            finite = all(bool(torch.isfinite(w.grad).all()) for w in ws)
            ok = err < (1e-5 if dtype == torch.float32 else 1e-2) and finite
            bad += not ok
            print(f"triton normalize     {str(dtype):15s} max rel err {err:.2e} "
                  f"grads finite {finite} {'ok' if ok else 'FAIL'}")
    torch.cuda.synchronize()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
