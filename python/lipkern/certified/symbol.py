r"""Every layer as a restriction of a circular convolution (the package docstring has the
derivation): the tap tensor, the circular grid, and the grid's frequencies up to conjugation.
"""
from __future__ import annotations

import functools
import math
import threading
from typing import List, NamedTuple, Optional, Tuple

import torch

from ..spec import KIND_DENSE, LayerGeom


class Symbol(NamedTuple):
    """A layer as a restriction of a circular convolution.

    taps: (groups, co, ci', Qh, Qw), float64, differentiable w.r.t. the weight.
    grid: (Mh, Mw), the circular grid (1 on an axis with a single tap).
    factor: >= 1, multiplies the circular norm (repeated output positions)."""
    taps: torch.Tensor
    grid: Tuple[int, int]
    factor: float


def _embeds(m: int, k: int, d: int, s: int, p: int, n: int, out_len: int) -> bool:
    """Whether the stride-s zero-padded correlation (one axis) is a restriction of the
    polyphase circular correlation on m points: inside every phase the input's positions stay
    distinct mod m, and no position a tap reads in the padding lands on an input position."""
    if out_len > m:
        return False  # the outputs must stay distinct points of the grid
    support = {}  # phase -> residues of its input positions
    for t in range(p, p + n):
        r, q = t % s, t // s
        res = support.setdefault(r, set())
        if q % m in res:
            return False
        res.add(q % m)
    for o in range(out_len):
        for j in range(k):
            t = s * o + d * j
            if not p <= t < p + n and (t // s) % m in support.get(t % s, ()):
                return False
    return True


@functools.lru_cache(maxsize=1024)
def _axis(k: int, d: int, s: int, p: int, n: int, circular: bool, out_len: int):
    """One spatial axis: per tap j its (phase, shift), the phases used, the grid length and
    the output multiplicity.

    Zero padding: the smallest grid on which the layer embeds (``_embeds``), searched from
    the number of outputs up to ``ceil((n + 2p) / s)`` (always valid: nothing wraps). For a
    "same" 3x3 conv that is ``n + p``, not ``n + 2p``: the right padding may wrap onto the
    left padding, both zeros (a 4x4 input: a 5x5 grid, 13 distinct frequencies instead of
    the 6x6 grid's 20)."""
    if not circular:
        offs = [d * j for j in range(k)]
        se, mult = s, 1
        top = -(-(n + 2 * p) // s)
        grid = next(m for m in range(max(1, out_len), top + 1)
                    if m == top or _embeds(m, k, d, s, p, n, out_len))
    else:
        se = s if n % s == 0 else 1  # polyphase needs whole periods on the circle
        r0 = (-p) % se
        grid = n // se
        offs = [r0 + d * j for j in range(k)]
        pos = [(((s * o - p) % n) - r0) // se for o in range(out_len)]
        mult = max(pos.count(m) for m in set(pos))
    phases = sorted({e % se for e in offs})
    shifts = [(e // se) % grid for e in offs]
    q = max(shifts) + 1
    return (tuple(phases.index(e % se) for e in offs), tuple(shifts), len(phases), q, grid,
            mult)


class Layout(NamedTuple):
    """Where each kernel tap lands in the symbol: slot ``idx[a * kw + b]`` of the
    ``phases * Qh * Qw`` (phase, shift) slots; the grid and the output multiplicity factor."""
    idx: Tuple[int, ...]
    phases: int
    qh: int
    qw: int
    grid: Tuple[int, int]
    factor: float

    @property
    def aliased(self) -> bool:
        """Two taps in one slot (small circular grids): their sum is the symbol's tap."""
        return len(set(self.idx)) < len(self.idx)


def layout(g: LayerGeom) -> Layout:
    """The symbol's layout of a conv geometry (see ``_axis``)."""
    circ = bool(g.circular)
    rh, qh_of, nrh, qh, mh, multh = _axis(g.kh, g.dh, g.sh, g.ph, g.h, circ, g.oh)
    rw, qw_of, nrw, qw, mw, multw = _axis(g.kw, g.dw, g.sw, g.pw, g.w, circ, g.ow)
    idx = tuple(((rh[a] * nrw + rw[b]) * qh + qh_of[a]) * qw + qw_of[b]
                for a in range(g.kh) for b in range(g.kw))
    # an axis with one tap has the same matrix at every frequency: a grid of 1 says the same
    return Layout(idx, nrh * nrw, qh, qw, (1 if qh == 1 else mh, 1 if qw == 1 else mw),
                  math.sqrt(multh * multw))


def symbol(w: torch.Tensor, g: LayerGeom) -> Symbol:
    """The circular operator ``w`` under geometry ``g`` is a restriction of (float64 taps)."""
    wd = w.to(torch.float64)
    if g.kind == KIND_DENSE:
        return Symbol(wd.reshape(1, g.cout, -1, 1, 1), (1, 1), 1.0)
    lo = layout(g)
    co, ci = g.cout, g.cin // g.groups
    # target slot of every tap in (phase_h, phase_w, shift_h, shift_w), flattened; taps that
    # alias on a small circular grid land in one slot and add up (index_add)
    k = wd.reshape(co, ci, g.kh * g.kw)
    t = k.new_zeros(co, ci, lo.phases * lo.qh * lo.qw).index_add(
        2, torch.tensor(lo.idx, device=w.device), k)
    # phases outermost in ci' (ci' = phase * ci + c): gram_spatial skips a tap's unreached
    # phases as whole column blocks
    t = t.reshape(co, ci, lo.phases, lo.qh, lo.qw).transpose(1, 2)
    t = t.reshape(g.groups, co // g.groups, lo.phases * ci, lo.qh, lo.qw)
    return Symbol(t, lo.grid, lo.factor)


_WS = threading.local()
_WS_KEEP = 64 << 20  # bytes: larger taps get a fresh tensor


def _workspace(shape) -> Optional[torch.Tensor]:
    """A float32 tensor of ``shape`` in this thread's workspace, reused between calls (a
    fresh 10 MB tensor costs ~2500 page faults, ~4 ms here); None past _WS_KEEP. Its
    contents live until the next call in this thread (``certified_sigma`` reads them before
    returning)."""
    numel = math.prod(shape)
    if numel * 4 > _WS_KEEP:
        return None
    buf = getattr(_WS, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _WS.buf = torch.empty(numel, dtype=torch.float32)
    return buf[:numel].view(shape)


def tap_major32(w: torch.Tensor, g: LayerGeom, scale: float) -> Optional[torch.Tensor]:
    """The taps of ``symbol(w, g) * scale`` (``scale`` a power of two) as float32, tap-major
    (G, Qh * Qw, co / G, ci'), the layout the C++ step reads; built from ``w`` in one pass
    without float64 copies. Equal to the float64 route's rounding: w * scale is exact
    in float64 and rounded once to float32 (float32 weights: exact in float32 already, except
    below the normal range, rounded the same way). None where taps alias (their sum would
    round once more: the float64 route)."""
    if g.kind == KIND_DENSE:
        return (w.detach().to(torch.float64) * scale).to(torch.float32).reshape(
            1, 1, g.cout, -1) if w.dtype == torch.float64 else \
            (w.detach() * scale).to(torch.float32).reshape(1, 1, g.cout, -1)
    lo = layout(g)
    if lo.aliased:
        return None
    co, ci, gr = g.cout, g.cin // g.groups, g.groups
    wd = w.detach()
    if wd.device.type == "cpu" and wd.dtype in (torch.float32, torch.float64) and \
            hasattr(torch.ops.lipkern, "tap_major"):  # the same values, in one C++ pass
        shape = (gr, lo.qh * lo.qw, co // gr, lo.phases * ci)
        return torch.ops.lipkern.tap_major(
            wd.reshape(co, ci, g.kh * g.kw), torch.tensor(lo.idx, dtype=torch.int64), gr,
            lo.phases, lo.qh * lo.qw, scale, out=_workspace(shape))
    if wd.dtype == torch.float64:  # scaled in float64 (exact), then rounded once
        ws, scale = (wd * scale).to(torch.float32), 1.0
    else:  # float32 (or lower: exact in float32): scaled below, in float32
        ws = wd.to(torch.float32)
    ws = ws.reshape(gr, co // gr, ci, g.kh * g.kw)
    nq = lo.qh * lo.qw
    full = len(lo.idx) == nq * lo.phases  # every slot gets a tap: nothing to zero
    out = (ws.new_empty if full else ws.new_zeros)(gr, nq, co // gr, lo.phases, ci)
    for j, slot in enumerate(lo.idx):  # slot = phase * Q + shift; the scaling fused in
        torch.mul(ws[..., j], scale, out=out[:, slot % nq, :, slot // nq, :])
    return out.reshape(gr, nq, co // gr, lo.phases * ci)


def frequencies(grid: Tuple[int, int]) -> List[Tuple[int, int]]:
    """The grid's frequencies, one of each conjugate pair ``f, -f`` (real taps: A_{-f} is
    the complex conjugate of A_f, the same singular values). (M_h M_w + #self-conjugate) / 2
    of them."""
    mh, mw = grid
    out = []
    for fh in range(mh):
        for fw in range(mw):
            ch, cw = (-fh) % mh, (-fw) % mw
            if fh * mw + fw <= ch * mw + cw:
                out.append((fh, fw))
    return out


def phase_angles(freqs: List[Tuple[int, int]], grid: Tuple[int, int], qh: int, qw: int,
                 device) -> torch.Tensor:
    """(F, Qh * Qw) float64: the angle ``-2 pi <f, q / M>`` of tap q at frequency f, so that
    ``A_f = sum_q T_q exp(i angle)``."""
    mh, mw = grid
    f = torch.tensor(freqs, dtype=torch.float64, device=device)  # (F, 2)
    qy = torch.arange(qh, dtype=torch.float64, device=device).repeat_interleave(qw)
    qx = torch.arange(qw, dtype=torch.float64, device=device).repeat(qh)
    return -2 * math.pi * (f[:, :1] * qy[None] / mh + f[:, 1:] * qx[None] / mw)


def phase_table(angles: torch.Tensor) -> torch.Tensor:
    """(F, Q) angles -> (F, Q, 2) float32 (cos, sin), contiguous: the phases every path of
    the frequency matrices reads (rounded once from float64, the u the bounds count)."""
    return torch.stack([torch.cos(angles), torch.sin(angles)], -1).to(torch.float32).contiguous()
