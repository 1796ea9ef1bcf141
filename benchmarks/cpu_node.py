"""Node scale on the CPU (issue #21, item 2): how to split one node's cores into ranks x threads.

One global problem (default N=32768 tokens, 8 heads, d=64, float32, causal, batch 1):

1. reference: PyTorch's CPU ``scaled_dot_product_attention`` on the whole problem in one
   process, ``torch.set_num_threads(C)`` with C the most cores a split uses (16 at the
   defaults), inputs (batch, heads, tokens, d) contiguous (``benchmarks/torch_peer.py``);
2. ``seqpar.ring_attention(layout="zigzag")`` (each rank holds chunks r and 2R-1-r of 2R,
   the same causal work on every rank) for each RANKSxTHREADS split (default 1x16, 2x8,
   4x4, 8x2, 16x1), each its own job ``python -m seqpar run -n R --mpiexec-args BINDING
   -m seqpar bench --layout zigzag ...``; threads through ``SEQPAR_NUM_THREADS`` (the
   size of each rank's tile-job pool; seqpar keeps BLAS at one thread inside a job, and
   its numba kernels are serial) and ``OMP/OPENBLAS/MKL_NUM_THREADS``. BINDING
   (``--bind``): ``--map-by slot:PE=T --bind-to core`` where a probe job shows that it
   gives every rank T CPUs of its own (``auto``, the default), else ``--bind-to none``;
3. one rank's thread scaling at ``--scale-seq`` (default 8192) over ``--threads``
   (default 1,2,4,8,16), the same ``seqpar bench`` at ``-n 1``: efficiency t1 / (T * tT).

Every time is the best of ``--repeats`` (3) calls after one warm-up call (which compiles
the numba kernels, or loads them from numba's cache); ``seqpar bench`` times each call
collectively: barrier, ``perf_counter``, the slowest rank's time. Every measurement runs
in a child process under a time limit (``--timeout``, default from its FLOPs) and all of
them within ``--budget`` seconds; the JSON file (``--json``) is rewritten after each, so
a run cut short keeps what it measured. Prints a markdown table at the end.

    python3 benchmarks/cpu_node.py --json cpu_node.json        # the 16-core node, ~2 min
    python benchmarks/cpu_node.py --seq 2048 --scale-seq 1024 --splits 1x2,2x1 --threads 1,2

FLOPs are counted as 4*B*H*N*N*d (the two products, a multiply-add as 2), halved when
causal; the softmax is not counted: 1.10e12 per call at N=32768, 6.9e10 at N=8192.
Run time at the defaults on 16 cores, at seqpar's ~1 TFLOP/s (0.5 where a split does
worse) and ~60 GFLOP/s per thread at N=8192: 5 splits x 4 calls x 1.1 s-2.2 s plus ~4 s of
start-up each (probe, mpiexec, imports), 40-65 s; torch ~10-15 s; thread scaling 4 calls
x 1.15 s x (1 + 1/2 + ... + 1/16) plus start-ups, ~30 s: under 2 minutes in all.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's seqpar, not an installed one

import mpi4py  # noqa: E402

mpi4py.rc.initialize = False  # this process only starts jobs: it is no MPI process

from seqpar.commands._common import rate_text  # noqa: E402
from seqpar.commands.bench import device_name  # noqa: E402
from seqpar.launch import _physical_cores, find_mpiexec  # noqa: E402

THREAD_VARIABLES = ("SEQPAR_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "MKL_NUM_THREADS")
# the per-core rate no healthy run falls below: a child's time limit is its calls at this
# rate plus START_S of start-up (mpiexec, imports, the numba compile of a cold cache)
FLOOR_FLOPS_PER_CORE = 10e9
START_S = 60.0
GRACE_S = 10.0  # after SIGTERM, for `seqpar run` to end its job (it kills what is left)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=32768, help="global N (default 32768)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--splits", default="1x16,2x8,4x4,8x2,16x1", type=_splits,
                        help="RANKSxTHREADS, comma separated (default 1x16,2x8,4x4,8x2,16x1)")
    parser.add_argument("--scale-seq", type=int, default=8192,
                        help="N of the one-rank thread scaling (default 8192)")
    parser.add_argument("--threads", default="1,2,4,8,16", type=_counts,
                        help="thread counts of the scaling (default 1,2,4,8,16)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch's threads (default: the most cores a split uses)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls (default 3)")
    parser.add_argument("--bind", choices=("auto", "cores", "none"), default="auto",
                        help="auto: --map-by slot:PE=T --bind-to core where a probe shows "
                             "it works, else --bind-to none (default auto)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per child (default: from its FLOPs)")
    parser.add_argument("--budget", type=float, default=270.0,
                        help="seconds for everything; later children are skipped "
                             "(default 270, under device_check's 300)")
    parser.add_argument("--json", metavar="FILE", help="write the results here")
    parser.add_argument("--child-torch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.torch_threads = args.torch_threads or max(r * t for r, t in args.splits)
    for ranks, _ in args.splits:
        if args.seq % (2 * ranks):
            parser.error(f"--seq {args.seq} does not split into {2 * ranks} equal chunks "
                         f"(zigzag on {ranks} ranks)")
    if args.scale_seq % 2:
        parser.error("--scale-seq must be even (zigzag: 2 chunks on one rank)")
    return args


def _counts(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"takes whole numbers >= 1, commas between: {text!r}")
    return values


def _splits(text: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(x) for x in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"takes RANKSxTHREADS, commas between: {text!r}")
    return pairs


def flops(n: int, args) -> float:
    return 4.0 * n * n * args.heads * args.head_dim / 2  # causal: half the blocks


# ---- children ----------------------------------------------------------------------------

class Clock:
    """What is left of --budget, and the limit of the next child."""

    def __init__(self, args):
        self.args, self.end = args, time.monotonic() + args.budget

    def limit(self, n: int, cores: int) -> float:
        calls = (1 + self.args.repeats) * flops(n, self.args)
        own = self.args.timeout or START_S + calls / (FLOOR_FLOPS_PER_CORE * cores)
        return min(own, self.end - time.monotonic())


def child_env(threads: int) -> dict:
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, **{name: str(threads) for name in THREAD_VARIABLES},
                PYTHONPATH=ROOT + (os.pathsep + path if path else ""), PYTHONUNBUFFERED="1")


def run_child(command: list[str], env: dict, limit: float) -> SimpleNamespace:
    """Run a command under a time limit: SIGTERM at the limit (``seqpar run`` passes it to
    its job and kills what is left), SIGKILL GRACE_S later. Never raises for the child."""
    start = time.perf_counter()
    if limit <= 1:
        return SimpleNamespace(rc=None, out="", err="", seconds=0.0, why="skipped: --budget spent")
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, text=True, cwd=ROOT)
    why = None
    try:
        out, err = child.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        why = f"timed out after {limit:.0f} s"
        child.send_signal(signal.SIGTERM)
        try:
            out, err = child.communicate(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            child.kill()
            out, err = child.communicate()
    if why is None and child.returncode:
        why = f"exit status {child.returncode}: " + _last_line(err or out)
    return SimpleNamespace(rc=child.returncode, out=out, err=err,
                           seconds=time.perf_counter() - start, why=why)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


def seqpar_run(ranks: int, mpiexec_args: list[str], program: list[str]) -> list[str]:
    return [sys.executable, "-m", "seqpar", "run", "-n", str(ranks),
            "--mpiexec-args", shlex.join(mpiexec_args), *program]


BIND_CORES = "--map-by slot:PE={} --bind-to core"
BIND_NONE = "--bind-to none"
_PROBE = "import os; print('cpus', sorted(os.sched_getaffinity(0)), flush=True)"


def binding(ranks: int, threads: int, args, clock: Clock) -> tuple[list[str], str]:
    """mpiexec's binding options for R ranks of T threads, and what the probe found."""
    cores = shlex.split(BIND_CORES.format(threads))
    if args.bind == "none":
        return shlex.split(BIND_NONE), "none (--bind none)"
    if args.bind == "cores":
        return cores, "cores (--bind cores)"
    done = run_child(seqpar_run(ranks, cores, ["-c", _PROBE]), child_env(1),
                     min(60.0, clock.end - time.monotonic()))
    sets = [line.split(" ", 1)[1] for line in done.out.splitlines() if line.startswith("cpus ")]
    cpus = [set(json.loads(s)) for s in sets]
    disjoint = len(set().union(*cpus)) == sum(len(c) for c in cpus) if cpus else False
    if done.rc == 0 and len(cpus) == ranks and disjoint and all(len(c) == threads for c in cpus):
        return cores, f"{threads} core{'s' if threads > 1 else ''} per rank"
    found = done.why or f"rank CPU sets {sets}"
    return shlex.split(BIND_NONE), f"none (PE={threads} binding did not work: {found})"


