"""The compiled (numba) pieces of the CPU backend: what NumPy would do in several passes
over a score tile, done in one.

The two products of a tile stay BLAS calls (:mod:`seqpar.local.numpy_kernel`); these
kernels replace the passes between them. Each reads and writes a tile in place, rows
one at a time (a row of scores stays in L1 between its max and its exponentials), and
takes every row's visible keys as an interval ``[lo, hi]`` of tile columns, which is
what every mask gives (:mod:`seqpar.masks`); columns outside it become 0.

- :func:`softmax_step`: the forward's online-softmax step (masked row max, running max,
  exponentials in place, row sums, rescale of the output accumulator).
- :func:`probabilities`, :func:`softmax_grad`: the backward's ``P = exp(S - lse)`` and
  ``dS = P * (dP - delta)``.
- :func:`decode`: attention of a few rows over a long run of keys without BLAS, reading
  each key and value row once for all rows of a GQA group (decoding).

Every kernel is compiled on first use for float32 and float64 and cached on disk
(``cache=True``); results are the same bytes run to run (the loop order is fixed by
the compiled code and the shapes, and nothing runs in parallel inside a kernel).
Importing this module needs numba.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .numba_math import FASTMATH, exp_nonpositive, fmax, not_finite, prefer_wide_vectors

__all__ = ["DECODE_CHUNK", "decode", "not_finite", "probabilities", "softmax_grad",
           "softmax_step"]

# Keys per chunk of the decode kernel: a chunk's scores (rows x chunk) stay in L1/L2
# between the score, softmax and value passes, while K and V stream from memory once.
DECODE_CHUNK = 512

_JIT = {"nogil": True, "cache": True, "fastmath": FASTMATH, "error_model": "numpy"}


@njit(inline="always", **_JIT)
def _row_bounds(lo, hi, r, cols, masked):
    """Columns [a, b) of tile row r that its mask shows (all when not masked)."""
    if not masked:
        return 0, cols
    a = min(max(lo[r], 0), cols)
    return a, max(min(hi[r] + 1, cols), a)


@njit(inline="always", **_JIT)
def _row_update(row, a, b, r, row_max, row_sum):
    """One row's online-softmax step over row[a:b] (the rest of the row set to 0):
    exponentials in place, running max and sum updated; returns the factor by which
    the row's earlier output must be rescaled."""
    row[:a] = 0
    row[b:] = 0
    seen = row[a:b]  # a view from 0: LLVM sees unit stride and no negative index
    old = row_max[r]
    top = old
    for j in range(seen.shape[0]):
        top = fmax(top, seen[j])
    if top == -np.inf:  # no key seen yet: nothing to add, nothing to rescale
        seen[:] = 0
        return row_sum[r] * np.float32(0) + np.float32(1)
    total = row_sum[r] * np.float32(0)
    for j in range(seen.shape[0]):
        e = exp_nonpositive(seen[j] - top)
        seen[j] = e
        total += e
    alpha = exp_nonpositive(old - top)  # 0 when old is -inf
    row_sum[r] = row_sum[r] * alpha + total
    row_max[r] = top
    return alpha


@njit(**_JIT)
def softmax_step(scores, row_max, row_sum, out, lo, hi, masked):
    """The online-softmax step of one (rows x keys) score tile, in place.

    Parameters
    ----------
    scores : ndarray, (rows, keys), C order
        Scaled scores; replaced by ``exp(score - new row max)``, 0 where masked.
    row_max, row_sum : ndarray, (rows,)
        Running max (-inf before any key) and sum of exponentials; updated.
    out : ndarray, (rows, d), C order
        Unnormalised output so far; rescaled to the new row max (the caller then adds
        ``scores @ V``).
    lo, hi : ndarray of int64, (rows,)
        Visible columns [lo, hi] of each row (tile-local); read only when ``masked``.
    masked : bool
    """
    prefer_wide_vectors()
    rows, cols = scores.shape
    for r in range(rows):
        a, b = _row_bounds(lo, hi, r, cols, masked)
        alpha = _row_update(scores[r], a, b, r, row_max, row_sum)
        orow = out[r]
        for c in range(orow.shape[0]):
            orow[c] *= alpha


@njit(**_JIT)
def probabilities(scores, lse, lo, hi, masked):
    """``scores = exp(scores - lse)`` per row in place, 0 where masked; ``lse`` is +inf
    for rows that see no key (their probabilities are then exactly 0)."""
    rows, cols = scores.shape
    for r in range(rows):
        a, b = _row_bounds(lo, hi, r, cols, masked)
        row = scores[r]
        row[:a] = 0
        row[b:] = 0
        seen = row[a:b]
        shift = lse[r]
        for j in range(seen.shape[0]):
            seen[j] = exp_nonpositive(seen[j] - shift)


@njit(**_JIT)
def softmax_grad(dp, p, delta):
    """``dp = p * (dp - delta)`` per row in place: the score gradient dS."""
    rows, cols = dp.shape
    for r in range(rows):
        row, prob, shift = dp[r], p[r], delta[r]
        for j in range(cols):
            row[j] = prob[j] * (row[j] - shift)


@njit(**_JIT)
def decode(q, k, k_stride, v, v_stride, keys, lo, hi, masked, out, row_max, row_sum,
           scores):
    """Attention of a few query rows over ``keys`` key rows, online, without BLAS.

    Parameters
    ----------
    q : ndarray, (rows, d), C order
        Scaled queries (the rows of one GQA group).
    k, v : ndarray, 1-D, read only
        Key and value row i at ``x[i * stride : i * stride + d]`` (one head of the
        cache, read in place).
    k_stride, v_stride : int
        Elements between consecutive key (value) rows.
    keys : int
        Number of key rows.
    lo, hi : ndarray of int64, (rows,)
        Visible keys [lo, hi] of each row (local); read only when ``masked``.
    masked : bool
    out : ndarray, (rows, d), C order
        Unnormalised output accumulator (zeros on entry for a fresh pass).
    row_max, row_sum : ndarray, (rows,)
        Running max and sum, as in :func:`softmax_step`.
    scores : ndarray, (rows, DECODE_CHUNK), C order
        Scratch.

    Returns
    -------
    bool
        False, with the accumulators left part-way, when a score is NaN or inf (the
        caller then runs the NumPy passes, which propagate it), else True.
    """
    rows, d = q.shape
    chunk = scores.shape[1]
    for j0 in range(0, keys, chunk):
        n = min(chunk, keys - j0)
        # scores of the chunk: each key row is read once, for every query row
        for j in range(n):
            kr = k[(j0 + j) * k_stride:(j0 + j) * k_stride + d]
            for r in range(rows):
                qr = q[r]
                s = qr[0] * np.float32(0)
                for c in range(d):
                    s += qr[c] * kr[c]
                scores[r, j] = s
        for r in range(rows):
            if not_finite(scores[r, :n]):
                return False
        for r in range(rows):
            lo_r = lo[r] - j0 if masked else 0
            hi_r = hi[r] - j0 if masked else n - 1
            a = min(max(lo_r, 0), n)
            b = max(min(hi_r + 1, n), a)
            alpha = _row_update(scores[r, :n], a, b, r, row_max, row_sum)
            orow = out[r]
            for c in range(d):
                orow[c] *= alpha
        # values: each value row is read once and added into every query row
        for j in range(n):
            vr = v[(j0 + j) * v_stride:(j0 + j) * v_stride + d]
            for r in range(rows):
                p = scores[r, j]
                orow = out[r]
                for c in range(d):
                    orow[c] += p * vr[c]
    return True
