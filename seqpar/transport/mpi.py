"""MPI transports: host (NumPy) buffers, and CuPy buffers handed to a CUDA-aware MPI."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from mpi4py import MPI

from ..comms import complete
from ._exchange import Exchange, as_bytes

__all__ = ["HostTransport", "CudaAwareTransport", "MPI_OPS", "alltoallv_bytes"]

MPI_OPS = {"sum": MPI.SUM, "max": MPI.MAX}


def alltoallv_bytes(comm: MPI.Comm, send, send_counts, recv, recv_counts) -> None:
    """Alltoallv of contiguous host buffers, counts in bytes per peer."""
    complete(comm.Ialltoallv([as_bytes(send), (list(send_counts), None), MPI.BYTE],
                             [as_bytes(recv), (list(recv_counts), None), MPI.BYTE]))


class HostTransport:
    """NumPy buffers through mpi4py's buffer interface (what the CPU path uses)."""

    name = "host"

    def __init__(self, comm: MPI.Comm):
        self.comm = comm

    def exchange(self, after: Exchange | None = None) -> Exchange:
        """An exchange; with ``after``, its transfers queue behind that exchange's on
        the same helper thread (two exchanges never call MPI at the same time)."""
        return _MpiExchange(self.comm, self.name != "host", after)

    def allreduce(self, buffer, op: str) -> None:
        """In-place Allreduce of a contiguous buffer; ``op`` is "sum" or "max"."""
        complete(self.comm.Iallreduce(MPI.IN_PLACE, buffer, op=MPI_OPS[op]))

    def alltoall(self, send, recv, send_counts=None, recv_counts=None) -> None:
        """``send[p]`` goes to rank p and ``recv[p]`` comes from it (contiguous; equal
        parts, or the given byte counts per peer)."""
        if send_counts is None:
            complete(self.comm.Ialltoall([as_bytes(send), MPI.BYTE],
                                         [as_bytes(recv), MPI.BYTE]))
        else:
            alltoallv_bytes(self.comm, send, send_counts, recv, recv_counts)


class CudaAwareTransport(HostTransport):
    """CuPy buffers handed straight to an MPI built with CUDA support.

    MPI reads device memory from the host's point of view, so each call first
    waits for the work queued on the current stream to finish (the exchange waits
    on a helper thread, not on the thread that queues kernels).
    """

    name = "cuda-aware"

    def allreduce(self, buffer, op: str) -> None:
        _current_stream().synchronize()
        super().allreduce(buffer, op)

    def alltoall(self, send, recv, send_counts=None, recv_counts=None) -> None:
        _current_stream().synchronize()
        super().alltoall(send, recv, send_counts, recv_counts)


class _MpiExchange(Exchange):
    """Sendrecv of whole arrays, NumPy or (CUDA-aware MPI) CuPy.

    Where MPI allows threads (``THREAD_SERIALIZED`` or better) a helper thread posts
    each pair and completes it, so the transfer progresses while the caller computes
    (MPI progresses non-blocking requests only inside MPI calls); otherwise
    ``Isend``/``Irecv`` are posted and completed in :meth:`wait`. Either way requests
    are completed by polling between short sleeps (:func:`seqpar.comms.complete`), so
    a rank that waits leaves its cores to ranks that compute.
    """

    def __init__(self, comm: MPI.Comm, gpu: bool, after: "_MpiExchange | None" = None):
        super().__init__(comm, gpu)
        threaded = MPI.Query_thread() >= MPI.THREAD_SERIALIZED and comm.size > 1
        self._owns_worker = after is None
        if after is not None:
            self._worker = after._worker
        else:
            self._worker = (ThreadPoolExecutor(1, thread_name_prefix="seqpar-xchg")
                            if threaded else None)
        self._pending = None
        self._requests: list[MPI.Request] = []

    def _start(self, sends, recvs, dest, source, tag) -> None:
        dest = MPI.PROC_NULL if dest is None else dest
        source = MPI.PROC_NULL if source is None else source
        pairs = [([as_bytes(s), MPI.BYTE] if s is not None else None,
                  [as_bytes(r), MPI.BYTE] if r is not None else None)
                 for s, r in _zip_longest(sends, recvs)]
        if self._worker is not None:
            self._pending = self._worker.submit(self._sendrecv, pairs, dest, source, tag)
            return
        if self._stream is not None:  # MPI reads device memory from the host
            self._ready.synchronize()
        for send, recv in pairs:
            if recv is not None:
                self._requests.append(self.comm.Irecv(recv, source, tag))
            if send is not None:
                self._requests.append(self.comm.Isend(send, dest, tag))

    def _sendrecv(self, pairs, dest, source, tag) -> None:
        if self._stream is not None:
            self._ready.synchronize()
        requests = []
        for send, recv in pairs:  # one pair at a time, as a Sendrecv would
            if recv is not None:
                requests.append(self.comm.Irecv(recv, source, tag))
            if send is not None:
                requests.append(self.comm.Isend(send, dest, tag))
            complete(requests)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
        else:
            complete(self._requests)
            self._requests = []

    def _finish(self) -> None:
        try:
            if self._pending is not None:
                self._pending.result()
            if self._requests:
                MPI.Request.Waitall(self._requests)
        finally:
            if self._worker is not None and self._owns_worker:
                self._worker.shutdown(wait=True)
            self._worker = self._pending = None
            self._requests = []


def _zip_longest(sends, recvs):
    n = max(len(sends), len(recvs))
    return [(sends[i] if i < len(sends) else None, recvs[i] if i < len(recvs) else None)
            for i in range(n)]


def _current_stream():
    import cupy

    return cupy.cuda.get_current_stream()
