"""Compile the v2 kernels ahead of time for a GPU architecture, with no GPU: the static checks
of tests/test_triton_v2_static.py and the build stage of bench/gpu_session.sh.

    python -m lipkern.triton_kernels.v2_aot --cap 90 [--set ci|networks]

prints one JSON line per specialization: registers, stack and local bytes (spills) read
from the cubin with the cuobjdump that ships with Triton, shared memory, whether the PTX has
the barrier's release reduction and acquire load, and the compile time. Run it with
TRITON_INTERPRET unset (the interpreter compiles nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

SIGNATURE = dict(lt_ptr="*i64", prog_ptr="*i32", wptr_ptr="*i64", x0_ptr="*fp32",
                 u0_ptr="*fp32", x_ptr="*fp32", u_ptr="*fp32", xs_ptr="*fp32", ys_ptr="*fp32",
                 xf_ptr="*fp32", uf_ptr="*fp32",
                 wc_ptr="*fp32", wt_ptr="*fp32", part_ptr="*fp64", ctl_ptr="*i32",
                 sig_ptr="*fp32", lip_ptr="*fp32", loglip_ptr="*fp32", L="i32",
                 n_programs="i32", step_lo="i32", step_hi="i32", n_steps="i32", n_iters="i32",
                 eps="fp32", tol="fp32")
# what the barrier must compile to (Triton drops an acquire whose result is unused, and an
# add whose result is unused becomes a `red`: both forms are a release arrive)
RELEASE = re.compile(r"\b(red|atom)\.global\.gpu\.release\.add")
ACQUIRE = re.compile(r"\bld\.global\.gpu\.acquire\b")


def conv_classes(entries, block_p=64):
    """Distinct v2 shape classes of (weight shape, ConvSpec) entries (covered ones only)."""
    from lipkern.spec import resolve_geometry
    from . import v2_plan
    out = []
    for i, (shape, spec) in enumerate(entries):
        g = resolve_geometry(tuple(shape), spec, f"w{i}")
        if v2_plan.why_not_covered(g) is None:
            c = tuple(v2_plan.conv_class(g, block_p))
            if c not in out:
                out.append(c)
    return tuple(out)


def compile_fwd(classes, cap, prec="tf32x3", sn=False, barrier=True, wdtype="fp32",
                num_warps=None):
    """triton.compile of conv_v2_fwd_kernel for one specialization (no GPU needed)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from . import v2_conv as k
    fn = k.conv_v2_fwd_kernel
    consts = dict(CLASSES=tuple(classes), NCLS=len(classes),
                  W_DTYPE={"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}[wdtype],
                  SN_VARIANT=sn, PREC=prec, GMAX=32, BLOCK_L=128, BLOCK_E=k.BLOCK_E,
                  USE_BARRIER=barrier, SPIN_LIMIT=0, LT_W=k.LT_WIDTH)
    full = dict(SIGNATURE, **{c: "constexpr" for c in consts})
    assert set(full) == set(fn.arg_names), set(full) ^ set(fn.arg_names)
    sig = {n: full[n] for n in fn.arg_names}
    names = list(sig)
    # what the JIT infers for the torch-allocated (256-byte aligned) buffers
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*")}
    src = ASTSource(fn=fn, signature=sig, attrs=attrs,
                    constexprs={(names.index(n),): v for n, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", cap, 32),
                          options=dict(num_warps=num_warps or k.NUM_WARPS,
                                       launch_cooperative_grid=barrier))


def resource_usage(ptx: str, cap: int) -> dict:
    """Registers and spill bytes per function, from ``ptxas -v`` on the kernel's PTX (the
    ptxas Triton itself uses for this architecture): max registers over the functions (the
    noinline per-class step function included), total spill stores + loads, and the entry's
    stack frame (a noinline call's frame is not a spill)."""
    from triton.backends.nvidia.compiler import get_ptxas
    arch = f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        txt = subprocess.run([get_ptxas(cap).path, "-v", f"--gpu-name={arch}", path, "-o",
                              os.path.join(d, "k.cubin")], capture_output=True, text=True,
                             check=True).stderr
    regs = [int(v) for v in re.findall(r"Used (\d+) registers", txt)]
    spills = [int(a) + int(b) for a, b in
              re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", txt)]
    stack = [int(v) for v in re.findall(r"(\d+) bytes stack frame", txt)]
    return dict(reg=max(regs), spill_bytes=sum(spills), stack=max(stack or [0]),
                n_functions=len(regs))


def check(name, classes, cap, **kw) -> dict:
    t0 = time.time()
    out = compile_fwd(classes, cap, **kw)
    ptx = out.asm["ptx"]
    row = dict(name=name, cap=cap, n_classes=len(classes), **kw,
               compile_s=round(time.time() - t0, 1), shared=out.metadata.shared,
               **resource_usage(ptx, cap),
               release=bool(RELEASE.search(ptx)), acquire=bool(ACQUIRE.search(ptx)),
               cp_async_16=ptx.count("cp.async.cg.shared.global") +
               len(re.findall(r"cp\.async\.ca\.shared\.global.*0x10;", ptx)))
    return row


def ci_set(cap=90):
    """What CI compiles: the toy class (20 conv 3x3 64->64 @ 32x32) in every precision with
    the barrier; on sm_90 also torch's update in the step mode with bf16 weights on a kernel
    of four small classes that take every constexpr branch of the plan (4x4 and 1x1 stride 2
    with parity classes, circular, transposed) -- ~30-130 s of compile on 2 cores, so once,
    not per architecture."""
    from lipkern import ConvSpec
    toy = conv_classes([((64, 64, 3, 3), ConvSpec(32, padding=1))])
    odd = conv_classes([((32, 16, 4, 4), ConvSpec(16, stride=2, padding=1)),
                        ((32, 16, 1, 1), ConvSpec(16, stride=2)),
                        ((16, 16, 3, 3), ConvSpec(8, padding=1, padding_mode="circular")),
                        ((16, 16, 4, 4), ConvSpec(8, stride=2, padding=1, transposed=True))])
    rows = []
    for prec in ("ieee", "tf32x3", "tf32"):
        rows.append(("toy_" + prec, toy, dict(prec=prec)))
    if cap >= 90:
        rows.append(("odd4_sn_step", odd, dict(prec="tf32x3", sn=True, barrier=False,
                                               wdtype="bf16")))
    return rows


def network_set():
    """One kernel per benchmark network (every class of its convs in one launch), tf32x3:
    what the GPU session's build stage compiles (minutes on a small CPU)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                    "bench"))
    from gpu_v2_check import NETWORKS  # bench/gpu_v2_check.py: the layer lists
    return [(name, conv_classes(make()), dict(prec="tf32x3")) for name, make in
            NETWORKS.items()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cap", type=int, default=90)
    ap.add_argument("--set", default="ci", choices=["ci", "networks"])
    args = ap.parse_args(argv)
    rows = ci_set(args.cap) if args.set == "ci" else network_set()
    for name, classes, kw in rows:
        print(json.dumps(check(name, classes, args.cap, **kw)), flush=True)


if __name__ == "__main__":
    main()
