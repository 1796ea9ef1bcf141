"""Faults that must end the job or raise on every rank, never hang or pair calls wrongly.

Tests that need a whole MPI job of their own (the watchdog, an interrupt after the
agreement) start one with ``python -m seqpar run -n 2`` from the 1-rank run of the
suite only; the others run on every rank of the suite's own job.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from mpi4py import MPI

import seqpar

from conftest import check_attention, raises_everywhere, random_qkv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LAUNCHER_VARIABLES = ("OMPI_", "PMIX_", "PRTE_", "OPAL_", "HYDRA_", "PMI_", "MPI_LOCAL")
own_job = pytest.mark.skipif(MPI.COMM_WORLD.size > 1,
                             reason="starts MPI jobs of its own (from the 1-rank run)")


def run_job(tmp_path, body: str, ranks: int = 2, timeout: float = 90, **env):
    """Run ``body`` (Python, with ``comm``, ``rank``, ``seqpar``, ``np`` and a small
    problem ``q, k, v`` of this rank's slice defined) on ``ranks`` ranks; returns
    (exit status, seconds, stdout + stderr)."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""\
        import os, sys, time
        import numpy as np
        from mpi4py import MPI
        import seqpar
        comm = MPI.COMM_WORLD
        rank = comm.rank
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((1, 8, 2, 4)) for _ in range(3))
        """) + textwrap.dedent(body))
    environ = {key: value for key, value in os.environ.items()
               if not key.startswith(_LAUNCHER_VARIABLES)}
    environ.update({key: str(value) for key, value in env.items()})
    environ["PYTHONPATH"] = REPO + os.pathsep + environ.get("PYTHONPATH", "")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "seqpar", "run", "-n", str(ranks),
                           str(script)], cwd=tmp_path, env=environ, capture_output=True,
                          text=True, timeout=timeout)
    return done.returncode, time.monotonic() - start, done.stdout + done.stderr


@own_job
def test_watchdog_ignores_long_computation(tmp_path):
    """A block that computes for 3 s under SEQPAR_TIMEOUT=1 is healthy: only waiting for
    other ranks counts, so the call completes."""
    status, _, output = run_job(tmp_path, """
        from seqpar.local import numpy_kernel
        forward = numpy_kernel.forward
        def slow(*args, **kwargs):
            time.sleep(1.5)
            return forward(*args, **kwargs)
        numpy_kernel.forward = slow
        out = seqpar.ring_attention(q, k, v, comm=comm)
        sys.stdout.write(f"done {rank}\\n")  # one write: lines of two ranks never interleave
        sys.stdout.flush()
        """, SEQPAR_TIMEOUT=1)
    assert status == 0, output
    assert "done 0" in output and "done 1" in output


@own_job
def test_watchdog_names_the_rank_that_never_came(tmp_path):
    """Rank 1 never makes its second call: rank 0 ends the job after about
    SEQPAR_TIMEOUT, naming rank 1 (a first call on a communicator starts with MPI's own
    collective duplicate, where only "every rank" can be named)."""
    status, seconds, output = run_job(tmp_path, """
        seqpar.ring_attention(q, k, v, comm=comm)
        if rank == 1:
            time.sleep(60)
        seqpar.ring_attention(q, k, v, comm=comm)
        """, SEQPAR_TIMEOUT=2)
    assert status != 0
    assert seconds < 30, output
    assert "rank 1 of 2, which did not call ring_attention" in output, output


@own_job
def test_default_watch_ends_a_mismatched_communicator(tmp_path):
    """Without SEQPAR_TIMEOUT, rank 0 passing COMM_WORLD while rank 1 passes a Split
    of it (the same ranks, another communicator) ends the job after the default
    arrival limit (shortened here) with one line naming the call and where it waited."""
    status, seconds, output = run_job(tmp_path, """
        seqpar.comms.ARRIVAL_TIMEOUT_S = 2.0
        other = comm.Split(0, rank)
        seqpar.ring_attention(q, k, v, comm=comm if rank == 0 else other)
        """)
    assert status != 0
    assert seconds < 30, output
    assert "ring_attention waited" in output, output
    assert "seqpar's default limit for ranks to arrive at a call" in output, output
    assert "a rank that passed another communicator" in output, output


@own_job
def test_default_watch_ignores_long_computation(tmp_path):
    """The default watch covers only arriving at a call: past the agreement, a rank
    that waits 1.5 s per step for a slower rank's block is healthy."""
    status, _, output = run_job(tmp_path, """
        seqpar.comms.ARRIVAL_TIMEOUT_S = 0.5
        from seqpar.local import numpy_kernel
        forward = numpy_kernel.forward
        def slow(*args, **kwargs):
            if rank == 0:
                time.sleep(1.5)
            return forward(*args, **kwargs)
        numpy_kernel.forward = slow
        seqpar.ring_attention(q, k, v, comm=comm)
        sys.stdout.write(f"done {rank}\\n")
        sys.stdout.flush()
        """)
    assert status == 0, output
    assert "done 0" in output and "done 1" in output


