"""What the subcommands share: printing on rank 0, dtypes by name, the array module."""
from __future__ import annotations

import sys
from types import ModuleType

import numpy as np
from mpi4py import MPI

__all__ = ["TOLERANCE", "UsageError", "array_module", "dtype_for", "rate_text", "rate_unit",
           "say"]

# ||out - ref|| / ||ref|| against float64 (README, "Numerics")
TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}


class UsageError(Exception):
    """A bad option, found on every rank alike: one line, exit status 2."""


def say(*lines: str, comm: MPI.Comm | None = None, file=None) -> None:
    """Print lines on rank 0 of ``comm`` (default ``MPI.COMM_WORLD``) only."""
    if (comm or MPI.COMM_WORLD).rank == 0:
        print(*lines, sep="\n", file=file or sys.stdout, flush=True)


def dtype_for(name: str) -> np.dtype:
    """The NumPy dtype called ``name``; ``"bfloat16"`` is ``ml_dtypes.bfloat16``.

    NumPy has no bfloat16 of its own (``np.dtype("bfloat16")`` fails); ml_dtypes adds it.

    Raises
    ------
    UsageError
        For bfloat16 without ml_dtypes, saying how to install it.
    """
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise UsageError('bfloat16 needs ml_dtypes: pip install ml_dtypes '
                             '(or "seqpar[lowp]")') from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def array_module(gpu: bool) -> ModuleType:
    """numpy, or cupy with this rank on the GPU of its node-local rank (round robin)."""
    if not gpu:
        return np
    import cupy

    from .. import use_local_device

    use_local_device()
    return cupy


def rate_unit(largest: float) -> tuple[float, str]:
    """(divisor, name) to show rates up to ``largest`` FLOP/s: TFLOP/s from 1e12 up,
    else GFLOP/s (a CPU's 0.007 TFLOP/s reads better as 7.0 GFLOP/s)."""
    return (1e12, "TFLOP/s") if largest >= 1e12 else (1e9, "GFLOP/s")


def rate_text(flops_per_s: float) -> str:
    """A rate in the unit :func:`rate_unit` picks for it, e.g. ``"6.8 GFLOP/s"``."""
    scale, unit = rate_unit(flops_per_s)
    return f"{flops_per_s / scale:.{2 if scale == 1e12 else 1}f} {unit}"
