"""CuPy backward for Hopper (compute capability 9.0): ``kernels/flash_backward_sm90.cu``.

Implements ``backward`` of the contract of :mod:`seqpar.local` for float16 and
bfloat16 with head dims 64 and 128 on sm_90a, as one fused kernel: all five
products on wgmma, the K/V tile of a work item resident in shared memory, Q, dO,
lse and delta streamed by TMA from a producer warpgroup, each step's dQ tile staged
in shared memory and added into float32 dQ sums by one bulk reduction from a writer
thread, then written into (or added to) ``dq`` by a small kernel. With
``deterministic=True`` (the default) the reductions into each dQ tile happen in a
fixed order (increasing key tile), so the bytes are the same run to run;
``deterministic=False`` drops the waits that order them. Design and measurements:
benchmarks/gpu_kernel_notes.md ("Hopper backward").
"""
from __future__ import annotations

import functools
import math

import numpy as np

from ._launch import SM90_BACKWARD_HEAD_DIMS, _cupy, _mask_args, source
from .cupy_sm90 import _sm_count, launch, supports, tensor_map

__all__ = ["backward", "supports", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = SM90_BACKWARD_HEAD_DIMS
_BM, _BN = 64, 128          # query rows per step, keys per work item (kernel constants)
# registers per thread of the producer warpgroup and of each consumer warpgroup: the
# kernel starts at 168 (65536 / 384, rounded down to 8), and what the producer gives
# back must cover what the consumers take (24 + 2 * 240 = 3 * 168), or setmaxnreg waits
_PREG, _CREG = 24, 240


@functools.lru_cache(maxsize=None)
def _kernels(d, bf16, masked, device_id):
    """(main kernel, prep kernel, dq kernel, dynamic shared bytes), compiled once per device."""
    cupy = _cupy()
    tf = ("false", "true")
    name = f"bwd_sm90<{d}, {tf[bf16]}, {tf[masked]}, {_PREG}, {_CREG}>"
    tiles = 2 * _BN * d * 2 + 2 * 2 * _BM * d * 2 + 2 * _BN * _BM * 2  # K, V; Q, dO; dS
    # lse2, delta; the staged dQ chunks (two slots per 64-column half)
    slots = 2 * (d // 64)
    staged = 2 * 2 * _BM * 4 + slots * _BM * 64 * 4
    # barriers, the mask's row bounds (bytes), alignment: d = 128 takes 231,792 bytes of
    # the 232,448 a block may have
    smem = tiles + staged + 8 * (6 + 2 * slots) + 2 * 2 * _BM + 1024
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=source("flash_backward_sm90.cu"),
                                options=("-std=c++17", "--gpu-architecture=sm_90a"),
                                name_expressions=[name, "bwd_sm90_prep", "bwd_sm90_dq"])
        fn = module.get_function(name)
        fn.max_dynamic_shared_size_bytes = smem
        prep = module.get_function("bwd_sm90_prep")
        write_dq = module.get_function("bwd_sm90_dq")
    return fn, prep, write_dq, smem


def backward(dout, q, k, v, lse, delta, *, scale, mask=None, q_offset=0, k_offset=0,
             dq, dk, dv, accumulate=False, deterministic=True):
    """Gradients over this block of keys on sm_90a; the caller (seqpar.local.cupy_backward)
    has checked shapes, dtypes and :func:`supports`, and made ``lse`` (float64) and
    ``delta`` (float32) C-contiguous. dq, dk, dv are float32 with 8-byte aligned strides."""
    cupy = _cupy()
    batch, sq, hq, d = q.shape
    _, sk, hk, _ = k.shape
    dev = q.device.id
    bf16 = getattr(q.dtype, "name", "") == "bfloat16"
    fn, prep, write_dq, smem = _kernels(d, bf16, mask is not None, dev)
    n_mtiles = -(-sq // _BM)
    n_ktiles = -(-sk // _BN)
    n_items = batch * hk * n_ktiles
    mpad = n_mtiles * _BM
    nf = 2 if d == 128 else 1
    with q.device:
        lse2 = cupy.empty((batch, hq, mpad), np.float32)
        dlt = cupy.empty((batch, hq, mpad), np.float32)
        flags = cupy.empty(batch * hq * n_mtiles * nf, np.int32)
        sums = cupy.empty(batch * hq * mpad * d, np.float32)  # the kernel's dQ chunks
        i32, i64 = np.int32, np.int64
        ls = [s // lse.itemsize for s in lse.strides]
        blocks = 4 * _sm_count(dev)
        prep((min(-(-sums.size // 1024), blocks),), (256,),
             (lse, delta, lse2, dlt, flags, i64(flags.size), sums, i64(sums.size // 4),
              i32(sq), i32(hq), i32(batch), i32(mpad), i64(ls[0]), i64(ls[1]), i64(ls[2])))
        q_off, k_off, left, right, docs, ndocs = _mask_args(mask, q_offset, k_offset, dev)
        lim = 1 << 61
        q_off, k_off = (i64(max(-lim, min(lim, int(x)))) for x in (q_off, k_off))
        dqs, dks, dvs = ([s // 4 for s in x.strides] for x in (dq, dk, dv))
        args = (tensor_map(q, _BM), tensor_map(k, _BN), tensor_map(v, _BN), tensor_map(dout, _BM),
                lse2, dlt, sums, dk, dv, flags, docs,
                i32(sq), i32(sk), i32(hq), i32(hk), i32(batch), i32(n_mtiles), i32(n_items),
                *(i64(x) for x in (*dks[:3], *dvs[:3])),
                q_off, k_off, left, right, i32(ndocs),
                np.float32(scale * math.log2(math.e)), np.float32(scale),
                i32(bool(accumulate)), i32(bool(deterministic)), i32(mask is not None))
        grid = min(n_items, _sm_count(dev))
        launch(fn, (grid, 1, 1), (384, 1, 1), args, smem)
        write_dq((min(-(-dq.size // 1024), blocks),), (256,),
                 (sums, dq, i32(sq), i32(hq), i32(batch), i32(d), i32(n_mtiles),
                  i64(dqs[0]), i64(dqs[1]), i64(dqs[2]), i32(bool(accumulate))))
    return dq, dk, dv

