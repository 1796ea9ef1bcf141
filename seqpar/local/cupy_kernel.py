"""CuPy backend: fused attention kernels compiled from ``kernels/*.cu``.

Implements the contract of :mod:`seqpar.local` for CuPy arrays. float16 and
bfloat16 (``ml_dtypes.bfloat16`` arrays) run on the tensor cores (mma.sync, fp32
accumulation); float32 runs a plain fp32 kernel. cupy is imported lazily, so
importing this module needs no GPU.

Kernels are compiled once per process and device (NVRTC through
``cupy.RawModule``; CuPy also keeps the binary in its on-disk kernel cache, so a
later process skips the compiler) and launched on the current CuPy stream with no
synchronisation. The sources include shared headers (``kernels/*.cuh``); they are
inlined before compiling, so CuPy's cache key covers every line. Which kernel runs
for a call is decided in one place, :func:`choose_kernel`, from the table ``KERNELS``
(both in ``seqpar/local/_launch.py``, shared with the backward).
"""
from __future__ import annotations

import functools
import math
import os
import threading

import numpy as np

from ._launch import (_DECODE_MAX_ROWS, BACKWARD_KERNELS, KERNELS, SUPPORTED_HEAD_DIMS,
                      DirectLaunch, _capability, _cupy, _element_strides, _kind, _mask_args,
                      _readable, _tma_readable, choose_kernel, doc_starts, reads_in_place,
                      source)
from .cupy_backward import backward
from .cupy_merge import normalise_sums, sum_weights, sums_lse

# GPU scores are float32 at most: a plain float64 lse carries them exactly (seqpar.merge)
SPLIT_CARRY = False

__all__ = ["SPLIT_CARRY", "forward", "plan_forward", "backward", "backward_delta",
           "choose_kernel", "KERNELS", "BACKWARD_KERNELS", "SUPPORTED_HEAD_DIMS",
           "sum_weights", "normalise_sums", "sums_lse"]


# head_dim -> (warps per block, 16-row atoms per warp, key tile, cp.async
# stages, min blocks per SM, Q held in registers) for the fp16/bf16 kernel.
_MMA_CONFIG = {
    32: (4, 2, 64, 2, 2, 1),
    64: (4, 2, 128, 2, 1, 0),
    96: (4, 2, 64, 2, 2, 0),
    128: (4, 2, 64, 2, 2, 0),
    192: (4, 1, 64, 2, 1, 0),
    256: (4, 1, 32, 2, 1, 0),
}
_F32_ROWS, _F32_KEYS, _F32_THREADS = 16, 32, 128
_MAX_GRID_Y = 65535


@functools.lru_cache(maxsize=None)
def _kernel(kind, head_dim, device_id, masked):
    """(RawKernel, threads, rows per block, dynamic shared bytes), cached."""
    cupy = _cupy()
    tf = ("false", "true")
    if kind == "f32":
        name = f"attn_fwd_f32<{head_dim}, {tf[masked]}>"
        threads, rows = _F32_THREADS, _F32_ROWS
        smem = 4 * (rows * head_dim + _F32_KEYS * (head_dim + 1) + _F32_KEYS * head_dim)
    else:
        nw, mt, bn, st, minb, qreg = _MMA_CONFIG[head_dim]
        name = (f"flash_fwd_mma<{head_dim}, {nw}, {mt}, {bn}, {st}, {tf[kind == 'bf16']}, "
                f"{minb}, {tf[bool(qreg)]}, {tf[masked]}>")
        threads, rows = 32 * nw, 16 * mt * nw
        ld = head_dim + 8
        smem = 2 * (rows * ld + 2 * st * bn * ld)
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=source("flash_forward.cu"), options=("-std=c++17",),
                                name_expressions=[name])
        fn = module.get_function(name)
        if smem > 48 * 1024:
            fn.max_dynamic_shared_size_bytes = smem
    return fn, threads, rows, smem


# Prepared Hopper launches by call signature (the host time of a call is otherwise
# several times the kernel's at a few thousand tokens), oldest dropped first.
_PREPARED: dict = {}
_PREPARED_MAX = 64
_PREPARED_LOCK = threading.Lock()


