"""The one merge of partial attention results by the log-sum-exp identity.

Two partial results over disjoint key sets, each normalised within its own set,
``(o1, lse1)`` and ``(o2, lse2)``, combine exactly and in any order::

    lse = max(lse1, lse2) + log1p(exp(-|lse1 - lse2|))
    o   = exp(lse1 - lse) * o1 + exp(lse2 - lse) * o2

An lse of -inf (no visible key) has weight zero; two of them give lse -inf and
o 0, never NaN. Written once against the array module of its inputs.
"""
from __future__ import annotations

import numpy as np

from ._arrays import array_module

__all__ = ["merge_into", "combined_lse"]


def combined_lse(lse1, lse2):
    """log(exp(lse1) + exp(lse2)), overflow-free and -inf safe."""
    xp = array_module(lse1)
    hi = xp.maximum(lse1, lse2)
    with np.errstate(invalid="ignore"):
        gap = xp.minimum(lse1, lse2) - hi  # <= 0; NaN where both are -inf
    gap = xp.where(hi == -np.inf, -np.inf, gap)
    return hi + xp.log1p(xp.exp(gap))


def merge_into(out, lse, block_out, block_lse) -> None:
    """Merge ``(block_out, block_lse)`` into the running ``(out, lse)`` in place.

    Parameters
    ----------
    out, block_out : array, shape (B, S, H, D)
        Normalised partial outputs; ``out`` is float32 or float64.
    lse, block_lse : array, shape (B, H, S)
        Their log-sum-exp values (natural log), same dtype as ``out``'s accumulator.
    """
    xp = array_module(out)
    new_lse = combined_lse(lse, block_lse)
    finite = xp.where(new_lse == -np.inf, 0, new_lse)
    # (B, H, S) weights broadcast against (B, S, H, D) outputs
    w_old = xp.exp(lse - finite).transpose(0, 2, 1)[..., None]
    w_new = xp.exp(block_lse - finite).transpose(0, 2, 1)[..., None]
    out *= w_old
    out += w_new * block_out
    lse[...] = new_lse
