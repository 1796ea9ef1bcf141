"""CuPy backend for Hopper (compute capability 9.0): ``kernels/flash_forward_sm90.cu``.

Implements ``forward`` of the contract of :mod:`seqpar.local` for float16 and
bfloat16 with head dims 64, 96, 128, 192 and 256 on sm_90a: wgmma tensor-core products with
operands in 128-byte-swizzled shared memory, TMA loads (tensor maps built here
with ``cuda.bindings.driver.cuTensorMapEncodeTiled`` and passed by value), a
producer warpgroup and ping-ponging consumer warpgroups, a persistent grid.
Design and measurements: benchmarks/gpu_kernel_notes.md.

The tensor maps read q, k, v in place with their strides (GQA and strided views
need no copies); the kernel is compiled by NVRTC through ``cupy.RawModule`` with
``--gpu-architecture=sm_90a`` (headers of ``kernels/`` inlined, so CuPy's cache
key covers them) and launched on the current CuPy stream. A 128-byte tensor map
goes to the kernel as a one-element NumPy array, which CuPy passes by value;
``SEQPAR_SM90_LAUNCH=driver`` launches through ``cuda.bindings`` instead.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
from typing import NamedTuple

import numpy as np

from ._launch import doc_starts, source

__all__ = ["forward", "prepare", "supports", "Launch", "Config", "CONFIGS",
           "SUPPORTED_HEAD_DIMS"]


class Config(NamedTuple):
    """Tile shape of one instantiation."""

    bn: int          # keys per tile
    nwg: int         # consumer warpgroups (query rows per tile: 64 * nwg)
    stages: int      # K/V shared-memory stages
    pingpong: bool   # consumers take turns issuing their products
    preg: int        # registers of the producer warpgroup (setmaxnreg)
    creg: int        # registers of each consumer warpgroup


# head dim -> configuration (measured: benchmarks/gpu_kernel_notes.md, "Hopper kernel").
# Larger head dims take fewer keys per tile (O's registers, d / 2 per thread, and the
# Q, K, V panels in shared memory grow with d) and no ping-pong: with P V at N = d the
# products are long enough that the consumers' turns only add waits.
CONFIGS = {
    64: Config(bn=128, nwg=2, stages=2, pingpong=True, preg=24, creg=240),
    96: Config(bn=128, nwg=2, stages=2, pingpong=True, preg=24, creg=240),
    128: Config(bn=128, nwg=2, stages=2, pingpong=True, preg=24, creg=240),
    192: Config(bn=112, nwg=2, stages=2, pingpong=False, preg=24, creg=240),
    256: Config(bn=80, nwg=2, stages=2, pingpong=False, preg=24, creg=240),
}
SUPPORTED_HEAD_DIMS = tuple(CONFIGS)
# Causal tiles go longest first; in groups of this many neighbouring query blocks of a
# head where that keeps K/V in L2 (heavy_group)
HEAVY_GROUP = 16
_L2_KV_BYTES = 32 << 20  # K/V of the heads in flight that L2 (50 MB) keeps with the rest
_UNBOUNDED = 1 << 60


def _cupy():
    import cupy

    return cupy


def _kind(dtype):
    if dtype == np.float16:
        return "f16"
    if getattr(dtype, "name", "") == "bfloat16":
        return "bf16"
    return None


@functools.lru_cache(maxsize=None)
def _device_ready(dev_id) -> bool:
    """Compute capability 9.0 and cuda.bindings (tensor maps) importable."""
    try:
        import cuda.bindings.driver  # noqa: F401
    except ImportError:
        return False
    return _cupy().cuda.Device(dev_id).compute_capability == "90"


def supports(q, k, v, out=None) -> bool:
    """Whether this kernel can run the call (device, dtype, head dim, strides)."""
    if _kind(q.dtype) is None or q.shape[-1] not in CONFIGS or q.dtype != k.dtype:
        return False
    if not _device_ready(q.device.id):
        return False
    for x in (q, k, v):
        if x.data.ptr % 16 or x.strides[-1] != x.itemsize:
            return False
        if any((s % 16 or s < 0 or s >= 1 << 40) for n, s in zip(x.shape[:-1], x.strides[:-1])
               if n > 1):
            return False
    return True


@functools.lru_cache(maxsize=None)
def _kernel(d, bf16, cfg, device_id):
    """(kernel, threads, dynamic shared bytes), compiled once per process and device."""
    cupy = _cupy()
    name = (f"flash_fwd_sm90<{d}, {cfg.bn}, {cfg.nwg}, {cfg.stages}, "
            f"{'true' if bf16 else 'false'}, {'true' if cfg.pingpong else 'false'}, "
            f"{cfg.preg}, {cfg.creg}>")
    threads = 128 * (cfg.nwg + 1)
    smem = shared_bytes(d, cfg)
    with cupy.cuda.Device(device_id):
        options = ("-std=c++17", "--gpu-architecture=sm_90a")
        module = cupy.RawModule(code=source("flash_forward_sm90.cu"), options=options,
                                name_expressions=[name])
        fn = module.get_function(name)
        fn.max_dynamic_shared_size_bytes = smem
    return fn, threads, smem


def shared_bytes(d, cfg):
    """Dynamic shared memory of one block: Q and the K, V stages in whole 64-column
    panels (d = 96 takes two), the mbarriers, and room to align to 1024 bytes."""
    panels = -(-d // 64)
    return 128 * panels * (64 * cfg.nwg + 2 * cfg.stages * cfg.bn) + 8 * (2 + 4 * cfg.stages) + 1024


def tensor_map(x, box_rows):
    """The TMA tensor map of a (B, S, H, D) 16-bit CuPy array, as a one-element
    128-byte NumPy array: dims (D, S, H, B), box (64, box_rows, 1, 1), 128-byte
    swizzle, out-of-bounds rows and columns read as zeros (d = 96 fills its second
    panel half-way). Cached: the map is a function of the address, shape, strides,
    dtype and box alone, and encoding one costs more host time than the launch.
    Callers pass it to a launch (which copies it) and never write into it."""
    return _encoded_map(x.data.ptr, x.shape, x.strides, _kind(x.dtype), box_rows)


@functools.lru_cache(maxsize=256)
def _encoded_map(ptr, shape, x_strides, kind, box_rows):
    from cuda.bindings import driver

    batch, seq, heads, d = shape
    itemsize = 2
    dims = [d, seq, heads, batch]
    strides = []
    span = d * itemsize
    for n, s in ((seq, x_strides[1]), (heads, x_strides[2]), (batch, x_strides[0])):
        if n == 1:  # never stepped over: any valid stride
            s = -(-span // 16) * 16
        strides.append(int(s))
        span = s * n
    dtype = (driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 if kind == "bf16"
             else driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT16)
    u32, u64 = driver.cuuint32_t, driver.cuuint64_t  # the lists take these, not ints
    err, tmap = driver.cuTensorMapEncodeTiled(
        dtype, 4, ptr, [u64(n) for n in dims], [u64(s) for s in strides],
        [u32(64), u32(box_rows), u32(1), u32(1)], [u32(1)] * 4,
        driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed ({err}) for shape {shape}, "
                           f"strides {x_strides}")
    arr = np.empty(1, dtype=np.dtype((np.void, 128)))
    arr.view(np.uint8)[:] = np.frombuffer(ctypes.string_at(tmap.getPtr(), 128), dtype=np.uint8)
    return arr


@functools.lru_cache(maxsize=None)
def _sm_count(device_id):
    return _cupy().cuda.Device(device_id).attributes["MultiProcessorCount"]


def launch(fn, grid, block, args, smem):
    """Launch on the current CuPy stream (CuPy, or cuda.bindings when
    SEQPAR_SM90_LAUNCH=driver)."""
    if os.environ.get("SEQPAR_SM90_LAUNCH", "cupy") != "driver":
        fn(grid, block, args, shared_mem=smem)
        return
    cupy = _cupy()
    from cuda.bindings import driver

    holders = []
    for a in args:
        if isinstance(a, cupy.ndarray):
            holders.append(np.array([a.data.ptr], dtype=np.uint64))
        elif a is None:
            holders.append(np.zeros(1, dtype=np.uint64))
        elif isinstance(a, np.ndarray):
            holders.append(a)
        else:
            holders.append(np.array([a]))
    params = np.array([h.ctypes.data for h in holders], dtype=np.uint64)
    func = getattr(fn, "kernel", fn)
    stream = cupy.cuda.get_current_stream().ptr
    (err,) = driver.cuLaunchKernel(driver.CUfunction(int(func.ptr)), *grid, *block, smem,
                                   driver.CUstream(stream), int(params.ctypes.data), 0)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuLaunchKernel failed: {err}")


class Launch(NamedTuple):
    """One prepared launch of the kernel: out and lse go in by address (arguments 3
    and 4), so a launch can be kept and run again with other arrays of their shape."""

    fn: object
    grid: tuple
    block: tuple
    args: tuple
    smem: int
    device_id: int

    def __call__(self, out, lse):
        args = self.args[:3] + (np.uint64(out.data.ptr), np.uint64(lse.data.ptr)) + self.args[5:]
        with _cupy().cuda.Device(self.device_id):
            launch(self.fn, self.grid, self.block, args, self.smem)


def forward(q, k, v, *, scale, mask=None, q_offset=0, k_offset=0, key_lengths=None,
            out=None, lse=None, accumulate=False, config=None):
    """Fused attention forward on sm_90a; see :mod:`seqpar.local` for the contract.

    ``config`` (a :class:`Config`) overrides the tile shape (benchmarks, tests).
    The caller checks :func:`supports` first.
    """
    call, out, lse = prepare(q, k, v, scale=scale, mask=mask, q_offset=q_offset,
                             k_offset=k_offset, key_lengths=key_lengths, out=out, lse=lse,
                             accumulate=accumulate, config=config)
    if call is not None:
        call(out, lse)
    return out, lse


def heavy_group(batch, hq, hk, sk, d, itemsize, grid) -> int:
    """Query blocks of a head dealt together in the longest-first (causal) order.

    One by one, with the head innermost, a round of ``grid`` tiles covers grid / (batch *
    hq) query blocks of every head: with many heads (batch 8 x 16 heads, say) that is
    one block of each, whose K/V together do not stay in L2, and the kernel waits on
    DRAM. Dealing HEAVY_GROUP blocks of a head together keeps a round to a few heads'
    K/V (batch 8, 4096 tokens: 0.76-0.80 -> 0.86-0.89 x cuDNN, gpu_kernel_notes.md);
    where the rounds already cover that many blocks of each head, or all K/V fits L2,
    grouping only coarsens the order (d = 192-256 at 4096 tokens lost 14 %).
    """
    if grid >= HEAVY_GROUP * batch * hq or 2 * batch * hk * sk * d * itemsize <= _L2_KV_BYTES:
        return 1
    return HEAVY_GROUP


def prepare(q, k, v, *, scale, mask=None, q_offset=0, k_offset=0, key_lengths=None,
            out=None, lse=None, accumulate=False, config=None):
    """(launch, out, lse): :func:`forward`'s checks and arguments without the launch;
    launch is None when there is nothing to compute (out and lse are then final)."""
    cupy = _cupy()
    kind = _kind(q.dtype)
    if kind is None or not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, float16 or bfloat16 "
                        f"(got {q.dtype}, {k.dtype}, {v.dtype})")
    batch, sq, hq, d = q.shape
    _, sk, hk, _ = k.shape
    if d not in CONFIGS:
        raise ValueError(f"head_dim {d} not supported here (supported: {SUPPORTED_HEAD_DIMS})")
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != d or hk == 0 or hq % hk:
        raise ValueError(f"k/v shapes {k.shape}, {v.shape} do not fit q {q.shape}")
    if out is None or lse is None:
        if accumulate:
            raise ValueError("accumulate=True needs the running out and lse")
        out = cupy.empty(q.shape, dtype=q.dtype) if out is None else out
        lse = cupy.empty((batch, hq, sq), dtype=np.float64) if lse is None else lse
    if out.shape != q.shape or not (out.dtype == q.dtype or out.dtype == np.float32):
        raise ValueError(f"out must have shape {q.shape} and q's dtype or float32")
    if lse.shape != (batch, hq, sq) or lse.dtype != np.float64:
        raise ValueError(f"lse must be float64 of shape {(batch, hq, sq)}")
    if batch == 0 or sq == 0 or hq == 0:
        return None, out, lse
    if sk == 0:
        if not accumulate:
            out.fill(0)
            lse.fill(-np.inf)
        return None, out, lse
    o_item, l_item = out.itemsize, lse.itemsize
    if (out.strides[-1] != o_item or lse.strides[-1] != l_item
            or any(s % o_item for s in out.strides) or any(s % l_item for s in lse.strides)):
        raise ValueError("out and lse need a contiguous last axis and item-multiple strides")
    if out.data.ptr % (2 * o_item) or any(s % (2 * o_item) for s in out.strides[:-1]):
        raise ValueError(f"out: data pointer and strides must be multiples of {2 * o_item} bytes")

    cfg = config or CONFIGS[d]
    dev = q.device.id
    fn, threads, smem = _kernel(d, kind == "bf16", cfg, dev)
    bm = 64 * cfg.nwg
    n_mblocks = -(-sq // bm)
    n_tiles = n_mblocks * batch * hq
    grid = min(n_tiles, _sm_count(dev))

    if mask is None:
        left = right = _UNBOUNDED
        docs, ndocs, heavy = None, 0, 0
    else:
        left, right = mask.left, mask.right
        docs, ndocs = None, 0
        if mask.doc_starts is not None:
            docs = doc_starts(tuple(mask.doc_starts), dev)
            ndocs = len(mask.doc_starts) - 1
        heavy = heavy_group(batch, hq, hk, sk, d, q.itemsize, grid) if mask.causal else 0
    if key_lengths is not None:
        key_lengths = cupy.asarray(key_lengths, dtype=np.int64)
        if key_lengths.shape != (batch,):
            raise ValueError(f"key_lengths must have shape ({batch},), got {key_lengths.shape}")
    lim = 1 << 61
    i32, i64 = np.int32, np.int64
    os_ = [s // o_item for s in out.strides]
    ls_ = [s // l_item for s in lse.strides]
    args = (tensor_map(q, bm), tensor_map(k, cfg.bn), tensor_map(v, cfg.bn), None, None, docs,
            key_lengths, i32(sq), i32(sk), i32(hq), i32(hk), i32(batch), i32(n_mblocks),
            i32(n_tiles), i64(os_[0]), i64(os_[1]), i64(os_[2]), i64(ls_[0]), i64(ls_[1]),
            i64(max(-lim, min(lim, int(q_offset)))), i64(max(-lim, min(lim, int(k_offset)))),
            i64(min(left, _UNBOUNDED)), i64(min(right, _UNBOUNDED)), i32(ndocs),
            np.float32(float(scale) * math.log2(math.e)), i32(bool(accumulate)),
            i32(out.dtype == np.float32), i32(heavy))
    return Launch(fn, (grid, 1, 1), (threads, 1, 1), args, smem, dev), out, lse
