"""seqpar's own communicators, and what a call does when a rank fails or stalls.

Every seqpar call talks on a private duplicate of the user's communicator, made
on first use, cached on it (an MPI attribute) and freed with it, so seqpar's
messages never meet the user's.

Threads: calls pair up across ranks in the order each rank makes them on one
*channel*: a communicator, or a communicator and a ``tag=`` (an int the caller
gives every call that belongs together, e.g. a task's index: calls with another
tag never meet it). Only one thread per rank can define that order, so:

- untagged calls come from the main thread; a call from any other thread without a
  tag raises the same ValueError on every rank (a thread pool's tasks run in a
  different order on each rank, and nothing seqpar can see tells them apart);
- the calls of one tag come one after another (from any threads: a framework may run
  the backward on a thread of its own); a call that arrives while another thread is
  in a call of the same tag raises on every rank.

So a thread pool passes each task's own tag, and calls never pair with an unrelated
call. A tagged channel is a communicator of its own, made on its first use with
``MPI_Comm_create_group`` under that tag, which threads may do concurrently.

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

A watchdog counts only time spent *waiting for other ranks*, never computing. By
default it watches the waits before a call's agreement, where every rank of a
healthy job soon arrives: a rank that waited ``ARRIVAL_TIMEOUT_S`` (10 minutes, as
long as torch.distributed waits for NCCL collectives) for ranks that never came to
the call (one rank passed another communicator, skipped a call, or hung elsewhere)
ends the job, naming the call, its step and the ranks. ``SEQPAR_TIMEOUT=<seconds>``
sets that limit and watches every wait of a call (transfers, collectives) too;
``SEQPAR_TIMEOUT=0`` turns the watchdog off.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from contextlib import contextmanager

import numpy as np
from mpi4py import MPI

__all__ = ["resolve_comm", "check_tag", "MAX_TAG", "CallContext", "call", "communicating", "progress",
           "waiting", "collective", "is_collective", "current_call", "complete",
           "complete_some"]

_CREATE_LOCK = threading.Lock()
_KEYVAL: int | None = None
_COLLECTIVE = "_seqpar_collective"
_PRINTED_ONCE = "_seqpar_printed_once"
_ECHO = "_seqpar_echo"  # the one line a rank other than 0 prints for an uncaught error


def resolve_comm(comm) -> MPI.Comm:
    """``comm``, or ``MPI.COMM_WORLD`` when it is None."""
    if comm is None:
        return MPI.COMM_WORLD
    if not isinstance(comm, MPI.Comm) or comm == MPI.COMM_NULL:
        raise TypeError(f"comm must be an mpi4py.MPI.Comm, got {comm!r}")
    if isinstance(comm, MPI.Intercomm):
        raise TypeError("comm must be an intracommunicator, got an MPI.Intercomm")
    return comm


def collective(error: BaseException, *, printed_once: bool = True) -> BaseException:
    """Mark ``error`` as raised by every rank of the call alike (from agreed data).

    ``printed_once``: left uncaught, it is printed in full by rank 0 of the call's
    communicator only, and as one line by the others (:func:`_print_uncaught`), so a
    job of 64 ranks shows one traceback, not 64 interleaved. False for a rank's own
    exception (its traceback is the evidence)."""
    setattr(error, _COLLECTIVE, True)
    if printed_once:
        setattr(error, _PRINTED_ONCE, True)
    return error


def is_collective(error: BaseException) -> bool:
    return getattr(error, _COLLECTIVE, False)


MAX_TAG = 32767  # the largest tag MPI guarantees


def check_tag(tag) -> None:
    """``tag`` is None or an int in [0, MAX_TAG]; TypeError or ValueError naming it."""
    if tag is None:
        return
    if isinstance(tag, bool) or not isinstance(tag, (int, np.integer)):
        raise TypeError(f"tag must be an int or None, got {tag!r}")
    if not 0 <= tag <= MAX_TAG:
        raise ValueError(f"tag must lie in [0, {MAX_TAG}], got {tag}")


class CallContext:
    """What seqpar keeps per channel (a user communicator, or one of its tags): its
    private communicator, a lock, the thread that owns it, and what calls on it build
    once (transports, sub-communicators, tagged channels), freed with it."""

    def __init__(self, user_comm: MPI.Comm | None = None, *, private: MPI.Comm | None = None):
        self.comm = private if private is not None else user_comm.Dup()
        # ranks of this communicator on this node: they share its memory (seqpar.memory);
        # found while the communicator is made, which every rank does at the same point
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.node_ranks = node.size
        node.Free()
        self.lock = threading.RLock()
        self.active: threading.Thread | None = None  # the thread in a call, if any
        self.cache: dict = {}
        self._channels_lock = threading.Lock()
        self._making: dict = {}

    def channel(self, tag: int) -> "CallContext":
        """The context of calls with ``tag``: made on first use (collective over the
        ranks, safe beside other threads' calls), cached, freed with this one."""
        key = ("tag", int(tag))
        with self._channels_lock:  # held briefly: creation waits for the other ranks
            making = self._making.setdefault(key, threading.Lock())
        with making:
            if key not in self.cache:
                group = self.comm.Get_group()
                try:
                    private = self.comm.Create_group(group, tag=int(tag))
                finally:
                    group.Free()
                self.cache[key] = CallContext(private=private)
            return self.cache[key]

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

    def refusal(self, tag, overlapping: bool) -> Exception | None:
        """The error to report when the calling thread may not call on this channel
        (``overlapping``: another thread was in a call on it when this one came)."""
        me = threading.current_thread()
        if tag is None and me is not threading.main_thread():
            return ValueError(
                f"this call comes from thread {me.name!r}, not the main thread, without a "
                "tag: calls from other threads pair up across ranks only by a tag that "
                "says which calls belong together (e.g. tag=task_index, the same on every "
                "rank), since threads run in a different order on each rank")
        if overlapping:
            return ValueError(
                f"thread {me.name!r} called with tag {tag} while another thread of this "
                "rank was in a call with that tag: calls of one tag must come one after "
                "another to pair up across ranks; give concurrent calls their own tags")
        return None


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
        self.node_ranks = 1
        self.dispatch = getattr(_ACTIVE, "dispatch", None)  # see dispatching()
        _ACTIVE.dispatch = None


_ACTIVE = threading.local()


def current_call() -> _Call | None:
    """The seqpar call this thread is in, if any."""
    return getattr(_ACTIVE, "call", None)


@contextmanager
def dispatching(function: str, settings: dict):
    """The next call on this thread runs on behalf of ``function`` (which chose it
    from ``settings``): its agreement names ``function`` and compares ``settings``
    first, so ranks that chose differently are told why."""
    _ACTIVE.dispatch = (function, dict(settings))
    try:
        yield
    finally:
        _ACTIVE.dispatch = None


@contextmanager
def call(comm, function: str, tag=None):
    """Run one seqpar call on the private communicator of ``comm`` (and ``tag``);
    yields its CallContext.

    Serialises calls on one channel across threads, registers the call with the
    watchdog, and turns an exception on this rank into the same error on every
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
                 "every rank of it (a rank that passed another communicator, or makes no "
                 "seqpar call, leaves the others waiting here)")
        context = context_of(user_comm)
        try:
            check_tag(tag)
        except (TypeError, ValueError) as exc:
            record.deferred, tag = record.deferred or exc, None
        if tag is not None:
            progress(f"making seqpar's communicator for tag {tag} (first call with it)",
                     "every rank")
            context = context.channel(tag)
        record.comm, record.node_ranks = context.comm, context.node_ranks
        me = threading.current_thread()
        overlapping = context.active not in (None, me)
        progress("waiting for another thread's call on this communicator")
        with context.lock:
            record.deferred = record.deferred or context.refusal(tag, overlapping)
            outer_active, context.active = context.active, me
            progress("checking arguments")
            try:
                yield context
            except BaseException as exc:  # noqa: BLE001 - re-raised, or the job ends
                _settle(record, exc)
                raise
            finally:
                context.active = outer_active
    finally:
        _Watchdog.untrack(record)
        _ACTIVE.call = outer


def _settle(record: _Call, exc: BaseException) -> None:
    """An exception leaves the call on this rank: make sure no other rank waits for it."""
    if is_collective(exc):
        if getattr(exc, _PRINTED_ONCE, False) and record.comm.size > 1:
            if record.comm.rank > 0 and not hasattr(exc, _ECHO):
                setattr(exc, _ECHO, f"seqpar: rank {record.comm.rank} of {record.comm.size}: "
                                    f"the same {type(exc).__name__} in {record.function} "
                                    "(rank 0 prints it in full)")
            _print_uncaught.install()
        return
    if record.comm.size == 1:
        return
    if record.agreed:
        traceback.print_exc(file=sys.stderr)
        _abort(record.comm, f"rank {MPI.COMM_WORLD.rank}: {type(exc).__name__} in "
                            f"{record.function} ({record.step}): {exc}")
    from .validation import report_failure  # the agreement builds on this module

    report_failure(record.comm, record.function, exc)  # every rank raises


class _print_uncaught:
    """Hooks for uncaught exceptions (the process's, its threads') that print a
    collective error as its one line on ranks other than 0 and in one write on rank 0,
    and anything else as the hooks found at installation would; installed at the
    first such error."""

    _installed = False
    # after printing its line, a rank waits this long before its exit aborts the job:
    # rank 0, which raised at the same moment, has printed the error by then
    GRACE_S = 1.0

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return
        cls._installed = True
        process_hook, thread_hook = sys.excepthook, threading.excepthook

        def process(kind, value, tb):
            if hasattr(value, _ECHO):
                sys.stderr.write(getattr(value, _ECHO) + "\n")
                sys.stderr.flush()
                time.sleep(cls.GRACE_S)
            elif getattr(value, _PRINTED_ONCE, False):
                # one write, so the launcher cannot splice other ranks' lines into it
                sys.stderr.write("".join(traceback.format_exception(kind, value, tb)))
                sys.stderr.flush()
            else:
                process_hook(kind, value, tb)

        def thread(args):
            if hasattr(args.exc_value, _ECHO):
                sys.stderr.write(getattr(args.exc_value, _ECHO) + "\n")
            else:
                thread_hook(args)

        sys.excepthook, threading.excepthook = process, thread


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


# Waiting without spinning: MPI's blocking calls poll a core at full speed, taking it
# from the threads of ranks that compute on the same node (a rank that waits for a
# longer block, an idle rank of uneven shards). Requests are tested at full speed for
# _POLL_SPIN_S (most waits of a healthy call end within it), then between sleeps of an
# eighth of the time waited so far (at most _POLL_MAX_SLEEP_S): a long wait costs a
# sliver of a core and ends at most about 1/8 later than it could.
_POLL_SPIN_S = 200e-6
_POLL_MAX_SLEEP_S = 1e-3


def _poll(test) -> object:
    """``test()`` until it returns something other than False."""
    start = time.perf_counter()
    while True:
        outcome = test()
        if outcome is not False:
            return outcome
        waited = time.perf_counter() - start
        if waited > _POLL_SPIN_S:
            time.sleep(min(waited / 8, _POLL_MAX_SLEEP_S))


def complete(requests) -> None:
    """Complete every MPI request of ``requests`` (a list, or one request), testing
    them between short sleeps once the wait is long, rather than spinning in Waitall."""
    if isinstance(requests, MPI.Request):
        requests = [requests]
    _poll(lambda: MPI.Request.Testall(requests) or False)


def complete_some(requests) -> list[int]:
    """Indices of the requests that completed (at least one), as ``Waitsome`` gives
    them, polling like :func:`complete`; [] when none is active."""
    def test():
        done = MPI.Request.Testsome(requests)
        return [] if done is None else (list(done) or False)

    return _poll(test)


def _abort(comm: MPI.Comm, message: str) -> None:
    sys.stderr.write(f"seqpar: {message}\nseqpar: aborting the job: the other ranks "
                     "would wait for this one forever\n")
    sys.stderr.flush()
    comm.Abort(1)


ARRIVAL_TIMEOUT_S = 600.0  # default limit on waiting for ranks to arrive at a call


def timeout_seconds() -> float | None:
    """SEQPAR_TIMEOUT in seconds (0: off; None: unset, the default watch); ValueError
    naming it when it is not a number of seconds >= 0."""
    text = os.environ.get("SEQPAR_TIMEOUT", "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"SEQPAR_TIMEOUT must be a number of seconds >= 0 (0: off), "
                         f"got {text!r}")
    return value


def _limit(record: _Call, setting: float | None) -> tuple[float, str]:
    """How long ``record`` may wait in its current step (0: forever), and the setting
    that says so, for the message."""
    if setting is None:  # the default: only ranks that never arrive at the call
        if record.agreed:
            return 0.0, ""
        return ARRIVAL_TIMEOUT_S * record.patience, (
            f"seqpar's default limit for ranks to arrive at a call, {ARRIVAL_TIMEOUT_S:g} s; "
            "SEQPAR_TIMEOUT=<seconds> sets it, 0 turns it off")
    return setting * record.patience, f"SEQPAR_TIMEOUT={setting:g}"


class _Watchdog:
    """A daemon thread that aborts calls waiting for other ranks longer than their
    limit (:func:`_limit`)."""

    _records: set = set()
    _lock = threading.Lock()
    _thread: threading.Thread | None = None

    @classmethod
    def track(cls, record: _Call) -> None:
        if timeout_seconds() == 0:
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
                setting = timeout_seconds()
            except ValueError:
                setting = 0.0  # changed while running: the next call reports it
            shortest = ARRIVAL_TIMEOUT_S if setting is None else setting
            time.sleep(min(1.0, max(shortest / 20, 0.05)))
            now = time.monotonic()
            stalled = []
            with cls._lock:
                for record in cls._records:
                    limit, why = _limit(record, setting)
                    if limit > 0 and record.waiting_for and now - record.since > limit:
                        stalled.append((record, why))
            for record, why in stalled:
                waiting_for = record.waiting_for
                if callable(waiting_for):
                    waiting_for = waiting_for()
                _abort(record.comm, f"rank {MPI.COMM_WORLD.rank}: {record.function} waited "
                                    f"{now - record.since:.0f} s ({why}) at {record.step}, "
                                    f"for {waiting_for}")
