"""The one merge of partial attention results by the log-sum-exp identity.

Two partial results over disjoint key sets, each normalised within its own set,
``(o1, lse1)`` and ``(o2, lse2)``, combine exactly and in any order::

    lse = max(lse1, lse2) + log1p(exp(-|lse1 - lse2|))
    o   = w1 * o1 + w2 * o2,   w1 = 1 / (1 + exp(lse2 - lse1)),  w2 = 1 - w1

The weights are computed from the difference ``lse2 - lse1`` alone, as a
sigmoid, so they lie in [0, 1] and sum to one: the merged output stays a convex
combination of values (within the range of V) at any score magnitude.

What is carried between merges decides the accuracy at large score magnitudes.
A float32 lse of magnitude 1e5 is only known to 0.01, which would make every
weight wrong by a percent, so the carry is float64 (``CARRY_DTYPE``). Even a
float64 lse of magnitude c is known only to c * 1e-16, which is far more than a
float64 computation's error when c is large (1e-6 at c = 1e10). So the carry may
also be *split*: an array with a trailing axis of two, ``(top, rest)`` with
``lse = top + rest``, where ``top`` is a score the kernel computed (a row
maximum) and ``rest`` the log of the row's sum relative to it (between 0 and the
log of the number of keys). Gaps are then formed as ``(top2 - top1) + (rest2 -
rest1)``: the difference of two computed scores is exact, so a merge adds no
error a one-block computation would not have, at any magnitude. The NumPy
backend carries split lse (16 bytes per row instead of 8); the GPU kernels carry
plain float64 lse, which is exact for their float32-or-narrower scores.

An lse of -inf (no visible key) has weight zero; two of them give lse -inf and
o 0, never NaN. Written once against the array module of its inputs.
"""
from __future__ import annotations

import numpy as np

from ._arrays import array_module

__all__ = ["CARRY_DTYPE", "new_carry", "carried_lse", "carry_parts", "merge_into",
           "merge_weights", "sum_weights", "normalise_sums", "sums_lse"]

CARRY_DTYPE = np.dtype(np.float64)


def new_carry(xp, shape, *, split: bool):
    """An empty carry (every row lse -inf) for rows of ``shape`` (B, H, S): float64,
    with a trailing (top, rest) axis when ``split``."""
    if not split:
        return xp.full(shape, -np.inf, dtype=CARRY_DTYPE)
    carry = xp.zeros(tuple(shape) + (2,), dtype=CARRY_DTYPE)
    carry[..., 0] = -np.inf
    return carry


def carry_parts(carry):
    """(top, rest) of a split carry (B, H, S, 2); (lse, 0.0) of a plain one (B, H, S)."""
    if carry.ndim == 4:
        return carry[..., 0], carry[..., 1]
    return carry, 0.0


def carried_lse(carry):
    """The lse (float64, natural log) a carry stands for."""
    if carry.ndim != 4:
        return carry
    with np.errstate(invalid="ignore"):
        return carry[..., 0] + carry[..., 1]  # -inf + 0 stays -inf


def merge_weights(lse, block_lse):
    """(w_old, w_new, merged) for merging ``block_lse`` into ``lse``, -inf safe.

    Either argument is an lse array or a ``(top, rest)`` pair (a split carry, see
    the module docstring); ``merged`` is then a (top, rest) pair too.
    """
    split = isinstance(lse, tuple) or isinstance(block_lse, tuple)
    top_old, rest_old = lse if isinstance(lse, tuple) else (lse, 0.0)
    top_new, rest_new = block_lse if isinstance(block_lse, tuple) else (block_lse, 0.0)
    xp = array_module(top_old)
    with np.errstate(invalid="ignore", over="ignore"):
        gap = (top_new - top_old) + (rest_new - rest_old)  # NaN where both are -inf
        both_empty = xp.isnan(gap)
        gap = xp.where(both_empty, -np.inf, gap)  # keep the old (empty) result
        small = xp.exp(-xp.abs(gap))              # in [0, 1]
        big_share = 1.0 / (1.0 + small)
        small_share = small * big_share
        newer = gap > 0
        w_new = xp.where(newer, big_share, small_share)
        w_old = xp.where(newer, small_share, big_share)
        if split:
            top = xp.where(newer, top_new, top_old)
            rest = xp.where(newer, rest_new, rest_old) + xp.log1p(small)
            return w_old, w_new, (top, rest)
        merged = xp.maximum(top_old, top_new) + xp.log1p(small)
    return w_old, w_new, merged


