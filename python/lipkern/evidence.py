"""What ``backend="auto"`` runs, by evidence: the committed measurements, per device family
and shape class, as a small table in the package.

A call's **shape class** is ``"dense"`` when every layer is a matrix (Linear layers,
reshaped kernels) and ``"conv"`` otherwise (conv operators dominate a mixed call's time).
The **device family** is ``"cpu"``, or ``"sm<major><minor>"`` of a CUDA device (H100 and H200
are both ``sm90``). For each (family, class) the table lists backends fastest first with the
measurement behind each entry; "auto" runs the first one available here. Where a family or
class has no row, "auto" runs ``grouped`` on CUDA (no kernel has been measured faster than
cuDNN/cuBLAS there) and the compiled C++ kernel on the CPU (``cpp``; ``grouped`` when the
extension is missing, the faster of the two pure-torch paths).

Add a row only from a committed benchmark run (bench/results/*.jsonl, bench/NOTES.md): the
source string names it. :func:`lipkern.explain` prints the row a call used.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from .spec import LayerGeom


class Measured(NamedTuple):
    backend: str
    ms: float          # forward + backward of the workload, median
    source: str        # benchmark, machine, date


_H100 = "bench_power_iter.py, NVIDIA H100 80GB HBM3, 2026-11-22, fwd+bwd median of 20"
_H100_MODEL = "bench_spectral_norm.py --workload mlp, H100, 2026-11-22 (normalization overhead)"
_CPU = ("bench_power_iter.py --providers grouped,lipkern_cpp,lipkern_grouped,lipkern_torch "
        "--reps 7, 2-core x86_64 shared by 4 jobs (load ~6), 2026-12-02")

# "grouped" on the H100 is the benchmark's user-written grouped provider (autograd through
# every iteration): backend="grouped" does the same convolutions without the autograd graph,
# so these times are upper bounds for it.
TABLE = {
    ("sm90", "conv", "power_iter"): (
        Measured("grouped", 7.0, "toy (20 conv 64->64 @ 32x32, 5 it): " + _H100),
        Measured("triton", 44.3, "toy: " + _H100),
        Measured("cuda", 430.0, "toy: " + _H100)),
    ("sm90", "dense", "power_iter"): (
        Measured("cuda", 3.7, "mlp (100 x 512^2, 1 warm it): " + _H100),
        Measured("triton", 6.9, "mlp: " + _H100),
        Measured("grouped", 7.7, "mlp: " + _H100)),
    # fused_normalize: the Triton kernel also writes every W / sigma in its one launch;
    # measured in spectral_norm_model (fused_weights +11.1 ms vs scaled_outputs on the
    # power_iter path +30.9 ms per step). Conv calls follow the power_iter evidence.
    ("sm90", "dense", "normalize"): (
        Measured("triton", 11.1, "MLP 100 x 512, batch 8, overhead per step: " + _H100_MODEL),),
    ("sm90", "conv", "normalize"): (
        Measured("grouped", 7.0, "power_iter toy (the normalize cost is the iteration's): "
                 + _H100),
        Measured("triton", 44.3, "power_iter toy: " + _H100)),
    # CPU: the compiled kernel stays the choice (grouped 2.6x slower on the toy net, 4.4x on
    # ResNet-18 (cpp 756 ms, grouped 3362 ms), 7.3x on the MLP, one run each)
    ("cpu", "conv", "power_iter"): (
        Measured("cpp", 51.4, "toy, CPU size (20 conv 32->32 @ 16x16, 5 it): " + _CPU),
        Measured("grouped", 131.2, "toy, CPU size: " + _CPU)),
    ("cpu", "dense", "power_iter"): (
        Measured("cpp", 77.1, "mlp, CPU size (64 x 256^2, 1 warm it): " + _CPU),
        Measured("grouped", 564.3, "mlp, CPU size: " + _CPU)),
}


def shape_class(geoms: Tuple[LayerGeom, ...]) -> str:
    """"dense" if every layer is a matrix, else "conv"."""
    return "dense" if all(g.h == g.w == g.oh == g.ow == g.kh == g.kw == 1 and g.groups == 1
                          for g in geoms) else "conv"


_FAMILY: dict = {}  # device -> family (memoized: a device query per call is host time)


def device_family(device: torch.device) -> str:
    fam = _FAMILY.get(device)
    if fam is None:
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            fam = f"sm{major}{minor}"
        else:
            fam = device.type
        fam = _FAMILY[device] = fam
    return fam


class Choice(NamedTuple):
    backend: str
    reason: str
    measured: Optional[Measured]


def choose(geoms: Tuple[LayerGeom, ...], device: torch.device, dtype: torch.dtype,
           op: str = "power_iter") -> Choice:
    """What "auto" runs for these layers here, and why (see the module docstring)."""
    from .backends import _why_not
    fam, cls = device_family(device), shape_class(geoms)
    rows = TABLE.get((fam, cls, op), ())
    skipped = []
    for row in rows:
        why = _why_not(row.backend, device, dtype)
        if why is None:
            extra = f" (skipped: {'; '.join(skipped)})" if skipped else ""
            return Choice(row.backend, f"fastest measured available on {fam} for {cls} "
                          f"layers: {row.ms:g} ms, {row.source}{extra}", row)
        skipped.append(f"{row.backend}: {why}")
    if fam == "cpu" and _why_not("cpp", device, dtype) is None:
        return Choice("cpp", "the compiled CPU kernel (no measurement for this class)", None)
    note = f" (skipped: {'; '.join(skipped)})" if skipped else ""
    return Choice("grouped", f"no kernel measured faster than grouped cuDNN/cuBLAS calls on "
                  f"{fam} for {cls} layers{note}", None)
