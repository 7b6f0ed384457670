"""Every .cu compiles with nvcc for Hopper and Ampere, here where no GPU can run it (the
torch binding is compiled by setup.py only where torch has CUDA)."""
import glob
import os
import shutil
import subprocess

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
