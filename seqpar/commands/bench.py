"""``seqpar bench``: time ring attention over one or more sequence lengths."""
from __future__ import annotations

import datetime
import json
import platform
import time

import numpy as np
from mpi4py import MPI

from .. import ring_attention
from ..progress import Progress
from ._common import UsageError, array_module, dtype_for, say

__all__ = ["bench"]


def bench(args) -> int:
    """Time ring attention at each N; print, and write JSON and a figure when asked."""
    comm = MPI.COMM_WORLD
    try:
        seqs = _sizes(args, comm.size)
        dtype = dtype_for(args.dtype)
        if args.plot:
            from .plot import require_matplotlib

            require_matplotlib()
        # rank 0 reads an existing --json file now, so a bad one stops every rank early
        earlier = comm.bcast(_earlier_records(args.json) if comm.rank == 0 else None)
        if isinstance(earlier, str):
            raise UsageError(earlier)
    except UsageError as exc:  # the same on every rank: every rank stops here
        say(f"seqpar bench: {exc}", comm=comm)
        return 2
    xp = array_module(args.gpu)
    records = []
    with Progress(len(seqs) * (1 + args.repeats), "bench", comm=comm) as progress:
        for n in seqs:
            record = _time_one(comm, xp, args, n, dtype, progress)
            records.append(record)
            progress.write(_line(record))
    if comm.rank == 0:
        if args.json:
            records = _merge(earlier, records)
            with open(args.json, "w") as out:
                json.dump(_document(records), out, indent=1)
            print(f"wrote {len(records)} record(s) to {args.json}", flush=True)
        if args.plot:
            from .plot import plot_bench

            plot_bench(records, args.plot)
            print(f"wrote {args.plot}", flush=True)
    return 0


# What makes two records the same measurement: a new run replaces the old one's numbers.
_SETTINGS = ("strategy", "ranks", "seq", "heads", "kv_heads", "head_dim", "dtype", "causal",
             "layout", "device", "transport")


def _earlier_records(path: str | None) -> list | str:
    """The records already in the --json file (none if it is missing), or what is wrong."""
    if not path:
        return []
    try:
        with open(path) as old:
            return list(json.load(old)["records"])
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"--json {path}: not a file that seqpar bench wrote ({type(exc).__name__}: {exc})"


def _merge(earlier: list, records: list) -> list:
    """Earlier records plus these; a repeated measurement replaces the old one.

    Runs at other rank counts or settings keep their records, so one file (and its
    figure) gathers a scaling study.
    """
    key = lambda r: tuple(r.get(name) for name in _SETTINGS)  # noqa: E731
    new = {key(r) for r in records}
    merged = [r for r in earlier if key(r) not in new] + records
    return sorted(merged, key=lambda r: (r["ranks"], r["dtype"], r["causal"], r["seq"]))


def _sizes(args, ranks: int) -> list[int]:
    """The sequence lengths to time: --seq, swept N/8 .. N for --plot with one N."""
    try:
        seqs = [int(x) for x in str(args.seq).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--seq takes integers separated by commas, got {args.seq!r}") from None
    if not seqs or min(seqs) <= 0:
        raise UsageError(f"--seq must be positive, got {args.seq!r}")
    if args.repeats < 1:
        raise UsageError(f"--repeats must be at least 1, got {args.repeats}")
    # zigzag cuts the sequence into 2P equal chunks, contiguous into P slices
    parts = 2 * ranks if args.layout == "zigzag" else ranks
    if args.plot and len(seqs) == 1:
        seqs = sorted({seqs[0] // f for f in (8, 4, 2, 1) if (seqs[0] // f) % parts == 0
                       and seqs[0] // f >= parts} | {seqs[0]})
    bad = [n for n in seqs if n % parts]
    if bad:
        raise UsageError(f"--seq {bad[0]} does not split into {parts} equal parts "
                         f"({args.layout} layout on {ranks} ranks)")
    return seqs


def _time_one(comm, xp, args, n: int, dtype, progress: Progress) -> dict:
    kv_heads = args.kv_heads or args.heads
    local = n // comm.size
    rng = np.random.default_rng(comm.rank)
    q, k, v = (xp.asarray(rng.standard_normal((1, local, h, args.head_dim), dtype=np.float32)
                          .astype(dtype)) for h in (args.heads, kv_heads, kv_heads))
    options = dict(causal=args.causal, layout=args.layout, transport=args.transport)
    ring_attention(q, k, v, **options)  # warm-up: compiles kernels, sets up the transport
    _synchronize(xp)
    progress.update(note=f"N={n} warm-up")
    times, exposed, stats = [], [], {}
    for _ in range(args.repeats):
        comm.Barrier()
        start = time.perf_counter()
        ring_attention(q, k, v, **options, stats=stats)
        _synchronize(xp)
        # the slowest rank is the time of the call
        times.append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
        exposed.append(comm.allreduce(float(sum(stats.get("exposed_seconds", ()))), op=MPI.MAX))
        progress.update(note=f"N={n} {times[-1] * 1e3:.0f} ms")
    median = float(np.median(times))
    flops = 4.0 * n * n * args.heads * args.head_dim / (2 if args.causal else 1)
    return {"strategy": "ring_attention", "ranks": comm.size, "seq": n, "heads": args.heads,
            "kv_heads": kv_heads, "head_dim": args.head_dim, "dtype": args.dtype,
            "causal": args.causal, "layout": args.layout,
            "device": "gpu" if args.gpu else "cpu", "transport": stats.get("transport"),
            "times_s": times, "median_s": median, "flops": flops,
            "tflops": flops / median / 1e12, "exposed_s": float(np.median(exposed))}


def _synchronize(xp) -> None:
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def _line(r: dict) -> str:
    return (f"ring_attention ranks={r['ranks']} N={r['seq']} heads={r['heads']}/{r['kv_heads']} "
            f"d={r['head_dim']} {r['dtype']} causal={r['causal']} layout={r['layout']} "
            f"transport={r['transport']}: {r['median_s'] * 1e3:.1f} ms "
            f"(median of {len(r['times_s'])}), {r['tflops']:.3f} TFLOP/s in all, "
            f"{r['tflops'] / r['ranks'] * 1e3:.1f} GFLOP/s per rank, "
            f"exposed communication {r['exposed_s'] * 1e3:.1f} ms")


def _document(records: list) -> dict:
    from .. import __version__

    return {"seqpar": __version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(),
            "mpi": MPI.Get_library_version().strip("\x00 \n").splitlines()[0],
            "records": records}
