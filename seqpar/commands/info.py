"""``seqpar info``: what seqpar runs on, printed by rank 0."""
from __future__ import annotations

import ctypes
import importlib.util
import shutil
import os
import sys
from importlib import metadata

import numpy as np
from mpi4py import MPI

from ..launch import LaunchError, find_mpiexec
from ._common import say

__all__ = ["info"]


def info(args) -> int:
    """Print versions, the MPI library and mpiexec, thread level, GPUs and extras."""
    from .. import __version__

    comm = MPI.COMM_WORLD
    if comm.rank != 0:
        comm.Barrier()
        return 0
    levels = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled",
              MPI.THREAD_SERIALIZED: "serialized", MPI.THREAD_MULTIPLE: "multiple"}
    library = " ".join(MPI.Get_library_version().strip("\x00 \n").splitlines()[0].split())
    lines = [f"seqpar {__version__} (Python {sys.version.split()[0]}, {sys.executable})",
             f"numpy {np.__version__}, mpi4py {_version('mpi4py')}",
             f"MPI library: {library}",
             f"mpiexec: {_mpiexec(library)}",
             f"ranks: {comm.size}, thread level: {levels.get(MPI.Query_thread(), '?')}"
             + _srun_mismatch(comm.size),
             f"GPU: {_gpu()}",
             f"CUDA-aware MPI: {_cuda_aware()}",
             f"bfloat16: {_extra('ml_dtypes', 'lowp')}",
             f"progress bars: {_extra('tqdm', 'progress')}",
             f"figures (bench --plot): {_extra('matplotlib', 'plot')}"]
    say(*lines, comm=comm)
    comm.Barrier()
    return 0


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def _mpiexec(library: str) -> str:
    """The mpiexec jobs would start with, and whether it is the MPI that mpi4py loads."""
    try:
        found = find_mpiexec()
    except LaunchError as exc:
        return f"none ({exc})"
    text = f"{shutil.which(found.path) or found.path} ({found.version})"
    loaded = "openmpi" if "open mpi" in library.lower() else (
        "mpich" if "mpich" in library.lower() else "other")
    if "other" not in (loaded, found.flavor) and loaded != found.flavor:
        text += (f"; WARNING: mpi4py loads {loaded} but this mpiexec is {found.flavor}: "
                 "each rank would run alone")
    return text


def _srun_mismatch(size: int) -> str:
    """srun with the wrong --mpi= starts every task as a job of one rank."""
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "0") or 0)
    if "SLURM_PROCID" in os.environ and tasks > size:
        return (f"; WARNING: srun started {tasks} tasks but MPI sees {size}: srun's --mpi= must "
                "match the MPI (pmix for Open MPI, pmi2 for MPICH)")
    return ""


def _gpu() -> str:
    try:
        import cupy
        from cupy.cuda import nccl

        return (f"cupy {cupy.__version__}, {cupy.cuda.runtime.getDeviceCount()} device(s), "
                f"NCCL {'yes' if getattr(nccl, 'available', False) else 'no'}")
    except Exception as exc:  # noqa: BLE001 - no CuPy, or no driver: say which
        return f"none ({type(exc).__name__}: {exc})".splitlines()[0]


def _cuda_aware() -> str:
    """What the MPI library says of GPU buffers (MPIX_Query_cuda_support, an extension)."""
    override = os.environ.get("SEQPAR_CUDA_AWARE_MPI", "").strip()
    try:
        query = getattr(ctypes.CDLL(MPI.__file__), "MPIX_Query_cuda_support", None)
    except OSError:
        query = None
    if query is None:
        said = "no (the MPI library has no MPIX_Query_cuda_support)"
    else:
        query.restype = ctypes.c_int
        said = "yes" if query() else "no"
    return said + (f"; SEQPAR_CUDA_AWARE_MPI={override} overrides" if override else "")


def _extra(module: str, extra: str) -> str:
    # find_spec, not import: matplotlib alone takes a second to import
    if importlib.util.find_spec(module) is None:
        return f'no (pip install "seqpar[{extra}]")'
    return f"{module} {_version(module)}"
