"""Command line: ``seqpar info | check | bench`` (run under mpiexec for several ranks)."""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from mpi4py import MPI

from . import __version__, gather, kv_sharded_attention, ring_attention, shard, use_local_device
from .strategies.local import attention
from .transport import TRANSPORTS, cuda_aware_mpi

__all__ = ["main"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="seqpar", description="seqpar: check and benchmark")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, MPI library and thread level, GPU")
    check = sub.add_parser("check", help="every strategy against a float64 softmax")
    check.add_argument("--gpu", action="store_true", help="use CuPy arrays")
    check.add_argument("--transport", choices=TRANSPORTS, default="auto")
    bench = sub.add_parser("bench", help="time ring attention at one size")
    bench.add_argument("--seq", type=int, default=8192, help="global sequence length")
    bench.add_argument("--heads", type=int, default=8)
    bench.add_argument("--head-dim", type=int, default=64)
    bench.add_argument("--dtype", default="float32")
    bench.add_argument("--causal", action="store_true")
    bench.add_argument("--layout", choices=["contiguous", "zigzag"], default="zigzag")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--gpu", action="store_true", help="use CuPy arrays")
    bench.add_argument("--transport", choices=TRANSPORTS, default="auto")
    args = parser.parse_args(argv)
    return {"info": _info, "check": _check, "bench": _bench}[args.command](args)


def _say(*lines: str) -> None:
    if MPI.COMM_WORLD.rank == 0:
        print(*lines, sep="\n", flush=True)


def _xp(gpu: bool):
    """numpy, or cupy with this rank on the GPU of its node-local rank (round robin)."""
    if not gpu:
        return np
    import cupy

    use_local_device()
    return cupy


def _info(args) -> int:
    comm = MPI.COMM_WORLD
    levels = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled",
              MPI.THREAD_SERIALIZED: "serialized", MPI.THREAD_MULTIPLE: "multiple"}
    try:
        import cupy
        from cupy.cuda import nccl

        gpu = (f"cupy {cupy.__version__}, {cupy.cuda.runtime.getDeviceCount()} device(s), "
               f"NCCL {'yes' if getattr(nccl, 'available', False) else 'no'}")
    except Exception as exc:  # no CuPy, or no driver: say which
        gpu = f"none ({type(exc).__name__}: {exc})"
    _say(f"seqpar {__version__}", f"numpy {np.__version__}",
         f"MPI: {MPI.Get_library_version().splitlines()[0]}",
         f"ranks: {comm.size}, thread level: {levels.get(MPI.Query_thread(), '?')}",
         f"GPU: {gpu}", f"CUDA-aware MPI: {'yes' if cuda_aware_mpi() else 'no'}")
    return 0


def _check(args) -> int:
    """Every strategy and layout on small random problems vs a float64 softmax."""
    comm = MPI.COMM_WORLD
    xp = _xp(args.gpu)
    rng = np.random.default_rng(7)
    n, heads, kv_heads, d = 24 * comm.size, 4, 2, 32
    q, k, v = (rng.standard_normal((2, n, h, d)) for h in (heads, kv_heads, kv_heads))
    dtypes = ["float32", "float64"] if xp is np else ["float32", "float16"]
    tolerance = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3}
    failures, stats = 0, {}
    for dtype in dtypes:
        qd, kd, vd = (xp.asarray(x.astype(dtype)) for x in (q, k, v))
        for causal in (False, True):
            ref = _softmax_reference(*(x.astype(dtype) for x in (q, k, v)), causal)
            results = {"attention": attention(qd, kd, vd, causal=causal)}
            for layout in ("contiguous", "zigzag"):
                parts = [shard(x, layout=layout) for x in (qd, kd, vd)]
                out = ring_attention(*parts, causal=causal, layout=layout,
                                     transport=args.transport, stats=stats)
                results[f"ring/{layout}"] = gather(out, layout=layout)
            if not causal:
                keys = np.array_split(np.arange(n), comm.size)[comm.rank]
                results["kv_sharded"] = kv_sharded_attention(qd, kd[:, keys], vd[:, keys],
                                                             transport=args.transport)
            for name, out in results.items():
                out = out.get() if xp is not np else out
                err = np.linalg.norm(out.astype(np.float64) - ref) / np.linalg.norm(ref)
                err = comm.allreduce(err, op=MPI.MAX)
                ok = err <= tolerance[dtype]
                failures += not ok
                _say(f"{'ok  ' if ok else 'FAIL'} {name:18s} {dtype:8s} causal={causal!s:5s} "
                     f"error {err:.1e} (tolerance {tolerance[dtype]:g})")
    verdict = f"{failures} FAILED" if failures else "all passed"
    _say(f"{comm.size} rank(s), transport {stats.get('transport')}: {verdict}")
    return 1 if failures else 0


def _softmax_reference(q, k, v, causal):
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1])
    if causal:
        s = np.where(np.triu(np.ones(s.shape[-2:], bool), 1), -np.inf, s)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return np.einsum("bhij,bjhd->bihd", p / p.sum(axis=-1, keepdims=True), v)


def _bench(args) -> int:
    comm = MPI.COMM_WORLD
    xp = _xp(args.gpu)
    if args.seq % (2 * comm.size):
        _say(f"--seq must be divisible by 2 * ranks = {2 * comm.size}")
        return 2
    local = args.seq // comm.size
    rng = np.random.default_rng(comm.rank)
    q, k, v = (xp.asarray(rng.standard_normal((1, local, args.heads, args.head_dim))
                          .astype(args.dtype)) for _ in range(3))
    options = dict(causal=args.causal, layout=args.layout, transport=args.transport)
    ring_attention(q, k, v, **options)  # warm-up: compiles, sets up the transport
    times = []
    for _ in range(args.repeats):
        comm.Barrier()
        start = time.perf_counter()
        out = ring_attention(q, k, v, **options)
        if xp is not np:
            xp.cuda.get_current_stream().synchronize()
        times.append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
    del out
    stats = {}
    ring_attention(q, k, v, **options, stats=stats)
    exposed = comm.allreduce(sum(stats["exposed_seconds"]), op=MPI.MAX)
    best = float(np.median(times))
    flops = 4.0 * args.seq**2 * args.heads * args.head_dim / (2 if args.causal else 1)
    _say(f"ring_attention ranks={comm.size} N={args.seq} heads={args.heads} d={args.head_dim} "
         f"{args.dtype} causal={args.causal} layout={args.layout} "
         f"transport={stats['transport']}: {best * 1e3:.1f} ms (median of {args.repeats}), "
         f"{flops / best / 1e9 / comm.size:.1f} GFLOP/s per rank, "
         f"exposed communication {exposed * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
