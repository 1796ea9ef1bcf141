"""Blocked attention on the CPU: K/V tiles with an online softmax.

Where numba imports and the head dim is a multiple of 32, a compiled kernel does a
tile's two products and softmax step in one pass (:func:`numba_kernel.attend_keys
<seqpar.local.numba_kernel.attend_keys>`, on a copy of the tile's keys and values);
otherwise two BLAS matmuls per tile with the softmax step between them (compiled, or
NumPy passes without numba).

Memory stays O(tile): a (rows x keys) score tile is the largest temporary, and
each tile job reads q, k and v in place (any strides) and writes its own rows of
out and lse, so nothing of the size of the inputs is allocated besides the
output. Queries of the heads that share one K/V head (GQA) are stacked as rows
of one matrix, so K/V are read once per group and never copied per query head.
Implements the contract of :mod:`seqpar.local`.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .._arrays import accumulation_dtype
from ..masks import FULL, HIDDEN
from ..merge import CARRY_DTYPE, merge_weights, normalise_sums, sum_weights, sums_lse

__all__ = ["SPLIT_CARRY", "TILED_ROWS", "backward", "backward_delta", "compiled", "forward",
           "normalise_sums", "plan_forward", "sum_weights", "sums_lse", "visible_key_range"]

# The carry between merges keeps (row max, log of the sum) apart (seqpar.merge): with
# float64 scores the weights then stay exact at any score magnitude.
SPLIT_CARRY = True

# Rows (query positions x group) and keys per score tile: 512 x 1024 float32
# scores are 2 MiB, large enough for efficient BLAS calls, small enough for L2/L3
# through the max / exp / sum passes (measured: benchmarks/cpu_attention.md).
_TILE_ROWS = 512
_TILE_KEYS = 512

# Up to this many rows (query positions x heads of a GQA group) per job, a compiled
# decode kernel replaces the BLAS tiles: for float32 and head dims that are multiples
# of 32 the vector kernel over every K/V head at once (any d: 2x the one below at d 64
# and 128), else the one-head kernel up to _DECODE_HEAD_DIM; beyond them BLAS is
# faster (measured: benchmarks/cpu_decode.md; with 64 rows the vector kernel only
# matches BLAS).
_DECODE_ROWS = 8
_DECODE_HEAD_DIM = 64
# Keys per job of the all-heads decode kernel: jobs split a batch row's keys (a fixed
# length, so the bytes of the result do not depend on the number of threads) and
# their partial results merge in key order.
_DECODE_PIECE = 16384
_NO_BOUNDS = np.zeros(0, dtype=np.int64)  # the compiled kernels' "no mask" bounds
# The compiled tile kernels copy each key tile (keys transposed, values in rows) before
# their products: from this many rows on that beats BLAS and the compiled softmax step
# in every run (65,536 keys, 2 threads: 1.02-1.15x at 128 rows, 1.05-1.33x at 256-512;
# 0.72-1.15x at 64; `python benchmarks/cpu_attention.py --rows`, cpu_attention.md)
TILED_ROWS = 128


def forward(q, k, v, *, scale, mask=None, q_offset=0, k_offset=0, key_lengths=None,
            out=None, lse=None, accumulate=False):
    """Attention of q over (k, v); see :mod:`seqpar.local` for the contract."""
    batch, sq, hq, d = q.shape
    if out is None:
        out = np.empty(q.shape, dtype=q.dtype)
    if lse is None:
        lse = np.empty((batch, hq, sq), dtype=CARRY_DTYPE)
    settings = (float(scale), mask, int(q_offset), int(k_offset))
    batches = range(batch)
    if _decodes_all_heads(q, k):
        batches = _decode_all_heads(q, k, v, out, lse, *settings, key_lengths, accumulate)
    tiles = [tile for tile in _row_tiles(q, k) if tile[0] in batches]
    jobs = [functools.partial(_attend_tile, q, k, v, out, lse, *settings, b, h, p0, p1,
                              _key_limit(key_lengths, b, k.shape[1]), accumulate)
            for b, h, p0, p1 in _longest_first(tiles, mask, q_offset, k_offset, k.shape[1])]
    run_jobs(jobs)
    return out, lse


def plan_forward(q, k, v, *, scale, mask=None, q_offset=0, key_lengths=None, out_dtype=None,
                 need_lse=True):
    """A callable ``(q, k, v, key_lengths, out=None, lse=None) -> (out, lse)`` running
    :func:`forward` with these settings (the CPU has nothing to prepare per shape;
    ``out_dtype`` is that of the ``out`` later calls pass, or q's; ``need_lse`` is
    the GPU plan's and changes nothing here)."""
    def run(q, k, v, key_lengths, out=None, lse=None):
        return forward(q, k, v, scale=scale, mask=mask, q_offset=q_offset,
                       key_lengths=key_lengths, out=out, lse=lse)

    return run


def _row_tiles(q, k):
    """(batch, K/V head, first, last query position) of every row tile."""
    batch, sq, hq, _ = q.shape
    group = hq // k.shape[2]
    step = max(1, _TILE_ROWS // group)
    return [(b, h, p0, min(p0 + step, sq)) for b in range(batch) for h in range(k.shape[2])
            for p0 in range(0, sq, step)]


def _longest_first(tiles, mask, q_offset, k_offset, sk):
    """Row tiles in decreasing order of the keys they see, so that under a mask the pool
    starts the long jobs first and does not end on one of them alone (each job writes its
    own rows: the order changes no result)."""
    if mask is None or len(tiles) <= 1:
        return tiles
    first = np.array([q_offset + p0 for _, _, p0, _ in tiles], dtype=np.int64)
    last = np.array([q_offset + p1 - 1 for _, _, _, p1 in tiles], dtype=np.int64)
    lo, _ = mask.bounds(first)
    _, hi = mask.bounds(last)
    keys = np.clip(hi + 1 - k_offset, 0, sk) - np.clip(lo - k_offset, 0, sk)
    return [tiles[i] for i in np.argsort(-keys, kind="stable")]


def _key_limit(key_lengths, b, sk):
    if key_lengths is None:
        return sk
    return max(0, min(sk, int(key_lengths[b])))


def visible_key_range(mask, q_offset, k_offset, p0, p1, sk):
    """Local keys [j0, j1) that queries [p0, p1) may see, and the per-row bounds.

    Returns (j0, j1, lo, hi) with lo/hi the local visible interval of each row
    (None when every key is visible to every row).
    """
    if mask is None:
        return 0, sk, None, None
    lo, hi = mask.bounds(np.arange(q_offset + p0, q_offset + p1))
    lo, hi = lo - k_offset, hi - k_offset
    return max(0, int(lo[0])), min(sk, int(hi[-1]) + 1), lo, hi


def _tile_kind(lo, hi, j0, j1):
    """HIDDEN, FULL or partial for rows with local bounds lo/hi against keys [j0, j1)."""
    if lo is None:
        return FULL
    if lo[0] > j1 - 1 or hi[-1] < j0:
        return HIDDEN
    return FULL if lo[-1] <= j0 and hi[0] >= j1 - 1 else "partial"


def _attend_tile(q, k, v, out, lse, scale, mask, q_offset, k_offset, b, h, p0, p1, sk,
                 accumulate):
    """Online softmax over key tiles for query positions [p0, p1) of K/V head h."""
    group = q.shape[2] // k.shape[2]
    heads = slice(h * group, (h + 1) * group)
    acc = accumulation_dtype(q.dtype)
    n_rows, d = (p1 - p0) * group, q.shape[3]
    j_begin, j_end, lo, hi = visible_key_range(mask, q_offset, k_offset, p0, p1, sk)
    fused = compiled()
    # few rows (decoding): one pass of the compiled kernel reads each key and value row
    # once for all rows, where BLAS would run two thin products; it gives up on a NaN
    # or inf score, and the NumPy passes start again
    decoding = fused is not None and n_rows <= _DECODE_ROWS and d <= _DECODE_HEAD_DIM
    # else, for a head dim it takes and enough rows to pay for its copy of each key
    # tile: the compiled tile kernel, products included, on rows padded to its row
    # blocks (the padding is cut off at the end)
    tiled = (fused is not None and not decoding and d % fused.FUSED_COLUMNS == 0
             and n_rows >= TILED_ROWS)
    rows = n_rows + (-n_rows % fused.FUSED_ROWS if tiled else 0)
    # rows ordered (position, head in group): row r is at position p0 + r // group
    q_tile = np.zeros((rows, d), dtype=acc)
    np.multiply(q[b, p0:p1, heads, :], scale, dtype=acc,
                out=q_tile[:n_rows].reshape(p1 - p0, group, d))
    if lo is not None:
        lo, hi = np.repeat(lo, group), np.repeat(hi, group)
        lo, hi = np.pad(lo, (0, rows - n_rows), mode="edge"), np.pad(hi, (0, rows - n_rows),
                                                                     mode="edge")
    o_tile = np.zeros((rows, d), dtype=acc)
    row_max = np.full(rows, -np.inf, dtype=acc)
    row_sum = np.zeros(rows, dtype=acc)
    if fused is not None and not np.isfinite(q_tile).all():
        # the compiled kernels assume no NaN: the NumPy passes propagate it
        fused, decoding, tiled = None, False, False
    decoded = decoding and _decode(fused, q_tile, k[b, j_begin:max(j_end, j_begin), h, :],
                                   v[b, j_begin:max(j_end, j_begin), h, :], lo, hi, j_begin,
                                   o_tile, row_max, row_sum)
    if not decoded:
        if decoding:  # the kernel gave up part-way: start again from empty accumulators
            o_tile[...], row_max[...], row_sum[...] = 0, -np.inf, 0
            fused = None
        _online_softmax(q_tile, k[b, :, h, :], v[b, :, h, :], lo, hi, j_begin, j_end, acc,
                        o_tile, row_max, row_sum, fused, tiled)
    o_tile, row_max, row_sum = o_tile[:n_rows], row_max[:n_rows], row_sum[:n_rows]
    _write_rows(out, lse, b, h, p0, p1, o_tile, row_max, row_sum, accumulate)


def _write_rows(out, lse, b, h, p0, p1, o_tile, row_max, row_sum, accumulate):
    """Normalise the running (o_tile, row_max, row_sum) of query positions [p0, p1) of
    K/V head h's GQA group (rows ordered (position, head in group)) and write them to
    out and lse, merged with what these hold when ``accumulate``."""
    group, d = o_tile.shape[0] // (p1 - p0), o_tile.shape[1]
    heads = slice(h * group, (h + 1) * group)
    seen = row_sum > 0
    o_tile /= np.where(seen, row_sum, 1)[:, None]
    # the block's lse as (top, rest): its row max and the log of the sum below it
    top = np.where(seen, row_max, -np.inf).astype(CARRY_DTYPE).reshape(p1 - p0, group).T
    rest = np.log(np.where(seen, row_sum, 1).astype(CARRY_DTYPE)).reshape(p1 - p0, group).T
    o_tile = o_tile.reshape(p1 - p0, group, d)
    out_rows, lse_rows = out[b, p0:p1, heads, :], lse[b, heads, p0:p1]
    split = lse.ndim == 4
    if accumulate:
        old = (lse_rows[..., 0], lse_rows[..., 1]) if split else lse_rows.astype(CARRY_DTYPE)
        w_old, w_new, merged = merge_weights(old, (top, rest))
        o_tile *= w_new.T[..., None].astype(o_tile.dtype)
        o_tile += w_old.T[..., None].astype(o_tile.dtype) * out_rows
        top, rest = merged
    out_rows[...] = o_tile
    if split:
        lse_rows[..., 0], lse_rows[..., 1] = top, rest
    else:
        with np.errstate(invalid="ignore"):
            lse_rows[...] = top + rest


def _online_softmax(q_tile, k, v, lo, hi, j_begin, j_end, acc, o_tile, row_max, row_sum,
                    fused, tiled=False):
    """Keys [j_begin, j_end) of k, v (2-D, one head) into the running (o_tile, row_max,
    row_sum), one key tile at a time: by the compiled tile kernel where ``tiled``
    (:func:`seqpar.local.numba_kernel.attend_keys`), else two BLAS products per tile and,
    between them, the online-softmax step, compiled (``fused``,
    :mod:`seqpar.local.numba_kernel`) or as NumPy passes."""
    n_rows, d = q_tile.shape
    # few rows (decoding): longer key tiles keep a score tile's size and cut the
    # per-tile overhead, which would otherwise dominate a memory-bound pass; the tile
    # kernel keeps its tiles, whose transposed copy is cheapest per key at this size
    tile_keys = _TILE_KEYS if tiled else max(_TILE_KEYS,
                                             (_TILE_ROWS * _TILE_KEYS) // max(n_rows, 1))
    # the score tile and the product with V are written into buffers made once per
    # job: a fresh 2 MiB array per tile costs its page faults every time
    score_buffer = np.empty(n_rows * min(tile_keys, max(j_end - j_begin, 0)), dtype=acc)
    pv = np.empty_like(o_tile)
    if tiled:
        packed = _PackedKeys(fused, min(tile_keys, max(j_end - j_begin, 0)), d, acc)
    for j0 in range(j_begin, j_end, tile_keys):
        j1 = min(j0 + tile_keys, j_end)
        kind = _tile_kind(lo, hi, j0, j1)
        if kind == HIDDEN:
            continue
        if tiled and packed.load(k[j0:j1], v[j0:j1]):
            masked = kind != FULL
            fused.attend_keys(q_tile, packed.kt, packed.vf, j1 - j0,
                              lo - j0 if masked else _NO_BOUNDS,
                              hi - j0 if masked else _NO_BOUNDS, masked,
                              row_max, row_sum, o_tile, packed.scores)
            continue
        k_tile = _as(k[j0:j1], acc)
        scores = np.matmul(q_tile, k_tile.T,
                           out=score_buffer[:n_rows * (j1 - j0)].reshape(n_rows, j1 - j0))
        # a NaN key goes through the NumPy passes, which make NaN the rows that see it;
        # the test reads the smaller of the key tile and the score tile
        if fused is not None and not fused.not_finite(
                (scores if n_rows < k_tile.shape[1] else k_tile).ravel()):
            masked = kind != FULL
            fused.softmax_step(scores, row_max, row_sum, o_tile,
                               lo - j0 if masked else _NO_BOUNDS,
                               hi - j0 if masked else _NO_BOUNDS, masked)
        else:
            _softmax_passes(scores, row_max, row_sum, o_tile, lo, hi, j0, j1, kind)
        o_tile += np.matmul(scores, _as(v[j0:j1], acc), out=pv)


def _block_width(fused, keys: int) -> int:
    """``keys`` rounded up to whole column blocks of the compiled tile kernels."""
    return -(-keys // fused.FUSED_COLUMNS) * fused.FUSED_COLUMNS


class _PackedKeys:
    """A job's buffers for the compiled tile kernel's copy of one key tile: keys
    transposed (``kt``: column c of key j at ``c * width + j``) and values in rows
    (``vf``), zero beyond the tile's keys up to :func:`_block_width`; and its (8, width)
    score scratch, all of the accumulation dtype."""

    def __init__(self, fused, keys: int, d: int, dtype):
        self.fused = fused
        width = _block_width(fused, keys)
        self.kt_buffer = np.zeros(d * width, dtype=dtype)
        self.vf_buffer = np.zeros(width * d, dtype=dtype)
        self.scores = np.empty((fused.FUSED_ROWS, width), dtype=dtype)

    def load(self, k_tile, v_tile) -> bool:
        """Copy (and cast) the (keys, d) tiles in; False, when a key is NaN or inf (the
        NumPy passes then make NaN the rows that see it)."""
        keys, d = k_tile.shape
        width = _block_width(self.fused, keys)
        self.kt = self.kt_buffer[:d * width]
        self.vf = self.vf_buffer[:width * d]
        kt, vf = self.kt.reshape(d, width), self.vf.reshape(width, d)
        kt[:, :keys] = k_tile.T
        vf[:keys] = v_tile
        if width > keys:
            kt[:, keys:] = 0
            vf[keys:] = 0
        return not self.fused.not_finite(self.kt)


def _softmax_passes(scores, row_max, row_sum, o_tile, lo, hi, j0, j1, kind):
    """The online-softmax step in NumPy passes over the tile (mask, max, subtract, exp,
    sum), updating row_max in place; the fallback of the compiled step."""
    if kind != FULL:
        cols = np.arange(j0, j1)
        hidden = (cols[None, :] < lo[:, None]) | (cols[None, :] > hi[:, None])
        np.copyto(scores, -np.inf, where=hidden)
    new_max = np.maximum(row_max, scores.max(axis=1))
    finite_max = np.where(new_max == -np.inf, 0, new_max)
    scores -= finite_max[:, None]
    np.exp(scores, out=scores)
    rescale = np.exp(row_max - finite_max)
    row_sum *= rescale
    row_sum += scores.sum(axis=1)
    o_tile *= rescale[:, None]
    row_max[...] = new_max


def _decodes_all_heads(q, k):
    """Whether forward runs the all-heads vector decode kernel: compiled kernels, float32
    accumulation, few rows per K/V head, a head dim it takes."""
    fused = compiled()
    rows = q.shape[1] * (q.shape[2] // k.shape[2])
    return (fused is not None and accumulation_dtype(q.dtype) == np.float32
            and 0 < rows <= _DECODE_ROWS and q.shape[3] % fused.DECODE_HEADS_COLUMNS == 0)


def _decode_all_heads(q, k, v, out, lse, scale, mask, q_offset, k_offset, key_lengths,
                      accumulate):
    """Forward by the all-heads decode kernel: one job per batch row and piece of
    _DECODE_PIECE keys, reading every K/V head in one pass, its partial results merged
    in key order. Returns the batch rows it left to the tile jobs: those whose scaled
    queries or scores hold a NaN or inf (the NumPy passes propagate it)."""
    fused = compiled()
    batch, sq, hq, d = q.shape
    hk = k.shape[2]
    group = hq // hk
    rows = sq * group
    parts, left = {}, []
    jobs = []
    for b in range(batch):
        j_begin, j_end, lo, hi = visible_key_range(mask, q_offset, k_offset, 0, sq,
                                                   _key_limit(key_lengths, b, k.shape[1]))
        # rows (position, head in group) of each K/V head
        q_rows = np.multiply(q[b], scale, dtype=np.float32).reshape(sq, hk, group, d)
        q_rows = np.ascontiguousarray(q_rows.transpose(1, 0, 2, 3)).reshape(hk, rows, d)
        if not np.isfinite(q_rows).all():
            left.append(b)
            continue
        if lo is not None:
            lo, hi = np.repeat(lo, group), np.repeat(hi, group)
        starts = [j0 for j0 in range(j_begin, j_end, _DECODE_PIECE)
                  if _tile_kind(lo, hi, j0, min(j0 + _DECODE_PIECE, j_end)) != HIDDEN]
        parts[b] = [_empty_part(hk, rows, d) for _ in starts]
        jobs += [functools.partial(_decode_piece, fused, q_rows, k[b], v[b], lo, hi, j0,
                                   min(j0 + _DECODE_PIECE, j_end), part)
                 for j0, part in zip(starts, parts[b])]
    run_jobs(jobs)
    for b, pieces in parts.items():
        if not all(done for *_, done in pieces):
            left.append(b)
            continue
        o_rows, row_max, row_sum = _merge_parts(pieces, hk, rows, d)
        for h in range(hk):
            _write_rows(out, lse, b, h, 0, sq, o_rows[h], row_max[h], row_sum[h], accumulate)
    return left


def _empty_part(hk, rows, d):
    """A piece's (out, row max, row sum, done) before its keys."""
    return [np.zeros((hk, rows, d), dtype=np.float32),
            np.full((hk, rows), -np.inf, dtype=np.float32),
            np.zeros((hk, rows), dtype=np.float32), False]


def _decode_piece(fused, q_rows, k, v, lo, hi, j0, j1, part):
    """Keys [j0, j1) of k, v (keys, heads, d) into ``part`` (:func:`_empty_part`)."""
    k_flat, k_stride, k_head = _rows_heads(k[j0:j1])
    v_flat, v_stride, v_head = _rows_heads(v[j0:j1])
    masked = lo is not None
    scores = np.empty((q_rows.shape[1], fused.DECODE_CHUNK), dtype=np.float32)
    block = np.empty(fused.LANES * q_rows.shape[2], dtype=np.float32)
    part[3] = fused.decode_heads(
        q_rows, k_flat, k_stride, k_head, v_flat, v_stride, v_head, j1 - j0,
        lo - j0 if masked else _NO_BOUNDS, hi - j0 if masked else _NO_BOUNDS, masked,
        part[0], part[1], part[2], scores, block)


def _merge_parts(pieces, hk, rows, d):
    """The online-softmax state of consecutive pieces of keys merged, in their order."""
    if not pieces:
        return _empty_part(hk, rows, d)[:3]
    o_rows, row_max, row_sum, _ = pieces[0]
    for o_next, max_next, sum_next, _ in pieces[1:]:
        top = np.maximum(row_max, max_next)
        finite = np.where(top == -np.inf, 0, top)
        w_old, w_new = np.exp(row_max - finite), np.exp(max_next - finite)
        o_rows = o_rows * w_old[..., None] + o_next * w_new[..., None]
        row_sum = row_sum * w_old + sum_next * w_new
        row_max = top
    return o_rows, row_max, row_sum


def _rows_heads(x):
    """(flat, key stride, head stride): a read-only 1-D float32 view over 3-D ``x``
    (keys, heads, d) with row i of head h at ``flat[h * head + i * stride:][:d]``, in
    place when x is float32 with contiguous, ascending rows, else over a C-order copy."""
    keys, heads, d = x.shape
    item = 4
    inplace = (x.dtype == np.float32 and keys > 0 and (d <= 1 or x.strides[2] == item)
               and all(s >= 0 and s % item == 0 for s in x.strides[:2]))
    if not inplace:
        x = np.ascontiguousarray(x, dtype=np.float32)
    stride = x.strides[0] // item if keys > 1 else heads * d
    head = x.strides[1] // item if heads > 1 else d
    span = (keys - 1) * stride + (heads - 1) * head + d if keys else 0
    flat = np.lib.stride_tricks.as_strided(x, shape=(span,), strides=(item,), writeable=False)
    return flat, stride, head


def _decode(fused, q_tile, k, v, lo, hi, j_begin, o_tile, row_max, row_sum):
    """Keys k, v (2-D views from local key j_begin on) into the running (o_tile, row_max,
    row_sum) by the compiled decode kernel, reading them in place where their rows
    have a contiguous last axis (else from a contiguous copy); False when the kernel met
    a NaN or inf score and left the accumulators part-way."""
    scratch = np.empty((q_tile.shape[0], fused.DECODE_CHUNK), dtype=q_tile.dtype)
    k_flat, k_stride = _row_major(k, q_tile.dtype)
    v_flat, v_stride = _row_major(v, q_tile.dtype)
    masked = lo is not None
    return fused.decode(q_tile, k_flat, k_stride, v_flat, v_stride, k.shape[0],
                 lo - j_begin if masked else _NO_BOUNDS, hi - j_begin if masked else _NO_BOUNDS,
                 masked, o_tile, row_max, row_sum, scratch)


def _row_major(x, dtype):
    """(flat, stride): a read-only 1-D view over the rows of 2-D ``x`` with row i at
    ``flat[i * stride:][:x.shape[1]]``, in place when x's rows are contiguous and
    ascending, else over a contiguous copy (cast to ``dtype`` where it differs)."""
    rows, d = x.shape
    item = x.itemsize
    inplace = (x.dtype == dtype and rows > 0 and (d <= 1 or x.strides[1] == item)
               and x.strides[0] >= 0 and x.strides[0] % item == 0)
    if not inplace:
        x = np.ascontiguousarray(x, dtype=dtype)
        item = x.itemsize
    stride = x.strides[0] // item if rows > 1 else d
    span = (rows - 1) * stride + d if rows else 0
    flat = np.lib.stride_tricks.as_strided(x, shape=(span,), strides=(item,), writeable=False)
    return flat, stride


def _as(x, dtype):
    """x itself when it has the dtype (BLAS reads strided 2-D views), else a cast copy."""
    return x if x.dtype == dtype else x.astype(dtype)


def compiled():
    """The compiled kernels (:mod:`seqpar.local.numba_kernel`), or None for the NumPy passes.

    ``SEQPAR_CPU_KERNEL`` chooses: ``numba`` (an ImportError where numba does not
    import), ``numpy``, or ``auto`` (the default: numba where it imports).
    """
    return _compiled(os.environ.get("SEQPAR_CPU_KERNEL", "").strip().lower() or "auto")


@functools.cache
def _compiled(choice):
    if choice not in ("auto", "numba", "numpy"):
        raise ValueError(f"SEQPAR_CPU_KERNEL must be auto, numba or numpy, got {choice!r}")
    if choice == "numpy":
        return None
    try:
        from . import numba_kernel
    except ImportError as exc:
        if choice == "numba":
            raise ImportError('SEQPAR_CPU_KERNEL=numba needs numba (pip install '
                              '"seqpar[cpu]")') from exc
        return None
    return numba_kernel


def run_jobs(jobs) -> None:
    """Run independent tile jobs on the rank's thread pool (or inline on one core)."""
    pool, blas = _threads()
    if pool is None or len(jobs) == 1:
        for job in jobs:
            job()
        return
    # one BLAS thread per tile job: the pool already keeps every core busy
    with blas.limit(limits=1, user_api="blas"):
        for done in [pool.submit(job) for job in jobs]:
            done.result()


def pool_threads() -> int:
    """Threads of the tile pool: SEQPAR_NUM_THREADS, by default (unset, empty or 0) one
    per core this process may run on (an MPI rank bound to one core gets one)."""
    text = os.environ.get("SEQPAR_NUM_THREADS", "").strip()
    if not text.isdigit():
        if text:
            raise ValueError(f"SEQPAR_NUM_THREADS={text!r}: expected a whole number of "
                             "threads (or unset, for one thread per usable core)")
        text = "0"
    return int(text) or len(os.sched_getaffinity(0))


@functools.lru_cache(maxsize=None)
def _threads():
    """A process-wide pool for tile jobs (NumPy and BLAS release the GIL) and a BLAS
    thread controller; (None, None) where one thread is all there is.

    The pool has SEQPAR_NUM_THREADS threads, by default one per core this process may
    run on (an MPI rank bound to one core gets one).
    """
    threads = pool_threads()
    if threads <= 1:
        return None, None
    from threadpoolctl import ThreadpoolController

    return ThreadPoolExecutor(threads, thread_name_prefix="seqpar"), ThreadpoolController()


def backward_delta(dout, out):
    """delta = rowsum(dout * out), shape (B, H, S), in the accumulation dtype."""
    acc = accumulation_dtype(out.dtype)
    return np.einsum("bshd,bshd->bhs", dout.astype(acc, copy=False), out.astype(acc, copy=False))


def backward(dout, q, k, v, lse, delta, **options):
    """Gradients of attention over this block of keys; see :mod:`seqpar.local`.

    Written in :mod:`seqpar.local.numpy_backward`, which builds on this module's
    helpers (imported here at call time, so either module may be imported first).
    """
    from .numpy_backward import backward as blocked_backward

    return blocked_backward(dout, q, k, v, lse, delta, **options)
