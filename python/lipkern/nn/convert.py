"""Checkpoints of the old spectral-norm API (``torch.nn.utils.spectral_norm``: parameters
``<layer>.weight_orig``, buffers ``<layer>.weight_u`` / ``<layer>.weight_v``) loaded into a
model normalized by :func:`lipkern.nn.spectral_norm_model` or :func:`lipkern.nn.spectral_norm`
(torch's new parametrization keys: ``<layer>.parametrizations.weight.original``,
``<layer>.parametrizations.weight.0._u`` / ``._v``).

The vectors mean the same in both APIs (u: output side, v: the flattened input side, torch's
matrix of the weight), so a mapped checkpoint continues exactly where the old one stopped
(matrix mode; operator-mode vectors live in another space and are not taken from it).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

__all__ = ["convert_old_spectral_norm", "load_old_spectral_norm"]

_OLD = {"weight_orig": "parametrizations.weight.original",
        "weight_u": "parametrizations.weight.0._u",
        "weight_v": "parametrizations.weight.0._v"}


def convert_old_spectral_norm(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """A state_dict with the old API's keys renamed to the new API's; other keys unchanged.

    ``<p>.weight_orig -> <p>.parametrizations.weight.original``, ``<p>.weight_u -> ...0._u``,
    ``<p>.weight_v -> ...0._v``; a stray ``<p>.weight`` of such a layer (some code saved the
    computed weight too) is dropped, since the new API recomputes it.
    """
    out, normalized = {}, set()
    for k in state_dict:
        prefix, _, leaf = k.rpartition(".")
        if leaf in _OLD:
            normalized.add(prefix)
    for k, v in state_dict.items():
        prefix, _, leaf = k.rpartition(".")
        if leaf in _OLD:
            out[(prefix + "." if prefix else "") + _OLD[leaf]] = v
        elif leaf == "weight" and prefix in normalized:
            continue
        else:
            out[k] = v
    return out


def load_old_spectral_norm(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                           strict: bool = True):
    """``model.load_state_dict(convert_old_spectral_norm(state_dict), strict)`` for a model
    normalized with the new API (lipkern's or torch's parametrizations) from a checkpoint of
    a model normalized with ``torch.nn.utils.spectral_norm``. Returns load_state_dict's
    result (missing and unexpected keys)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model.load_state_dict(convert_old_spectral_norm(state_dict), strict=strict)
