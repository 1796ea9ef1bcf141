"""examples/transformers_llama.py, run by every rank: a transformers Llama trained with
seqpar's ring attention (qkv_format="bhsd") matches the one-process model's loss and
gradients. Skipped where torch or transformers is not installed (pip install
".[frameworks]"); the CI runs it at 2 ranks."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.mpi

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "transformers_llama.py")


def test_transformers_llama_example(comm, capsys, monkeypatch):
    # run from the repository root, its kernels/ folder (CUDA sources) would pass for
    # Hugging Face's "kernels" package, which transformers imports where it finds one
    monkeypatch.setitem(sys.modules, "kernels", None)
    from transformers.utils import import_utils

    if hasattr(import_utils.is_kernels_available, "cache_clear"):
        import_utils.is_kernels_available.cache_clear()
    spec = importlib.util.spec_from_file_location("transformers_llama", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    status = example.main()
    printed = capsys.readouterr().out
    assert comm.allgather(status) == [0] * comm.size, printed
    if comm.rank == 0:
        assert printed.count("step ") == example.STEPS and ": OK (" in printed, printed
