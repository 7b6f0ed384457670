"""Packing: the one table that describes all layers, and the packed state vectors.

The table (``Layout.meta``) is a flat tuple of ints, ``META_WIDTH`` per layer, in the field
order of ``META_FIELDS``. It is what the registered op receives (an ``int[]`` argument, so it
is static under torch.compile) and what every kernel walks. Iteration vectors of all layers
live in two packed buffers: ``x`` (sum of the layers' ``x_numel``) and ``u``
(sum of ``y_numel``); layer ``l`` owns ``x[x_off[l] : x_off[l] + x_numel[l]]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from .spec import ConvSpec, LayerGeom, resolve_geometry

META_FIELDS = ("kind", "x_off", "y_off") + LayerGeom._fields[1:] + ("w_off",)
META_WIDTH = 20  # padded to a round width; the kernels index rows with this stride
assert len(META_FIELDS) <= META_WIDTH


@dataclass(frozen=True)
class Layout:
    """All layers of one call: geometry, packed offsets and the flat int table."""
    geoms: Tuple[LayerGeom, ...]
    x_offsets: Tuple[int, ...]
    y_offsets: Tuple[int, ...]
    w_offsets: Tuple[int, ...]
    total_x: int
    total_y: int
    total_w: int
    meta: Tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return len(self.geoms)

    def x_slice(self, i: int) -> slice:
        return slice(self.x_offsets[i], self.x_offsets[i] + self.geoms[i].x_numel)

    def y_slice(self, i: int) -> slice:
        return slice(self.y_offsets[i], self.y_offsets[i] + self.geoms[i].y_numel)

    def w_slice(self, i: int) -> slice:
        return slice(self.w_offsets[i], self.w_offsets[i] + self.geoms[i].w_numel)


def _build(geoms: Tuple[LayerGeom, ...]) -> Layout:
    x_offsets, y_offsets, w_offsets, meta = [], [], [], []
    tx = ty = tw = 0
    for g in geoms:
        x_offsets.append(tx)
        y_offsets.append(ty)
        w_offsets.append(tw)
        row = [g.kind, tx, ty, *g[1:], tw]
        meta += row + [0] * (META_WIDTH - len(row))
        tx += g.x_numel
        ty += g.y_numel
        tw += g.w_numel
    return Layout(geoms, tuple(x_offsets), tuple(y_offsets), tuple(w_offsets), tx, ty, tw,
                  tuple(meta))


# Plain dict memos rather than functools.lru_cache: torch.compile traces a dict lookup
# without the "lru_cache-wrapped function" warning, and these keys are few per program.
_BY_SPECS: dict = {}
_BY_META: dict = {}
_MEMO_MAX = 1024


def _memo(table: dict, key, make):
    hit = table.get(key)
    if hit is None:
        if len(table) >= _MEMO_MAX:
            table.clear()
        hit = table[key] = make()
    return hit


def layout_for(shapes: Tuple[Tuple[int, ...], ...],
               specs: Tuple[Optional[ConvSpec], ...]) -> Layout:
    """Layout of weights with these shapes and specs (memoized: the hot path hits it)."""
    return _memo(_BY_SPECS, (shapes, specs), lambda: _build(tuple(
        resolve_geometry(s, sp, f"weights[{i}]") for i, (s, sp) in enumerate(zip(shapes, specs)))))


def _from_meta(meta: Tuple[int, ...]) -> Layout:
    n = len(LayerGeom._fields)
    rows = [meta[i:i + META_WIDTH] for i in range(0, len(meta), META_WIDTH)]
    layout = _build(tuple(LayerGeom(r[0], *r[3:3 + n - 1]) for r in rows))
    if layout.meta != tuple(meta):
        raise ValueError("meta is not a lipkern layer table")
    return layout


def layout_from_meta(meta: Tuple[int, ...]) -> Layout:
    """Inverse of ``Layout.meta`` (what an op implementation receives)."""
    return _memo(_BY_META, meta, lambda: _from_meta(meta))


def check_op_inputs(layout: Layout, weights, x, u) -> None:
    """The registered ops' own cheap check (they can be called directly, past
    lipkern.validate): the tensors must fit the layer table, or a kernel would read past
    them. ``weights`` None skips the weights (the backward)."""
    if weights is not None:
        if len(weights) != layout.num_layers:
            raise ValueError(f"weights: {len(weights)} tensors for a table of "
                             f"{layout.num_layers} layers")
        for i, (w, g) in enumerate(zip(weights, layout.geoms)):
            if w.numel() != g.w_numel:
                raise ValueError(f"weights[{i}] has {w.numel()} elements, the table says "
                                 f"{g.w_numel}")
    if x.numel() != layout.total_x:
        raise ValueError(f"x0: {x.numel()} elements, the table needs {layout.total_x}")
    if u is not None and u.numel() != layout.total_y:
        raise ValueError(f"u0: {u.numel()} elements, the table needs {layout.total_y}")


@dataclass(frozen=True)
class PowerIterState:
    """Warm-start state: the packed unit vectors of the last call (detached).

    ``x``: (total_x,) right vectors (the operators' input spaces), ``u``: (total_y,) left
    vectors. ``meta`` ties the state to the layers it was computed for.
    """
    x: torch.Tensor
    u: torch.Tensor
    meta: Tuple[int, ...]

    def x_of(self, layout: Layout, i: int) -> torch.Tensor:
        """Layer ``i``'s right vector, shaped as the operator's input."""
        return self.x[layout.x_slice(i)]

    def u_of(self, layout: Layout, i: int) -> torch.Tensor:
        return self.u[layout.y_slice(i)]

    def to(self, *args, **kwargs) -> "PowerIterState":
        return PowerIterState(self.x.to(*args, **kwargs), self.u.to(*args, **kwargs), self.meta)


def initial_x(layout: Layout, device: torch.device, dtype: torch.dtype,
              generator: Optional[torch.Generator]) -> torch.Tensor:
    """Packed cold-start vectors: standard normal, drawn in float32 on the generator's device
    (CPU if none) so every backend and the reference start from the same numbers. They need
    not be unit: every backend normalizes x before its first use."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    x = torch.randn(layout.total_x, generator=generator, device=gen_device, dtype=torch.float32)
    return x.to(device=device, dtype=dtype)


# Knuth's multiplicative hash of the index (mod 2^32): exact integer arithmetic in every
# language a backend is written in, so the fallback is the same vector everywhere; unlike a
# constant vector it is not in the null space of structured kernels (a zero-sum difference
# filter annihilates the all-ones vector).
FALLBACK_MUL, FALLBACK_ADD = 2654435761, 1013904223


def fallback_vector(n: int, dtype: torch.dtype = torch.float64,
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """The deterministic start vector that replaces an all-zero or non-finite start or
    warm-start vector (every backend): ``h_i = (i * 2654435761 + 1013904223) mod 2^32``,
    entry ``h_i / 2^32 - 0.5``; (n,), not normalized."""
    i = torch.arange(n, dtype=torch.int64)
    h = (i * FALLBACK_MUL + FALLBACK_ADD) % (1 << 32)
    return (h.double() / float(1 << 32) - 0.5).to(dtype=dtype, device=device)


def weight_shapes(weights: Sequence[torch.Tensor]) -> Tuple[Tuple[int, ...], ...]:
    return tuple(tuple(w.shape) for w in weights)


def initial_u(layout: Layout, device: torch.device, dtype: torch.dtype,
              generator: Optional[torch.Generator]) -> torch.Tensor:
    """Packed cold-start left vectors of ``variant="spectral_norm"`` (drawn after
    :func:`initial_x` from the same generator; used as is only when ``n_iters == 0``)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    u = torch.randn(layout.total_y, generator=generator, device=gen_device, dtype=torch.float32)
    return u.to(device=device, dtype=dtype)
