"""Build lipkern: the Python package, the Triton kernels inside it, and the compiled
extension lipkern._C.

The Python package lives in python/lipkern; triton_kernels/ ships inside it as
lipkern.triton_kernels. The extension needs torch at build time, so install with
``pip install --no-build-isolation`` after installing torch (see README).

Environment flags:
  LIPKERN_BUILD_EXT=auto|1|0   build lipkern._C (auto: try, and fall back to the pure-Python
                               package with a message if it fails; 1: a failure is an error)
  LIPKERN_BUILD_CUDA=auto|1|0  add the CUDA sources (auto: when torch has CUDA, i.e.
                               torch.version.cuda, and a CUDA toolkit is found via CUDA_HOME;
                               a GPU need not be present)
  LIPKERN_CUDA_ARCHS="8.0;9.0" target architectures (TORCH_CUDA_ARCH_LIST format)
  MAX_JOBS                     parallel compile jobs (ninja)
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"[lipkern setup] {msg}", file=sys.stderr)


def _flag(name, default="auto"):
    v = os.environ.get(name, default).strip().lower()
    if v not in ("auto", "1", "0"):
        raise SystemExit(f"{name} must be auto, 1 or 0, got {v!r}")
    return v


def _extensions():
    """(ext_modules, cmdclass) for lipkern._C, or ([], {}) when skipped."""
    build = _flag("LIPKERN_BUILD_EXT")
    if build == "0":
        _say("LIPKERN_BUILD_EXT=0: skipping the compiled extension (pure-Python package)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        if build == "1":
            raise SystemExit(f"LIPKERN_BUILD_EXT=1 but torch is not importable: {e}")
        _say(f"torch is not importable at build time ({e}); skipping lipkern._C. Install "
             f"torch first and use pip install --no-build-isolation to build it.")
        return [], {}

    cuda = _flag("LIPKERN_BUILD_CUDA")
    has_toolkit = cpp_extension.CUDA_HOME is not None
    if cuda == "1" and not (torch.version.cuda and has_toolkit):
        raise SystemExit("LIPKERN_BUILD_CUDA=1 needs a CUDA build of torch and a CUDA toolkit "
                         f"(torch.version.cuda={torch.version.cuda}, "
                         f"CUDA_HOME={cpp_extension.CUDA_HOME})")
    with_cuda = cuda != "0" and bool(torch.version.cuda) and has_toolkit
    archs = os.environ.get("LIPKERN_CUDA_ARCHS", "8.0;9.0")

    sources = [os.path.relpath(p, ROOT) for p in
               sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
               + sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    # -fno-math-errno: sqrt vectorizes (nothing here reads errno)
    cxx = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno"]
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", archs)
        sources += [os.path.relpath(p, ROOT) for p in
                    sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
                    + sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))]
        kwargs["extra_compile_args"] = {"cxx": cxx + ["-DLIPKERN_WITH_CUDA"],
                                        "nvcc": ["-O3", "-DLIPKERN_WITH_CUDA"]}
        ext = cpp_extension.CUDAExtension("lipkern._C", sources, **kwargs)
    else:
        ext = cpp_extension.CppExtension("lipkern._C", sources, **kwargs)
    _say(f"building lipkern._C: CPU kernels{' + CUDA kernels for ' + archs if with_cuda else ''}"
         f" (torch {torch.__version__}, torch.version.cuda={torch.version.cuda}, "
         f"CUDA_HOME={cpp_extension.CUDA_HOME})")

    class BuildExt(cpp_extension.BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any compiler failure
                if build == "1":
                    raise
                # an editable checkout keeps the previous build's lipkern/_C*.so in place:
                # left there, it would load with the old kernels and schemas
                stale = glob.glob(os.path.join(ROOT, "python", "lipkern", "_C*.so")) + \
                    glob.glob(os.path.join(ROOT, "python", "lipkern", "_C*.pyd"))
                for f in stale:
                    os.remove(f)
                _say(f"building lipkern._C failed ({type(e).__name__}: {e}); continuing with "
                     f"the pure-Python package (backends 'cpp'/'cuda' unavailable"
                     f"{'; removed the previous build ' + str(stale) if stale else ''}). Set "
                     f"LIPKERN_BUILD_EXT=1 to make this an error.")

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="lipkern",
    version="0.1.0",
    description="Fused GPU kernels for spectral norms and Lipschitz constants of networks",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=["lipkern", "lipkern.nn", "lipkern.ops", "lipkern.bound", "lipkern.certified",
              "lipkern.triton_kernels"],
    package_dir={"lipkern": "python/lipkern", "lipkern.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest>=7", "triton>=3.0"],
                    # optional providers and plots of the benchmarks
                    "bench": ["deel-torchlip", "orthogonium", "matplotlib"]},
)
