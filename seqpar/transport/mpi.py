"""MPI transports: host (NumPy) buffers, and CuPy buffers handed to a CUDA-aware MPI."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from mpi4py import MPI

from ._ring import RingExchange

__all__ = ["HostTransport", "CudaAwareTransport", "MPI_OPS"]

MPI_OPS = {"sum": MPI.SUM, "max": MPI.MAX}


class HostTransport:
    """NumPy buffers through mpi4py's buffer interface (what the CPU path uses)."""

    name = "host"

    def __init__(self, comm: MPI.Comm):
        self.comm = comm

    def ring(self, first_block) -> RingExchange:
        return _MpiRing(self.comm, first_block)

    def allreduce(self, buffer, op: str) -> None:
        """In-place Allreduce; ``op`` is "sum" or "max"."""
        self.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI_OPS[op])

    def alltoall(self, send, recv) -> None:
        """``send[p]`` goes to rank p and ``recv[p]`` comes from it (contiguous, shape (P, ...))."""
        self.comm.Alltoall([_as_bytes(send), MPI.BYTE], [_as_bytes(recv), MPI.BYTE])


class CudaAwareTransport(HostTransport):
    """CuPy buffers handed straight to an MPI built with CUDA support.

    MPI reads device memory from the host's point of view, so each call first
    waits for the work queued on the current stream to finish (the ring waits on a
    helper thread, not on the thread that queues kernels).
    """

    name = "cuda-aware"

    def allreduce(self, buffer, op: str) -> None:
        _current_stream().synchronize()
        self.comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI_OPS[op])

    def alltoall(self, send, recv) -> None:
        _current_stream().synchronize()
        self.comm.Alltoall([_as_bytes(send), MPI.BYTE], [_as_bytes(recv), MPI.BYTE])


class _MpiRing(RingExchange):
    """Sendrecv of whole blocks, NumPy or (CUDA-aware MPI) CuPy.

    Where MPI allows threads (``THREAD_SERIALIZED`` or better) a blocking
    ``Sendrecv`` runs on a helper thread, so the transfer progresses while the
    caller computes (MPI progresses non-blocking requests only inside MPI calls);
    otherwise ``Isend``/``Irecv`` are posted and completed in :meth:`wait`.
    """

    def __init__(self, comm: MPI.Comm, first_block):
        super().__init__(comm, first_block)
        threaded = MPI.Query_thread() >= MPI.THREAD_SERIALIZED and comm.size > 1
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="seqpar-ring") if threaded else None
        self._pending = None
        self._requests: list[MPI.Request] = []

    def _start(self, send, recv) -> None:
        send_buf, recv_buf = [_as_bytes(send), MPI.BYTE], [_as_bytes(recv), MPI.BYTE]
        if self._worker is not None:
            self._pending = self._worker.submit(self._sendrecv, send_buf, recv_buf)
        else:
            if self._stream is not None:  # MPI reads device memory from the host
                self._ready.synchronize()
            self._requests = [self.comm.Irecv(recv_buf, self.prev, 0),
                              self.comm.Isend(send_buf, self.next, 0)]

    def _sendrecv(self, send_buf, recv_buf) -> None:
        if self._stream is not None:
            self._ready.synchronize()
        self.comm.Sendrecv(send_buf, self.next, 0, recv_buf, self.prev, 0)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
        else:
            MPI.Request.Waitall(self._requests)
            self._requests = []

    def _finish(self) -> None:
        try:
            if self._pending is not None:
                self._pending.result()
            if self._requests:
                MPI.Request.Waitall(self._requests)
        finally:
            if self._worker is not None:
                self._worker.shutdown(wait=True)
            self._worker = self._pending = None
            self._requests = []


def _current_stream():
    import cupy

    return cupy.cuda.get_current_stream()


def _as_bytes(a):
    return a.reshape(-1).view(np.uint8)

