"""mpi4py's MPI module, loaded once for the package, with one clear line where no MPI loads.

``seqpar.devices`` imports this module first of all the package, so a machine without an
MPI library gets one sentence and the way to get one instead of a traceback through
mpi4py's library loader.
"""
from __future__ import annotations

import os
import sys

from .launch import INSTALL_HINT

__all__ = ["MPI", "MPIUnavailableError"]


class MPIUnavailableError(ImportError):
    """mpi4py or the MPI library it needs cannot be loaded."""


def _command() -> str | None:
    """The subcommand when this process is seqpar's command line, else None.

    While ``python -m seqpar`` imports the package, ``sys.argv[0]`` is ``"-m"`` (the
    documented state of argv while ``-m`` locates its module); the installed
    ``seqpar`` script has its own name there.
    """
    argv = sys.argv
    if argv and (argv[0] == "-m" or os.path.basename(argv[0]) in ("seqpar", "seqpar.exe")):
        return argv[1] if len(argv) > 1 else ""
    return None


def _load():
    try:
        import mpi4py
    except ImportError as exc:
        raise MPIUnavailableError(f"mpi4py is not installed ({exc}): pip install mpi4py, "
                                  f"and an MPI library: {INSTALL_HINT}") from exc
    if _command() == "run" and "mpi4py.MPI" not in sys.modules:
        # `seqpar run` only starts mpiexec: initialising MPI would make the launcher an
        # MPI process of its own for nothing (a second of start-up with Open MPI).
        mpi4py.rc.initialize = False
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as exc:  # mpi4py's loader raises RuntimeError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MPIUnavailableError(
            f"no MPI library could be loaded (mpi4py: {reason}); get one: {INSTALL_HINT}"
        ) from exc
    return MPI


try:
    MPI = _load()
except MPIUnavailableError as _error:
    if _command() is None:
        raise
    # `python -m seqpar ...` imports this package before seqpar/__main__.py runs, so the
    # command line cannot catch this itself: say it in one line and stop.
    print(f"seqpar: {_error}", file=sys.stderr)
    raise SystemExit(1) from None
