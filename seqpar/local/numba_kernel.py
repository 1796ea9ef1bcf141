"""The compiled (numba) pieces of the CPU backend: what BLAS and NumPy would do in several
passes over a score tile, done in one.

Each kernel takes every row's visible keys as an interval ``[lo, hi]`` of tile columns,
which is what every mask gives (:mod:`seqpar.masks`); columns outside it become 0.

- :func:`attend_keys`: a key tile into the forward's running softmax, both products
  included, 8 query rows at a time in explicit vectors (:mod:`seqpar.local.numba_simd`):
  their scores stay in L1 between the products, and only the blocks of keys (32 float32
  or 16 float64) that one of the rows sees are computed (head dims a multiple of 32).
- :func:`backward_keys`: one (row tile, key tile) pair of the backward the same way,
  all five products included.
- :func:`softmax_step`: the forward's online-softmax step between two BLAS products
  (masked row max, running max, exponentials in place, row sums, rescale of the output
  accumulator), row by row (a row of scores stays in L1 between its max and its
  exponentials); :func:`probabilities`, :func:`softmax_grad`: the backward's
  ``P = exp(S - lse)`` and ``dS = P * (dP - delta)``. These serve the other head dims.
- :func:`decode_heads`: attention of a few rows per K/V head over a run of keys without
  BLAS, for every K/V head at once (each cache line of the (keys, heads, d) cache read
  once), in explicit 16-lane vectors: float32, d a multiple of 32 (decoding).
- :func:`decode`: the same for one K/V head in plain loops, any float dtype and d (the
  score dot products end in horizontal reductions: slower).

Every kernel is compiled on first use for float32 and float64 and cached on disk
(``cache=True``); results are the same bytes run to run (the loop order is fixed by
the compiled code and the shapes, and nothing runs in parallel inside a kernel).
Importing this module needs numba.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .numba_math import FASTMATH, exp_nonpositive, fmax, not_finite, prefer_wide_vectors
from .numba_simd import (
    LANES,
    fold1,
    fold2,
    fold4,
    fold8,
    lanes,
    prefetch,
    vadd,
    vfma,
    vload,
    vsplat,
    vstore,
    vzero,
    vzero_like,
)

__all__ = ["DECODE_CHUNK", "DECODE_HEADS_COLUMNS", "FUSED_COLUMNS", "FUSED_ROWS", "attend_keys",
           "backward_keys", "decode", "decode_heads", "not_finite", "probabilities", "softmax_grad",
           "softmax_step"]

# Keys per chunk of the decode kernel: a chunk's scores (rows x chunk) stay in L1/L2
# between the score, softmax and value passes, while K and V stream from memory once.
DECODE_CHUNK = 512
# attend_keys and backward_keys take row tiles of a multiple of FUSED_ROWS rows and head
# dims of a multiple of FUSED_COLUMNS (its register blocks: 8 rows x two vectors, 32 float32 or 16 float64)
FUSED_ROWS = 8
FUSED_COLUMNS = 2 * LANES
# decode_heads takes float32 rows of a multiple of this many columns (two vectors)
DECODE_HEADS_COLUMNS = 2 * LANES
# decode_heads: floats of one column step of a reordered block of LANES keys, and how
# many keys ahead of the one in use it asks for K and V rows (measured: 64 keys beat
# none by ~15% at d = 64 and changed nothing at d = 128; benchmarks/cpu_decode.md)
_BLOCK_STEP = LANES * LANES
_PREFETCH_KEYS = 64

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


@njit(inline="always", **_JIT)
def _block_columns(lo, hi, r0, keys, masked, width, step):
    """(j0, n): the columns [j0, j0 + n) of whole register blocks of ``step`` keys that
    hold every key one of rows r0 .. r0 + 7 sees (n = 0: none sees any)."""
    first, last = keys, 0
    for i in range(FUSED_ROWS):
        a, b = _row_bounds(lo, hi, r0 + i, keys, masked)
        if b > a:
            first, last = min(first, a), max(last, b)
    if last <= first:
        return 0, 0
    j0 = (first // step) * step
    return j0, min(width - j0, -(-(last - j0) // step) * step)


@njit(inline="always", **_JIT)
def _score_rows(q, r0, kt, kt_row, j0, n, d, scores):
    """``scores[0:8, 0:n] = q[r0:r0 + 8] @ kt[:, j0:j0 + n]`` (kt: d rows of ``kt_row``
    keys, flat; n a multiple of two vectors): an 8 x 2-vector block of scores in 16
    vector accumulators over the d column steps, each key vector loaded once for 8 rows."""
    w = lanes(kt)
    q0, q1, q2, q3 = q[r0], q[r0 + 1], q[r0 + 2], q[r0 + 3]
    q4, q5, q6, q7 = q[r0 + 4], q[r0 + 5], q[r0 + 6], q[r0 + 7]
    for j in range(0, n, 2 * w):
        a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = vzero_like(kt)
        a40 = a41 = a50 = a51 = a60 = a61 = a70 = a71 = vzero_like(kt)
        for c in range(d):
            at = c * kt_row + j0 + j
            x0, x1 = vload(kt, at), vload(kt, at + w)
            s = vsplat(q0[c])
            a00, a01 = vfma(s, x0, a00), vfma(s, x1, a01)
            s = vsplat(q1[c])
            a10, a11 = vfma(s, x0, a10), vfma(s, x1, a11)
            s = vsplat(q2[c])
            a20, a21 = vfma(s, x0, a20), vfma(s, x1, a21)
            s = vsplat(q3[c])
            a30, a31 = vfma(s, x0, a30), vfma(s, x1, a31)
            s = vsplat(q4[c])
            a40, a41 = vfma(s, x0, a40), vfma(s, x1, a41)
            s = vsplat(q5[c])
            a50, a51 = vfma(s, x0, a50), vfma(s, x1, a51)
            s = vsplat(q6[c])
            a60, a61 = vfma(s, x0, a60), vfma(s, x1, a61)
            s = vsplat(q7[c])
            a70, a71 = vfma(s, x0, a70), vfma(s, x1, a71)
        vstore(scores[0], j, a00)
        vstore(scores[0], j + w, a01)
        vstore(scores[1], j, a10)
        vstore(scores[1], j + w, a11)
        vstore(scores[2], j, a20)
        vstore(scores[2], j + w, a21)
        vstore(scores[3], j, a30)
        vstore(scores[3], j + w, a31)
        vstore(scores[4], j, a40)
        vstore(scores[4], j + w, a41)
        vstore(scores[5], j, a50)
        vstore(scores[5], j + w, a51)
        vstore(scores[6], j, a60)
        vstore(scores[6], j + w, a61)
        vstore(scores[7], j, a70)
        vstore(scores[7], j + w, a71)


@njit(inline="always", **_JIT)
def _add_rows(p, vf, j0, n, out, r0, d):
    """``out[r0:r0 + 8] += p[0:8, 0:n] @ V[j0:j0 + n]`` (vf: rows of d values, flat),
    columns two vectors at a time, that 8 x 2-vector block of the product summed in
    registers over the n keys, then added to out (summed from zero, as a BLAS product
    would be: a running sum over every tile's keys in one chain has ~3x the rounding
    error at 4k keys)."""
    w = lanes(vf)
    p0, p1, p2, p3, p4, p5, p6, p7 = p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]
    w0, w1, w2, w3 = out[r0], out[r0 + 1], out[r0 + 2], out[r0 + 3]
    w4, w5, w6, w7 = out[r0 + 4], out[r0 + 5], out[r0 + 6], out[r0 + 7]
    for c in range(0, d, 2 * w):
        o00 = o01 = vzero_like(vf)
        o10 = o11 = vzero_like(vf)
        o20 = o21 = vzero_like(vf)
        o30 = o31 = vzero_like(vf)
        o40 = o41 = vzero_like(vf)
        o50 = o51 = vzero_like(vf)
        o60 = o61 = vzero_like(vf)
        o70 = o71 = vzero_like(vf)
        for j in range(n):
            at = (j0 + j) * d + c
            x0, x1 = vload(vf, at), vload(vf, at + w)
            s = vsplat(p0[j])
            o00, o01 = vfma(s, x0, o00), vfma(s, x1, o01)
            s = vsplat(p1[j])
            o10, o11 = vfma(s, x0, o10), vfma(s, x1, o11)
            s = vsplat(p2[j])
            o20, o21 = vfma(s, x0, o20), vfma(s, x1, o21)
            s = vsplat(p3[j])
            o30, o31 = vfma(s, x0, o30), vfma(s, x1, o31)
            s = vsplat(p4[j])
            o40, o41 = vfma(s, x0, o40), vfma(s, x1, o41)
            s = vsplat(p5[j])
            o50, o51 = vfma(s, x0, o50), vfma(s, x1, o51)
            s = vsplat(p6[j])
            o60, o61 = vfma(s, x0, o60), vfma(s, x1, o61)
            s = vsplat(p7[j])
            o70, o71 = vfma(s, x0, o70), vfma(s, x1, o71)
        vstore(w0, c, vadd(o00, vload(w0, c)))
        vstore(w0, c + w, vadd(o01, vload(w0, c + w)))
        vstore(w1, c, vadd(o10, vload(w1, c)))
        vstore(w1, c + w, vadd(o11, vload(w1, c + w)))
        vstore(w2, c, vadd(o20, vload(w2, c)))
        vstore(w2, c + w, vadd(o21, vload(w2, c + w)))
        vstore(w3, c, vadd(o30, vload(w3, c)))
        vstore(w3, c + w, vadd(o31, vload(w3, c + w)))
        vstore(w4, c, vadd(o40, vload(w4, c)))
        vstore(w4, c + w, vadd(o41, vload(w4, c + w)))
        vstore(w5, c, vadd(o50, vload(w5, c)))
        vstore(w5, c + w, vadd(o51, vload(w5, c + w)))
        vstore(w6, c, vadd(o60, vload(w6, c)))
        vstore(w6, c + w, vadd(o61, vload(w6, c + w)))
        vstore(w7, c, vadd(o70, vload(w7, c)))
        vstore(w7, c + w, vadd(o71, vload(w7, c + w)))


@njit(**_JIT)
def attend_keys(q, kt, vf, keys, lo, hi, masked, row_max, row_sum, out, scores):
    """One key tile into the running softmax of a row tile, both products included
    (float32 or float64, all arrays of one dtype; no BLAS, no score tile in memory: 8
    rows at a time in L1).

    Parameters
    ----------
    q : ndarray, (rows, d), C order
        Scaled queries; rows a multiple of ``FUSED_ROWS``, d of ``FUSED_COLUMNS``.
    kt : ndarray, (d * width,)
        The tile's keys transposed: column c of key j at ``kt[c * width + j]``, width
        a multiple of ``FUSED_COLUMNS`` and at least ``keys``.
    vf : ndarray, (width * d,)
        The tile's values, row j at ``vf[j * d:][:d]``; rows from ``keys`` on are 0.
    keys : int
        Keys in the tile.
    lo, hi : ndarray of int64, (rows,)
        Visible keys [lo, hi] of each row (tile-local); read only when ``masked``.
    masked : bool
    row_max, row_sum, out : ndarray
        The running state of :func:`softmax_step`, updated.
    scores : ndarray, (FUSED_ROWS, width), C order
        Scratch.

    Each block of 8 rows takes the blocks of keys that any of its rows sees (a causal
    diagonal tile costs about half a full one), scores them, runs the online-softmax
    step row by row and adds its values.
    """
    prefer_wide_vectors()
    rows, d = q.shape
    width = kt.shape[0] // d
    step = 2 * lanes(kt)  # keys per register block
    for r0 in range(0, rows, FUSED_ROWS):
        j0, n = _block_columns(lo, hi, r0, keys, masked, width, step)
        if n == 0:  # no row of the block sees a key here: nothing changes
            continue
        _score_rows(q, r0, kt, width, j0, n, d, scores)
        for i in range(FUSED_ROWS):
            a, b = _row_bounds(lo, hi, r0 + i, keys, masked)
            a, b = min(max(a - j0, 0), n), min(max(b - j0, 0), n)
            alpha = _row_update(scores[i, :n], a, max(a, b), r0 + i, row_max, row_sum)
            orow = out[r0 + i]
            for c in range(d):
                orow[c] *= alpha
        _add_rows(scores, vf, j0, n, out, r0, d)


@njit(inline="always", **_JIT)
def _add_key_rows(p, x, r0, grad, j0, n, d):
    """``grad[j0:j0 + n] += p[0:8, 0:n].T @ x[r0:r0 + 8]`` (grad: rows of d, flat; n a
    multiple of 4): the 8 x 2-vector block of x held in registers; four keys at a
    time, so that eight chains of multiply-adds run side by side (one key's two
    vectors alone would wait on the FMA latency)."""
    w = lanes(grad)
    p0, p1, p2, p3, p4, p5, p6, p7 = p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]
    for c in range(0, d, 2 * w):
        x00, x01 = vload(x[r0], c), vload(x[r0], c + w)
        x10, x11 = vload(x[r0 + 1], c), vload(x[r0 + 1], c + w)
        x20, x21 = vload(x[r0 + 2], c), vload(x[r0 + 2], c + w)
        x30, x31 = vload(x[r0 + 3], c), vload(x[r0 + 3], c + w)
        x40, x41 = vload(x[r0 + 4], c), vload(x[r0 + 4], c + w)
        x50, x51 = vload(x[r0 + 5], c), vload(x[r0 + 5], c + w)
        x60, x61 = vload(x[r0 + 6], c), vload(x[r0 + 6], c + w)
        x70, x71 = vload(x[r0 + 7], c), vload(x[r0 + 7], c + w)
        for j in range(0, n, 4):
            at = (j0 + j) * d + c
            g00, g01 = vload(grad, at), vload(grad, at + w)
            g10, g11 = vload(grad, at + 1 * d), vload(grad, at + 1 * d + w)
            g20, g21 = vload(grad, at + 2 * d), vload(grad, at + 2 * d + w)
            g30, g31 = vload(grad, at + 3 * d), vload(grad, at + 3 * d + w)
            s = vsplat(p0[j])
            g00, g01 = vfma(s, x00, g00), vfma(s, x01, g01)
            s = vsplat(p0[j + 1])
            g10, g11 = vfma(s, x00, g10), vfma(s, x01, g11)
            s = vsplat(p0[j + 2])
            g20, g21 = vfma(s, x00, g20), vfma(s, x01, g21)
            s = vsplat(p0[j + 3])
            g30, g31 = vfma(s, x00, g30), vfma(s, x01, g31)
            s = vsplat(p1[j])
            g00, g01 = vfma(s, x10, g00), vfma(s, x11, g01)
            s = vsplat(p1[j + 1])
            g10, g11 = vfma(s, x10, g10), vfma(s, x11, g11)
            s = vsplat(p1[j + 2])
            g20, g21 = vfma(s, x10, g20), vfma(s, x11, g21)
            s = vsplat(p1[j + 3])
            g30, g31 = vfma(s, x10, g30), vfma(s, x11, g31)
            s = vsplat(p2[j])
            g00, g01 = vfma(s, x20, g00), vfma(s, x21, g01)
            s = vsplat(p2[j + 1])
            g10, g11 = vfma(s, x20, g10), vfma(s, x21, g11)
            s = vsplat(p2[j + 2])
            g20, g21 = vfma(s, x20, g20), vfma(s, x21, g21)
            s = vsplat(p2[j + 3])
            g30, g31 = vfma(s, x20, g30), vfma(s, x21, g31)
            s = vsplat(p3[j])
            g00, g01 = vfma(s, x30, g00), vfma(s, x31, g01)
            s = vsplat(p3[j + 1])
            g10, g11 = vfma(s, x30, g10), vfma(s, x31, g11)
            s = vsplat(p3[j + 2])
            g20, g21 = vfma(s, x30, g20), vfma(s, x31, g21)
            s = vsplat(p3[j + 3])
            g30, g31 = vfma(s, x30, g30), vfma(s, x31, g31)
            s = vsplat(p4[j])
            g00, g01 = vfma(s, x40, g00), vfma(s, x41, g01)
            s = vsplat(p4[j + 1])
            g10, g11 = vfma(s, x40, g10), vfma(s, x41, g11)
            s = vsplat(p4[j + 2])
            g20, g21 = vfma(s, x40, g20), vfma(s, x41, g21)
            s = vsplat(p4[j + 3])
            g30, g31 = vfma(s, x40, g30), vfma(s, x41, g31)
            s = vsplat(p5[j])
            g00, g01 = vfma(s, x50, g00), vfma(s, x51, g01)
            s = vsplat(p5[j + 1])
            g10, g11 = vfma(s, x50, g10), vfma(s, x51, g11)
            s = vsplat(p5[j + 2])
            g20, g21 = vfma(s, x50, g20), vfma(s, x51, g21)
            s = vsplat(p5[j + 3])
            g30, g31 = vfma(s, x50, g30), vfma(s, x51, g31)
            s = vsplat(p6[j])
            g00, g01 = vfma(s, x60, g00), vfma(s, x61, g01)
            s = vsplat(p6[j + 1])
            g10, g11 = vfma(s, x60, g10), vfma(s, x61, g11)
            s = vsplat(p6[j + 2])
            g20, g21 = vfma(s, x60, g20), vfma(s, x61, g21)
            s = vsplat(p6[j + 3])
            g30, g31 = vfma(s, x60, g30), vfma(s, x61, g31)
            s = vsplat(p7[j])
            g00, g01 = vfma(s, x70, g00), vfma(s, x71, g01)
            s = vsplat(p7[j + 1])
            g10, g11 = vfma(s, x70, g10), vfma(s, x71, g11)
            s = vsplat(p7[j + 2])
            g20, g21 = vfma(s, x70, g20), vfma(s, x71, g21)
            s = vsplat(p7[j + 3])
            g30, g31 = vfma(s, x70, g30), vfma(s, x71, g31)
            vstore(grad, at, g00)
            vstore(grad, at + w, g01)
            vstore(grad, at + 1 * d, g10)
            vstore(grad, at + 1 * d + w, g11)
            vstore(grad, at + 2 * d, g20)
            vstore(grad, at + 2 * d + w, g21)
            vstore(grad, at + 3 * d, g30)
            vstore(grad, at + 3 * d + w, g31)


@njit(**_JIT)
def backward_keys(qs, do, lse, delta, kt, kf, vt, keys, lo, hi, masked, dq, dk, dv, p, ds):
    """One (row tile, key tile) pair of the backward, all five products included
    (float32 or float64, all arrays of one dtype; no BLAS: 8 rows at a time in L1).

    Parameters
    ----------
    qs, do : ndarray, (rows, d), C order
        Scaled queries and output gradients; rows a multiple of ``FUSED_ROWS``, d of
        ``FUSED_COLUMNS``.
    lse, delta : ndarray, (rows,)
        Each row's log-sum-exp (+inf for a row that sees no key) and
        ``rowsum(dout * out)``.
    kt, vt : ndarray, (d * width,)
        The tile's keys and values transposed (column c of key j at ``c * width + j``),
        width as in :func:`attend_keys`.
    kf : ndarray, (width * d,)
        The tile's keys in rows, zero from row ``keys`` on.
    keys : int
        Keys in the tile.
    lo, hi : ndarray of int64, (rows,)
        Visible keys [lo, hi] of each row (tile-local); read only when ``masked``.
    masked : bool
    dq : ndarray, (rows, d), C order
        ``dS @ K`` of the rows is added here (not yet multiplied by the scale).
    dk, dv : ndarray, (width * d,)
        The key tile's gradients in rows; ``dS.T @ qs`` and ``P.T @ do`` are added.
    p, ds : ndarray, (FUSED_ROWS, width), C order
        Scratch.

    Per block of 8 rows, over the blocks of keys any of them sees: P = exp(S - lse),
    dP = do @ V.T, dS = P (dP - delta), then dq, dv and dk.
    """
    prefer_wide_vectors()
    rows, d = qs.shape
    width = kt.shape[0] // d
    step = 2 * lanes(kt)  # keys per register block
    for r0 in range(0, rows, FUSED_ROWS):
        j0, n = _block_columns(lo, hi, r0, keys, masked, width, step)
        if n == 0:  # no row of the block sees a key here: nothing changes
            continue
        _score_rows(qs, r0, kt, width, j0, n, d, p)
        _score_rows(do, r0, vt, width, j0, n, d, ds)
        for i in range(FUSED_ROWS):
            a, b = _row_bounds(lo, hi, r0 + i, keys, masked)
            a, b = min(max(a - j0, 0), n), min(max(b - j0, 0), n)
            b = max(a, b)
            prow, drow = p[i, :n], ds[i, :n]
            shift, centre = lse[r0 + i], delta[r0 + i]
            prow[:a] = 0
            prow[b:] = 0
            seen = prow[a:b]  # a view from 0: LLVM vectorises the loop (not from a)
            for j in range(seen.shape[0]):
                seen[j] = exp_nonpositive(seen[j] - shift)
            for j in range(n):
                drow[j] = prow[j] * (drow[j] - centre)
        _add_rows(ds, kf, j0, n, dq, r0, d)
        _add_key_rows(p, do, r0, dv, j0, n, d)
        _add_key_rows(ds, qs, r0, dk, j0, n, d)


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


@njit(inline="always", **_JIT)
def _decode_step(scores, n, j0, rows, lo, hi, masked, row_max, row_sum, out, d):
    """The online-softmax step of a decode chunk: score columns [0, n) of each row (keys
    j0 .. j0 + n - 1, masked by the rows' local bounds [lo, hi]) into probabilities,
    the running max and sum, and the rows' outputs rescaled. False, with nothing
    changed, when a score is NaN or inf."""
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
    return True


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
        if not _decode_step(scores, n, j0, rows, lo, hi, masked, row_max, row_sum, out, d):
            return False
        # values: each value row is read once and added into every query row
        for j in range(n):
            vr = v[(j0 + j) * v_stride:(j0 + j) * v_stride + d]
            for r in range(rows):
                p = scores[r, j]
                orow = out[r]
                for c in range(d):
                    orow[c] += p * vr[c]
    return True


@njit(inline="always", **_JIT)
def _gather_keys(k, k_stride, v, v_stride, j, last, d, block):
    """Key rows j .. j + 15 (clamped to ``last``: the copies are ignored) into ``block``
    as ``block[step * 256 + m * 16 + i] = k[row_m * k_stride + step * 16 + i]``, so the
    score pass reads 16 keys' vectors of one column step at fixed offsets; asks for the
    K and V rows _PREFETCH_KEYS keys ahead."""
    for m in range(LANES):
        source = min(j + m, last) * k_stride
        ahead = min(j + m + _PREFETCH_KEYS, last)
        for c in range(0, d, LANES):
            prefetch(k, ahead * k_stride + c)
            prefetch(v, ahead * v_stride + c)
            vstore(block, (c // LANES) * _BLOCK_STEP + m * LANES, vload(k, source + c))


@njit(inline="always", **_JIT)
def _score_keys(q_row, block, d, scores_row, at):
    """``scores_row[at:at + 16]`` = the dot products of ``q_row`` with the 16 keys of
    ``block`` (:func:`_gather_keys`): 16 independent vector sums over the column steps,
    then four fold steps that sum each vector's lanes into one lane per key."""
    # accumulator m sums key bitrev4(m), so that the folds put key i in lane i
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = vzero()
    a8 = a9 = a10 = a11 = a12 = a13 = a14 = a15 = vzero()
    for c in range(0, d, LANES):
        x = vload(q_row, c)
        b = (c // LANES) * _BLOCK_STEP
        a0 = vfma(x, vload(block, b + 0 * LANES), a0)
        a1 = vfma(x, vload(block, b + 8 * LANES), a1)
        a2 = vfma(x, vload(block, b + 4 * LANES), a2)
        a3 = vfma(x, vload(block, b + 12 * LANES), a3)
        a4 = vfma(x, vload(block, b + 2 * LANES), a4)
        a5 = vfma(x, vload(block, b + 10 * LANES), a5)
        a6 = vfma(x, vload(block, b + 6 * LANES), a6)
        a7 = vfma(x, vload(block, b + 14 * LANES), a7)
        a8 = vfma(x, vload(block, b + 1 * LANES), a8)
        a9 = vfma(x, vload(block, b + 9 * LANES), a9)
        a10 = vfma(x, vload(block, b + 5 * LANES), a10)
        a11 = vfma(x, vload(block, b + 13 * LANES), a11)
        a12 = vfma(x, vload(block, b + 3 * LANES), a12)
        a13 = vfma(x, vload(block, b + 11 * LANES), a13)
        a14 = vfma(x, vload(block, b + 7 * LANES), a14)
        a15 = vfma(x, vload(block, b + 15 * LANES), a15)
    e0, e1, e2, e3 = fold8(a0, a1), fold8(a2, a3), fold8(a4, a5), fold8(a6, a7)
    e4, e5, e6, e7 = fold8(a8, a9), fold8(a10, a11), fold8(a12, a13), fold8(a14, a15)
    f0, f1, f2, f3 = fold4(e0, e1), fold4(e2, e3), fold4(e4, e5), fold4(e6, e7)
    vstore(scores_row, at, fold1(fold2(f0, f1), fold2(f2, f3)))


@njit(inline="always", **_JIT)
def _add_values(v, v_stride, j0, n, p, out, rows, d):
    """``out += p[:, :n] @ V[j0:j0 + n]``, rows four at a time (the last block repeats
    the last row: the repeat computes the same bytes) and columns 32 at a time, the
    4 x 32 block of out kept in registers over the n keys."""
    for r0 in range(0, rows, 4):
        i0, i1 = r0, min(r0 + 1, rows - 1)
        i2, i3 = min(r0 + 2, rows - 1), min(r0 + 3, rows - 1)
        p0, p1, p2, p3 = p[i0], p[i1], p[i2], p[i3]
        w0, w1, w2, w3 = out[i0], out[i1], out[i2], out[i3]
        for c in range(0, d, 2 * LANES):
            o00, o01 = vload(w0, c), vload(w0, c + LANES)
            o10, o11 = vload(w1, c), vload(w1, c + LANES)
            o20, o21 = vload(w2, c), vload(w2, c + LANES)
            o30, o31 = vload(w3, c), vload(w3, c + LANES)
            for j in range(n):
                at = (j0 + j) * v_stride + c
                x0, x1 = vload(v, at), vload(v, at + LANES)
                s = vsplat(p0[j])
                o00, o01 = vfma(s, x0, o00), vfma(s, x1, o01)
                s = vsplat(p1[j])
                o10, o11 = vfma(s, x0, o10), vfma(s, x1, o11)
                s = vsplat(p2[j])
                o20, o21 = vfma(s, x0, o20), vfma(s, x1, o21)
                s = vsplat(p3[j])
                o30, o31 = vfma(s, x0, o30), vfma(s, x1, o31)
            vstore(w3, c, o30)
            vstore(w3, c + LANES, o31)
            vstore(w2, c, o20)
            vstore(w2, c + LANES, o21)
            vstore(w1, c, o10)
            vstore(w1, c + LANES, o11)
            vstore(w0, c, o00)
            vstore(w0, c + LANES, o01)


@njit(**_JIT)
def decode_heads(q, k, k_stride, k_head, v, v_stride, v_head, keys, lo, hi, masked, out,
                 row_max, row_sum, scores, block):
    """Attention of a few query rows per K/V head over ``keys`` keys, every head in one
    pass over the cache, without BLAS (float32 only).

    Parameters
    ----------
    q : ndarray of float32, (heads, rows, d), C order
        Scaled queries: the rows of each K/V head's GQA group; d a multiple of
        ``DECODE_HEADS_COLUMNS``.
    k, v : ndarray of float32, 1-D, read only
        Row i of head h at ``x[h * head + i * stride:][:d]`` (the cache read in place).
    k_stride, k_head, v_stride, v_head : int
        Elements between consecutive key (value) rows, and between heads.
    keys : int
        Number of key rows.
    lo, hi : ndarray of int64, (rows,)
        Visible keys [lo, hi] of each row (local), the same for every head; read only
        when ``masked``.
    masked : bool
    out : ndarray of float32, (heads, rows, d), C order
        Unnormalised output accumulators (zeros on entry for a fresh pass).
    row_max, row_sum : ndarray of float32, (heads, rows)
        Running max and sum, as in :func:`softmax_step`.
    scores : ndarray of float32, (rows, DECODE_CHUNK), C order
        Scratch.
    block : ndarray of float32, (16 * d,)
        Scratch (16 key rows, reordered).

    Returns
    -------
    bool
        False, with the accumulators left part-way, when a score is NaN or inf (the
        caller then runs the NumPy passes, which propagate it), else True.

    Per chunk of DECODE_CHUNK keys and per head: the scores of every row
    (:func:`_score_keys`, 16 keys at a time), the online-softmax step, and the values
    (:func:`_add_values`); the chunk's other heads are the neighbouring cache lines,
    so the cache streams through once.
    """
    prefer_wide_vectors()
    heads, rows, d = q.shape
    chunk = scores.shape[1]
    for j0 in range(0, keys, chunk):
        n = min(chunk, keys - j0)
        for h in range(heads):
            k_h, v_h = k[h * k_head:], v[h * v_head:]
            q_h, out_h, max_h, sum_h = q[h], out[h], row_max[h], row_sum[h]
            for jb in range(0, n, LANES):
                _gather_keys(k_h, k_stride, v_h, v_stride, j0 + jb, keys - 1, d, block)
                for r in range(rows):
                    _score_keys(q_h[r], block, d, scores[r], jb)
            if not _decode_step(scores, n, j0, rows, lo, hi, masked, max_h, sum_h, out_h, d):
                return False
            _add_values(v_h, v_stride, j0, n, scores, out_h, rows, d)
    return True
