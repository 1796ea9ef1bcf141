"""seqpar's own communicators, and what a call does when a rank fails or stalls.

Every seqpar call talks on a private duplicate of the user's communicator, made
on first use, cached on it (an MPI attribute) and freed with it, so seqpar's
messages never meet the user's.

Threads: calls on one communicator pair up across ranks in the order each rank
makes them, which only one thread per rank can define. So a communicator belongs
to the first thread that calls seqpar on it (until that thread ends); a call on
it from another thread raises the same ValueError on every rank (through the
collective check), never pairs with an unrelated call. Threads that run seqpar
concurrently give each their own communicator (``comm.Dup()``, made in the same
order on every rank).

A call acquires what it needs and agrees with the other ranks before its first
point-to-point message (:mod:`seqpar.validation`). Anything that fails on one
rank before that agreement (a bad argument, a failed DLPack conversion, an
invalid ``comm``, a KeyboardInterrupt) is reported through the agreement, so
every rank raises. Past the agreement nothing can be taken back: an exception on
one rank (a bug, a device fault, Ctrl-C) would leave the other ranks waiting for
messages that never come, so the call ends the whole job with ``MPI_Abort`` and a
message naming the rank, the call and its step: mpi4py's abort semantics
(``python -m mpi4py``), applied inside seqpar too. On one rank there is nobody to
strand, and exceptions are raised as they are.

``SEQPAR_TIMEOUT=<seconds>`` (off by default) starts a watchdog that counts only
time spent *waiting for other ranks* (the agreement, transfers, collectives):
a rank that waits longer than that aborts the job, naming the call, its step and
the ranks that did not arrive. Long computation never trips it.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from contextlib import contextmanager

from mpi4py import MPI

__all__ = ["resolve_comm", "CallContext", "call", "communicating", "progress",
           "waiting", "collective", "is_collective", "current_call"]

_CREATE_LOCK = threading.Lock()
_KEYVAL: int | None = None
_COLLECTIVE = "_seqpar_collective"


def resolve_comm(comm) -> MPI.Comm:
    """``comm``, or ``MPI.COMM_WORLD`` when it is None."""
    if comm is None:
        return MPI.COMM_WORLD
    if not isinstance(comm, MPI.Comm) or comm == MPI.COMM_NULL:
        raise TypeError(f"comm must be an mpi4py.MPI.Comm, got {comm!r}")
    if isinstance(comm, MPI.Intercomm):
        raise TypeError("comm must be an intracommunicator, got an MPI.Intercomm")
    return comm


def collective(error: BaseException) -> BaseException:
    """Mark ``error`` as raised by every rank of the call alike (from agreed data)."""
    setattr(error, _COLLECTIVE, True)
    return error


def is_collective(error: BaseException) -> bool:
    return getattr(error, _COLLECTIVE, False)


class CallContext:
    """What seqpar keeps per user communicator: its private duplicate, a lock, the
    thread that owns it, and what calls on it build once (transports,
    sub-communicators), freed with it."""

    def __init__(self, user_comm: MPI.Comm | None = None, *, private: MPI.Comm | None = None):
        self.comm = private if private is not None else user_comm.Dup()
        self.lock = threading.RLock()
        self.owner: threading.Thread | None = None
        self.cache: dict = {}

    def close(self) -> None:
        self.free()

    def free(self) -> None:
        for item in list(self.cache.values()):
            close = getattr(item, "close", None)
            if close is not None:
                close()
        self.cache.clear()
        if self.comm != MPI.COMM_NULL and not MPI.Is_finalized():
            self.comm.Free()

    def claim(self) -> Exception | None:
        """Make the calling thread the owner (first caller, or the owner has ended);
        the error to report when another live thread owns the communicator."""
        me, owner = threading.current_thread(), self.owner
        if owner is None or owner is me or not owner.is_alive():
            self.owner = me
            return None
        return ValueError(
            f"comm is used by thread {owner.name!r} of this rank and this call comes from "
            f"thread {me.name!r}: calls from several threads on one communicator cannot be "
            "paired up across ranks. Give each thread its own communicator (comm.Dup(), "
            "made in the same order on every rank)")


def _delete(comm, keyval, context: CallContext) -> None:
    context.free()


def context_of(user_comm: MPI.Comm) -> CallContext:
    """The cached :class:`CallContext` of ``user_comm``; collective on first use."""
    global _KEYVAL
    with _CREATE_LOCK:
        if _KEYVAL is None:
            _KEYVAL = MPI.Comm.Create_keyval(delete_fn=_delete)
        context = user_comm.Get_attr(_KEYVAL)
        if context is None:
            context = CallContext(user_comm)
            user_comm.Set_attr(_KEYVAL, context)
    return context


# -- progress, failure and the watchdog -------------------------------------------

class _Call:
    """One seqpar call in flight on this rank: its name, its step, whom it waits for.

    ``waiting_for`` is empty while the rank computes (the watchdog ignores it) and
    names the ranks it waits for otherwise (a callable: evaluated when reported).
    ``deferred`` is an error found before the agreement (reported through it);
    ``agreed`` is set once this rank has exchanged the agreement message.
    """

    def __init__(self, comm: MPI.Comm, function: str):
        self.comm = comm
        self.function = function
        self.step = "starting"
        self.waiting_for: object = ""
        self.patience = 1.0
        self.since = time.monotonic()
        self.deferred: Exception | None = None
        self.agreed = False


_ACTIVE = threading.local()


def current_call() -> _Call | None:
    """The seqpar call this thread is in, if any."""
    return getattr(_ACTIVE, "call", None)


@contextmanager
def call(comm, function: str):
    """Run one seqpar call on ``comm``'s private duplicate; yields its CallContext.

    Serialises calls on one communicator across threads, registers the call with
    the watchdog, and turns an exception on this rank into the same error on every
    rank (before the agreement) or the end of the job (after it).
    """
    record, outer = _Call(MPI.COMM_WORLD, function), current_call()
    _ACTIVE.call = record
    try:
        try:
            user_comm = resolve_comm(comm)
        except TypeError as exc:
            # agree on COMM_WORLD, the default every rank has: ranks that passed it
            # (or None) raise this error too, instead of waiting for this rank
            user_comm, record.deferred = MPI.COMM_WORLD, exc
        try:
            _Watchdog.track(record)
        except ValueError as exc:
            record.deferred = record.deferred or exc
        progress("making seqpar's communicator (first call on this communicator)",
                 "every rank")
        context = context_of(user_comm)
        record.comm = context.comm
        progress("waiting for another thread's call on this communicator")
        with context.lock:
            record.deferred = record.deferred or context.claim()
            progress("checking arguments")
            try:
                yield context
            except BaseException as exc:  # noqa: BLE001 - re-raised, or the job ends
                _settle(record, exc)
                raise
    finally:
        _Watchdog.untrack(record)
        _ACTIVE.call = outer


def _settle(record: _Call, exc: BaseException) -> None:
    """An exception leaves the call on this rank: make sure no other rank waits for it."""
    if is_collective(exc) or record.comm.size == 1:
        return
    if record.agreed:
        traceback.print_exc(file=sys.stderr)
        _abort(record.comm, f"rank {MPI.COMM_WORLD.rank}: {type(exc).__name__} in "
                            f"{record.function} ({record.step}): {exc}")
    from .validation import report_failure  # the agreement builds on this module

    report_failure(record.comm, record.function, exc)  # every rank raises


def progress(step: str, waiting_for: object = "", patience: float = 1.0) -> None:
    """Say what the current call does now (for failure messages and the watchdog):
    computing (``waiting_for`` empty) or waiting for the ranks it names (a string,
    or a callable giving one when the watchdog reports)."""
    record = current_call()
    if record is not None:
        record.step, record.waiting_for, record.since = step, waiting_for, time.monotonic()
        record.patience = patience


@contextmanager
def waiting(step: str, waiting_for: object):
    """A blocking wait for other ranks inside a computing step; the watchdog counts it."""
    record = current_call()
    before = None if record is None else (record.step, record.waiting_for)
    progress(step, waiting_for)
    try:
        yield
    finally:
        if before is not None:
            progress(before[0], "")


@contextmanager
def communicating():
    """The part of a call that exchanges point-to-point messages: a failure here
    aborts the job (the other ranks would wait for this rank forever)."""
    progress("starting to communicate")
    try:
        yield
    except BaseException as exc:  # noqa: BLE001 - every failure here strands the others
        record = current_call()
        comm = record.comm if record else MPI.COMM_WORLD
        if comm.size > 1 and not is_collective(exc):
            where = "" if record is None else f" in {record.function} ({record.step})"
            traceback.print_exc(file=sys.stderr)
            _abort(comm, f"rank {MPI.COMM_WORLD.rank}: {type(exc).__name__}{where}: {exc}")
        raise


def _abort(comm: MPI.Comm, message: str) -> None:
    sys.stderr.write(f"seqpar: {message}\nseqpar: aborting the job: the other ranks "
                     "would wait for this one forever\n")
    sys.stderr.flush()
    comm.Abort(1)


def timeout_seconds() -> float:
    """SEQPAR_TIMEOUT in seconds (0: off); ValueError naming it when it is not a
    number of seconds >= 0."""
    text = os.environ.get("SEQPAR_TIMEOUT", "").strip()
    if not text:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"SEQPAR_TIMEOUT must be a number of seconds >= 0 (0: off), "
                         f"got {text!r}")
    return value


class _Watchdog:
    """A daemon thread that aborts calls waiting for other ranks longer than
    SEQPAR_TIMEOUT seconds (times their patience)."""

    _records: set = set()
    _lock = threading.Lock()
    _thread: threading.Thread | None = None

    @classmethod
    def track(cls, record: _Call) -> None:
        if timeout_seconds() <= 0:
            return
        with cls._lock:
            cls._records.add(record)
            if cls._thread is None:
                cls._thread = threading.Thread(target=cls._run, name="seqpar-watchdog",
                                               daemon=True)
                cls._thread.start()

    @classmethod
    def untrack(cls, record: _Call) -> None:
        with cls._lock:
            cls._records.discard(record)

    @classmethod
    def _run(cls) -> None:
        while True:
            try:
                limit = timeout_seconds()
            except ValueError:
                limit = 0.0  # changed while running: the next call reports it
            time.sleep(min(1.0, max(limit / 20, 0.05)))
            now = time.monotonic()
            with cls._lock:
                stalled = [r for r in cls._records if limit > 0 and r.waiting_for
                           and now - r.since > limit * r.patience]
            for record in stalled:
                waiting_for = record.waiting_for
                if callable(waiting_for):
                    waiting_for = waiting_for()
                _abort(record.comm, f"rank {MPI.COMM_WORLD.rank}: {record.function} waited "
                                    f"{now - record.since:.0f} s (SEQPAR_TIMEOUT={limit:g}) "
                                    f"at {record.step}, for {waiting_for}")
