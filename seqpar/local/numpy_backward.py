"""Blocked attention backward on the CPU: BLAS matmuls over (query, key) tiles, or, where
numba imports and the head dim is a multiple of 32, one compiled kernel per tile pair
(:func:`numba_kernel.backward_keys <seqpar.local.numba_kernel.backward_keys>`, the
same five products and steps in registers, 8 rows at a time).

For one block of keys and the forward's lse over ALL keys, every visible pair
of a query row tile and a key tile gives (rows stacked as in the forward:
position, then head in the group; ``Qs = scale * Q``)::

    P  = exp(Qs K^T - lse)            dV += P^T dO
    dP = dO V^T                       dS  = P * (dP - delta)
    dK += dS^T Qs                     dQ += scale * dS K

five matmuls of ``2 * rows * keys * d`` FLOPs, 2.5x the forward's two. A tile
job owns one (batch, K/V head) and a contiguous run of key tiles: it keeps
dK and dV of its keys in tile-sized accumulators and adds its dQ contributions
into its own rows, so no two jobs ever write the same memory. Implements the
``backward`` of :mod:`seqpar.local`.
"""
from __future__ import annotations

import functools

import numpy as np

from .._arrays import accumulation_dtype
from ..masks import FULL, HIDDEN
from .numpy_kernel import (
    _NO_BOUNDS,
    TILED_ROWS,
    _as,
    _block_width,
    _threads,
    _tile_kind,
    compiled,
    run_jobs,
    visible_key_range,
)

__all__ = ["backward"]

# Rows (query positions x group) and keys per tile pair. Two (rows x keys) float32
# tiles live at once (P and dS), so the square 512 x 512 tile keeps the pair's working
# set at 2 MiB like the forward's one 512 x 1024 score tile; measured on 2 cores,
# float32, N=4096, d=64, 8 heads, it beat 512 x 1024, 256 x 512, 256 x 1024, 128 x 512
# and 256 x 256 (by 4-10% unmasked, 3-18% causal, where smaller tiles waste less on
# the diagonal). benchmarks/cpu_backward.md has the resulting rates.
_TILE_ROWS = 512
_TILE_KEYS = 512

# Work decomposition. One pass (five matmuls per tile pair) against two passes (a
# dK/dV pass over key tiles and a dQ pass over query tiles, which recomputes P and
# dS: seven matmuls and twice the elementwise work), same tiles, same machine:
# 0.66 s vs 1.01 s unmasked and 0.43 s vs 0.66 s causal (N=4096, d=64, 8 heads), so
# one pass. A job owns a (batch, K/V head) and a run of its key tiles, so dK and dV
# need no reduction; only when there are fewer (batch, K/V head) pairs than threads
# are a pair's key tiles split into chunks, chunk c > 0 accumulating its dQ in its
# own buffer, added after all jobs in chunk order: the bytes never depend on thread
# timing (they do on the thread count, which fixes the chunks).