def merge_into(out, lse, block_out, block_lse) -> None:
    """Merge ``(block_out, block_lse)`` into the running ``(out, lse)`` in place.

    Parameters
    ----------
    out, block_out : array, shape (..., S, H, D)
        Normalised partial outputs; ``out`` is float32 or float64.
    lse, block_lse : array, shape (..., H, S), or (B, H, S, 2) split carries
        Their log-sum-exp values (natural log); ``lse`` is the float64 carry.
    """
    split = lse.ndim == 4
    block = carry_parts(block_lse) if block_lse.ndim == 4 else block_lse
    w_old, w_new, merged = merge_weights(carry_parts(lse) if split else lse, block)
    dtype = out.dtype
    # (..., H, S) weights broadcast against (..., S, H, D) outputs
    out *= _per_row(w_old).astype(dtype, copy=False)
    out += _per_row(w_new).astype(dtype, copy=False) * block_out
    if split:
        lse[..., 0], lse[..., 1] = merged
    else:
        lse[...] = merged


def _per_row(weights):
    """(..., H, S) -> (..., S, H, 1), to scale outputs of shape (..., S, H, D)."""
    return weights.swapaxes(-1, -2)[..., None]


# -- the merge of every rank's slice at once (K/V-sharded attention) ---------------------
#
# Each rank holds (o_r, lse_r) over its own keys. With M the largest lse over the ranks
# (an Allreduce(MAX)), w_r = exp(lse_r - M) lies in [0, the rank's key count]; the sums
# over the ranks of w_r * o_r and of w_r (one Allreduce(SUM) of both, packed) give
# out = sum(w_r o_r) / sum(w_r) and lse = M + log(sum(w_r)). The GPU backend runs the same
# three steps as fused kernels (seqpar/local/cupy_merge.py).

def sum_weights(top, rest, global_max, weights) -> None:
    """Write w = exp(lse - M) of this rank's rows into ``weights``.

    ``(top, rest)`` is this rank's carry (:func:`carry_parts`), ``global_max`` M, the
    Allreduce(MAX) of ``top`` (float64, (B, H, S)). The gap is formed as ``(top - M) +
    rest``, exact at any magnitude (the difference of two computed scores); a rank that
    saw no key has weight 0, and where no rank did M is -inf, taken as 0.
    """
    xp = array_module(global_max)
    finite_max = xp.where(global_max == -np.inf, 0, global_max)
    weights[...] = xp.exp((top - finite_max) + rest)


def normalise_sums(numerators, denominators) -> None:
    """``numerators`` (B, S, H, D) divided in place by ``denominators`` (B, H, S), the
    summed weights; rows of denominator 0 (no key anywhere) stay 0."""
    xp = array_module(denominators)
    safe = xp.where(denominators > 0, denominators, 1)
    numerators /= _per_row(safe)


def sums_lse(denominators, global_max, lse) -> None:
    """The merged lse, M + log(sum of weights), into ``lse`` (B, H, S); -inf where no
    rank saw a key."""
    xp = array_module(denominators)
    seen = denominators > 0
    finite_max = xp.where(global_max == -np.inf, 0, global_max)
    safe = xp.where(seen, denominators, 1).astype(CARRY_DTYPE)
    lse[...] = xp.where(seen, finite_max + xp.log(safe), -np.inf)
