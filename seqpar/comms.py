"""seqpar's own communicators, and what a call does when a rank fails or stalls.

Every seqpar call talks on a private duplicate of the user's communicator, made
on first use, cached on it (an MPI attribute) and freed with it, so seqpar's
messages never meet the user's. Calls on one communicator from several threads
take turns (a lock per communicator); ranks pair their calls by thread name,
which the collective check compares (:mod:`seqpar.validation`).

A call acquires what it needs and agrees with the other ranks before its first
point-to-point message. Past that point nothing can be taken back: an exception
on one rank (a bug, a device fault, Ctrl-C) would leave the other ranks waiting
for messages that never come, so :func:`communicating` ends the whole job with
``MPI_Abort`` and a message naming the rank, the call and its step: mpi4py's
abort semantics (``python -m mpi4py``), applied inside seqpar too.

``SEQPAR_TIMEOUT=<seconds>`` (off by default) starts a watchdog: a call that makes
no progress for that long (a step waiting for ranks that never arrive) aborts the
job, naming the step and the ranks it waits for.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from contextlib import contextmanager

from mpi4py import MPI

__all__ = ["resolve_comm", "CallContext", "call", "communicating", "progress"]

_CREATE_LOCK = threading.Lock()
_KEYVAL: int | None = None


def resolve_comm(comm) -> MPI.Comm:
    """``comm``, or ``MPI.COMM_WORLD`` when it is None."""
    if comm is None:
        return MPI.COMM_WORLD
    if not isinstance(comm, MPI.Comm) or comm == MPI.COMM_NULL:
        raise TypeError(f"comm must be an mpi4py.MPI.Comm, got {comm!r}")
    if isinstance(comm, MPI.Intercomm):
        raise TypeError("comm must be an intracommunicator, got an MPI.Intercomm")
    return comm


class CallContext:
    """What seqpar keeps per user communicator: its private duplicate, a lock, and
    what calls on it build once (transports, sub-communicators), freed with it."""

    def __init__(self, user_comm: MPI.Comm | None = None, *, private: MPI.Comm | None = None):
        self.comm = private if private is not None else user_comm.Dup()
        self.lock = threading.RLock()
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
    """One seqpar call in flight on this rank: its name and current step."""

    def __init__(self, comm: MPI.Comm, function: str):
        self.comm = comm
        self.function = function
        self.step = "checking arguments with every rank"
        self.waiting_for = "every rank"
        self.since = time.monotonic()


_ACTIVE = threading.local()


@contextmanager
def call(comm, function: str):
    """Run one seqpar call on ``comm``'s private duplicate; yields that communicator.

    Serialises calls on one communicator across threads, and registers the call
    with the watchdog.
    """
    user_comm = resolve_comm(comm)
    record, outer = _Call(user_comm, function), getattr(_ACTIVE, "call", None)
    record.step = "making seqpar's communicator (first call on this communicator)"
    _ACTIVE.call = record
    _Watchdog.track(record)  # from the start: the first call's Dup is collective too
    try:
        context = context_of(user_comm)
        record.comm = context.comm
        progress("waiting for another thread's call on this communicator", "this rank")
        with context.lock:
            progress("checking arguments with every rank", "every rank")
            yield context
    finally:
        _Watchdog.untrack(record)
        _ACTIVE.call = outer


def progress(step: str, waiting_for: str = "") -> None:
    """Say what the current call does now (for failure messages and the watchdog)."""
    record = getattr(_ACTIVE, "call", None)
    if record is not None:
        record.step, record.waiting_for, record.since = step, waiting_for, time.monotonic()


@contextmanager
def communicating():
    """The part of a call that exchanges point-to-point messages: a failure here
    aborts the job (the other ranks would wait for this rank forever)."""
    progress("starting to communicate")
    try:
        yield
    except BaseException as exc:  # noqa: BLE001 - every failure here strands the others
        record = getattr(_ACTIVE, "call", None)
        where = "" if record is None else f" in {record.function} ({record.step})"
        traceback.print_exc(file=sys.stderr)
        _abort(record.comm if record else MPI.COMM_WORLD,
               f"rank {MPI.COMM_WORLD.rank}: {type(exc).__name__}{where}: {exc}")
        raise


def _abort(comm: MPI.Comm, message: str) -> None:
    sys.stderr.write(f"seqpar: {message}\nseqpar: aborting the job: the other ranks "
                     "would wait for this one forever\n")
    sys.stderr.flush()
    comm.Abort(1)


class _Watchdog:
    """A daemon thread that aborts calls which make no progress for SEQPAR_TIMEOUT s."""

    _records: set = set()
    _lock = threading.Lock()
    _thread: threading.Thread | None = None

    @classmethod
    def timeout(cls) -> float:
        try:
            return float(os.environ.get("SEQPAR_TIMEOUT", "0") or 0)
        except ValueError:
            return 0.0

    @classmethod
    def track(cls, record: _Call) -> None:
        if cls.timeout() <= 0:
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
            limit = cls.timeout()
            time.sleep(min(1.0, max(limit / 10, 0.05)))
            now = time.monotonic()
            with cls._lock:
                stalled = [r for r in cls._records if limit > 0 and now - r.since > limit]
            for record in stalled:
                _abort(record.comm, f"rank {MPI.COMM_WORLD.rank}: {record.function} made no "
                                    f"progress for {limit:g} s (SEQPAR_TIMEOUT) at "
                                    f"{record.step}, waiting for {record.waiting_for}")