def backward(dout, q, k, v, lse, delta, *, scale, mask=None, q_offset=0, k_offset=0,
             dq=None, dk=None, dv=None, accumulate=False, deterministic=True):
    """Gradients of attention over this block of keys; see :mod:`seqpar.local`.

    Parameters
    ----------
    dout, q : ndarray, shape (B, Sq, Hq, D)
        Gradient of the output and the queries; any float dtype, any strides
        (read in place, never written).
    k, v : ndarray, shape (B, Sk, Hk, D)
        This block's keys and values, ``Hq % Hk == 0``.
    lse : ndarray, shape (B, Hq, Sq)
        The forward's log-sum-exp over ALL keys (any float dtype); -inf marks a
        row that sees no key.
    delta : ndarray, shape (B, Hq, Sq)
        ``rowsum(dout * out)`` of the final forward output
        (:func:`seqpar.local.numpy_kernel.backward_delta`).
    scale : float
        Softmax scale.
    mask : seqpar.masks.Mask, optional
        Visibility by global position; None shows every pair.
    q_offset, k_offset : int
        Global positions of query row 0 and key row 0.
    dq : ndarray, shape (B, Sq, Hq, D), optional
    dk, dv : ndarray, shape (B, Sk, Hk, D), optional
        Outputs in the accumulation dtype (float32; float64 for float64 input),
        allocated when None.
    accumulate : bool
        Add this block's gradients into dq, dk, dv instead of overwriting them.
    deterministic : bool
        Accepted for the contract; this backend is always deterministic.

    Returns
    -------
    (dq, dk, dv) : tuple of ndarray
        dk and dv are summed over the query heads that share a K/V head.
    """
    acc = accumulation_dtype(q.dtype)
    batch, _, hq, d = q.shape
    hk = k.shape[2]
    dq = np.empty(q.shape, dtype=acc) if dq is None else dq
    dk = np.empty(k.shape, dtype=acc) if dk is None else dk
    dv = np.empty(v.shape, dtype=acc) if dv is None else dv
    if not accumulate:
        dq[...] = 0  # jobs add into dq; dk and dv are assigned tile by tile
    tiling = _Tiling(q.shape, k.shape, mask, q_offset, k_offset)
    chunks = tiling.key_chunks(-(-_thread_count() // (batch * hk)))
    arrays = (dout, q, k, v, lse, delta, dq, dk, dv)
    fused = compiled()
    if fused is not None and not all(np.isfinite(x).all() for x in (dout, q, k, v)):
        fused = None  # the compiled kernels assume no NaN: the NumPy passes propagate it
    jobs, partials = [], []
    for b in range(batch):
        for h in range(hk):
            for c, (key_tiles, (r0, r1)) in enumerate(chunks):
                own = None if c == 0 else np.zeros((r1 - r0, hq // hk, d), dtype=acc)
                if own is not None:
                    partials.append((b, h, r0, r1, own))
                jobs.append(functools.partial(_backward_job, arrays, float(scale), tiling, b, h,
                                              key_tiles, (r0, own), accumulate, fused))
    run_jobs(jobs)
    group = hq // hk
    for b, h, r0, r1, own in partials:  # a fixed order: the same bytes whatever the timing
        dq[b, r0:r1, h * group:(h + 1) * group, :] += own
    return dq, dk, dv


def _thread_count() -> int:
    """Threads of the tile pool (1 when jobs run inline)."""
    pool, _ = _threads()
    return 1 if pool is None else pool._max_workers


class _Tiling:
    """The row tiles (query positions, with their visible key bounds) and key tiles of
    one call; a row tile holds up to ``_TILE_ROWS`` (position, head in group) rows."""

    def __init__(self, q_shape, k_shape, mask, q_offset, k_offset):
        sq, group, sk = q_shape[1], q_shape[2] // k_shape[2], k_shape[1]
        step = max(1, _TILE_ROWS // group)
        self.group = group
        self.rows = [(p0, min(p0 + step, sq)) for p0 in range(0, sq, step)]
        self.bounds = [visible_key_range(mask, q_offset, k_offset, p0, p1, sk)[2:]
                       for p0, p1 in self.rows]
        self.keys = [(j0, min(j0 + _TILE_KEYS, sk)) for j0 in range(0, sk, _TILE_KEYS)]

    def pairs(self, j0, j1):
        """(p0, p1, bounds) of every row tile that sees keys [j0, j1); ``bounds`` is
        (lo, hi), each row's visible keys relative to j0 (rows ordered as in the
        forward), for a partial tile, None for a full one."""
        for (p0, p1), (lo, hi) in zip(self.rows, self.bounds):
            kind = _tile_kind(lo, hi, j0, j1)
            if kind != HIDDEN:
                yield p0, p1, None if kind == FULL else (np.repeat(lo - j0, self.group),
                                                         np.repeat(hi - j0, self.group))

    def key_chunks(self, wanted):
        """At most ``wanted`` contiguous runs of key tiles of similar work, each with
        the span [r0, r1) of query positions it touches.

        Work is counted in visible (row tile, key tile) pairs weighted by their size,
        so causal blocks, where late keys see few queries, still balance.
        """
        seen = [[(p0, p1) for (p0, p1), (lo, hi) in zip(self.rows, self.bounds)
                 if _tile_kind(lo, hi, j0, j1) != HIDDEN] for j0, j1 in self.keys]
        work = np.array([sum(p1 - p0 for p0, p1 in rows) * (j1 - j0)
                         for rows, (j0, j1) in zip(seen, self.keys)], dtype=np.float64)
        wanted = max(1, min(wanted, len(self.keys)))
        edges = [0, len(self.keys)]
        if wanted > 1 and work.sum() > 0:
            # cut where the running work crosses each multiple of total / wanted
            cuts = np.searchsorted(np.cumsum(work), work.sum() * np.arange(1, wanted) / wanted)
            edges = sorted({0, len(self.keys), *(cuts + 1).clip(0, len(self.keys)).tolist()})
        chunks = []
        for a, z in zip(edges[:-1], edges[1:]):
            rows = [r for tile_rows in seen[a:z] for r in tile_rows]
            span = (min(r[0] for r in rows), max(r[1] for r in rows)) if rows else (0, 0)
            chunks.append((self.keys[a:z], span))
        return chunks


def _backward_job(arrays, scale, tiling, b, h, key_tiles, own_dq, accumulate, fused):
    """dK, dV of ``key_tiles`` for K/V head h of batch row b, and their dQ contribution.

    ``own_dq`` is (r0, buffer): dQ of positions [r0, r0 + len(buffer)) goes into the
    buffer, shape (positions, group, D), when there is one, else into dq itself.
    """
    dout, q, k, v, lse, delta, dq, dk, dv = arrays
    group = tiling.group
    heads = slice(h * group, (h + 1) * group)
    acc = dq.dtype
    r0, own = own_dq
    # the pair's two (rows x keys) tiles, made once per job: fresh ones per pair would
    # cost their page faults every time
    n_rows = max([p1 - p0 for p0, p1 in tiling.rows], default=0) * group
    buffers = np.empty((2, n_rows * _TILE_KEYS), dtype=acc)
    # for a head dim it takes and rows enough to pay for its copies of each key tile
    # (the forward's measured threshold), the compiled pair kernel: products included,
    # rows padded to its row blocks (padded rows have lse = +inf: P = 0, no gradient)
    tiled = (fused is not None and q.shape[3] % fused.FUSED_COLUMNS == 0
             and q.shape[1] * group >= TILED_ROWS)
    if tiled:
        packed = _PackedPair(fused, _TILE_KEYS, q.shape[3], acc)
    for j0, j1 in key_tiles:
        if tiled:
            packed.load(k[b, j0:j1, h, :], v[b, j0:j1, h, :])
            dk_tile, dv_tile = packed.dk, packed.dv
        else:
            k_tile = _as(k[b, j0:j1, h, :], acc)
            v_tile = _as(v[b, j0:j1, h, :], acc)
            dk_tile = np.zeros(k_tile.shape, dtype=acc)
            dv_tile = np.zeros(v_tile.shape, dtype=acc)
        for p0, p1, bounds in tiling.pairs(j0, j1):
            rows = _Rows(dout, q, lse, delta, b, heads, p0, p1, scale, acc,
                         fused.FUSED_ROWS if tiled else 1)
            if tiled:
                dq_rows = packed.pair_grads(rows, bounds)
            else:
                dq_rows = _pair_grads(rows, k_tile, v_tile, bounds, dk_tile, dv_tile,
                                      buffers, fused)
            dq_rows = dq_rows[:(p1 - p0) * group]
            dq_rows *= scale
            target = dq[b, p0:p1, heads, :] if own is None else own[p0 - r0:p1 - r0]
            target += dq_rows.reshape(p1 - p0, group, -1)
        for grad, tile in ((dk, dk_tile), (dv, dv_tile)):
            if accumulate:
                grad[b, j0:j1, h, :] += tile
            else:
                grad[b, j0:j1, h, :] = tile


class _PackedPair:
    """A job's buffers for the compiled pair kernel
    (:func:`seqpar.local.numba_kernel.backward_keys`): one key tile's keys and values
    transposed and its keys in rows (zero beyond its keys, to a width of whole column
    blocks), its dK and dV accumulators, and the P and dS scratch of a row block."""

    def __init__(self, fused, keys: int, d: int, dtype):
        self.fused = fused
        width = _block_width(fused, keys)
        # kt, vt, kf; dk, dv of the tile; dk, dv of one pair, summed from zero and then
        # added (as the BLAS products were: one chain over every row has ~3x the error)
        self.buffers = np.zeros((7, width * d), dtype=dtype)
        self.scratch = np.empty((2, fused.FUSED_ROWS, width), dtype=dtype)

    def load(self, k_tile, v_tile) -> None:
        """Copy (and cast) the (keys, d) tiles in; zero the gradient accumulators."""
        keys, d = k_tile.shape
        self.keys = keys
        width = _block_width(self.fused, keys)
        self.kt, self.vt, self.kf, dk, dv, self._pair_dk, self._pair_dv = \
            self.buffers[:, :width * d]
        for flat, tile in ((self.kt, k_tile), (self.vt, v_tile)):
            flat.reshape(d, width)[:, :keys] = tile.T
            flat.reshape(d, width)[:, keys:] = 0
        self.kf.reshape(width, d)[:keys] = k_tile
        self.kf.reshape(width, d)[keys:] = 0
        dk[...], dv[...] = 0, 0
        self.dk, self.dv = dk.reshape(width, d)[:keys], dv.reshape(width, d)[:keys]
        self._dk, self._dv = dk, dv

    def pair_grads(self, rows, bounds):
        """Add one pair's dK, dV into the accumulators; return its (padded) dQ / scale."""
        masked = bounds is not None
        lo, hi = bounds if masked else (_NO_BOUNDS, _NO_BOUNDS)
        if masked and len(lo) < rows.qs.shape[0]:
            pad = (0, rows.qs.shape[0] - len(lo))
            lo, hi = np.pad(lo, pad, mode="edge"), np.pad(hi, pad, mode="edge")
        dq_rows = np.zeros_like(rows.qs)
        self._pair_dk[...], self._pair_dv[...] = 0, 0
        self.fused.backward_keys(rows.qs, rows.do, rows.lse, rows.delta, self.kt, self.kf,
                                 self.vt, self.keys, lo, hi, masked, dq_rows, self._pair_dk,
                                 self._pair_dv, self.scratch[0], self.scratch[1])
        self._dk += self._pair_dk
        self._dv += self._pair_dv
        return dq_rows


class _Rows:
    """One query row tile in the accumulation dtype, rows ordered (position, head in group).

    ``qs`` is ``scale * q``; ``lse`` has +inf for rows that see no key, so that
    ``exp(s - lse)`` is exactly 0 there instead of exp(+inf) or NaN. Rows are padded
    to a multiple of ``multiple`` with zero rows whose lse is +inf.
    """

    __slots__ = ("qs", "do", "lse", "delta")

    def __init__(self, dout, q, lse, delta, b, heads, p0, p1, scale, acc, multiple=1):
        group, d = heads.stop - heads.start, q.shape[3]
        n = (p1 - p0) * group
        padded = n + (-n % multiple)
        self.qs = np.zeros((padded, d), dtype=acc)
        self.do = np.zeros((padded, d), dtype=acc)
        np.multiply(q[b, p0:p1, heads, :], scale, dtype=acc,
                    out=self.qs[:n].reshape(p1 - p0, group, d))
        self.do[:n].reshape(p1 - p0, group, d)[...] = dout[b, p0:p1, heads, :]
        self.lse = np.full(padded, np.inf, dtype=acc)
        self.delta = np.zeros(padded, dtype=acc)
        row_lse = np.asarray(lse[b, heads, p0:p1].T, dtype=acc).reshape(n)
        self.lse[:n] = np.where(row_lse == -np.inf, np.inf, row_lse)
        self.delta[:n] = np.asarray(delta[b, heads, p0:p1].T, dtype=acc).reshape(n)


def _pair_grads(rows, k_tile, v_tile, bounds, dk_tile, dv_tile, buffers, fused):
    """Add one tile pair's dK, dV into the key-tile accumulators; return its dQ / scale.

    P and dS are written into ``buffers`` (two flat arrays of at least rows x keys);
    between the products, the elementwise steps run compiled (``fused``,
    :mod:`seqpar.local.numba_kernel`) or as NumPy passes.
    """
    shape = (rows.qs.shape[0], k_tile.shape[0])
    size = shape[0] * shape[1]
    p = np.matmul(rows.qs, k_tile.T, out=buffers[0, :size].reshape(shape))
    if fused is not None:
        masked = bounds is not None
        fused.probabilities(p, rows.lse, bounds[0] if masked else _NO_BOUNDS,
                            bounds[1] if masked else _NO_BOUNDS, masked)
    else:
        p -= rows.lse[:, None]
        if bounds is not None:
            cols = np.arange(shape[1])
            lo, hi = bounds
            np.copyto(p, -np.inf, where=(cols[None, :] < lo[:, None]) | (cols[None, :] > hi[:, None]))
        np.exp(p, out=p)
    dv_tile += p.T @ rows.do
    ds = np.matmul(rows.do, v_tile.T, out=buffers[1, :size].reshape(shape))
    if fused is not None:
        fused.softmax_grad(ds, p, rows.delta)
    else:
        ds -= rows.delta[:, None]
        ds *= p
    dk_tile += ds.T @ rows.qs
    return ds @ k_tile
