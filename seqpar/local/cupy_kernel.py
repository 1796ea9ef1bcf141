"""CuPy backend: fused attention forward compiled from ``kernels/flash_forward.cu``.

Implements the contract of :mod:`seqpar.local` for CuPy arrays. float16 and
bfloat16 (``ml_dtypes.bfloat16`` arrays) run on the tensor cores (mma.sync,
fp32 accumulation); float32 runs a plain fp32 kernel. cupy is imported lazily,
so importing this module needs no GPU.

Kernels are compiled once per process and device (NVRTC through
``cupy.RawModule``; CuPy also keeps the binary in its on-disk kernel cache, so
a later process skips the compiler) and launched on the current CuPy stream
with no synchronisation. The target architecture is the current device's
(CuPy passes ``-arch`` from its compute capability to NVRTC); the source
needs no CUDA headers. Tile shapes per head dim are in ``_MMA_CONFIG``
(measured on an H100: benchmarks/gpu_kernel_notes.md).
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np

__all__ = ["forward", "choose_kernel", "SUPPORTED_HEAD_DIMS", "KERNEL_TABLE"]

SUPPORTED_HEAD_DIMS = (32, 64, 96, 128, 256)

# head_dim -> (warps per block, 16-row atoms per warp, key tile, cp.async
# stages, min blocks per SM, Q held in registers) for the fp16/bf16 kernel.
_MMA_CONFIG = {
    32: (4, 2, 64, 2, 2, 1),
    64: (4, 2, 128, 2, 1, 0),
    96: (4, 2, 64, 2, 2, 0),
    128: (4, 2, 64, 2, 2, 0),
    256: (4, 1, 32, 2, 1, 0),
}
_F32_ROWS, _F32_KEYS, _F32_THREADS = 16, 32, 128
_MAX_GRID_Y = 65535


def _cupy():
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ImportError(
            "seqpar.local.cupy_kernel needs cupy (pip install 'seqpar[gpu]')"
        ) from exc
    return cupy


@functools.lru_cache(maxsize=None)
def _source(name="flash_forward.cu"):
    """Kernel source: package data when installed, else ../../kernels/."""
    try:
        from importlib.resources import files

        return files("seqpar.kernels").joinpath(name).read_text()
    except (ImportError, FileNotFoundError, OSError, TypeError):
        path = Path(__file__).resolve().parents[2] / "kernels" / name
        return path.read_text()


def _kind(dtype):
    if dtype == np.float16:
        return "f16"
    if dtype == np.float32:
        return "f32"
    if getattr(dtype, "name", "") == "bfloat16":
        return "bf16"
    return None


@functools.lru_cache(maxsize=None)
def _kernel(kind, head_dim, device_id, cfg=None):
    """(RawKernel, threads, rows per block, dynamic shared bytes), cached."""
    cupy = _cupy()
    if kind == "f32":
        name = f"attn_fwd_f32<{head_dim}>"
        threads, rows = _F32_THREADS, _F32_ROWS
        smem = 4 * (rows * head_dim + _F32_KEYS * (head_dim + 1) + _F32_KEYS * head_dim)
    else:
        nw, mt, bn, st, minb, qreg = cfg or _MMA_CONFIG[head_dim]
        tf = ("false", "true")
        name = (f"flash_fwd_mma<{head_dim}, {nw}, {mt}, {bn}, {st}, {tf[kind == 'bf16']}, "
                f"{minb}, {tf[bool(qreg)]}>")
        threads, rows = 32 * nw, 16 * mt * nw
        ld = head_dim + 8
        smem = 2 * (rows * ld + 2 * st * bn * ld)
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=_source(), options=("-std=c++17",),
                                name_expressions=[name])
        fn = module.get_function(name)
        if smem > 48 * 1024:
            fn.max_dynamic_shared_size_bytes = smem
    return fn, threads, rows, smem


def _elem_strides(x, name):
    item = x.itemsize
    if any(s % item for s in x.strides):
        raise ValueError(f"{name}: strides {x.strides} are not multiples of the item size")
    st = [s // item for s in x.strides]
    if x.shape[-1] > 1 and st[-1] != 1:
        raise ValueError(f"{name}: the last axis must be contiguous (strides {x.strides})")
    return st


def _check_align(x, name, nbytes):
    if x.data.ptr % nbytes or any(s % nbytes for s in x.strides[:-1]):
        raise ValueError(
            f"{name}: data pointer and batch/seq/head strides must be multiples of "
            f"{nbytes} bytes for this kernel (got ptr%{nbytes}={x.data.ptr % nbytes}, "
            f"strides {x.strides})")


# Which kernel runs a call: the first row whose condition holds. SEQPAR_KERNEL=<name>
# forces a row (tests, benchmarks); forcing one that cannot run the call is an error.
# The choice never changes results beyond the dtype tolerance.
#   name   kernel                              runs when
#   sm90   kernels/flash_forward_sm90.cu       compute capability 9.0, fp16/bf16, head dim
#          (wgmma, TMA, warp-specialised)      64 or 128, 16-byte strides (cupy_sm90.supports)
#   mma    kernels/flash_forward.cu            any GPU, fp16/bf16/fp32, SUPPORTED_HEAD_DIMS
KERNEL_TABLE = ("sm90", "mma")


def choose_kernel(q, k, v, out=None) -> str:
    """Name of the kernel (a row of KERNEL_TABLE) that runs this call."""
    from . import cupy_sm90

    forced = os.environ.get("SEQPAR_KERNEL", "")
    if forced and forced not in KERNEL_TABLE:
        raise ValueError(f"SEQPAR_KERNEL={forced!r}: expected one of {KERNEL_TABLE}")
    sm90 = isinstance(q, _cupy().ndarray) and q.ndim == 4 and cupy_sm90.supports(q, k, v, out)
    if forced == "sm90" and not sm90:
        raise ValueError("SEQPAR_KERNEL=sm90 but this call cannot run on the sm_90a kernel "
                         "(needs compute capability 9.0, fp16/bf16, head dim 64 or 128, "
                         "16-byte strides, cuda.bindings)")
    if forced == "mma" or not sm90:
        return "mma"
    return "sm90"


def forward(q, k, v, *, scale, mask=None, causal=False, q_offset=0, k_offset=0,
            key_lengths=None, out=None, lse=None, accumulate=False):
    """Fused attention forward on the GPU; see :mod:`seqpar.local` for the contract."""
    if choose_kernel(q, k, v, out) == "sm90":
        from ..masks import Mask
        from . import cupy_sm90

        if causal and (mask is None or not mask.causal):
            mask = Mask(True) if mask is None else Mask(True, mask.window, mask.doc_starts)

        return cupy_sm90.forward(q, k, v, scale=scale, mask=mask, q_offset=q_offset,
                                 k_offset=k_offset, key_lengths=key_lengths, out=out, lse=lse,
                                 accumulate=accumulate)
    if mask is not None:
        if mask.doc_starts is not None or mask.window != (None, None):
            raise NotImplementedError("the mma.sync kernel takes causal masks only")
        causal = causal or mask.causal
    if key_lengths is not None:
        raise NotImplementedError("the mma.sync kernel takes no key_lengths")
    cupy = _cupy()
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, cupy.ndarray):
            raise TypeError(f"{name} must be a cupy.ndarray, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-D (batch, seq, heads, head_dim), got shape {x.shape}")
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
    for name, x in (("k", k), ("v", v), ("out", out), ("lse", lse)):
        if x is not None and x.device.id != dev:
            raise ValueError(f"{name} is on device {x.device.id}, q on device {dev}")

    if out is None:
        if accumulate:
            raise ValueError("accumulate=True needs the running out and lse")
        out = cupy.empty(q.shape, dtype=q.dtype)
    if lse is None:
        if accumulate:
            raise ValueError("accumulate=True needs the running out and lse")
        lse = cupy.empty((batch, hq, sq), dtype=np.float32)
    if not isinstance(out, cupy.ndarray) or out.shape != q.shape:
        raise ValueError(f"out must be a cupy array of shape {q.shape}")
    if not (out.dtype == q.dtype or out.dtype == np.float32):
        raise TypeError(f"out dtype {out.dtype} must be q's dtype ({q.dtype}) or float32")
    if not isinstance(lse, cupy.ndarray) or lse.shape != (batch, hq, sq) or lse.dtype != np.float32:
        raise ValueError(f"lse must be a float32 cupy array of shape {(batch, hq, sq)}")

    # Empty arrays may carry zero strides, so they leave before the stride checks.
    if batch == 0 or sq == 0 or hq == 0:
        return out, lse
    if sk == 0:
        if not accumulate:
            out.fill(0)
            lse.fill(-np.inf)
        return out, lse

    qs, ks, vs = (_elem_strides(x, n) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    os_ = _elem_strides(out, "out")
    ls = _elem_strides(lse, "lse")
    if kind != "f32":
        for x, n in ((q, "q"), (k, "k"), (v, "v")):
            _check_align(x, n, 16)
        _check_align(out, "out", 8 if out.dtype == np.float32 else 4)

    cfg = None if kind == "f32" else _MMA_CONFIG[d]
    fn, threads, rows, smem = _kernel(kind, d, dev, cfg)
    grid_x = -(-sq // rows)
    if batch * hq > _MAX_GRID_Y:
        raise ValueError(f"q: batch * heads = {batch * hq} too large for one launch "
                         f"(max {_MAX_GRID_Y})")
    lim = sq + sk + 1
    delta = max(-lim, min(lim, int(q_offset) - int(k_offset)))
    i32, i64 = np.int32, np.int64
    args = (q, k, v, out, lse, i32(sq), i32(sk), i32(hq), i32(hk),
            i64(qs[0]), i64(qs[1]), i64(qs[2]),
            i64(ks[0]), i64(ks[1]), i64(ks[2]),
            i64(vs[0]), i64(vs[1]), i64(vs[2]),
            i64(os_[0]), i64(os_[1]), i64(os_[2]),
            i64(ls[0]), i64(ls[1]),
            np.float32(scale * math.log2(math.e)), i32(bool(causal)), i32(delta),
            i32(bool(accumulate)), i32(out.dtype == np.float32))
    with q.device:
        fn((grid_x, batch * hq, 1), (threads, 1, 1), args, shared_mem=smem)
    return out, lse
