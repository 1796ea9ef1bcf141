"""The one merge of partial attention results by the log-sum-exp identity.

Two partial results over disjoint key sets, each normalised within its own set,
``(o1, lse1)`` and ``(o2, lse2)``, combine exactly and in any order::

    lse = max(lse1, lse2) + log1p(exp(-|lse1 - lse2|))
    o   = w1 * o1 + w2 * o2,   w1 = 1 / (1 + exp(lse2 - lse1)),  w2 = 1 - w1

The weights are computed from the difference ``lse2 - lse1`` alone, as a
sigmoid, so they lie in [0, 1] and sum to one: the merged output stays a convex
combination of values (within the range of V) at any score magnitude. The lse
that is carried between merges is float64 (``CARRY_DTYPE``): a float32 lse of
magnitude 1e5 is only known to 0.01, which would make every weight wrong by a
percent; float64 keeps the difference exact to far below float32 resolution. It
costs 8 bytes per (batch, head, query), nothing next to the outputs.

An lse of -inf (no visible key) has weight zero; two of them give lse -inf and
o 0, never NaN. Written once against the array module of its inputs.
"""
from __future__ import annotations

import numpy as np

from ._arrays import array_module

__all__ = ["CARRY_DTYPE", "merge_into", "merge_weights"]

CARRY_DTYPE = np.dtype(np.float64)


def merge_weights(lse, block_lse):
    """(w_old, w_new, merged lse) for merging ``block_lse`` into ``lse``, -inf safe."""
    xp = array_module(lse)
    with np.errstate(invalid="ignore", over="ignore"):
        gap = block_lse - lse                     # NaN where both are -inf
        both_empty = xp.isnan(gap)
        gap = xp.where(both_empty, -np.inf, gap)  # keep the old (empty) result
        small = xp.exp(-xp.abs(gap))              # in [0, 1]
        big_share = 1.0 / (1.0 + small)
        small_share = small * big_share
        newer = gap > 0
        w_new = xp.where(newer, big_share, small_share)
        w_old = xp.where(newer, small_share, big_share)
        merged = xp.maximum(lse, block_lse) + xp.log1p(small)
    return w_old, w_new, merged


def merge_into(out, lse, block_out, block_lse) -> None:
    """Merge ``(block_out, block_lse)`` into the running ``(out, lse)`` in place.

    Parameters
    ----------
    out, block_out : array, shape (..., S, H, D)
        Normalised partial outputs; ``out`` is float32 or float64.
    lse, block_lse : array, shape (..., H, S)
        Their log-sum-exp values (natural log); ``lse`` is the float64 carry.
    """
    w_old, w_new, merged = merge_weights(lse, block_lse)
    dtype = out.dtype
    # (..., H, S) weights broadcast against (..., S, H, D) outputs
    out *= _per_row(w_old).astype(dtype, copy=False)
    out += _per_row(w_new).astype(dtype, copy=False) * block_out
    lse[...] = merged


def _per_row(weights):
    """(..., H, S) -> (..., S, H, 1), to scale outputs of shape (..., S, H, D)."""
    return weights.swapaxes(-1, -2)[..., None]
