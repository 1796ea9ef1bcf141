"""Moving buffers between ranks; transports know nothing of attention.

Every transport offers the strategies the same three operations:
``exchange()`` (an :class:`Exchange`: arrays sent and received step by
step, overlapped with compute), ``allreduce(buffer, op)`` in place with op "sum"
or "max", and ``alltoall(send, recv[, send_counts, recv_counts])``. Every buffer
they touch is C-contiguous and owned by the caller or the exchange.

================  ==============================================================
``"host"``        NumPy arrays through mpi4py (the only one for NumPy arrays)
``"nccl"``        CuPy arrays by NCCL (``cupy.cuda.nccl``), its communicator
                  bootstrapped over the MPI one, made once and reused
``"cuda-aware"``  CuPy arrays handed straight to an MPI built with CUDA support
``"staged"``      CuPy arrays through pinned host buffers and any MPI, chunked
                  so that copies overlap the transfer
``"auto"``        NumPy: host. CuPy: nccl where every rank has it and no two ranks
                  share a GPU (NCCL refuses that), else cuda-aware where the MPI
                  says so on every rank, else staged (also on one rank, where
                  nothing crosses)
================  ==============================================================

CUDA-aware MPI is detected with ``MPIX_Query_cuda_support`` (Open MPI) or
``MPIX_GPU_query_support`` (MPICH); ``SEQPAR_CUDA_AWARE_MPI=0`` or ``1`` in the
environment overrides the detection (``1`` on an MPI that cannot read GPU
memory crashes the job, as MPI itself would).

The first GPU call on a communicator gathers these facts from every rank (one
small Allgather) and binds the communicator to this rank's device; what it
builds (NCCL communicator, streams, pinned buffers) is cached with seqpar's
private duplicate of the communicator (:mod:`seqpar.comms`) and released when
the user's communicator is freed or the process exits.
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import os

import numpy as np
from mpi4py import MPI

from ..comms import collective
from ..graphs import capturing
from ._exchange import Exchange
from .mpi import CudaAwareTransport, HostTransport

__all__ = ["TRANSPORTS", "Exchange", "check_transport", "get_transport", "cuda_aware_mpi"]

TRANSPORTS = ("auto", "host", "nccl", "cuda-aware", "staged")


def check_transport(context, name: str, q) -> str:
    """Local check of a ``transport=`` argument for arrays like ``q``; returns ``name``.

    ``context`` is the call's :class:`seqpar.comms.CallContext`. Raises ValueError
    naming the argument; meant to run inside the collective check.
    """
    if name not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {name!r}")
    if isinstance(q, np.ndarray):
        if name not in ("auto", "host"):
            raise ValueError(f"transport {name!r} moves CuPy arrays; NumPy arrays use "
                             "'host' (or 'auto')")
        return name
    if name == "host":
        raise ValueError("transport 'host' moves NumPy arrays; for CuPy arrays use 'auto', "
                         "'nccl', 'cuda-aware' or 'staged'")
    gpu = context.cache.get("gpu")
    if gpu is not None and gpu.device_id != q.device.id:
        raise ValueError(f"q is on device {q.device.id}, but this communicator's transport is "
                         f"bound to device {gpu.device_id} on this rank: use one GPU per "
                         "rank per communicator (or a new communicator, e.g. comm.Dup())")
    if context.comm.size > 1 and capturing(q):
        _check_capturable(gpu, name)
    return name


def _check_capturable(gpu, name: str) -> None:
    """A CUDA graph replays NCCL's transfers only; MPI's run on the host, once."""
    if name not in ("auto", "nccl") or (gpu is not None and (
            not gpu.nccl_everywhere or gpu.gpus_shared)):
        raise ValueError(f"transport {name!r}: a CUDA graph being captured replays NCCL "
                         "transfers only (MPI moves data from the host, once); capture with "
                         "transport 'nccl' (one GPU per rank)")
    if gpu is None or "nccl" not in gpu._transports:
        raise ValueError("transport: the first call over NCCL on a communicator sets NCCL up, "
                         "which a CUDA graph capture cannot hold; make one call with this "
                         "transport before capturing")


def get_transport(context, q, name: str = "auto"):
    """The transport for arrays like ``q`` on the call's communicator; collective on a
    communicator's first GPU call. ``name`` was checked by :func:`check_transport`."""
    if isinstance(q, np.ndarray):
        return HostTransport(context.comm)
    gpu = context.cache.get("gpu")
    if gpu is None:
        gpu = context.cache["gpu"] = _GpuContext(context.comm, q.device.id)
    return gpu.transport(name)


