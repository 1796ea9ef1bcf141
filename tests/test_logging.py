"""seqpar's log (seqpar.log): the progress of long ring calls on rank 0, silent by default.

Named ``progress`` so CI's ``-k "bench or progress"`` run (tqdm installed) runs them too.
"""
from __future__ import annotations

import logging
import warnings

import pytest
from conftest import TOL, check_attention, random_qkv
from reference import reference_attention_backward, relative_error

import seqpar
import seqpar.log
from seqpar.log import Steps


def _run(name, comm, rng):
    """One call of ``name`` on fresh float64 data, checked against the float64 reference;
    returns the number of ring steps rank 0's call counts."""
    size = comm.size
    q, k, v = random_qkv(rng, "float64", b=1, sq=4 * size, hq=2 * size, hk=size, d=8)
    parts = [seqpar.shard(x, comm, layout="zigzag") for x in (q, k, v)]
    if name == "ring_attention_backward":
        out, lse = seqpar.ring_attention(*parts, comm=comm, layout="zigzag", return_lse=True)
        dout = rng.standard_normal(q.shape)
        grads = seqpar.ring_attention_backward(seqpar.shard(dout, comm, layout="zigzag"),
                                               *parts, out, lse, comm=comm, layout="zigzag")
        for got, want in zip(grads, reference_attention_backward(dout, q, k, v)):
            assert relative_error(seqpar.gather(got, comm, layout="zigzag"), want) <= \
                TOL["float64"]
    elif name == "hybrid_attention":
        # groups of one rank: the ring across them has every rank, as ring_attention's
        out = seqpar.hybrid_attention(*parts, ulysses_size=1, comm=comm, layout="zigzag")
        check_attention(seqpar.gather(out, comm, layout="zigzag"), q, k, v)
    else:
        out = seqpar.ring_attention(*parts, comm=comm, layout="zigzag")
        check_attention(seqpar.gather(out, comm, layout="zigzag"), q, k, v)
    return size  # not causal: the own block and P - 1 steps


def _lines(caplog, name="seqpar.ring"):
    return [r.getMessage() for r in caplog.records if r.name == name]


@pytest.mark.mpi
@pytest.mark.parametrize("name", ["ring_attention", "ring_attention_backward",
                                  "hybrid_attention"])
def test_progress_of_long_ring_calls_on_rank_0_only(comm, rng, caplog, monkeypatch, name):
    monkeypatch.setattr(seqpar.log, "LONG_CALL_S", 0.0)  # every call is "long"
    monkeypatch.setattr(seqpar.log, "INTERVAL_S", 0.0)
    caplog.set_level(logging.INFO, logger="seqpar")
    total = _run(name, comm, rng)
    lines = [line for line in _lines(caplog) if line.startswith(f"{name}: ")]
    if comm.rank != 0:
        assert _lines(caplog) == []
        return
    assert len(lines) == total, lines
    for done, line in enumerate(lines, 1):
        assert line.startswith(f"{name}: step {done}/{total}, ")
        assert " s elapsed, about " in line and line.endswith(" s left")
    assert lines[-1].endswith("about 0.0 s left")


@pytest.mark.mpi
def test_progress_silent_when_off_and_for_quick_calls(comm, rng, caplog):
    # off: the default (no level, NullHandler on "seqpar"): no record is even made
    assert not logging.getLogger("seqpar.ring").isEnabledFor(logging.INFO)
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("seqpar").handlers)
    _run("ring_attention", comm, rng)
    assert _lines(caplog) == []
    # on, but the call is far quicker than LONG_CALL_S: still nothing
    caplog.set_level(logging.INFO, logger="seqpar")
    _run("ring_attention", comm, rng)
    assert _lines(caplog) == []


def test_progress_steps_read_no_clock_when_off(monkeypatch):
    """Off, a step costs a count and a test of one flag: no clock, no formatting."""
    logger = logging.getLogger("seqpar.test-off")
    monkeypatch.setattr(logger, "isEnabledFor", lambda level: False)
    steps = Steps(logger, "work", 3, report=True, after=0.0, interval=0.0)

    def no_clock():
        raise AssertionError("read the clock")

    monkeypatch.setattr(seqpar.log.time, "perf_counter", no_clock)
    for _ in range(3):
        steps.done()
    assert steps.count == 3


def test_progress_steps_wait_for_the_threshold_and_report_rank_0(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="seqpar")
    now = [100.0]
    monkeypatch.setattr(seqpar.log.time, "perf_counter", lambda: now[0])
    logger = logging.getLogger("seqpar.test-steps")
    for report in (True, False):
        caplog.clear()
        steps = Steps(logger, "work", 4, report=report, after=5.0, interval=2.0)
        for t in (1.0, 6.0, 7.0, 10.0):  # under 5 s: silent; then at most every 2 s, and the last
            now[0] = 100.0 + t
            steps.done(note=f"at {t}")
        lines = _lines(caplog, "seqpar.test-steps")
        if not report:
            assert lines == []
            continue
        assert lines == ["work: step 2/4, 6.0 s elapsed, about 6.0 s left (at 6.0)",
                         "work: step 4/4, 10.0 s elapsed, about 0.0 s left (at 10.0)"]


def test_progress_switch_log_to_stderr_and_seqpar_log(monkeypatch, capsys):
    root = logging.getLogger("seqpar")
    before = list(root.handlers)
    try:
        seqpar.log_to_stderr("info")
        seqpar.log_to_stderr("INFO")  # again: still one handler
        assert len(root.handlers) == len(before) + 1
        logging.getLogger("seqpar.ring").info("hello %d", 7)
        logging.getLogger("seqpar.ring").debug("not shown")
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.rstrip().endswith("seqpar.ring: hello 7")
        seqpar.log_to_stderr("off")
        assert root.handlers == before and root.level == logging.NOTSET
        logging.getLogger("seqpar.ring").warning("silent again")
        assert capsys.readouterr().err == ""
        with pytest.raises(ValueError, match="level must be one of debug, info"):
            seqpar.log_to_stderr("loud")
        # SEQPAR_LOG: read when seqpar is imported (here called again)
        monkeypatch.setenv("SEQPAR_LOG", "debug")
        seqpar.log._from_environment()
        assert root.level == logging.DEBUG and seqpar.log.logging_to_stderr()
        seqpar.log_to_stderr(None)
        monkeypatch.setenv("SEQPAR_LOG", "loud")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            seqpar.log._from_environment()
        assert "SEQPAR_LOG ignored" in str(caught[0].message)
        assert not seqpar.log.logging_to_stderr()
    finally:
        seqpar.log_to_stderr(None)
        root.handlers[:] = before