def time_ring(ranks: int, threads: int, n: int, args, clock: Clock) -> dict:
    """One ``seqpar bench`` job: its record, plus how it was started and what it cost."""
    mpiexec_args, bound = binding(ranks, threads, args, clock)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "bench.json")
        program = ["-m", "seqpar", "bench", "--seq", str(n), "--heads", str(args.heads),
                   "--head-dim", str(args.head_dim), "--dtype", "float32", "--causal",
                   "--layout", "zigzag", "--repeats", str(args.repeats), "--json", path]
        command = seqpar_run(ranks, mpiexec_args, program)
        done = run_child(command, child_env(threads), clock.limit(n, ranks * threads))
        record = _read_record(path) if done.why is None else None
    launched = next((line for line in done.err.splitlines() if line.startswith("+ ")), None)
    result = {"ranks": ranks, "threads": threads, "seq": n, "binding": bound,
              "command": shlex.join(command), "mpiexec": launched,
              "wall_s": round(done.seconds, 2), "error": done.why}
    if record is not None:
        result.update(best_s=record["min_s"], times_s=record["times_s"],
                      threads_seen=record["threads"], exposed_s=record["exposed_s"],
                      transport=record["transport"])
        if record["threads"] != threads:
            result["error"] = f"ranks ran {record['threads']} threads, not {threads}"
    return result


