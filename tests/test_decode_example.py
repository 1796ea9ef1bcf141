"""examples/decode.py, run by every rank on the CPU (a small cache): it decodes, checks
its last step against float64 and exits 0; ``--graph`` without ``--gpu`` is refused."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

pytestmark = pytest.mark.mpi

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "decode.py")


def _example():
    spec = importlib.util.spec_from_file_location("decode_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_example(comm, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["decode.py", "--capacity", "600", "--steps", "5"])
    status = _example().main()
    printed = capsys.readouterr().out
    assert comm.allgather(status) == [0] * comm.size, printed
    if comm.rank == 0:
        assert "decode: " in printed and "PASS" in printed, printed


def test_decode_example_graph_needs_gpu(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["decode.py", "--graph"])
    with pytest.raises(SystemExit) as info:
        _example().main()
    assert info.value.code == 2 and "--graph needs --gpu" in capsys.readouterr().err
