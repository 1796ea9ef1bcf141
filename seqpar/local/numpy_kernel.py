"""Blocked attention on the CPU: BLAS matmuls over K/V tiles with an online softmax.

Memory stays O(S*d + tile^2): a (rows x keys) score tile is the largest temporary.
Queries of the heads that share one K/V head (GQA) are stacked as rows of one
matrix, so K/V are read once per group and never copied per query head.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .._arrays import accumulation_dtype
from ..merge import merge_into

__all__ = ["forward"]

# Rows (query positions x group) and keys per score tile: 512 x 1024 float32
# scores are 2 MiB, large enough for efficient BLAS calls, small enough for L2/L3
# through the max / exp / sum passes (measured: benchmarks/cpu_attention.md).
_TILE_ROWS = 512
_TILE_KEYS = 1024


def forward(q, k, v, *, scale, causal=False, q_offset=0, k_offset=0,
            out=None, lse=None, accumulate=False):
    """Attention of q over (k, v); see :mod:`seqpar.local` for the contract."""
    batch, sq, hq, d = q.shape
    acc = accumulation_dtype(q.dtype)
    if out is None:
        out = np.empty(q.shape, dtype=q.dtype)
    if lse is None:
        lse = np.empty((batch, hq, sq), dtype=acc)
    if accumulate:
        block_out = np.empty(q.shape, dtype=acc)
        block_lse = np.empty((batch, hq, sq), dtype=acc)
        _attend(q, k, v, scale, causal, q_offset, k_offset, block_out, block_lse)
        merge_into(out, lse, block_out, block_lse)
    elif out.dtype == acc:
        _attend(q, k, v, scale, causal, q_offset, k_offset, out, lse)
    else:
        block_out = np.empty(q.shape, dtype=acc)
        _attend(q, k, v, scale, causal, q_offset, k_offset, block_out, lse)
        out[...] = block_out
    return out, lse


def _attend(q, k, v, scale, causal, q_offset, k_offset, out, lse):
    """Write normalised output (B, Sq, Hq, D) and lse (B, Hq, Sq) in the accumulator dtype."""
    batch, sq, hq, d = q.shape
    hk = k.shape[2]
    group = hq // hk
    acc = out.dtype
    tile_rows = max(1, _TILE_ROWS // group)  # query positions per tile
    shift = q_offset - k_offset
    jobs = []
    for b in range(batch):
        for h in range(hk):
            heads = slice(h * group, (h + 1) * group)
            # rows ordered (position, head in group): a tile of positions is contiguous
            rows = np.multiply(q[b, :, heads, :], scale, dtype=acc).reshape(sq * group, d)
            keys_t = np.ascontiguousarray(k[b, :, h, :].T, dtype=acc)
            values = np.ascontiguousarray(v[b, :, h, :], dtype=acc)
            for p0 in range(0, sq, tile_rows):
                p1 = min(p0 + tile_rows, sq)
                jobs.append((rows, keys_t, values, group, causal, shift, p0, p1,
                             out[b, p0:p1, heads, :], lse[b, heads, p0:p1]))
    pool, blas = _threads()
    if pool is None or len(jobs) == 1:
        for job in jobs:
            _attend_tile(*job)
        return
    # one BLAS thread per tile job: the pool already keeps every core busy
    with blas.limit(limits=1, user_api="blas"):
        for done in [pool.submit(_attend_tile, *job) for job in jobs]:
            done.result()


def _attend_tile(rows, keys_t, values, group, causal, shift, p0, p1, out, lse):
    """Online softmax over key tiles for query positions [p0, p1) of one K/V head.

    rows: (Sq*G, D) scaled queries, row r at position r // G; key j is hidden from
    position i when causal and j > i + shift. out: (p1-p0, G, D); lse: (G, p1-p0).
    """
    sk = keys_t.shape[1]
    visible = min(sk, p1 - 1 + shift + 1) if causal else sk
    if visible <= 0:
        out[...] = 0
        lse[...] = -np.inf
        return
    q_tile = rows[p0 * group:p1 * group]
    n_rows, d = q_tile.shape
    o_tile = np.empty((n_rows, d), dtype=rows.dtype)
    row_max = np.full(n_rows, -np.inf, dtype=rows.dtype)
    for j0 in range(0, visible, _TILE_KEYS):
        j1 = min(j0 + _TILE_KEYS, visible)
        scores = q_tile @ keys_t[:, j0:j1]
        if causal and j1 - 1 > p0 + shift:
            positions = np.arange(p0, p1).repeat(group) + shift
            np.copyto(scores, -np.inf, where=np.arange(j0, j1)[None, :] > positions[:, None])
        new_max = np.maximum(row_max, scores.max(axis=1))
        finite_max = np.where(new_max == -np.inf, 0, new_max)
        scores -= finite_max[:, None]
        np.exp(scores, out=scores)
        if j0 == 0:
            row_sum = scores.sum(axis=1)
            np.matmul(scores, values[j0:j1], out=o_tile)
        else:
            rescale = np.exp(row_max - finite_max)
            row_sum *= rescale
            row_sum += scores.sum(axis=1)
            o_tile *= rescale[:, None]
            o_tile += scores @ values[j0:j1]
        row_max = new_max
    seen = row_sum > 0
    o_tile /= np.where(seen, row_sum, 1)[:, None]
    out[...] = o_tile.reshape(out.shape)
    with np.errstate(divide="ignore"):
        tile_lse = np.where(seen, row_max + np.log(np.where(seen, row_sum, 1)), -np.inf)
    lse[...] = tile_lse.reshape(p1 - p0, group).T


@functools.lru_cache(maxsize=None)
def _threads():
    """A process-wide pool for tile jobs (NumPy and BLAS release the GIL) and a BLAS
    thread controller; (None, None) where one thread is all there is.

    The pool has SEQPAR_NUM_THREADS threads, by default one per core this process may
    run on (an MPI rank bound to one core gets one).
    """
    threads = int(os.environ.get("SEQPAR_NUM_THREADS", 0)) or len(os.sched_getaffinity(0))
    if threads <= 1:
        return None, None
    from threadpoolctl import ThreadpoolController

    return ThreadPoolExecutor(threads, thread_name_prefix="seqpar"), ThreadpoolController()