def test_watch_limits(monkeypatch):
    """What each setting of SEQPAR_TIMEOUT watches: unset, the waits before the
    agreement (ARRIVAL_TIMEOUT_S); 0, nothing; a number, every wait."""
    from seqpar import comms
    record = comms._Call(MPI.COMM_WORLD, "ring_attention")
    monkeypatch.delenv("SEQPAR_TIMEOUT", raising=False)
    assert comms.timeout_seconds() is None
    assert comms._limit(record, None)[0] == comms.ARRIVAL_TIMEOUT_S
    record.agreed = True
    assert comms._limit(record, None)[0] == 0
    assert comms._limit(record, 3.0) == (3.0, "SEQPAR_TIMEOUT=3")
    monkeypatch.setenv("SEQPAR_TIMEOUT", "0")
    assert comms.timeout_seconds() == 0
    assert comms._limit(record, 0.0)[0] == 0


@own_job
def test_an_argument_error_is_printed_once(tmp_path):
    """One rank's bad argument at 4 ranks, uncaught: rank 0 prints the traceback and
    the message naming the rank at fault, once; the other ranks one line each."""
    status, _, output = run_job(tmp_path, """
        if rank == 2:
            k = k[:, :, :1]
        seqpar.ring_attention(q, k, v, comm=comm)
        """, ranks=4)
    assert status != 0
    assert output.count("Traceback") == 1, output
    assert output.count("k and v must have the same shape") == 1, output
    assert "ValueError: rank 2: k and v must have the same shape" in output, output
    for r in (1, 2, 3):
        assert (f"seqpar: rank {r} of 4: the same ValueError in ring_attention "
                "(rank 0 prints it in full)") in output, output
    assert "direct cause" not in output, output


@own_job
def test_interrupt_after_the_agreement_ends_the_job(tmp_path):
    """A KeyboardInterrupt on rank 0 right after the agreement (the others go on to
    communicate) ends the job promptly instead of leaving rank 1 waiting."""
    status, seconds, output = run_job(tmp_path, """
        from seqpar import comms
        progress = comms.progress
        def interrupted(step, *args, **kwargs):
            if rank == 0 and step == "agreed with every rank":
                raise KeyboardInterrupt
            progress(step, *args, **kwargs)
        comms.progress = interrupted
        try:
            seqpar.ring_attention(q, k, v, comm=comm)
        except KeyboardInterrupt:
            pass
        time.sleep(30)  # caught: the job must already be over
        """)
    assert status != 0
    assert seconds < 25, output
    assert "KeyboardInterrupt in ring_attention" in output, output


@pytest.mark.mpi
def test_interrupt_during_the_check_raises_everywhere(comm, rng, monkeypatch):
    """A KeyboardInterrupt on one rank while it checks its arguments: that rank raises
    it, every other rank a RuntimeError naming it; the next call is right."""
    from seqpar.strategies import _prepare

    q, k, v = random_qkv(rng, "float64", b=1, sq=4 * comm.size, hq=2, hk=2, d=4)
    local = [seqpar.shard(x, comm) for x in (q, k, v)]
    check = _prepare.check_sequence_inputs

    def interrupted(*args, **kwargs):
        if comm.rank == comm.size - 1:
            raise KeyboardInterrupt
        return check(*args, **kwargs)

    monkeypatch.setattr(_prepare, "check_sequence_inputs", interrupted)
    from seqpar.strategies import ring

    monkeypatch.setattr(ring, "check_sequence_inputs", interrupted)
    outcome = "none"
    try:
        seqpar.ring_attention(*local, comm=comm)
    except KeyboardInterrupt:
        outcome = "KeyboardInterrupt"
    except RuntimeError as exc:
        outcome = str(exc)
    monkeypatch.undo()
    outcomes = comm.allgather(outcome)
    last = comm.size - 1
    assert outcomes[last] == "KeyboardInterrupt"
    assert all(o == f"ring_attention failed on rank {last}: KeyboardInterrupt: "
               for o in outcomes[:last]), outcomes
    out = seqpar.gather(seqpar.ring_attention(*local, comm=comm), comm)
    check_attention(out, q, k, v)


def _pool_problems(rng, comm, count=4):
    problems = [random_qkv(rng, "float64", b=1, sq=4 * comm.size, hq=2, hk=2, d=4)
                for _ in range(count)]
    return problems, [[seqpar.shard(x, comm) for x in problem] for problem in problems]


def _run_pool(comm, task, count=4, workers=2):
    """Run ``task(i)`` for every i on a pool of worker threads, submitted in an order
    that differs between ranks (reversed on odd ranks); returns {i: result}."""
    order = list(range(count)) if comm.rank % 2 == 0 else list(reversed(range(count)))
    barrier = threading.Barrier(2)

    def started(i):
        try:
            barrier.wait(timeout=5)  # both workers exist: tasks land on two threads
        except threading.BrokenBarrierError:
            pass
        return i, task(i)

    with ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(started, order))