def cuda_aware_mpi() -> bool:
    """Whether the MPI library says it can read and write GPU (CUDA) memory."""
    forced = os.environ.get("SEQPAR_CUDA_AWARE_MPI")
    if forced is not None:
        return forced.strip().lower() in ("1", "true", "yes", "on")
    try:
        library = ctypes.CDLL(MPI.__file__)  # its symbol lookup reaches libmpi
    except OSError:
        return False
    query = getattr(library, "MPIX_Query_cuda_support", None)
    if query is not None:
        query.restype = ctypes.c_int
        return bool(query())
    query = getattr(library, "MPIX_GPU_query_support", None)
    if query is not None:
        supported = ctypes.c_int(0)
        return query(ctypes.c_int(0), ctypes.byref(supported)) == 0 and bool(supported.value)
    return False


class _GpuContext:
    """What one communicator needs for CuPy transfers on this rank's device."""

    def __init__(self, comm: MPI.Comm, device_id: int):
        import cupy

        self.comm = comm
        self.device_id = device_id
        mine = np.array([_nccl_available(), cuda_aware_mpi(),
                         _hash(MPI.Get_processor_name()),
                         _hash(cupy.cuda.Device(device_id).pci_bus_id)], dtype=np.int64)
        everyone = np.empty((comm.size, mine.size), dtype=np.int64)
        comm.Allgather(mine, everyone)
        self.nccl_everywhere = bool(everyone[:, 0].all())
        self.cuda_aware_everywhere = bool(everyone[:, 1].all())
        gpus = {(int(host), int(bus)) for host, bus in everyone[:, 2:]}
        self.gpus_shared = len(gpus) < comm.size
        self._transports: dict[str, object] = {}
        _LIVE.append(self)

    def resolve(self, name: str) -> str:
        """The transport ``name`` means here; the same answer on every rank."""
        if name == "auto":
            if self.comm.size == 1:  # nothing crosses: no NCCL communicator needed
                return "staged"
            if self.nccl_everywhere and not self.gpus_shared:
                return "nccl"
            return "cuda-aware" if self.cuda_aware_everywhere else "staged"
        # decided from what every rank gathered: raised alike on every rank
        if name == "nccl" and not self.nccl_everywhere:
            raise collective(ValueError(
                "transport 'nccl': cupy.cuda.nccl is not available on every rank"))
        if name == "nccl" and self.gpus_shared:
            raise collective(ValueError(
                "transport 'nccl': two ranks share one GPU, which NCCL refuses; use "
                "'staged' or one GPU per rank"))
        return name

    def transport(self, name: str):
        name = self.resolve(name)
        if name not in self._transports:
            if name == "nccl":
                from .nccl import NcclTransport

                self._transports[name] = NcclTransport(self.comm, self.device_id)
            elif name == "staged":
                from .staged import StagedTransport

                self._transports[name] = StagedTransport(self.comm, self.device_id)
            else:
                self._transports[name] = CudaAwareTransport(self.comm)
        return self._transports[name]

    def close(self) -> None:
        for transport in self._transports.values():
            close = getattr(transport, "close", None)
            if close is not None:
                close()
        self._transports.clear()
        if self in _LIVE:
            _LIVE.remove(self)


_LIVE: list[_GpuContext] = []


@atexit.register
def _close_all() -> None:
    # before MPI finalizes and CuPy unloads; idempotent with the communicator's free
    for context in list(_LIVE):
        context.close()
    _LIVE.clear()


def _nccl_available() -> bool:
    try:
        from cupy.cuda import nccl
    except ImportError:
        return False
    return bool(getattr(nccl, "available", False))


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 2
