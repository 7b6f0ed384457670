"""Every .cu compiles with nvcc for Hopper and Ampere, here where no GPU can run it (the
torch binding is compiled by setup.py only where torch has CUDA)."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def test_there_are_cuda_sources():
    assert CU_FILES


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("path", CU_FILES, ids=os.path.basename)
def test_cu_compiles_with_nvcc(path, arch, tmp_path):
    out = subprocess.run(["nvcc", f"-arch={arch}", "-std=c++17", "-O3", "-Werror",
                          "all-warnings", "-c", path, "-o", str(tmp_path / "k.o")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "k.o").stat().st_size > 0


# The Triton interpreter accepts code the compiler rejects (non-constexpr globals, branch
# variables of different types): compile the real kernels for Hopper and Ampere, no GPU
# needed (Triton ships ptxas). Run in a subprocess: this session interprets Triton.
AOT_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.language as tl
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from lipkern.triton_kernels import power_iter as k
from lipkern.triton_kernels import normalize as nk
from lipkern.triton_kernels import certified as ck

def compile_(fn, sig, consts, cap):
    full = dict(sig, **{c: "constexpr" for c in consts})
    assert set(full) == set(fn.arg_names), set(full) ^ set(fn.arg_names)
    sig = {n: full[n] for n in fn.arg_names}  # the kernel's own parameter order
    names = list(sig)
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(names.index(n),): v for n, v in consts.items()})
    out = triton.compile(src, target=GPUTarget("cuda", cap, 32))
    assert len(out.asm["cubin"]) > 0

cap = int(sys.argv[1])
blocks = dict(META_WIDTH=20, BLOCK_L=16, BLOCK_C=k.BLOCK_C, BLOCK_P=k.BLOCK_P,
              BLOCK_R=k.BLOCK_R, BLOCK_M=k.BLOCK_M, BLOCK_N=k.BLOCK_N)
for wt, tlt, gt in (("fp32", tl.float32, "*fp32"), ("bf16", tl.bfloat16, "*bf16"),
                    ("fp16", tl.float16, "*fp16")):
    f32 = "*fp32"
    # the normalized-weight output with torch's update in a dense-only kernel, as an MLP under
    # spectral_norm_model uses it; the default update with every layer kind compiled in
    for sn in (False, True):
        compile_(k.power_iter_fwd_kernel,
                 dict(meta_ptr="*i32", wptr_ptr="*i64", x0_ptr=f32, u0_ptr=f32, x_ptr=f32,
                      u_ptr=f32, xn_ptr=f32, sig_ptr=f32, lip_ptr=f32, loglip_ptr=f32,
                      counter_ptr="*i32", what_ptr=gt, L="i32", n_iters="i32", eps="fp32",
                      tol="fp32"),
                 dict(W_DTYPE=tlt, SN_VARIANT=sn, WRITE_WHAT=sn, HAS_CONV=not sn,
                      BLOCK_V=k.BLOCK_V, **blocks), cap)
    for has in ((True, True, True), (False, True, False)):
        compile_(k.power_iter_bwd_kernel,
                 dict(meta_ptr="*i32", tiles_ptr="*i32", x_ptr=f32, u_ptr=f32, sig_ptr=f32,
                      gs_ptr=f32, gl_ptr=f32, glog_ptr=f32, grad_ptr=gt, L="i32"),
                 dict(HAS_GS=has[0], HAS_GL=has[1], HAS_GLOG=has[2], **blocks), cap)
    for has_gs in (False, True):
        compile_(nk.normalize_bwd_kernel,
                 dict(meta_ptr="*i32", wptr_ptr="*i64", x_ptr=f32, u_ptr=f32, sig_ptr=f32,
                      gs_ptr=f32, gwhat_ptr=gt, grad_ptr=gt, L="i32"),
                 dict(W_DTYPE=tlt, HAS_GS=has_gs, HAS_GWHAT=True, HAS_CONV=has_gs, META_WIDTH=20,
                      BLOCK_C=k.BLOCK_C, BLOCK_P=k.BLOCK_P, BLOCK_R=k.BLOCK_R,
                      BLOCK_E=nk.BLOCK_E), cap)
for q in (1, 4, 9):  # certified_sigma's frequency matrices: dense, 2x2 polyphase, 3x3
    compile_(ck.phase_sum_kernel,
             dict(t_ptr="*fp32", ph_ptr="*fp32", out_ptr="*fp32", E="i32", NF="i32",
                  CO_CI="i32"), dict(Q=q, BLOCK_E=ck.BLOCK_E), cap)
print("ok")
"""


@pytest.mark.parametrize("cap", [90, 80])
def test_triton_kernels_compile_for_gpu(cap):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", AOT_SCRIPT, str(cap)], capture_output=True,
                         text=True, timeout=900, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
