"""Where the time of the fused kernels goes on dense layers (GPU diagnostic; see NOTES).

    python bench/diag_dense.py

1. kernel time (CUDA events, median of 20) of the Triton forward for L = 1, 10, 100 layers of
   512x512, 1 iteration: equal times mean programs run concurrently and each is latency-bound;
   time growing with L means they serialize;
2. the same for a few tile shapes / warp counts (module constants patched at run time);
3. registers, spills and shared memory of the compiled kernels;
4. a profiler table of one spectral_norm_model training step (MLP 100 x 512): where the
   host and device time of the normalization goes (--profile);
5. cProfile of 20 such steps, plain and lipkern (--cprofile): host time by Python function.
"""
import argparse
import cProfile
import pstats
import statistics

import torch

import lipkern
from lipkern.triton_kernels import normalize as nk
from lipkern.triton_kernels import power_iter as k


def cuda_time(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def dense(L, n=512):
    g = torch.Generator().manual_seed(0)
    ws = [(torch.randn(n, n, generator=g) / n ** 0.5).cuda() for _ in range(L)]
    st = lipkern.fused_power_iter(ws, n_iters=3, backend="triton").state
    return ws, st


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--cprofile", action="store_true")
    args = ap.parse_args()
    print("# device:", torch.cuda.get_device_name(), "torch", torch.__version__)
    for variant in ("power", "spectral_norm"):
        for L in (1, 10, 100):
            ws, st = dense(L)
            if variant == "spectral_norm":
                st = lipkern.fused_power_iter(ws, n_iters=1, state=st, backend="triton",
                                              variant=variant).state
            t = cuda_time(lambda: lipkern.fused_power_iter(
                ws, n_iters=1, state=st, backend="triton", check_finite=False,
                variant=variant))
            print(f"fwd {variant:13s} L={L:3d}: {t * 1e3:8.1f} us "
                  f"({L * 512 * 512 * 4 * 2 / (t * 1e-3) / 1e9:6.1f} GB/s of 2 weight reads)")
    ws, st = dense(100)
    st = lipkern.fused_power_iter(ws, n_iters=1, state=st, backend="triton",
                                  variant="spectral_norm").state
    leaves = [w.clone().requires_grad_() for w in ws]
    r = lipkern.fused_normalize(leaves, n_iters=1, state=st, backend="triton",
                                check_finite=False, variant="spectral_norm")
    what = torch.cat([w.reshape(-1) for w in r.weights]).detach()
    gw = torch.randn_like(what)
    lay = lipkern.layout.layout_for(tuple((512, 512) for _ in ws), (None,) * 100)
    t = cuda_time(lambda: nk.backward(ws, r.state.x, r.state.u, r.sigmas.detach(), None, gw,
                                      lay))
    print(f"normalize bwd L=100: {t * 1e3:8.1f} us")
    t = cuda_time(lambda: lipkern.fused_normalize(leaves, n_iters=1, state=st,
                                                  backend="triton", check_finite=False,
                                                  variant="spectral_norm"))
    print(f"normalize fwd L=100: {t * 1e3:8.1f} us")

    base = dict(BLOCK_M=k.BLOCK_M, BLOCK_N=k.BLOCK_N)
    for bm, bn in ((32, 64), (16, 128), (8, 256), (64, 128)):
        k.BLOCK_M, k.BLOCK_N = bm, bn
        t = cuda_time(lambda: lipkern.fused_power_iter(ws, n_iters=1, state=st,
                                                       backend="triton", check_finite=False,
                                                       variant="spectral_norm"))
        print(f"fwd sn L=100 BLOCK_M={bm} BLOCK_N={bn}: {t * 1e3:8.1f} us")
    k.BLOCK_M, k.BLOCK_N = base["BLOCK_M"], base["BLOCK_N"]

    for kern in (k.power_iter_fwd_kernel, k.power_iter_bwd_kernel, nk.normalize_bwd_kernel):
        try:
            for dev_cache in kern.device_caches.values():
                for key, c in dev_cache[0].items():
                    print(f"{kern.fn.__name__}: regs {c.n_regs} spills {c.n_spills} "
                          f"shared {c.metadata.shared} warps {c.metadata.num_warps}")
        except Exception as e:  # noqa: BLE001 - version-dependent internals
            print(f"{kern.fn.__name__}: no compile info ({type(e).__name__}: {e})")

    import copy
    import sys
    import os
    import time
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_spectral_norm import mlp, step_fn
    torch.manual_seed(0)
    base_m = mlp().cuda()
    x = torch.randn(8, 512, device="cuda")
    for name, m in (("plain", copy.deepcopy(base_m)),
                    ("lipkern", lipkern.nn.spectral_norm_model(copy.deepcopy(base_m)))):
        step = step_fn(m, x)
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        ts = []
        for _ in range(20):
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            ts.append((t1 - t0, time.perf_counter() - t0))
        print(f"## {name}: host time of a step {statistics.median(a for a, _ in ts) * 1e3:.2f} "
              f"ms, with the GPU drained {statistics.median(b for _, b in ts) * 1e3:.2f} ms")
        if args.cprofile:
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(20):
                step()
            torch.cuda.synchronize()
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(18)
        if not args.profile:
            continue
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(f"\n## {name}: 3 steps")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=22,
                                        max_name_column_width=60))
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8,
                                        max_name_column_width=60))


if __name__ == "__main__":
    main()
