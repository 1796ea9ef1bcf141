"""seqpar's log: the standard ``logging`` module, loggers named ``seqpar.*``, silent by default.

What it says today: the steps of a long call (``seqpar.ring``: the ring of
``ring_attention``, its backward and ``hybrid_attention``), and the progress of the
command line and the example (``seqpar.progress``), at INFO, from rank 0 of the call's
communicator only. A call says nothing until it has run :data:`LONG_CALL_S` seconds.
On a GPU a step counts when the host has gone past it (its kernels launched, its
transfer waited for as the transport waits), not when the device has finished it.

One switch turns it on, on stderr: :func:`log_to_stderr` in a program, or the
environment variable ``SEQPAR_LOG=info`` (any level name: ``debug``, ``info``,
``warning``, ``error``; ``off``), which calls it when seqpar is imported, so a job
script needs no change. ``python -m seqpar check`` and ``bench`` turn it on at INFO
unless ``SEQPAR_LOG`` says otherwise. A program with logging of its own
(``logging.basicConfig(level=logging.INFO)``) gets the records through its handlers.

Off, it costs a call one :meth:`logging.Logger.isEnabledFor` check; on, one clock read
per step until a line is due.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings

__all__ = ["INTERVAL_S", "LONG_CALL_S", "Steps", "log_to_stderr", "logging_to_stderr"]

# A call logs its steps only once it has run this long: quick calls stay silent.
LONG_CALL_S = 5.0
# At most one line per call this often (and the last step): a ring of many quick steps
# does not flood a batch log.
INTERVAL_S = 1.0

_ROOT = logging.getLogger("seqpar")
_ROOT.addHandler(logging.NullHandler())  # silent unless the program asks (a library's manners)
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}
_OFF = ("", "0", "off", "no", "false", "none")


class _Stderr(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each record (as :data:`logging.lastResort`
    does), so a program or test that replaces stderr later still gets the lines."""

    def __init__(self):
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # tqdm's redirect copies it; the property stays
        pass


def log_to_stderr(level: str | int | None = "INFO") -> None:
    """Show seqpar's log on stderr from ``level`` up; ``None`` or ``"off"`` stops it.

    Sets the level of the ``seqpar`` logger and adds one handler to it (calling again
    changes the level; it never adds a second handler). Lines read
    ``12:04:31 seqpar.ring: ring_attention: step 3/8, 21.4 s elapsed, about 35.7 s left``.

    Parameters
    ----------
    level : str or int or None
        A ``logging`` level or its name, case-insensitive (``"INFO"`` shows the
        steps of long calls); ``None`` or ``"off"`` removes the handler and the level.

    Raises
    ------
    ValueError
        For a name that is no level.
    """
    number = _level(level)
    for handler in [h for h in _ROOT.handlers if isinstance(h, _Stderr)]:
        _ROOT.removeHandler(handler)
    if number is None:
        _ROOT.setLevel(logging.NOTSET)
        return
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    _ROOT.addHandler(handler)
    _ROOT.setLevel(number)


def logging_to_stderr() -> bool:
    """Whether :func:`log_to_stderr` (or ``SEQPAR_LOG``) has turned the log on."""
    return any(isinstance(h, _Stderr) for h in _ROOT.handlers)


def _level(level: str | int | None) -> int | None:
    if level is None or (isinstance(level, str) and level.strip().lower() in _OFF):
        return None
    if isinstance(level, int) and not isinstance(level, bool):
        return level
    if isinstance(level, str) and level.strip().lower() in _LEVELS:
        return _LEVELS[level.strip().lower()]
    raise ValueError(f"level must be one of {', '.join(_LEVELS)} or off, got {level!r}")


def _from_environment() -> None:
    """``SEQPAR_LOG=<level>``: :func:`log_to_stderr` at import; a bad value only warns
    (an import that fails on every rank over a typo would be worse)."""
    wanted = os.environ.get("SEQPAR_LOG", "")
    if wanted.strip().lower() in _OFF:
        return
    try:
        log_to_stderr(wanted)
    except ValueError as exc:
        warnings.warn(f"SEQPAR_LOG ignored: {exc}", RuntimeWarning, stacklevel=2)


class Steps:
    """Count the steps of one collective job and log them at INFO once it runs long.

    Every rank counts; only where ``report`` is true (rank 0) and the logger is enabled
    for INFO does :meth:`done` read the clock, and it formats a line only once ``after``
    seconds have passed, at most every ``interval`` seconds, and at the last step.

    Parameters
    ----------
    logger : logging.Logger
        Where the lines go.
    what : str
        The name shown first (a function, a command).
    total : int
        Number of steps.
    report : bool
        Whether this rank logs (rank 0 of the job's communicator).
    after, interval : float, optional
        Defaults :data:`LONG_CALL_S` and :data:`INTERVAL_S`, read when the job starts.
    """

    __slots__ = ("_after", "_interval", "_last", "_on", "_start", "count", "logger", "total",
                 "what")

    def __init__(self, logger: logging.Logger, what: str, total: int, *, report: bool,
                 after: float | None = None, interval: float | None = None):
        self.logger, self.what, self.total, self.count = logger, what, total, 0
        self._on = bool(report) and logger.isEnabledFor(logging.INFO)
        self._after = LONG_CALL_S if after is None else after
        self._interval = INTERVAL_S if interval is None else interval
        self._start = self._last = time.perf_counter() if self._on else 0.0
        self._last -= self._interval  # the first line is due as soon as ``after`` passes

    def done(self, n: int = 1, note: str = "") -> None:
        """``n`` more steps are done; ``note`` says something of the last one."""
        self.count += n
        if not self._on:
            return
        now = time.perf_counter()
        elapsed = now - self._start
        if elapsed < self._after or (now - self._last < self._interval
                                     and self.count < self.total):
            return
        self._last = now
        left = elapsed / self.count * (self.total - self.count) if self.count else 0.0
        self.logger.info("%s: step %d/%d, %.1f s elapsed, about %.1f s left%s", self.what,
                         self.count, self.total, elapsed, left, f" ({note})" if note else "")
