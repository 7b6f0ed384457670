"""Build lipkern.

The Python package lives in python/lipkern; the Triton kernels in triton_kernels/ ship inside
it as lipkern.triton_kernels. Install torch first (see README): a bare torch requirement on a
machine without torch pulls the CUDA wheels.
"""
from setuptools import setup

setup(
    name="lipkern",
    version="0.1.0",
    description="Fused GPU kernels for spectral norms and Lipschitz constants of networks",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=["lipkern", "lipkern.ops", "lipkern.triton_kernels"],
    package_dir={"lipkern": "python/lipkern", "lipkern.triton_kernels": "triton_kernels"},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest>=7", "triton>=3.0"]},
)
