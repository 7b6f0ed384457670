"""Triton kernels of lipkern (importable as lipkern.triton_kernels; needs triton)."""
