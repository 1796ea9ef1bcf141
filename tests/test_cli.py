"""The command line: check, bench (dtypes, JSON, figure), info, progress, and no MPI at all.

check and bench are collective (marked mpi): every rank runs them, rank 0 prints.
"""
from __future__ import annotations

import io
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from mpi4py import MPI

import seqpar.log
from seqpar.cli import main
from seqpar.progress import Progress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def shared_folder(comm):
    """A temporary folder made by rank 0, the same path on every rank."""
    path = comm.bcast(tempfile.mkdtemp(prefix="seqpar-cli-") if comm.rank == 0 else None)
    yield path
    comm.Barrier()
    if comm.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.mpi
def test_check_covers_every_strategy(comm, capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    if comm.rank != 0:
        assert out == ""
        return
    for name in ("attention", "ring/contiguous", "ring/zigzag", "kv_sharded",
                 "attention backward", "ring/zigzag backward", "kv_sharded backward"):
        assert f"ok   {name} " in out
    if 8 % comm.size == 0:
        assert "ok   ulysses " in out
        assert "ok   ulysses backward " in out
    else:
        assert f"skip ulysses: its 8 query and 4 K/V heads do not divide by {comm.size}" in out
    # the hybrid, forward and backward, with the smallest group U > 1 that divides the
    # ranks and the 4 K/V heads (so at 4 ranks two groups of 2 run the ring between them)
    groups = [u for u in range(2, comm.size + 1) if comm.size % u == 0 and 4 % u == 0]
    if groups:
        for name in (f"hybrid/U={groups[0]}", f"hybrid/U={groups[0]} backward"):
            for dtype in ("float64", "float32", "float16"):
                for causal in (False, True):
                    assert f"ok   {name:20s} {dtype:8s} causal={causal!s:5s}" in out
    else:
        assert (f"skip hybrid: no group of U > 1 ranks divides the {comm.size} rank(s), "
                "8 query heads and 4 K/V heads (U = 1 is the ring)") in out
        assert "hybrid/" not in out
    assert "FAIL" not in out
    assert out.rstrip().splitlines()[-1].endswith(" passed, 0 failed")


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_bench_every_dtype_writes_json(comm, shared_folder, capsys, dtype):
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    path = os.path.join(shared_folder, "bench.json")
    seq = 16 * comm.size
    argv = ["bench", "--seq", f"{seq},{2 * seq}", "--heads", "2", "--head-dim", "16",
            "--dtype", dtype, "--repeats", "2", "--causal", "--json", path]
    assert main(argv) == 0
    if comm.rank == 0:
        with open(path) as saved:
            records = json.load(saved)["records"]
        assert [r["seq"] for r in records] == [seq, 2 * seq]
        for r in records:
            assert (r["ranks"], r["dtype"], r["causal"], len(r["times_s"])) == \
                (comm.size, dtype, True, 2)
            assert r["median_s"] > 0 and r["tflops"] > 0
        assert f"N={2 * seq} " in capsys.readouterr().out
    # a second run at other settings keeps the first run's records (a scaling study)
    assert main(argv[:-3] + ["--json", path]) == 0  # not causal
    if comm.rank == 0:
        with open(path) as saved:
            assert len(json.load(saved)["records"]) == 4


@pytest.mark.mpi
def test_bench_plot_sweeps_n(comm, shared_folder):
    pytest.importorskip("matplotlib")
    figure = os.path.join(shared_folder, "bench.png")
    data = os.path.join(shared_folder, "bench.json")
    seq = 64 * comm.size
    assert main(["bench", "--seq", str(seq), "--heads", "1", "--head-dim", "8",
                 "--repeats", "1", "--plot", figure, "--json", data]) == 0
    if comm.rank == 0:
        with open(figure, "rb") as image:
            assert image.read(8) == b"\x89PNG\r\n\x1a\n"
        with open(data) as saved:  # N/8, N/4, N/2, N where they split into 2P chunks
            assert [r["seq"] for r in json.load(saved)["records"]] == \
                [seq // 8, seq // 4, seq // 2, seq]


def _bench_records(comm, shared_folder, *extra):
    """Run bench at this rank count into a JSON file; rank 0 returns its records."""
    path = os.path.join(shared_folder, "bench.json")
    seq = 32 * comm.size
    assert main(["bench", "--seq", f"{seq},{2 * seq}", "--heads", "2", "--kv-heads", "1",
                 "--head-dim", "8", "--repeats", "3", "--causal", "--json", path, *extra]) == 0
    if comm.rank == 0:
        with open(path) as saved:
            return json.load(saved)["records"]
    return None


@pytest.mark.mpi
def test_bench_median_and_min_threads_and_device(comm, shared_folder, capsys):
    records = _bench_records(comm, shared_folder)
    out = capsys.readouterr().out
    if comm.rank != 0:
        return
    for r in records:
        assert r["min_s"] == min(r["times_s"]) and r["min_s"] <= r["median_s"]
        assert r["median_s"] == sorted(r["times_s"])[1]  # the median of 3
        assert r["threads"] >= 1 and r["device"] == "cpu" and r["device_name"]
        # a CPU at these sizes is far from a TFLOP/s: the line says GFLOP/s
        assert f"{r['median_s'] * 1e3:.3g} ms median, {r['min_s'] * 1e3:.3g} ms min (of 3)" in out
    assert "GFLOP/s in all" in out and "TFLOP/s" not in out


def test_bench_rate_units_by_magnitude():
    from seqpar.commands._common import rate_text, rate_unit

    assert rate_unit(6.8e9) == (1e9, "GFLOP/s") and rate_text(6.84e9) == "6.8 GFLOP/s"
    assert rate_unit(999e9)[1] == "GFLOP/s"
    assert rate_unit(1e12) == (1e12, "TFLOP/s") and rate_text(6.2e14) == "620.00 TFLOP/s"


@pytest.mark.mpi
def test_bench_plot_ticks_units_and_legend(comm, shared_folder):
    """N ticks at the lengths measured, no minor labels, the rate in GFLOP/s, threads
    and device in the legend; records of another rank count add a panel against ranks
    with integer ticks."""
    pytest.importorskip("matplotlib")
    from seqpar.commands.plot import draw_bench, plot_bench

    records = _bench_records(comm, shared_folder)
    if comm.rank != 0:
        return
    other = [dict(r, ranks=2 * r["ranks"], median_s=r["median_s"] / 1.5) for r in records]
    for rows in (records, records + other):
        figure = draw_bench(rows)
        figure.canvas.draw()  # the tick labels exist once drawn
        panels = figure.axes
        assert len(panels) == (2 if rows is records else 3)
        seqs = sorted({r["seq"] for r in rows})
        for axes in panels[:2]:
            labels = [t.get_text() for t in axes.get_xticklabels()]
            assert labels == [str(n) if n < 1024 else f"{n >> 10}k" for n in seqs]
            assert axes.xaxis.get_minorticklocs().size == 0
        for axes in (panels[0], panels[-1]):  # log time axes: no minor labels
            assert all(t.get_text() == "" for t in axes.get_yticklabels(minor=True))
            assert all(t.get_text() for t in axes.get_yticklabels())
        assert panels[1].get_ylabel().startswith("GFLOP/s")
        legend = [t.get_text() for t in panels[1].get_legend().get_texts()]
        threads = records[0]["threads"]
        assert any(f"{comm.size} rank{'s' if comm.size > 1 else ''} \u00d7 {threads} thread"
                   in text and records[0]["device_name"] in text for text in legend), legend
        if rows is not records:
            ranks = sorted({comm.size, 2 * comm.size})
            assert [t.get_text() for t in panels[2].get_xticklabels()] == [str(r) for r in ranks]
            assert panels[2].get_xlabel() == "ranks"
    assert plot_bench(records, os.path.join(shared_folder, "figure")).endswith("figure.png")


def _torch_peer_script():
    """benchmarks/torch_peer.py as a module (PyTorch lives there, not in seqpar)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "torch_peer.py")
    spec = importlib.util.spec_from_file_location("torch_peer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.mpi
def test_bench_peer_torch(comm, shared_folder, capsys):
    pytest.importorskip("torch")
    _bench_records(comm, shared_folder)
    capsys.readouterr()
    if comm.rank != 0:
        return
    path = os.path.join(shared_folder, "bench.json")
    assert _torch_peer_script().main(["--json", path, "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    with open(path) as saved:
        records = json.load(saved)["records"]
    peers = [r for r in records if r["strategy"] == "torch_sdpa"]
    ours = [r for r in records if r["strategy"] == "ring_attention"]
    assert [r["seq"] for r in peers] == [r["seq"] for r in ours]
    for r in peers:
        assert r["ranks"] == 1 and r["threads"] >= 1 and r["peer"].startswith("torch ")
        assert r["min_s"] <= r["median_s"] and r["flops"] == ours[0]["flops"] * (
            r["seq"] / ours[0]["seq"]) ** 2
    assert out.count("scaled_dot_product_attention (1 process, ") == len(peers)


@pytest.mark.mpi
def test_bench_peer_torch_without_torch_is_a_usage_error(comm, shared_folder, capsys,
                                                         monkeypatch):
    _bench_records(comm, shared_folder)
    capsys.readouterr()
    if comm.rank != 0:
        return
    script = _torch_peer_script()
    monkeypatch.setitem(sys.modules, "torch", None)  # importlib finds no torch
    assert script.main(["--json", os.path.join(shared_folder, "bench.json")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("torch_peer: needs PyTorch, which is not installed "
                            "(pip install torch)\n")


@pytest.mark.parametrize("argv, message", [
    (["--heads", "0"], "argument --heads: must be at least 1, got 0"),
    (["--heads", "two"], "argument --heads: must be a whole number, got 'two'"),
    (["--head-dim", "-4"], "argument --head-dim: must be at least 1, got -4"),
    (["--kv-heads", "0"], "argument --kv-heads: must be at least 1, got 0"),
    (["--kv-heads", "3"], "argument --kv-heads: must divide --heads (8), got 3"),
    (["--heads", "6", "--kv-heads", "4"], "argument --kv-heads: must divide --heads (6), got 4"),
    (["--seq", "0"], "argument --seq: must be at least 1, got '0'"),
    (["--seq", "64,-64"], "argument --seq: must be at least 1, got '64,-64'"),
    (["--seq", "x"], "argument --seq: takes whole numbers separated by commas, got 'x'"),
    (["--seq", ","], "argument --seq: takes whole numbers separated by commas, got ','"),
    (["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    (["--repeats", "-2"], "argument --repeats: must be at least 1, got -2"),
    (["--json", "b.png", "--plot", "b.png"], "argument --plot: the same file as --json"),
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'")])
def test_bench_bad_options_are_usage_errors(capsys, argv, message):
    """Checked by the command line alone, the same on every rank, before any MPI call."""
    with pytest.raises(SystemExit) as done:
        main(["bench", *argv])
    assert done.value.code == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"python -m seqpar bench: error: {message}")
    assert captured.out == "" and "Traceback" not in captured.err


@pytest.mark.mpi
@pytest.mark.parametrize("argv, message", [
    (["--seq", "7"], "argument --seq: 7 does not split into"),
    (["--json", "{missing}/x.json"], "argument --json: {missing}/x.json: no folder {missing}"),
    (["--json", "{folder}"], "argument --json: {folder}: is a folder"),
    (["--plot", "{folder}/figure.xyz"], "argument --plot: {folder}/figure.xyz: matplotlib "
                                        "writes no .xyz files"),
    # divisible by 2P for every rank count the suite runs (zigzag), far beyond any memory
    (["--seq", str(3 * 2**40)], f"argument --seq: {3 * 2**40} tokens with --heads 8 and "
                                "--head-dim 64 need ")])
def test_bench_bad_sizes_and_paths_stop_every_rank_first(comm, shared_folder, capsys, argv,
                                                         message):
    """Checked where the ranks or rank 0's file system decide: one line on rank 0, status 2
    on every rank, before the first timing (today's --json error came after them all)."""
    if "--plot" in argv:
        pytest.importorskip("matplotlib")
    names = dict(folder=shared_folder, missing=os.path.join(shared_folder, "missing"))
    argv = [word.format(**names) for word in argv]
    if "--seq" not in argv:
        argv += ["--seq", str(16 * comm.size), "--heads", "1", "--head-dim", "8"]
    assert main(["bench", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing was timed
    if comm.rank == 0:
        assert captured.err.count("\n") == 1
        assert captured.err.startswith(f"python -m seqpar bench: error: "
                                       f"{message.format(**names)}")
    else:
        assert captured.err == ""
    assert not os.path.exists(os.path.join(shared_folder, "x.json"))


@pytest.mark.mpi
def test_info(comm, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    if comm.rank == 0:
        assert f"ranks: {comm.size}" in out and "MPI library: " in out and "mpiexec: " in out
        assert "WARNING" not in out  # mpiexec and mpi4py's library are the same MPI


def test_help_of_every_subcommand(capsys):
    for command in ("info", "check", "bench"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out and "python -m seqpar" in out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "-n N" in capsys.readouterr().out


def test_without_an_mpi_library_info_says_so_in_one_line():
    # mpi4py loads the library named by MPI4PY_LIBMPI: a missing one is no MPI at all
    env = dict(os.environ, MPI4PY_LIBMPI=os.path.join(REPO, "no-such-libmpi.so"))
    done = subprocess.run([sys.executable, "-m", "seqpar", "info"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("seqpar: no MPI library could be loaded")
    assert 'pip install "seqpar[mpi]"' in done.stderr and "pip install mpich" in done.stderr


@pytest.mark.parametrize("mode", ["lines", "off"])
def test_progress_on_rank_0_only(monkeypatch, capsys, caplog, mode):
    """Lines are records of the seqpar.progress logger (seqpar's log), on rank 0 only."""
    monkeypatch.setenv("SEQPAR_PROGRESS", mode)
    caplog.set_level(logging.INFO, logger="seqpar")
    for comm in (MPI.COMM_SELF, _Rank1()):
        caplog.clear()
        stream = io.StringIO()
        with Progress(3, "work", comm=comm, stream=stream) as progress:
            for step in range(3):
                progress.update(note=f"step {step}")
            progress.write("result")
        shown = [r.getMessage() for r in caplog.records if r.name == "seqpar.progress"]
        if comm.rank == 0 and mode == "lines":
            assert shown[-1].startswith("work: step 3/3, ")
            assert shown[-1].endswith("s left (step 2)")
        else:
            assert shown == []
        assert stream.getvalue() == ""  # the stream is for a bar only
        assert capsys.readouterr().out == ("result\n" if comm.rank == 0 else "")


@pytest.mark.mpi
def test_bench_progress_and_long_calls_through_the_log(comm, capsys, monkeypatch):
    """bench turns seqpar's log on: its progress lines and (the threshold made 0) the
    steps of each ring call reach stderr on rank 0 only; SEQPAR_LOG=off silences both."""
    monkeypatch.setenv("SEQPAR_PROGRESS", "lines")
    monkeypatch.setattr(seqpar.log, "LONG_CALL_S", 0.0)
    monkeypatch.setattr(seqpar.log, "INTERVAL_S", 0.0)
    argv = ["bench", "--seq", str(16 * comm.size), "--heads", "1", "--head-dim", "8",
            "--repeats", "1"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert not seqpar.log.logging_to_stderr()  # main put things back as they were
    if comm.rank == 0:
        assert " seqpar.progress: bench: step 2/2, " in err
        assert f" seqpar.ring: ring_attention: step {comm.size}/{comm.size}, " in err
    else:
        assert err == ""
    monkeypatch.setenv("SEQPAR_LOG", "off")
    assert main(argv) == 0
    assert capsys.readouterr().err == ""


class _Rank1:
    """Stands in for a communicator on which this process is rank 1."""
    rank = 1
