"""The v2 plan: which layers the v2 conv kernel covers (shape classes), how many programs each
layer gets (grid sizing against the device's SM count) and which mode runs (one persistent
launch with group barriers, or one launch per step).

Pure Python, no Triton import: the routing and the grid sizing are unit-tested without a GPU
(tests/test_triton_v2_plan.py, with fake device descriptions down to a MIG slice).

A **shape class** is everything the kernel specializes on as ``tl.constexpr``: the layer's
conv-form geometry (see :mod:`lipkern.spec`), whether the operator is C or C^T, the padded
channel counts and the tile sizes. Layers of one class share one compiled branch of the
kernel; a call compiles one kernel whose branches are the call's classes.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple

LOG = logging.getLogger("lipkern.triton_v2")

KIND_DENSE, KIND_CONV, KIND_CONV_T = 0, 1, 2  # lipkern.spec.KIND_* (kept import-free here)

# Coverage of the v2 conv kernel. Kernel extents up to 7 (1x1, 3x3, 4x4, 5x5, 7x7 stems):
# each tap is one unrolled K loop, so compile time and code size grow with kh*kw. Strides 1
# and 2 (the adjoint of stride 2 runs as 4 parity classes, see v2_conv._ct_phase). Channels
# up to 1024: the N dimension is tiled by 64, K by 32, so registers do not depend on it.
MAX_KERNEL = 7
STRIDES = (1, 2)
MAX_CHANNELS = 1024
MAX_CLASSES = 12        # branches per compiled kernel: more would make one compile take minutes
MAX_PROGRAMS_PER_LAYER = 32  # the width of the per-layer partial-sum arrays (GMAX)
INT32_LIMIT = 2 ** 31

MODES = ("persistent", "step")


class ConvClass(NamedTuple):
    """Constexpr geometry of one shape class (passed to the kernel as a tuple).

    T: 1 if the operator is A = C^T (transposed convs), else 0. C maps (CIN, H, W) to
    (COUT, OH, OW) with kernel (KH, KW), stride (SH, SW), padding (PH, PW), dilation (DH, DW),
    circular padding CIRC. CINP/COUTP: channel counts padded to the tile widths (scratch
    vectors and packed weights are zero-padded to them). BP: pixels per tile; BNI/BNO: N tile
    over input/output channels; BKI/BKO: K chunk over input/output channels."""
    T: int
    CIN: int
    H: int
    W: int
    COUT: int
    OH: int
    OW: int
    KH: int
    KW: int
    SH: int
    SW: int
    PH: int
    PW: int
    DH: int
    DW: int
    CIRC: int
    CINP: int
    COUTP: int
    BP: int
    BNI: int
    BNO: int
    BKI: int
    BKO: int
    # the C^T taps of parity class r (ih = r mod SH): kh = KH0_r + KSH_r * a, a < NKH_r
    # (tap_progression), r = 0, 1; the same for the width
    KH0_0: int = 0
    KSH_0: int = 1
    NKH_0: int = 0
    KH0_1: int = 0
    KSH_1: int = 1
    NKH_1: int = 0
    KW0_0: int = 0
    KSW_0: int = 1
    NKW_0: int = 0
    KW0_1: int = 0
    KSW_1: int = 1
    NKW_1: int = 0


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def channel_block(c: int) -> int:
    """N-tile width for c channels: a power of two in [16, 64] (tl.dot needs >= 16; 64 keeps
    a 64x64 fp32 accumulator at 32 registers per thread with 4 warps)."""
    return min(64, _next_pow2(max(16, c)))


def padded_channels(c: int) -> int:
    b = channel_block(c)
    return -(-c // b) * b


def why_not_covered(g) -> Optional[str]:
    """None if the v2 conv kernel covers layer geometry ``g`` (a lipkern.spec.LayerGeom),
    else the reason (a short phrase, for the debug log)."""
    if g.kind == KIND_DENSE:
        return "dense layer (dense v2 not built yet)"
    if g.groups != 1:
        return f"groups={g.groups}"
    if g.kh > MAX_KERNEL or g.kw > MAX_KERNEL:
        return f"kernel {g.kh}x{g.kw} > {MAX_KERNEL}"
    if g.sh not in STRIDES or g.sw not in STRIDES:
        return f"stride {(g.sh, g.sw)}"
    if g.circular and ((g.sh, g.sw) != (1, 1) or (g.oh, g.ow) != (g.h, g.w)):
        return "circular padding other than stride-1 'same'"
    if max(g.cin, g.cout) > MAX_CHANNELS:
        return f"channels > {MAX_CHANNELS}"
    cip, cop = padded_channels(g.cin), padded_channels(g.cout)
    if max(g.h * g.w * cip, g.oh * g.ow * cop, g.kh * g.kw * cip * cop) >= INT32_LIMIT:
        return "per-layer sizes need int64 indexing"
    return None


def tap_progression(r: int, k: int, s: int, p: int, d: int) -> Tuple[int, int, int]:
    """(start, step, count) of the taps kh < k with (r + p - kh*d) % s == 0: the taps of C
    that reach the input pixels ih = r (mod s) in C^T (s in 1, 2: an arithmetic
    progression, asserted against the brute-force set)."""
    hits = [kh for kh in range(k) if (r + p - kh * d) % s == 0]
    if not hits:
        return 0, 1, 0
    step = hits[1] - hits[0] if len(hits) > 1 else 1
    assert hits == list(range(hits[0], hits[0] + step * len(hits), step)), hits
    return hits[0], step, len(hits)


def conv_class(g, block_p: int = 64) -> ConvClass:
    """The shape class of a covered layer. block_p: pixels per tile (a power of two >= 16)."""
    bni, bno = channel_block(g.cin), channel_block(g.cout)
    taps = []
    for k, s, p, d in ((g.kh, g.sh, g.ph, g.dh), (g.kw, g.sw, g.pw, g.dw)):
        for r in (0, 1):
            taps += tap_progression(r, k, s, p, d) if r < s else (0, 1, 0)
    return ConvClass(int(g.kind == KIND_CONV_T), g.cin, g.h, g.w, g.cout, g.oh, g.ow, g.kh,
                     g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, int(g.circular),
                     padded_channels(g.cin), padded_channels(g.cout), block_p, bni, bno,
                     min(32, bni), min(32, bno), *taps)


def phase_items(c: ConvClass) -> Tuple[int, int]:
    """Work items (tiles) of the C phase and of the C^T phase of one layer of class c."""
    n_c = -(-(c.OH * c.OW) // c.BP) * (c.COUTP // c.BNO)
    n_ct = 0
    for rh in range(c.SH):
        for rw in range(c.SW):
            ni = -(-(c.H - rh) // c.SH)
            nj = -(-(c.W - rw) // c.SW)
            n_ct += -(-(ni * nj) // c.BP) * (c.CINP // c.BNI)
    return n_c, n_ct


def layer_flops(c: ConvClass) -> int:
    """FLOPs of one C (or C^T) application, unpadded: 2 * OH*OW * COUT * CIN * KH*KW."""
    return 2 * c.OH * c.OW * c.COUT * c.CIN * c.KH * c.KW


@dataclass(frozen=True)
class DeviceDesc:
    """What the grid sizing needs to know of a device (fake ones in the tests)."""
    sm_count: int
    name: str = "?"
    cooperative: bool = True   # co-residency can be guaranteed (cooperative launch works)


def device_desc(device) -> DeviceDesc:
    """The description of a CUDA device; a CPU (the interpreter) gets 4 fake SMs and no
    cooperative launch (the interpreter runs programs one after another)."""
    import torch
    if device.type != "cuda":
        return DeviceDesc(4, "interpreter", cooperative=False)
    p = torch.cuda.get_device_properties(device)
    # a MIG slice reports its own SM count here. MPS may cap a client's SMs below that
    # (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE): then co-residency of sm_count CTAs is not
    # guaranteed, and the persistent mode is off.
    coop = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in os.environ
    return DeviceDesc(p.multi_processor_count, p.name, cooperative=coop)


def size_groups(works: Sequence[int], max_members: Sequence[int], sm_count: int,
                gmax: int = MAX_PROGRAMS_PER_LAYER) -> Optional[List[int]]:
    """Programs per layer for the persistent mode: G_l >= 1, sum G_l <= sm_count (one CTA per
    SM, so all are co-resident), G_l <= min(gmax, max_members[l]).

    A phase lasts as long as its slowest layer, whose member does ceil(items/G) tiles of
    work/items each: the sizing lowers that maximum. It repeatedly gives every layer at the
    maximum the fewest extra programs that shorten it, and stops when that no longer fits
    or a layer at the maximum cannot shrink (extra programs would then idle). Deterministic.
    None if the layers alone outnumber the SMs (the caller uses the step mode)."""
    L = len(works)
    if L == 0 or L > sm_count:
        return None
    items = [max(1, int(m)) for m in max_members]
    cap = [max(1, min(gmax, n)) for n in items]
    G = [1] * L

    def cost(i, g):
        return -(-items[i] // g) * (works[i] / items[i])

    def next_g(i):  # the smallest G' > G[i] with fewer tiles per member, or None
        tiles = -(-items[i] // G[i])
        if tiles == 1:
            return None
        g = -(-items[i] // (tiles - 1))
        return g if g <= cap[i] else None

    spare = sm_count - L
    while True:
        worst = max(cost(i, G[i]) for i in range(L))
        top = [i for i in range(L) if cost(i, G[i]) == worst]
        steps = [next_g(i) for i in top]
        if any(g is None for g in steps):
            break
        need = sum(g - G[i] for g, i in zip(steps, top))
        if need > spare:
            break
        for g, i in zip(steps, top):
            G[i] = g
        spare -= need
    assert sum(G) <= sm_count and min(G) >= 1
    return G


class Plan(NamedTuple):
    """How one call runs: the v2 layers (indices into the call), their class index, programs
    per layer, the mode; the rest go to v1 (with the reason of each, for the log)."""
    v2_layers: Tuple[int, ...]
    v1_layers: Tuple[int, ...]
    v1_reasons: Tuple[str, ...]
    classes: Tuple[ConvClass, ...]
    layer_class: Tuple[int, ...]
    programs: Tuple[int, ...]
    mode: str


def make_plan(geoms, desc: DeviceDesc, *, block_p: int = 64, mode: Optional[str] = None,
              programs_per_layer: Optional[int] = None) -> Plan:
    """The plan for layers ``geoms`` on a device described by ``desc``.

    mode: None picks "persistent" where co-residency can be guaranteed (cooperative device,
    every v2 layer fits with at least one SM each), else "step". programs_per_layer: force G
    (the tests run the step mode with 1, 2 and 3); the persistent mode then still checks the
    SM count and falls back to step if the grid would not fit."""
    v2, v1, reasons, classes, lc = [], [], [], [], []
    for i, g in enumerate(geoms):
        why = why_not_covered(g)
        if why is None:
            c = conv_class(g, block_p)
            if c not in classes:
                if len(classes) == MAX_CLASSES:
                    why = f"more than {MAX_CLASSES} shape classes in one call"
                else:
                    classes.append(c)
        if why is None:
            v2.append(i)
            lc.append(classes.index(conv_class(g, block_p)))
        else:
            v1.append(i)
            reasons.append(why)
    items = [min(phase_items(classes[c])) for c in lc]
    if programs_per_layer is not None:
        G = [max(1, min(programs_per_layer, MAX_PROGRAMS_PER_LAYER))] * len(v2)
    else:
        G = size_groups([layer_flops(classes[c]) for c in lc], items, desc.sm_count) \
            if v2 else []
    fits = G is not None and desc.cooperative and sum(G or [0]) <= desc.sm_count
    if mode is None:
        mode = "persistent" if fits else "step"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "persistent" and not fits:
        LOG.debug("v2: %d programs do not fit %d SMs co-resident: step mode",
                  sum(G or [len(v2)]), desc.sm_count)
        mode = "step"
    if G is None:  # more layers than SMs: step mode, G sized without the SM cap
        G = [max(1, min(4, n)) for n in items]
    return Plan(tuple(v2), tuple(v1), tuple(reasons), tuple(classes), tuple(lc), tuple(G),
                mode)


def v2_requested() -> bool:
    """v2 is opt-in until it is measured on a GPU: LIPKERN_TRITON_V2=1."""
    return os.environ.get("LIPKERN_TRITON_V2", "0") not in ("", "0")


def describe(plan: Plan) -> str:
    """One line for the debug log: which layers run on which path, and why."""
    v1 = ", ".join(f"{i} ({r})" for i, r in zip(plan.v1_layers, plan.v1_reasons)) or "none"
    return (f"triton v2 ({plan.mode}, {len(plan.classes)} classes, "
            f"{sum(plan.programs)} programs): layers {list(plan.v2_layers)}; v1: {v1}")
