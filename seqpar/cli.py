"""Command line: ``python -m seqpar info | check | bench | run`` (also installed as ``seqpar``).

Each subcommand lives in :mod:`seqpar.commands` and is imported only when chosen; ``run``
(:mod:`seqpar.launch`) starts the others, or any script, under mpiexec.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap
from typing import Sequence

from .launch import positive_int

__all__ = ["main"]

_EXAMPLES = """\
examples:
  python -m seqpar info
  python -m seqpar run -n 4 -m seqpar check
  python -m seqpar run -n 4 -m seqpar bench --seq 16384 --causal --plot bench.png
  python -m seqpar run -n 4 examples/ring_attention.py --causal"""

# Transports the strategies accept (their transport= keyword); "auto" picks per call.
TRANSPORTS = ("auto", "host", "nccl", "cuda-aware", "staged")
DTYPES = ("float64", "float32", "float16", "bfloat16")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; return its exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name; defaults to ``sys.argv[1:]``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:
        # `run` takes a whole program after its options (-m module, -c ...), which
        # argparse would read as options of its own: the launcher parses them.
        from .launch import main as run_main

        return run_main(argv[1:], library=_mpi_library())
    args = _parser().parse_args(argv)  # a bad option: a usage error (status 2), nothing run
    if getattr(args, "check_options", None):
        args.check_options(args)
    if args.command == "info":
        from .commands.info import info

        return info(args)
    with _logging():
        if args.command == "check":
            from .commands.check import check

            return check(args)
        from .commands.bench import bench

        return bench(args)


@contextlib.contextmanager
def _logging():
    """seqpar's log at INFO on stderr while a command runs (its progress lines, the steps
    of long calls), unless SEQPAR_LOG chose a level (or off) or the program turned it on."""
    from .log import log_to_stderr, logging_to_stderr

    if os.environ.get("SEQPAR_LOG", "").strip() or logging_to_stderr():
        yield
        return
    log_to_stderr("INFO")
    try:
        yield
    finally:
        log_to_stderr(None)  # as it was (main may run inside a program, or a test)


def _mpi_library() -> str | None:
    """The version string of the MPI library mpi4py loads, without initialising MPI."""
    try:
        import mpi4py

        if "mpi4py.MPI" not in sys.modules:  # the launcher only asks; it runs no MPI
            mpi4py.rc.initialize = False
        from mpi4py import MPI

        return MPI.Get_library_version()
    except Exception:  # noqa: BLE001 - unknown: the launcher then checks nothing
        return None


def _lengths(text: str) -> list[int]:
    """argparse type: integers >= 1 separated by commas."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(
            f"takes whole numbers separated by commas, got {text!r}")
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return values