def _read_record(path: str) -> dict | None:
    try:
        with open(path) as saved:
            return json.load(saved)["records"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return None


def time_torch(args, clock: Clock) -> dict:
    """torch SDPA on the whole problem, in a child process (torch never enters this one)."""
    threads = args.torch_threads
    if importlib.util.find_spec("torch") is None:
        return {"threads": threads, "seq": args.seq, "error": "torch is not installed"}
    command = [sys.executable, os.path.abspath(__file__), "--child-torch", "--seq", str(args.seq),
               "--heads", str(args.heads), "--head-dim", str(args.head_dim),
               "--repeats", str(args.repeats), "--torch-threads", str(threads)]
    done = run_child(command, child_env(threads), clock.limit(args.seq, threads))
    result = {"threads": threads, "seq": args.seq, "command": shlex.join(command),
              "wall_s": round(done.seconds, 2), "error": done.why}
    if done.why is None:
        record = json.loads(done.out.strip().splitlines()[-1])
        result.update(best_s=record["min_s"], times_s=record["times_s"], torch=record["peer"])
    return result


def torch_child(args) -> None:
    """--child-torch: time torch as benchmarks/torch_peer.py does; its record on stdout."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from torch_peer import time_torch as peer

    settings = SimpleNamespace(heads=args.heads, kv_heads=args.heads, head_dim=args.head_dim,
                               dtype="float32", causal=True, gpu=False)
    print(json.dumps(peer(settings, args.seq, args.torch_threads, args.repeats)), flush=True)


# ---- the machine -------------------------------------------------------------------------

def machine() -> dict:
    """What the numbers ran on: CPU, numpy and its BLAS, seqpar's CPU kernel, MPI, torch."""
    import numpy as np
    import threadpoolctl

    from seqpar.local.numpy_kernel import compiled

    blas = [f"{p.get('internal_api')} {p.get('version')} ({p.get('threading_layer')}, "
            f"{p.get('architecture')})" for p in threadpoolctl.threadpool_info()
            if p.get("user_api") == "blas"]
    kernel = ("numba " + importlib.metadata.version("numba") if compiled() is not None
              else "numpy path (numba does not import, or SEQPAR_CPU_KERNEL=numpy)")
    return {"cpu": _cpu_model(), "cpus": len(os.sched_getaffinity(0)),
            "cores": _physical_cores(), "host": platform.node(),
            "python": platform.python_version(), "numpy": np.__version__,
            "blas": "; ".join(blas) or "?", "kernel": kernel, "mpiexec": find_mpiexec().version,
            "torch": _version("torch")}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return device_name(False)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ---- the report --------------------------------------------------------------------------

def write_json(path: str | None, report: dict) -> None:
    if path:
        with open(path, "w") as out:
            json.dump(report, out, indent=1)


def _ms(result: dict) -> str:
    return f"{result['best_s'] * 1e3:.1f}" if result.get("best_s") else "-"


def _rate(result: dict, args) -> str:
    return rate_text(flops(result["seq"], args) / result["best_s"]) if result.get("best_s") else "-"


def _amount(count: float) -> str:
    return f"{count / 1e12:.2f} TFLOP" if count >= 1e11 else f"{count / 1e9:.1f} GFLOP"


def _failed(result: dict) -> str:
    return f" ({result['error']})" if result.get("error") else ""


def table(report: dict, args) -> str:
    m, ref = report["machine"], report["reference"]
    lines = [f"## seqpar on one CPU node, {report['date']}", "",
             f"CPU: {m['cpu']}, {m['cpus']} CPUs ({m['cores']} cores) on {m['host']}; "
             f"Python {m['python']}, numpy {m['numpy']}, BLAS {m['blas']}; seqpar's CPU "
             f"kernel: {m['kernel']}; {m['mpiexec']}; torch {m['torch']}",
             f"Command: `{report['command']}`", "",
             f"### N={args.seq}, {args.heads} heads, d={args.head_dim}, float32, causal, batch 1 "
             f"({_amount(flops(args.seq, args))} per call), best of {args.repeats} "
             "after a warm-up", "",
             "ratio = torch ms / seqpar ms (above 1: seqpar is faster). exposed: the "
             "communication compute waited for (median call, slowest rank).", "",
             "| run | ranks x threads | binding | best ms | rate | ratio | exposed ms |",
             "| --- | --- | --- | --- | --- | --- | --- |",
             f"| torch SDPA{_failed(ref)} | 1 x {ref['threads']} | - | {_ms(ref)} "
             f"| {_rate(ref, args)} | 1.00 | - |"]
    for r in report["splits"]:
        ratio = (f"{ref['best_s'] / r['best_s']:.2f}"
                 if ref.get("best_s") and r.get("best_s") else "-")
        exposed = f"{r['exposed_s'] * 1e3:.1f}" if r.get("best_s") else "-"
        lines.append(f"| seqpar ring, zigzag{_failed(r)} | {r['ranks']} x {r['threads']} "
                     f"| {r['binding']} | {_ms(r)} | {_rate(r, args)} | {ratio} | {exposed} |")
    lines += ["", f"### One rank's thread scaling, N={args.scale_seq} "
              f"({_amount(flops(args.scale_seq, args))} per call)", "",
              "efficiency = t1 / (T * tT), t1 the time at the fewest threads scaled to one",
              "", "| threads | binding | best ms | rate | speed-up | efficiency |",
              "| --- | --- | --- | --- | --- | --- |"]
    timed = [r for r in report["scaling"] if r.get("best_s")]
    base = timed[0]["best_s"] * timed[0]["threads"] if timed else None
    for r in report["scaling"]:
        speedup = efficiency = "-"
        if r.get("best_s") and base:
            speedup = f"{base / r['best_s']:.2f}"
            efficiency = f"{base / (r['threads'] * r['best_s']):.2f}"
        lines.append(f"| {r['threads']}{_failed(r)} | {r['binding']} | {_ms(r)} "
                     f"| {_rate(r, args)} | {speedup} | {efficiency} |")
    return "\n".join(lines)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _line(result: dict) -> str:
    what = f"{result['ranks']}x{result['threads']}" if "ranks" in result else "torch"
    return (f"{what} N={result['seq']}: best {_ms(result)} ms, wall {result.get('wall_s')} s"
            + _failed(result))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_torch:
        torch_child(args)
        return 0
    if importlib.util.find_spec("threadpoolctl") is None:  # seqpar's pool needs it
        print("cpu_node: needs threadpoolctl, a dependency of seqpar (pip install "
              "threadpoolctl, or put its wheel in .whl-cpu)", file=sys.stderr)
        return 2
    clock = Clock(args)
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": shlex.join(["python3", *sys.argv]), "machine": machine(),
              "problem": {"seq": args.seq, "heads": args.heads, "head_dim": args.head_dim,
                          "dtype": "float32", "causal": True, "batch": 1, "layout": "zigzag",
                          "scale_seq": args.scale_seq, "repeats": args.repeats,
                          "flops": flops(args.seq, args),
                          "scale_flops": flops(args.scale_seq, args)},
              "reference": {}, "splits": [], "scaling": []}
    report["reference"] = time_torch(args, clock)
    say(_line(report["reference"]))
    write_json(args.json, report)
    for ranks, threads in args.splits:
        report["splits"].append(time_ring(ranks, threads, args.seq, args, clock))
        say(_line(report["splits"][-1]))
        write_json(args.json, report)
    for threads in args.threads:
        report["scaling"].append(time_ring(1, threads, args.scale_seq, args, clock))
        say(_line(report["scaling"][-1]))
        write_json(args.json, report)
    report["total_s"] = round(args.budget - (clock.end - time.monotonic()), 1)
    write_json(args.json, report)
    print(table(report, args))
    print(f"\n{report['total_s']:.0f} s in all" + (f"; JSON in {args.json}" if args.json else ""))
    failed = [r for r in (report["reference"], *report["splits"], *report["scaling"])
              if r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
