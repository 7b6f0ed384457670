r"""Every layer as a restriction of a circular convolution (the package docstring has the
derivation): the tap tensor, the circular grid, and the grid's frequencies up to conjugation.
"""
from __future__ import annotations

import functools
import math
from typing import List, NamedTuple, Tuple

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


def symbol(w: torch.Tensor, g: LayerGeom) -> Symbol:
    """The circular operator ``w`` under geometry ``g`` is a restriction of (float64 taps)."""
    wd = w.to(torch.float64)
    if g.kind == KIND_DENSE:
        return Symbol(wd.reshape(1, g.cout, -1, 1, 1), (1, 1), 1.0)
    circ = bool(g.circular)
    rh, qh_of, nrh, qh, mh, multh = _axis(g.kh, g.dh, g.sh, g.ph, g.h, circ, g.oh)
    rw, qw_of, nrw, qw, mw, multw = _axis(g.kw, g.dw, g.sw, g.pw, g.w, circ, g.ow)
    co, ci = g.cout, g.cin // g.groups
    # target slot of every tap in (phase_h, phase_w, shift_h, shift_w), flattened; taps that
    # alias on a small circular grid land in one slot and add up (index_add)
    idx = [((rh[a] * nrw + rw[b]) * qh + qh_of[a]) * qw + qw_of[b]
           for a in range(g.kh) for b in range(g.kw)]
    k = wd.reshape(co, ci, g.kh * g.kw)
    t = k.new_zeros(co, ci, nrh * nrw * qh * qw).index_add(
        2, torch.tensor(idx, device=w.device), k)
    # phases outermost in ci' (ci' = phase * ci + c): gram_spatial skips a tap's unreached
    # phases as whole column blocks
    t = t.reshape(co, ci, nrh * nrw, qh, qw).transpose(1, 2)
    t = t.reshape(g.groups, co // g.groups, nrh * nrw * ci, qh, qw)
    # an axis with one tap has the same matrix at every frequency: a grid of 1 says the same
    return Symbol(t, (1 if qh == 1 else mh, 1 if qw == 1 else mw), math.sqrt(multh * multw))


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
