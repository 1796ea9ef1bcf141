"""Progress of a long run, shown by rank 0 only: a tqdm bar on a terminal, plain lines elsewhere.

``SEQPAR_PROGRESS`` chooses: ``bar`` (tqdm, needs the ``progress`` extra), ``lines``, or
``off``; by default a bar when tqdm is installed and stderr or stdout is a terminal (Open
MPI's mpiexec gives ranks a terminal on stdout only; MPICH's on neither), else lines on
stderr, which read well in batch logs, where a bar's carriage returns do not.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from typing import TextIO

__all__ = ["Progress"]

# A plain line at most this often, and at the last step: quick steps stay quiet.
_LINE_INTERVAL_S = 1.0


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
        Where progress goes; by default the terminal among stderr and stdout, else
        stderr. Results given to :meth:`write` go to ``sys.stdout``.

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
        self._start = self._last_line = time.perf_counter()
        self._rank0 = comm.rank == 0
        self._mode, self._stream = _choose(stream) if self._rank0 else ("off", stream)
        self._bar = None
        if self._mode == "bar":
            from tqdm import tqdm

            # a terminal lent by mpiexec may report a size of 0 x 0, with which tqdm draws
            # nothing; shutil then falls back to 80 x 24
            size = shutil.get_terminal_size()
            self._bar = tqdm(total=total, desc=desc, file=self._stream, ncols=size.columns,
                             nrows=size.lines)

    def update(self, n: int = 1, note: str = "") -> None:
        """``n`` more steps are done; ``note`` says something about the last one."""
        self.done += n
        if self._bar is not None:
            self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
        elif self._mode == "lines":
            now = time.perf_counter()
            if now - self._last_line >= _LINE_INTERVAL_S or self.done >= self.total:
                self._last_line = now
                print(f"{self.desc}: {self.done}/{self.total} "
                      f"({now - self._start:.1f} s){' ' + note if note else ''}",
                      file=self._stream, flush=True)

    def write(self, line: str) -> None:
        """Print a result line on rank 0 (to stdout) without breaking the bar."""
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        elif self._rank0:  # results show even with SEQPAR_PROGRESS=off
            print(line, flush=True)

    def close(self) -> None:
        """End the bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