def _signature(cupy, q, k, v, out, lse, scale, mask, q_offset, k_offset, key_lengths,
               accumulate):
    """What decides a forward call's checks, kernel and arguments other than out's and
    lse's addresses; None for calls not kept (key lengths and document starts are
    read from device memory, whose contents a kept launch could not see change)."""
    if key_lengths is not None or (mask is not None and mask.doc_starts is not None):
        return None
    arrays = (q, k, v, out, lse)
    if any(x is not None and type(x) is not cupy.ndarray for x in arrays):
        return None
    return (tuple((x.data.ptr, x.shape, x.strides, x.dtype) for x in (q, k, v)),
            tuple(None if x is None else (x.data.ptr % 16, x.shape, x.strides, x.dtype)
                  for x in (out, lse)),
            float(scale), mask, int(q_offset), int(k_offset), bool(accumulate),
            os.environ.get("SEQPAR_KERNEL"))


def forward(q, k, v, *, scale, mask=None, q_offset=0, k_offset=0, key_lengths=None,
            out=None, lse=None, accumulate=False):
    """Fused attention forward on the GPU; see :mod:`seqpar.local` for the contract."""
    cupy = _cupy()
    signature = _signature(cupy, q, k, v, out, lse, scale, mask, q_offset, k_offset,
                           key_lengths, accumulate)
    call = _PREPARED.get(signature) if signature is not None else None
    if call is not None:  # checked, chosen and prepared by an earlier call like this one
        out = cupy.empty(q.shape, dtype=q.dtype) if out is None else out
        lse = cupy.empty((q.shape[0], q.shape[2], q.shape[1]), np.float64) if lse is None else lse
        call(out, lse)
        return out, lse
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, cupy.ndarray):
            raise TypeError(f"{name} must be a cupy.ndarray, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D (batch, seq, heads, head_dim), got {x.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    kind = _kind(q.dtype)
    if kind is None:
        raise TypeError(f"q: dtype {q.dtype} not supported by the CuPy kernel "
                        "(float16, bfloat16, float32)")
    batch, sq, hq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    kb, sk, hk, kd = k.shape
    if kb != batch or kd != d:
        raise ValueError(f"k/v shape {k.shape} does not match q shape {q.shape}")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {d} not supported (supported: {SUPPORTED_HEAD_DIMS})")
    if hk == 0 or hq % hk:
        raise ValueError(f"heads of q ({hq}) must be a multiple of heads of k/v ({hk})")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and positive, got {scale}")
    dev = q.device.id
    for name, x in (("k", k), ("v", v), ("out", out), ("lse", lse), ("key_lengths", key_lengths)):
        if x is not None and x.device.id != dev:
            raise ValueError(f"{name} is on device {x.device.id}, q on device {dev}")
    if accumulate and (out is None or lse is None):
        raise ValueError("accumulate=True needs the running out and lse")
    if out is None:
        out = cupy.empty(q.shape, dtype=q.dtype)
    if lse is None:
        lse = cupy.empty((batch, hq, sq), dtype=np.float64)
    if not isinstance(out, cupy.ndarray) or out.shape != q.shape:
        raise ValueError(f"out must be a cupy array of shape {q.shape}")
    if not (out.dtype == q.dtype or out.dtype == np.float32):
        raise TypeError(f"out dtype {out.dtype} must be q's dtype ({q.dtype}) or float32")
    if not isinstance(lse, cupy.ndarray) or lse.shape != (batch, hq, sq) or \
            lse.dtype != np.float64:
        raise ValueError(f"lse must be a float64 cupy array of shape {(batch, hq, sq)}")
    if key_lengths is not None and (key_lengths.dtype != np.int32 or key_lengths.shape != (batch,)
                                    or not key_lengths.flags.c_contiguous):
        key_lengths = cupy.ascontiguousarray(key_lengths, dtype=np.int32)

    # Empty arrays may carry zero strides, so they leave before the stride checks.
    if batch == 0 or sq == 0 or hq == 0:
        return out, lse
    if sk == 0:
        if not accumulate:
            out.fill(0)
            lse.fill(-np.inf)
        return out, lse

    inputs = (q, k, v)
    q, k, v = (_readable(x, n) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    qs, ks, vs, os_, ls = (_element_strides(x) for x in (q, k, v, out, lse))
    if out.strides[-1] != out.itemsize or out.data.ptr % (8 if out.dtype == np.float32 else 4) \
            or any(s % (8 if out.dtype == np.float32 else 4) for s in out.strides[:-1]):
        raise ValueError(f"out must have a contiguous, aligned last axis (strides {out.strides})")
    if lse.strides[-1] != lse.itemsize:
        raise ValueError(f"lse must be contiguous along its last axis (strides {lse.strides})")

    capability = _capability(dev)
    rows = sq * (hq // hk)
    sm90_reads = False
    if capability == (9, 0) and kind != "f32" and rows > _DECODE_MAX_ROWS:
        from . import cupy_sm90

        if d in cupy_sm90.SUPPORTED_HEAD_DIMS:
            # operands its tensor maps cannot describe (negative strides, say) are
            # copied, so every memory layout runs the same kernel: the same bytes
            q, k, v = (x if _tma_readable(x) else x.copy() for x in (q, k, v))
            qs, ks, vs = (_element_strides(x) for x in (q, k, v))
        sm90_reads = cupy_sm90.supports(q, k, v, out)
    chosen = choose_kernel(q.dtype, d, capability, rows=rows, sm90_reads=sm90_reads)
    if chosen == "decode":
        return _decode(q, k, v, out, lse, qs, ks, vs, os_, ls, scale, mask, q_offset, k_offset,
                       key_lengths, accumulate, kind, dev)
    if chosen == "sm90":
        call, out, lse = cupy_sm90.prepare(q, k, v, scale=scale, mask=mask, q_offset=q_offset,
                                           k_offset=k_offset, key_lengths=key_lengths, out=out,
                                           lse=lse, accumulate=accumulate)
        if call is not None:
            call(out, lse)
            # kept only when the launch reads the caller's own arrays (no copies) and
            # nothing whose contents it holds (key lengths, document starts)
            if signature is not None and all(a is b for a, b in zip(inputs, (q, k, v))):
                with _PREPARED_LOCK:
                    if len(_PREPARED) >= _PREPARED_MAX:
                        del _PREPARED[next(iter(_PREPARED))]
                    _PREPARED[signature] = call
        return out, lse
    masked = mask is not None or key_lengths is not None  # one variant handles both
    fn, threads, rows, smem = _kernel(kind if chosen == "mma" else "f32", d, dev, masked)
    grid_x = -(-sq // rows)
    if batch * hq > _MAX_GRID_Y:
        raise ValueError(f"q: batch * heads = {batch * hq} too large for one launch "
                         f"(max {_MAX_GRID_Y})")
    i32, i64 = np.int32, np.int64
    lengths = key_lengths if key_lengths is not None else np.uintp(0)
    args = (q, k, v, out, lse, i32(sq), i32(sk), i32(hq), i32(hk),
            i64(qs[0]), i64(qs[1]), i64(qs[2]),
            i64(ks[0]), i64(ks[1]), i64(ks[2]),
            i64(vs[0]), i64(vs[1]), i64(vs[2]),
            i64(os_[0]), i64(os_[1]), i64(os_[2]),
            i64(ls[0]), i64(ls[1]),
            np.float32(scale * math.log2(math.e)), lengths,
            *_mask_args(mask, q_offset, k_offset, dev),
            i32(bool(accumulate)), i32(out.dtype == np.float32))
    with q.device:
        fn((grid_x, batch * hq, 1), (threads, 1, 1), args, shared_mem=smem)
    return out, lse


# head_dim -> (keys per tile, cp.async stages); rows -> (row groups, key groups) of warps
_DECODE_TILE = {32: (64, 3), 64: (64, 3), 96: (64, 3), 128: (64, 3), 192: (32, 2),
                256: (32, 2)}
_DECODE_MIN_KEYS_PER_SPLIT = 256
_SMEM_PER_SM = 228 * 1024  # Hopper and Ampere (A100) alike; fewer elsewhere only lowers waves


def _decode_shape(rows, head_dim):
    """(row groups, key groups, keys per tile, stages): 4 warps where the rows allow,
    and for 3-4 row groups two stages, so two blocks fit an SM's shared memory."""
    bn, stages = _DECODE_TILE[head_dim]
    groups = -(-rows // 16)
    key_groups = max(1, min(4 // groups, bn // 16))
    return groups, key_groups, bn, (2 if groups >= 3 else stages)


@functools.lru_cache(maxsize=None)
def _decode_kernels(kind, head_dim, groups, key_groups, bn, stages, masked, out16, device_id):
    cupy = _cupy()
    tf = ("false", "true")
    bf16 = tf[kind == "bf16"]
    main = (f"flash_decode_mma<{head_dim}, {groups}, {key_groups}, {bn}, {stages}, {bf16}, "
            f"{tf[masked]}, {tf[out16]}>")
    rows = 16 * groups
    ld = head_dim + 8
    smem = max(2 * (rows * ld + 2 * stages * bn * ld),
               2 * rows * ld + 4 * (key_groups * rows * head_dim + 2 * key_groups * rows))
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=source("flash_decode.cu"), options=("-std=c++17",),
                                name_expressions=[main])
        fn = module.get_function(main)
        if smem > 48 * 1024:
            fn.max_dynamic_shared_size_bytes = smem
        return fn, smem


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_id: int) -> int:
    return int(_cupy().cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"])


def _decode_geometry(q_shape, k_shape, masked, kind, out16, dev):
    """(kernel, shared bytes, splits, row groups, key groups) of a split-K/V launch: one
    wave of blocks over the SMs (as many as fit at once), fewer where a split would
    get under a few tiles. Each split's partial costs the merge a pass, so more blocks
    than fit at once only lose: measured at 1 query, 32/8 heads, d = 128, 64k keys,
    33 splits 91 µs, 66 splits 111 µs, 132 splits 149 µs (benchmarks/gpu_decode.md)."""
    batch, sq, hq, d = q_shape
    sk, hk = k_shape[1], k_shape[2]
    groups, key_groups, bn, stages = _decode_shape(sq * (hq // hk), d)
    fn, smem = _decode_kernels(kind, d, groups, key_groups, bn, stages, masked, out16, dev)
    per_sm = max(1, min(_SMEM_PER_SM // (smem + 1024), 2048 // (32 * groups * key_groups)))
    wave = per_sm * _multiprocessors(dev)
    most = max(1, -(-sk // _DECODE_MIN_KEYS_PER_SPLIT))
    splits = min(most, max(1, wave // (batch * hk)))
    return fn, smem, splits, groups, key_groups


def _decode_arguments(q, k, v, out, lse, qs, ks, vs, os_, ls, scale, mask, q_offset,
                      k_offset, key_lengths, accumulate, splits, o_part, lse_part, counters,
                      dev):
    """The launch's arguments, in the kernel's order."""
    _, sq, hq, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    i32, i64 = np.int32, np.int64
    lengths = key_lengths if key_lengths is not None else np.uintp(0)
    return (q, k, v, o_part, lse_part, i32(sq), i32(sk), i32(hq), i32(hk), i32(splits),
            i64(qs[0]), i64(qs[1]), i64(qs[2]), i64(ks[0]), i64(ks[1]), i64(ks[2]),
            i64(vs[0]), i64(vs[1]), i64(vs[2]), np.float32(scale * math.log2(math.e)),
            lengths, *_mask_args(mask, q_offset, k_offset, dev), out, lse, i64(os_[0]),
            i64(os_[1]), i64(os_[2]), i64(ls[0]), i64(ls[1]), i32(bool(accumulate)), counters)


# the C types of the kernel's parameters, for DirectLaunch (see _decode_arguments)
_DECODE_KINDS = "ppppp" + "iiiii" + "qqqqqqqqq" + "f" + "p" + "qqqqpi" + "pp" + "qqqqq" + "ip"
# where the kernel's array pointers sit in that list
_DECODE_Q, _DECODE_PARTS, _DECODE_LENGTHS, _DECODE_OUT, _DECODE_COUNTERS = 0, 3, 20, 27, 35


def _decode_workspace(splits, batch, hk, padded, d):
    """o_part, lse_part and the split counters of one launch (the counters start at 0
    and the kernel leaves them so)."""
    cupy = _cupy()
    return (cupy.empty((splits, batch, hk, padded, d), dtype=np.float32),
            cupy.empty((splits, batch, hk, padded), dtype=np.float64),
            cupy.zeros(batch * hk, dtype=np.int32))


def _decode(q, k, v, out, lse, qs, ks, vs, os_, ls, scale, mask, q_offset, k_offset,
            key_lengths, accumulate, kind, dev):
    """Split-K/V launch: every SM streams a share of the keys; the last split of each
    (batch, K/V head) merges them."""
    batch, sq, hq, d = q.shape
    hk = k.shape[2]
    masked = mask is not None or key_lengths is not None
    fn, smem, splits, groups, key_groups = _decode_geometry(
        q.shape, k.shape, masked, kind, out.dtype != np.float32, dev)
    o_part, lse_part, counters = _decode_workspace(splits, batch, hk, 16 * groups, d)
    args = _decode_arguments(q, k, v, out, lse, qs, ks, vs, os_, ls, scale, mask, q_offset,
                             k_offset, key_lengths, accumulate, splits, o_part, lse_part,
                             counters, dev)
    with q.device:
        fn((splits, batch * hk, 1), (32 * groups * key_groups, 1, 1), args, shared_mem=smem)
    return out, lse


def plan_forward(q, k, v, *, scale, mask=None, q_offset=0, key_lengths=None, out_dtype=None,
                 need_lse=True):
    """A callable ``(q, k, v, key_lengths, out=None, lse=None) -> (out, lse)`` that runs
    :func:`forward` for arrays like these (same shapes, strides, dtypes, device) with
    these settings.

    ``out_dtype`` is the dtype of the output later calls get (q's by default) or pass:
    float32 for the accumulator of a merge (K/V-sharded attention). ``out`` and ``lse``
    given to a call must be C-contiguous, of that dtype and float64. ``need_lse=False``:
    the caller drops the lse it does not pass, so the plan may write it to its
    workspace (overwritten by the next call on the stream) instead of a new array.

    Where the decode kernel runs and reads the operands in place, the plan holds its
    launch with its parameters built (:class:`DirectLaunch`) and its workspace
    per stream: a call allocates out and lse (unless given, or lse dropped), writes nine
    pointers and launches once. Elsewhere (and for operands whose data is not 16-byte aligned) it calls
    :func:`forward`: the kernel's own checks, then the launch.
    """
    kind, dev = _kind(q.dtype), q.device.id
    batch, sq, hq, d = q.shape
    hk = k.shape[2]
    rows = sq * (hq // hk)
    in_place = all(reads_in_place(x) for x in (q, k, v))
    out16 = np.dtype(q.dtype if out_dtype is None else out_dtype) != np.float32

    def run(q, k, v, key_lengths, out=None, lse=None):
        return forward(q, k, v, scale=scale, mask=mask, q_offset=q_offset,
                       key_lengths=key_lengths, out=out, lse=lse)

    if not (in_place and kind in ("f16", "bf16") and d in SUPPORTED_HEAD_DIMS and batch * hq
            and sq and k.shape[1] and choose_kernel(q.dtype, d, _capability(dev), rows=rows)
            == "decode"):
        return run
    return _PlannedDecode(q, k, v, scale, mask, q_offset, key_lengths, kind, dev, run, out16,
                          need_lse)


class _PlannedDecode:
    """The decode kernel's launch for one shape (see :func:`plan_forward`)."""

    def __init__(self, q, k, v, scale, mask, q_offset, key_lengths, kind, dev, unplanned,
                 out16=True, need_lse=True):
        cupy = _cupy()
        batch, sq, hq, d = q.shape
        hk = k.shape[2]
        masked = mask is not None or key_lengths is not None
        fn, smem, splits, groups, key_groups = _decode_geometry(
            q.shape, k.shape, masked, kind, out16, dev)
        self._geometry = (splits, batch, hk, 16 * groups, d)
        self._lse_shape = (batch, hq, sq)
        self._need_lse = need_lse
        self._out = (q.shape, q.dtype if out16 else np.dtype(np.float32))
        self._workspace: dict = {}  # stream -> what _buffers makes
        # the parameter block is built for C-contiguous out and lse, as allocated here
        out = cupy.empty(q.shape, self._out[1])
        lse = cupy.empty(self._lse_shape, np.float64)
        args = _decode_arguments(
            q, k, v, out, lse, *(_element_strides(x) for x in (q, k, v, out, lse)), scale,
            mask, q_offset, 0, key_lengths, False, splits, *self._buffers()[:3], dev)
        self._launch = DirectLaunch(fn, _DECODE_KINDS, (splits, batch * hk, 1),
                                    (32 * groups * key_groups, 1, 1), smem)
        for i, value in enumerate(args):
            self._launch.set(i, value)
        self._docs = None if mask is None or mask.doc_starts is None else \
            doc_starts(tuple(mask.doc_starts), dev)  # the plan keeps what it points to
        self._unplanned = unplanned
        self._device = dev
        self._lock = threading.Lock()  # the parameter block, from writing to launching

    def _buffers(self):
        """o_part, lse_part, the split counters and, where the caller drops it, lse."""
        buffers = _decode_workspace(*self._geometry)
        if self._need_lse:
            return buffers
        return (*buffers, _cupy().empty(self._lse_shape, np.float64))

    def __call__(self, q, k, v, key_lengths, out=None, lse=None):
        cupy = _cupy()
        if (q.data.ptr | k.data.ptr | v.data.ptr) % 16 or \
                cupy.cuda.runtime.getDevice() != self._device:
            # strides fit, a pointer may not (forward copies what it must); or another
            # device is current (forward launches on q's)
            return self._unplanned(q, k, v, key_lengths, out=out, lse=lse)
        stream = cupy.cuda.get_current_stream()
        if stream.is_capturing():  # the graph keeps what it writes (seqpar.graphs)
            buffers = self._buffers()
        else:
            buffers = self._workspace.get(stream.ptr)
            if buffers is None:
                if len(self._workspace) >= 8:  # streams come and go: keep a few
                    self._workspace.clear()
                buffers = self._workspace[stream.ptr] = self._buffers()
        if out is None:
            out = cupy.empty(*self._out)
        if lse is None:
            lse = buffers[3] if len(buffers) > 3 else cupy.empty(self._lse_shape, np.float64)
        slots = self._launch.slots
        with self._lock:
            slots[_DECODE_Q], slots[_DECODE_Q + 1], slots[_DECODE_Q + 2] = (
                q.data.ptr, k.data.ptr, v.data.ptr)
            slots[_DECODE_PARTS], slots[_DECODE_PARTS + 1] = (buffers[0].data.ptr,
                                                              buffers[1].data.ptr)
            slots[_DECODE_LENGTHS] = 0 if key_lengths is None else key_lengths.data.ptr
            slots[_DECODE_OUT], slots[_DECODE_OUT + 1] = out.data.ptr, lse.data.ptr
            slots[_DECODE_COUNTERS] = buffers[2].data.ptr
            self._launch(stream.ptr)
        return out, lse


def backward_delta(dout, out):
    """delta = rowsum(dout * out), shape (B, H, S), float32 (fp32 products and sums)."""
    cupy = _cupy()
    product = cupy.multiply(dout, out, dtype=np.float32)
    return cupy.ascontiguousarray(product.sum(axis=-1).transpose(0, 2, 1))
