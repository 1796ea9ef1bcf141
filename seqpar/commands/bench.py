"""``seqpar bench``: time ring attention over one or more sequence lengths."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys
import time

import numpy as np
from mpi4py import MPI

from .. import ring_attention
from ..progress import Progress
from ._common import UsageError, array_module, dtype_for, rate_text, say

__all__ = ["bench", "device_name", "summary"]


def bench(args) -> int:
    """Time ring attention at each N; print, and write JSON and a figure when asked."""
    comm = MPI.COMM_WORLD
    try:
        seqs = _sizes(args, comm.size)
        dtype = dtype_for(args.dtype)
        _check_memory(args, max(seqs), comm.size, dtype)
        if args.plot:
            from .plot import require_matplotlib

            require_matplotlib()
        # rank 0, which writes them, checks the output files now and reads an existing
        # --json file, so a bad path stops every rank before the first timing, not after
        earlier = comm.bcast(_outputs(args) if comm.rank == 0 else None)
        if isinstance(earlier, str):
            raise UsageError(earlier)
    except UsageError as exc:  # the same on every rank: every rank stops here
        say(f"python -m seqpar bench: error: {exc}", comm=comm, file=sys.stderr)
        return 2
    xp = array_module(args.gpu)
    records = []
    with Progress(len(seqs) * (1 + args.repeats), "bench", comm=comm) as progress:
        for n in seqs:
            record = _time_one(comm, xp, args, n, dtype, progress)
            records.append(record)
            progress.write(_line(record))
    if comm.rank == 0:
        write_records(_merge(earlier, records) if args.json else records, args.json,
                      args.plot)
    return 0


def write_records(records: list, json_path: str | None, plot_path: str | None) -> None:
    """The records as a bench JSON file and as a figure, each where a path is given."""
    if json_path:
        with open(json_path, "w") as out:
            json.dump(_document(records), out, indent=1)
        print(f"wrote {len(records)} record(s) to {json_path}", flush=True)
    if plot_path:
        from .plot import plot_bench

        print(f"wrote {plot_bench(records, plot_path)}", flush=True)


# What makes two records the same measurement: a new run replaces the old one's numbers.
_SETTINGS = ("strategy", "ranks", "seq", "heads", "kv_heads", "head_dim", "dtype", "causal",
             "layout", "device", "transport")


def _outputs(args) -> list | str:
    """The records already in the --json file (none if it is missing), or what is wrong
    with --json or --plot: a folder that is missing or not writable, a file that cannot
    be replaced, a figure format matplotlib does not write."""
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        wrong = path and _not_writable(path)
        if wrong:
            return f"argument {option}: {path}: {wrong}"
    if args.plot:
        from .plot import figure_format_problem

        wrong = figure_format_problem(args.plot)
        if wrong:
            return f"argument --plot: {args.plot}: {wrong}"
    if not args.json:
        return []
    try:
        with open(args.json) as old:
            return list(json.load(old)["records"])
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return (f"argument --json: {args.json}: not a file that seqpar bench wrote "
                f"({type(exc).__name__}: {exc})")


def _not_writable(path: str) -> str | None:
    """Why ``path`` cannot be written (created or replaced), or None."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return "is a folder"
    if not os.path.isdir(folder):
        return f"no folder {folder}" if not os.path.exists(folder) else f"{folder} is not a folder"
    if os.path.exists(path):
        return None if os.access(path, os.W_OK) else "not writable"
    return None if os.access(folder, os.W_OK | os.X_OK) else f"folder {folder} is not writable"


def _merge(earlier: list, records: list) -> list:
    """Earlier records plus these; a repeated measurement replaces the old one.

    Runs at other rank counts or settings keep their records, so one file (and its
    figure) gathers a scaling study.
    """
    key = lambda r: tuple(r.get(name) for name in _SETTINGS)  # noqa: E731
    new = {key(r) for r in records}
    merged = [r for r in earlier if key(r) not in new] + records
    return sorted(merged, key=lambda r: (r.get("strategy", ""), r["ranks"], r["dtype"],
                                         r["causal"], r["seq"]))