def _check_bench(parser: argparse.ArgumentParser, args) -> None:
    """What bench's options say together, before anything runs (usage error, status 2)."""
    if args.kv_heads is not None and args.heads % args.kv_heads:
        parser.error(f"argument --kv-heads: must divide --heads ({args.heads}), "
                     f"got {args.kv_heads}")
    if args.json and args.plot and os.path.abspath(args.json) == os.path.abspath(args.plot):
        parser.error(f"argument --plot: the same file as --json ({args.json})")


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="python -m seqpar", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "seqpar: exact softmax attention over sequences split across MPI ranks. "
            "Check it, time it, or start a program on N ranks.", 79),
        epilog=_EXAMPLES)
    parser.add_argument("--version", action="version", version=f"seqpar {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, summary: str, description: str, examples: str, **kwargs):
        return sub.add_parser(name, help=summary, description=textwrap.fill(description, 79),
                              epilog="examples:\n" + examples, **kwargs,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    add("run", "run a script (or -m module) on N MPI ranks with the local mpiexec",
        "See `python -m seqpar run --help`.", "  python -m seqpar run -n 4 script.py",
        add_help=False)
    add("info", "versions, the MPI library and its mpiexec, thread level, GPU, extras",
        "Print what seqpar runs on: versions, the MPI library mpi4py loads and the mpiexec "
        "that would start jobs (they must be the same MPI), the thread level, GPUs, and "
        "which optional extras are installed. One rank prints.",
        "  python -m seqpar info\n  python -m seqpar run -n 2 -m seqpar info")

    check = add(
        "check", "every strategy and backward against float64",
        "Run every strategy on small random problems and compare each with a float64 "
        "softmax, and each backward with float64 gradients: attention (one rank's whole "
        "problem), ring attention (contiguous and zigzag layouts), K/V-sharded attention, "
        "Ulysses attention (when the 8 query and 4 K/V heads divide by the number of "
        "ranks) and the hybrid (with the smallest group of more than one rank that "
        "divides the ranks and heads), causal and not, in every dtype (bfloat16 needs "
        "ml_dtypes). Exit status 1 if any error is over its tolerance.",
        "  python -m seqpar run -n 4 -m seqpar check\n"
        "  python -m seqpar run -n 2 -m seqpar check --gpu --transport staged")
    check.add_argument("--gpu", action="store_true", help="use CuPy arrays, one GPU per rank")
    check.add_argument("--transport", choices=TRANSPORTS, default="auto",
                       help="how GPU blocks move between ranks (default: auto)")

    bench = add(
        "bench", "time ring attention; sweep N, write JSON, draw a figure",
        "Time ring attention over the sequence lengths given (median and minimum of "
        "--repeats calls after one warm-up, the slowest rank counts) and print time, "
        "GFLOP/s or TFLOP/s and the communication that compute waited for. --json writes the numbers; --plot draws time and rate against N, and "
        "against ranks when the records hold several rank counts (matplotlib: the plot "
        "extra), sweeping N/8 .. N when one N is given. Progress shows on rank 0 (a tqdm "
        "bar with the progress extra, else lines on stderr; SEQPAR_LOG=off silences them).",
        "  python -m seqpar run -n 4 -m seqpar bench --seq 16384 --causal\n"
        "  python -m seqpar run -n 2 -m seqpar bench --seq 4096,8192,16384 --dtype bfloat16 "
        "--json bench.json --plot bench.png\n"
        "  (then python benchmarks/torch_peer.py --json bench.json --plot bench.png adds "
        "PyTorch's SDPA as a dashed peer line)")
    bench.add_argument("--seq", default="8192", metavar="N[,N...]", type=_lengths,
                       help="global sequence length(s), comma separated (default 8192)")
    bench.add_argument("--heads", type=positive_int, default=8, help="query heads (default 8)")
    bench.add_argument("--kv-heads", type=positive_int, default=None,
                       help="K/V heads, a divisor of --heads: fewer for grouped-query "
                            "attention (default: --heads)")
    bench.add_argument("--head-dim", type=positive_int, default=64, help="default 64")
    bench.add_argument("--dtype", choices=DTYPES, default="float32",
                       help="default float32; bfloat16 needs ml_dtypes (the lowp extra)")
    bench.add_argument("--causal", action="store_true", help="causal mask")
    bench.add_argument("--layout", choices=["contiguous", "zigzag"], default="zigzag",
                       help="which tokens each rank holds (default zigzag)")
    bench.add_argument("--repeats", type=positive_int, default=3,
                       help="timed calls per N (default 3)")
    bench.add_argument("--gpu", action="store_true", help="use CuPy arrays, one GPU per rank")
    bench.add_argument("--transport", choices=TRANSPORTS, default="auto",
                       help="how GPU blocks move between ranks (default: auto)")
    bench.add_argument("--json", metavar="FILE",
                       help="add the results to this JSON file (made if missing; records of "
                            "other rank counts or settings stay, so --plot compares them)")
    bench.add_argument("--plot", metavar="FILE.png",
                       help="draw time and FLOP/s against N, every record of --json too "
                            "(needs matplotlib)")
    bench.set_defaults(check_options=lambda args: _check_bench(bench, args))
    return parser


if __name__ == "__main__":
    sys.exit(main())
