"""Progress of a long run, shown by rank 0 only: a tqdm bar on a terminal, else log lines.

The lines are records of the ``seqpar.progress`` logger at INFO (:mod:`seqpar.log`, the
same mechanism as the steps of long calls): they show where seqpar's log is on
(``python -m seqpar check`` and ``bench`` turn it on; a program calls
:func:`seqpar.log_to_stderr` or sets ``SEQPAR_LOG=info``), which reads well in batch
logs, where a bar's carriage returns do not. ``SEQPAR_PROGRESS`` chooses: ``bar``
(tqdm, needs the ``progress`` extra), ``lines``, or ``off``; by default a bar when tqdm
is installed and stderr or stdout is a terminal (Open MPI's mpiexec gives ranks a
terminal on stdout only; MPICH's on neither), else lines. While a bar is shown, seqpar's
log lines are written above it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from typing import TextIO

from .log import Steps, logging_to_stderr

__all__ = ["Progress"]

# A line at most this often, and at the last step: quick steps stay quiet.
_LINE_INTERVAL_S = 1.0
_LOG = logging.getLogger(__name__)  # "seqpar.progress"


class Progress:
    """Count the steps of a collective run and show them on rank 0.

    Every rank calls the same methods; only rank 0 of ``comm`` prints.

    Parameters
    ----------
    total : int
        Number of steps.
    desc : str
        What is running, shown before the count.
    comm : mpi4py.MPI.Comm, optional
        Whose rank 0 prints; defaults to ``MPI.COMM_WORLD``.
    stream : file, optional
        Where a bar is drawn; by default the terminal among stderr and stdout. Lines
        go to the ``seqpar.progress`` logger; results given to :meth:`write` go to
        ``sys.stdout``.

    Examples
    --------
    >>> with Progress(len(sizes), "bench") as progress:      # doctest: +SKIP
    ...     for n in sizes:
    ...         run(n)
    ...         progress.update(note=f"N={n}")
    """

    def __init__(self, total: int, desc: str, *, comm=None, stream: TextIO | None = None):
        if comm is None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        self.total, self.desc, self.done = total, desc, 0
        self._rank0 = comm.rank == 0
        self._mode, self._stream = _choose(stream) if self._rank0 else ("off", stream)
        self._lines = Steps(_LOG, desc, total, report=self._mode == "lines", after=0.0,
                            interval=_LINE_INTERVAL_S)
        self._bar = None
        self._redirect = contextlib.ExitStack()
        if self._mode == "bar":
            from tqdm import tqdm

            # a terminal lent by mpiexec may report a size of 0 x 0, with which tqdm draws
            # nothing; shutil then falls back to 80 x 24
            size = shutil.get_terminal_size()
            self._bar = tqdm(total=total, desc=desc, file=self._stream, ncols=size.columns,
                             nrows=size.lines)
            self._redirect.enter_context(_log_above(self._bar))

    def update(self, n: int = 1, note: str = "") -> None:
        """``n`` more steps are done; ``note`` says something about the last one."""
        self.done += n
        if self._bar is not None:
            self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
        else:
            self._lines.done(n, note)

    def write(self, line: str) -> None:
        """Print a result line on rank 0 (to stdout) without breaking the bar."""
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        elif self._rank0:  # results show even with SEQPAR_PROGRESS=off
            print(line, flush=True)

    def close(self) -> None:
        """End the bar (idempotent)."""
        if self._bar is not None:
            self._redirect.close()
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _log_above(bar):
    """seqpar's log lines on the console written above the bar, not through it
    (tqdm.contrib.logging, tqdm 4.60 and later; without it lines may cut the bar)."""
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:
        return contextlib.nullcontext()
    if not logging_to_stderr():  # a program's own handlers are its business
        return contextlib.nullcontext()
    return logging_redirect_tqdm(loggers=[logging.getLogger("seqpar")], tqdm_class=type(bar))


def _choose(stream: TextIO | None) -> tuple[str, TextIO]:
    """(mode, stream): "bar", "lines" or "off", and where it is shown."""
    wanted = os.environ.get("SEQPAR_PROGRESS", "").strip().lower()
    plain = sys.stderr if stream is None else stream
    if wanted in ("0", "off", "no", "false"):
        return "off", plain
    try:
        import tqdm  # noqa: F401 - only whether it is there
    except ImportError:
        return "lines", plain
    candidates = (sys.stderr, sys.stdout) if stream is None else (stream,)
    terminal = next((s for s in candidates if _is_terminal(s)), None)
    if wanted == "lines":
        return "lines", plain
    if wanted == "bar":
        return "bar", terminal or plain
    return ("bar", terminal) if terminal is not None else ("lines", plain)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
