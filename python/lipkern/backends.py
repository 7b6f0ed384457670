"""Which backends exist here, and which one "auto" picks. Imports are lazy: ``import
lipkern`` needs neither Triton nor the compiled extension."""
from __future__ import annotations

import importlib.util
import os

import torch



class BackendUnavailableError(ValueError):
    """An explicitly requested backend cannot run here (the message says why and how)."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Probed once, memoized in module globals (not functools.lru_cache, which torch.compile
# warns about when it traces through a call).
_UNSET = object()
_HAS_TRITON = _UNSET
_EXT = _UNSET
_EXT_ERROR = None


def has_triton() -> bool:
    global _HAS_TRITON
    if _HAS_TRITON is _UNSET:
        _HAS_TRITON = importlib.util.find_spec("triton") is not None
    return _HAS_TRITON


def load_ext():
    """The compiled extension lipkern._C (registers lipkern::power_iter_ext), or None; the
    import error's text is kept for the message of an explicit request."""
    global _EXT, _EXT_ERROR
    if _EXT is _UNSET:
        try:
            from . import _C  # torch is already imported: _C links against it
            _EXT = _C
        except ImportError as e:
            _EXT, _EXT_ERROR = None, str(e)
    return _EXT


def _ext_missing() -> str:
    return ("the compiled extension lipkern._C is not built (" + (_EXT_ERROR or "not found")
            + "); reinstall with torch already installed: pip install --no-build-isolation "
              "-e . (LIPKERN_BUILD_EXT=1 makes a failed build an error)")


def _why_not(backend: str, device: torch.device, dtype: torch.dtype):
    """None if ``backend`` can run on these tensors, else the reason (a sentence)."""
    if backend in ("torch", "grouped"):  # plain torch ops: every device torch runs on
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
        ext = load_ext()
        if ext is None:
            return _ext_missing()
        if backend == "cpp" and device.type != "cpu":
            return f"the C++ kernels run on CPU tensors, these are on {device}"
        if backend == "cuda":
            if device.type != "cuda":
                return f"the CUDA kernels run on CUDA tensors, these are on {device}"
            if not ext.with_cuda:
                return ("lipkern._C was built without CUDA (it needs a CUDA build of torch and "
                        "a CUDA toolkit at install time; LIPKERN_BUILD_CUDA=1 to insist)")
        return None
    return f"unknown backend {backend!r}"


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend to run: ``backend`` itself (or BackendUnavailableError saying what is
    missing), or for "auto" the fastest available one for this device and dtype."""
    if backend != "auto":
        why = _why_not(backend, device, dtype)
        if why is not None:
            raise BackendUnavailableError(f"backend={backend!r} is not available: {why}")
        return backend
    candidates = ("triton", "cuda") if device.type == "cuda" else ("cpp",)
    for candidate in candidates:
        if _why_not(candidate, device, dtype) is None:
            return candidate
    return "torch"


_CHOSEN: dict = {}  # (id(layout), device, dtype, op) -> (layout, backend): "auto" per call
_CHOSEN_MAX = 1024


def choose_backend(backend: str, layout, device: torch.device, dtype: torch.dtype,
                   op: str = "power_iter") -> str:
    """The backend a call of these layers runs: an explicit ``backend`` as
    :func:`resolve_backend` checks it, "auto" by the measurements of
    :mod:`lipkern.evidence` for the call's device family and shape class (memoized per
    layout: the choice costs one dict lookup per call). :func:`lipkern.explain` says why."""
    if backend != "auto":
        return resolve_backend(backend, device, dtype)
    key = (id(layout), device, dtype, op)
    hit = _CHOSEN.get(key)
    if hit is None or hit[0] is not layout:  # a recycled id rebuilds
        from .evidence import choose
        if len(_CHOSEN) >= _CHOSEN_MAX:
            _CHOSEN.clear()
        hit = _CHOSEN[key] = (layout, choose(layout.geoms, device, dtype, op).backend)
    return hit[1]


def available_backends(device="cpu", dtype=torch.float32):
    """Backends that can run on tensors of this device and dtype."""
    device = torch.device(device)
    return [b for b in ("triton", "cuda", "cpp", "grouped", "torch") if _why_not(b, device, dtype) is None]
