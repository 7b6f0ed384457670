"""Which backends exist here, and which one "auto" picks. Imports are lazy: ``import
lipkern`` needs neither Triton nor the compiled extension."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch



class BackendUnavailableError(ValueError):
    """An explicitly requested backend cannot run here (the message says why and how)."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _why_not(backend: str, device: torch.device, dtype: torch.dtype):
    """None if ``backend`` can run on these tensors, else the reason (a sentence)."""
    if backend == "torch":
        return None
    if backend == "triton":
        if not has_triton():
            return "Triton is not installed (pip install triton)"
        if device.type == "cpu" and not triton_interpreting():
            return ("Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
                    "importing triton to run them on the CPU (slow; for tests)")
        if device.type not in ("cpu", "cuda"):
            return f"Triton kernels do not run on {device.type} tensors"
        if dtype == torch.float64:
            return "the Triton kernels iterate in float32; float64 weights need 'torch'"
        return None
    if backend in ("cuda", "cpp"):
        return (f"the compiled extension lipkern._C with the {backend!r} kernels is not part "
                f"of this build yet; use backend='torch' or 'triton'")
    return f"unknown backend {backend!r}"


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend to run: ``backend`` itself (or BackendUnavailableError saying what is
    missing), or for "auto" the fastest available one for this device and dtype."""
    if backend != "auto":
        why = _why_not(backend, device, dtype)
        if why is not None:
            raise BackendUnavailableError(f"backend={backend!r} is not available: {why}")
        return backend
    if device.type == "cuda":
        for candidate in ("triton", "cuda"):
            if _why_not(candidate, device, dtype) is None:
                return candidate
    return "torch"


def available_backends(device="cpu", dtype=torch.float32):
    """Backends that can run on tensors of this device and dtype."""
    device = torch.device(device)
    return [b for b in ("triton", "cuda", "cpp", "torch") if _why_not(b, device, dtype) is None]
