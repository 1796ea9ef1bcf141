"""CuPy backward: the kernel ``BACKWARD_KERNELS`` picks, for float16/bfloat16, cuBLAS
blocks for float32.

Implements ``backward`` of the contract of :mod:`seqpar.local`. On Hopper, float16 and
bfloat16 with head dims 64 and 128 run one fused wgmma kernel
(``seqpar/local/cupy_sm90_backward.py``: dQ by ordered bulk reductions, the same bytes
run to run unless ``deterministic=False``); elsewhere two mma.sync kernels of
``kernels/flash_backward.cu`` (dK/dV per key tile, dQ per query tile: no atomics, always
deterministic); float32 runs blocked cuBLAS matmuls over (query chunk, key chunk) pairs
with the same mask rule, exact fp32 arithmetic.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from ..graphs import device_constant
from ._launch import (BACKWARD_KERNELS, _capability, _cupy, _element_strides, _kind,
                          _mask_args, _readable, _tma_readable, choose_kernel, source)

__all__ = ["backward"]

_CHUNK = 2048  # float32 path: rows and keys per block of scores


@functools.lru_cache(maxsize=None)
def _kernels(kind, head_dim, masked, device_id):
    cupy = _cupy()
    tf = ("false", "true")
    bf16 = tf[kind == "bf16"]
    dkdv = f"bwd_dkdv<{head_dim}, 64, {bf16}, {tf[masked]}>"
    dq = f"bwd_dq<{head_dim}, 64, {bf16}, {tf[masked]}>"
    ld = head_dim + 8
    smem = 2 * (2 * 64 + 4 * 64) * ld
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=source("flash_backward.cu"), options=("-std=c++17",),
                                name_expressions=[dkdv, dq])
        fns = module.get_function(dkdv), module.get_function(dq)
        for fn in fns:
            fn.max_dynamic_shared_size_bytes = smem
    return fns, smem


def backward(dout, q, k, v, lse, delta, *, scale, mask=None, q_offset=0, k_offset=0,
             dq=None, dk=None, dv=None, accumulate=False, deterministic=True):
    """Gradients of attention over this block of keys; see :mod:`seqpar.local`.

    ``deterministic=False`` lets the Hopper kernel add dq contributions in any order
    (faster; the rounding then varies run to run); the other kernels ignore it."""
    cupy = _cupy()
    kind = _kind(q.dtype)
    if kind is None or not (q.dtype == k.dtype == v.dtype == dout.dtype):
        raise TypeError(f"dout, q, k, v must share one dtype of float16, bfloat16, float32; "
                        f"got {dout.dtype}, {q.dtype}, {k.dtype}, {v.dtype}")
    batch, sq, hq, d = q.shape
    _, sk, hk, _ = k.shape
    acc = np.float32
    if accumulate and (dq is None or dk is None or dv is None):
        raise ValueError("accumulate=True needs the running dq, dk and dv")
    dq = cupy.empty(q.shape, acc) if dq is None else dq
    dk = cupy.empty(k.shape, acc) if dk is None else dk
    dv = cupy.empty(v.shape, acc) if dv is None else dv
    for name, x, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if x.shape != like.shape or x.dtype != acc or x.strides[-1] != 4 \
                or any(s % 8 for s in x.strides[:-1]) or x.data.ptr % 8:
            raise ValueError(f"{name} must be float32 of shape {like.shape} with a contiguous, "
                             "8-byte aligned last axis")
    if batch == 0 or hq == 0 or sq == 0 or sk == 0:
        if not accumulate:
            for x in (dq, dk, dv):
                x.fill(0)
        return dq, dk, dv
    lse = cupy.ascontiguousarray(lse, dtype=np.float64)
    delta = cupy.ascontiguousarray(delta, dtype=np.float32)
    if kind == "f32":
        return _backward_f32(dout, q, k, v, lse, delta, scale, mask, q_offset, k_offset,
                             dq, dk, dv, accumulate)
    dout, q, k, v = (_readable(x, n) for x, n in ((dout, "dout"), (q, "q"), (k, "k"), (v, "v")))
    capability = _capability(q.device.id)
    sm90_reads = False
    if capability == (9, 0) and d in BACKWARD_KERNELS[0][2]:
        from . import cupy_sm90_backward

        # layouts the tensor maps cannot describe are copied, so every layout runs the
        # same kernel (the same bytes)
        dout, q, k, v = (x if _tma_readable(x) else x.copy() for x in (dout, q, k, v))
        sm90_reads = cupy_sm90_backward.supports(q, k, v) and _tma_readable(dout)
    if choose_kernel(q.dtype, d, capability, sm90_reads=sm90_reads,
                     table=BACKWARD_KERNELS) == "sm90":
        from . import cupy_sm90_backward

        return cupy_sm90_backward.backward(dout, q, k, v, lse, delta, scale=scale, mask=mask,
                                           q_offset=q_offset, k_offset=k_offset, dq=dq, dk=dk,
                                           dv=dv, accumulate=accumulate,
                                           deterministic=deterministic)
    masked = mask is not None
    (dkdv_fn, dq_fn), smem = _kernels(kind, d, masked, q.device.id)
    qs, ks, vs, gs, ls = (_element_strides(x) for x in (q, k, v, dout, lse))
    dqs, dks, dvs = (_element_strides(x) for x in (dq, dk, dv))
    i32, i64, f32 = np.int32, np.int64, np.float32
    common = (i32(sq), i32(sk), i32(hq), i32(hk),
              *(i64(x) for x in (qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
                                 gs[0], gs[1], gs[2], ls[0], ls[1])))
    mask_args = _mask_args(mask, q_offset, k_offset, q.device.id)
    q_off, k_off, left, right, docs, ndocs = mask_args
    tail = (f32(scale * math.log2(math.e)), f32(scale), q_off, k_off, left, right, docs, ndocs,
            i32(bool(accumulate)))
    with q.device:
        dkdv_fn((-(-sk // 64), batch * hk, 1), (128, 1, 1),
                (q, k, v, dout, lse, delta, dk, dv, *common,
                 *(i64(x) for x in (dks[0], dks[1], dks[2], dvs[0], dvs[1], dvs[2])), *tail),
                shared_mem=smem)
        dq_fn((-(-sq // 64), batch * hq, 1), (128, 1, 1),
              (q, k, v, dout, lse, delta, dq, *common,
               *(i64(x) for x in (dqs[0], dqs[1], dqs[2])), *tail), shared_mem=smem)
    return dq, dk, dv


def _backward_f32(dout, q, k, v, lse, delta, scale, mask, q_offset, k_offset, dq, dk, dv,
                  accumulate):
    """float32: exact fp32 matmuls (cuBLAS) over chunks, the heads of a GQA group batched."""
    cupy = _cupy()
    batch, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    group = hq // hk
    if not accumulate:
        for x in (dq, dk, dv):
            x.fill(0)
    for b in range(batch):
        for h in range(hk):
            heads = slice(h * group, (h + 1) * group)
            for p0 in range(0, sq, _CHUNK):
                p1 = min(sq, p0 + _CHUNK)
                rows = np.arange(p0, p1)
                lo = hi = None
                if mask is not None:
                    lo, hi = mask.bounds(q_offset + rows)
                    lo, hi = lo - k_offset, hi - k_offset
                    j_begin, j_end = max(0, int(lo[0])), min(sk, int(hi[-1]) + 1)
                else:
                    j_begin, j_end = 0, sk
                qt = q[b, p0:p1, heads].transpose(1, 0, 2)            # (G, rows, D)
                gt = dout[b, p0:p1, heads].transpose(1, 0, 2)
                lt = lse[b, heads, p0:p1][..., None]                  # (G, rows, 1)
                dt = delta[b, heads, p0:p1][..., None]
                dq_acc = cupy.zeros(qt.shape, np.float32)
                for j0 in range(j_begin, j_end, _CHUNK):
                    j1 = min(j_end, j0 + _CHUNK)
                    kt, vt = k[b, j0:j1, h], v[b, j0:j1, h]           # (keys, D)
                    s = cupy.matmul(qt, kt.T) * np.float32(scale)
                    # a row that saw no key (lse -inf) gets lse +inf here: p = 0
                    p = cupy.exp(s - cupy.where(cupy.isinf(lt), cupy.inf, lt).astype(np.float32))
                    if lo is not None:
                        keys = cupy.arange(j0, j1)
                        # host bounds: copied from kept pinned memory when capturing
                        lo_d, hi_d = (device_constant(x, q.device.id) for x in (lo, hi))
                        hidden = (keys[None, :] < lo_d[:, None]) | (keys[None, :] > hi_d[:, None])
                        p = cupy.where(hidden[None], 0, p)
                    dv[b, j0:j1, h] += cupy.einsum("gik,gid->kd", p, gt)
                    ds = p * (cupy.matmul(gt, vt.T) - dt)
                    dq_acc += cupy.matmul(ds, kt) * np.float32(scale)
                    dk[b, j0:j1, h] += cupy.einsum("gik,gid->kd", ds, qt) * np.float32(scale)
                dq[b, p0:p1, heads] += dq_acc.transpose(1, 0, 2)
    return dq, dk, dv