def _sizes(args, ranks: int) -> list[int]:
    """The sequence lengths to time: --seq (positive integers, checked by the command
    line), swept N/8 .. N for --plot with one N."""
    seqs = list(args.seq)
    # zigzag cuts the sequence into 2P equal chunks, contiguous into P slices
    parts = 2 * ranks if args.layout == "zigzag" else ranks
    if args.plot and len(seqs) == 1:
        seqs = sorted({seqs[0] // f for f in (8, 4, 2, 1) if (seqs[0] // f) % parts == 0
                       and seqs[0] // f >= parts} | {seqs[0]})
    bad = [n for n in seqs if n % parts]
    if bad:
        raise UsageError(f"argument --seq: {bad[0]} does not split into {parts} equal parts "
                         f"({args.layout} layout on {ranks} ranks)")
    return seqs


def _check_memory(args, n: int, ranks: int, dtype) -> None:
    """Refuse sizes whose arrays could never fit: one rank's share of q, k, v and the
    output (and the float32 arrays they are drawn in) beyond all of this machine's memory."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX: no limit known
        return
    kv_heads = args.kv_heads or args.heads
    elements = n // ranks * args.head_dim * (2 * args.heads + 2 * kv_heads)
    need = elements * (np.dtype(dtype).itemsize + 4)
    if need > memory:
        raise UsageError(f"argument --seq: {n} tokens with "
                         f"--heads {args.heads} and --head-dim {args.head_dim} need "
                         f"{need / 2**30:.0f} GiB per rank, more than this machine's "
                         f"{memory / 2**30:.0f} GiB")


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
    return {"strategy": "ring_attention", "ranks": comm.size, "seq": n, "heads": args.heads,
            "kv_heads": kv_heads, "head_dim": args.head_dim, "dtype": args.dtype,
            "causal": args.causal, "layout": args.layout,
            "device": "gpu" if args.gpu else "cpu", "device_name": device_name(args.gpu),
            "threads": None if args.gpu else comm.allreduce(_threads_per_rank(), op=MPI.MIN),
            "transport": stats.get("transport"), **summary(times, n, args),
            "exposed_s": float(np.median(exposed))}


def summary(times: list, n: int, args) -> dict:
    """The statistics of one measurement: every time, their median and minimum (the
    median is what the rates use: the minimum alone flatters a noisy machine)."""
    median = float(np.median(times))
    flops = 4.0 * n * n * args.heads * args.head_dim / (2 if args.causal else 1)
    return {"times_s": [float(t) for t in times], "median_s": median,
            "min_s": float(min(times)), "flops": flops, "tflops": flops / median / 1e12}


def device_name(gpu: bool) -> str:
    """This rank's GPU (CuPy's name for it) or CPU model, short, for legends."""
    if gpu:
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    model = ""
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1] for line in info
                          if line.startswith("model name")), "")
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "CPU"
    # "Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz" -> "Intel Xeon Gold 6248"
    for noise in ("(R)", "(TM)", "(tm)"):
        model = model.replace(noise, "")
    model = re.sub(r"\s+(CPU\s+)?@.*$|\s+\d+-Core Processor$|\s+Processor$", "", model.strip())
    return " ".join(model.split())


def _threads_per_rank() -> int:
    """The threads a rank computes on: the rule of seqpar.local.numpy_kernel's pool."""
    from ..local.numpy_kernel import pool_threads

    return pool_threads()


def _synchronize(xp) -> None:
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def _line(r: dict) -> str:
    times = (f"{r['median_s'] * 1e3:.3g} ms median, {r['min_s'] * 1e3:.3g} ms min "
             f"(of {len(r['times_s'])}), {rate_text(r['flops'] / r['median_s'])}")
    if r["strategy"] != "ring_attention":
        where = f"1 process, {r['threads']} threads" if r["threads"] else "1 process"
        return (f"{r['peer']} scaled_dot_product_attention ({where}, {r['device_name']}) "
                f"N={r['seq']} heads={r['heads']}/{r['kv_heads']} d={r['head_dim']} "
                f"{r['dtype']} causal={r['causal']}: {times}")
    return (f"ring_attention ranks={r['ranks']} N={r['seq']} heads={r['heads']}/{r['kv_heads']} "
            f"d={r['head_dim']} {r['dtype']} causal={r['causal']} layout={r['layout']} "
            f"transport={r['transport']}: {times} in all, "
            f"{rate_text(r['flops'] / r['median_s'] / r['ranks'])} per rank, "
            f"exposed communication {r['exposed_s'] * 1e3:.1f} ms")


def _document(records: list) -> dict:
    from .. import __version__

    return {"seqpar": __version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(),
            "mpi": MPI.Get_library_version().strip("\x00 \n").splitlines()[0],
            "records": records}