@pytest.mark.mpi
def test_untagged_calls_from_a_thread_pool_raise_everywhere(comm, rng):
    """A thread pool whose tasks run in a different order on each rank, on one
    communicator and without tags: calls would pair with other tasks' calls, so every
    one of them raises the same error on every rank, never mixed results; the main
    thread's calls go on working."""
    problems, local = _pool_problems(rng, comm)

    def task(i):
        try:
            return seqpar.ring_attention(*local[i], comm=comm)
        except ValueError as exc:
            return str(exc)

    results = _run_pool(comm, task)
    assert all(isinstance(r, str) and "not the main thread, without a tag" in r
               for r in results.values()), results
    out = seqpar.ring_attention(*local[0], comm=comm)
    check_attention(seqpar.gather(out, comm), *problems[0])


@pytest.mark.mpi
def test_tagged_calls_from_a_thread_pool_pair_by_tag(comm, rng):
    """A pool with each task's index as its tag: calls pair by tag whatever order the
    tasks run in on each rank, and every result is right. (A tagged call waits for the
    same tag on the other ranks, so the pool runs every task at once.)"""
    problems, local = _pool_problems(rng, comm)
    results = _run_pool(comm, lambda i: seqpar.ring_attention(*local[i], comm=comm, tag=i),
                        workers=len(problems))
    for i, problem in enumerate(problems):
        check_attention(seqpar.gather(results[i], comm), *problem)


@pytest.mark.mpi
def test_a_tag_used_by_two_threads_at_once_raises_everywhere(comm, rng, monkeypatch):
    """A call that arrives while another thread is in a call of the same tag raises on
    every rank (once the first call is done: it never meets that call's messages)."""
    from seqpar.local import numpy_kernel

    problems, local = _pool_problems(rng, comm, count=2)
    inside = threading.Event()
    forward = numpy_kernel.forward

    def slow(*args, **kwargs):
        inside.set()
        time.sleep(0.5)  # the second thread comes meanwhile
        return forward(*args, **kwargs)

    monkeypatch.setattr(numpy_kernel, "forward", slow)
    first = {}
    owner = threading.Thread(target=lambda: first.update(
        out=seqpar.ring_attention(*local[0], comm=comm, tag=7)))
    owner.start()
    inside.wait(timeout=60)
    try:
        raises_everywhere(comm, ValueError, r"called with tag 7 while another thread",
                          lambda: _in_thread(lambda: seqpar.ring_attention(
                              *local[1], comm=comm, tag=7)), same_message=False)
    finally:
        owner.join(timeout=60)
    monkeypatch.undo()
    check_attention(seqpar.gather(first["out"], comm), *problems[0])


@pytest.mark.mpi
def test_a_tag_carries_calls_from_thread_to_thread(comm, rng):
    """One call after the other on one tag, from different threads (a framework's
    forward on the main thread, its backward on a thread of its own): they pair up."""
    problems, local = _pool_problems(rng, comm, count=2)
    out = seqpar.ring_attention(*local[0], comm=comm, tag=3)
    later = _in_thread(lambda: seqpar.ring_attention(*local[1], comm=comm, tag=3))
    check_attention(seqpar.gather(out, comm), *problems[0])
    check_attention(seqpar.gather(later, comm), *problems[1])


def _in_thread(function):
    """``function()`` run in a new thread; its result, or its exception re-raised."""
    box = {}

    def run():
        try:
            box["result"] = function()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    if "error" in box:
        raise box["error"]
    return box["result"]


@pytest.mark.mpi
def test_thread_per_communicator_pairs_by_communicator(comm, rng):
    """Each thread with its own communicator (Dup'ed in the same order on every rank)
    and a tag: calls pair by communicator, whatever order the threads start in."""
    problems, _ = _pool_problems(rng, comm, count=3)
    channels = [comm.Dup() for _ in problems]
    try:
        local = [[seqpar.shard(x, c) for x in problem]
                 for c, problem in zip(channels, problems)]
        order = [2, 0, 1] if comm.rank % 2 else [0, 1, 2]
        results = {}
        threads = [threading.Thread(target=lambda i=i: results.update(
            {i: seqpar.ring_attention(*local[i], comm=channels[i], tag=0)})) for i in order]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        for i, problem in enumerate(problems):
            check_attention(seqpar.gather(results[i], channels[i]), *problem)
    finally:
        for c in channels:
            c.Free()


@pytest.mark.mpi
def test_invalid_timeout_is_an_error_everywhere(comm, rng, monkeypatch):
    q, k, v = random_qkv(rng, "float64", b=1, sq=4 * comm.size, hq=2, hk=2, d=4)
    local = [seqpar.shard(x, comm) for x in (q, k, v)]
    for value in ("abc", "-1", "nan"):
        monkeypatch.setenv("SEQPAR_TIMEOUT", value)
        raises_everywhere(comm, ValueError, r"SEQPAR_TIMEOUT must be a number of seconds",
                          lambda: seqpar.ring_attention(*local, comm=comm))
    monkeypatch.delenv("SEQPAR_TIMEOUT")
    check_attention(seqpar.gather(seqpar.ring_attention(*local, comm=comm), comm), q, k, v)
