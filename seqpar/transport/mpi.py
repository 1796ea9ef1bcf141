"""MPI transport: host buffers directly; CuPy buffers staged through host memory."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from mpi4py import MPI

from .._arrays import array_module

__all__ = ["RingExchange", "allreduce", "alltoall"]


class RingExchange:
    """Passes a fixed-size buffer one step around the ring of ``comm``.

    Rank r sends to r+1 and receives from r-1. The protocol makes the overlap of
    communication and compute explicit::

        with RingExchange(comm, first_block) as ring:
            for step in range(comm.size):
                if step + 1 < comm.size:
                    ring.start()       # send ring.current, receive into the spare
                compute(ring.current)  # reading a buffer being sent is allowed
                if step + 1 < comm.size:
                    ring.wait()        # the received block becomes ring.current

    Where MPI allows threads (``MPI.Query_thread() >= THREAD_SERIALIZED``), a
    blocking ``Sendrecv`` runs on a helper thread so that the transfer progresses
    while NumPy computes (MPI progresses non-blocking requests only inside MPI
    calls); otherwise ``Isend``/``Irecv`` are posted and completed in :meth:`wait`.
    CuPy buffers are copied through host memory (synchronously, on the current
    stream) around the transfer.
    """

    def __init__(self, comm: MPI.Comm, first_block):
        self.comm = comm
        self._next = (comm.rank + 1) % comm.size
        self._prev = (comm.rank - 1) % comm.size
        self._xp = array_module(first_block)
        self._blocks = [first_block, self._xp.empty_like(first_block)]
        self._current = 0
        self._host = None
        if self._xp is not np:
            self._host = [np.empty(first_block.shape, first_block.dtype) for _ in range(2)]
        threaded = MPI.Query_thread() >= MPI.THREAD_SERIALIZED and comm.size > 1
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="seqpar-ring") if threaded else None
        self._pending = None
        self._requests: list[MPI.Request] = []

    @property
    def current(self):
        """The block to compute on now."""
        if self._blocks is None:
            raise RuntimeError("RingExchange already freed")
        return self._blocks[self._current]

    def start(self) -> None:
        """Post the transfer of :attr:`current` to the next rank and of the previous
        rank's block into the spare buffer."""
        send = self.current
        recv = self._blocks[1 - self._current]
        if self._host is not None:
            self._host[0][...] = send.get()
            send, recv = self._host
        send_buf, recv_buf = [_as_bytes(send), MPI.BYTE], [_as_bytes(recv), MPI.BYTE]
        if self._worker is not None:
            self._pending = self._worker.submit(
                self.comm.Sendrecv, send_buf, self._next, 0, recv_buf, self._prev, 0)
        else:
            self._requests = [self.comm.Irecv(recv_buf, self._prev, 0),
                              self.comm.Isend(send_buf, self._next, 0)]

    def wait(self) -> None:
        """Complete the transfer; the received block becomes :attr:`current`."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
        else:
            MPI.Request.Waitall(self._requests)
            self._requests = []
        self._current = 1 - self._current
        if self._host is not None:
            self._blocks[self._current].set(self._host[1])

    def free(self) -> None:
        """Finish any transfer in flight and release the buffers and the helper thread."""
        if self._blocks is None:
            return
        try:
            if self._pending is not None:
                self._pending.result()
            if self._requests:
                MPI.Request.Waitall(self._requests)
        finally:
            if self._worker is not None:
                self._worker.shutdown(wait=True)
            self._blocks = self._host = self._worker = self._pending = None
            self._requests = []

    def __enter__(self) -> "RingExchange":
        return self

    def __exit__(self, *exc) -> None:
        self.free()


def allreduce(comm: MPI.Comm, buffer, op: MPI.Op) -> None:
    """In-place Allreduce of a NumPy or CuPy buffer (CuPy staged through host memory)."""
    if isinstance(buffer, np.ndarray):
        comm.Allreduce(MPI.IN_PLACE, buffer, op=op)
        return
    host = buffer.get()
    comm.Allreduce(MPI.IN_PLACE, host, op=op)
    buffer.set(host)


def alltoall(comm: MPI.Comm, send, recv) -> None:
    """Alltoall of equal blocks: ``send[p]`` goes to rank p, ``recv[p]`` comes from it.

    NumPy or CuPy buffers of shape (P, ...), contiguous (CuPy staged through host memory).
    """
    if isinstance(send, np.ndarray):
        comm.Alltoall([_as_bytes(send), MPI.BYTE], [_as_bytes(recv), MPI.BYTE])
        return
    host_send, host_recv = send.get(), np.empty(recv.shape, recv.dtype)
    comm.Alltoall([_as_bytes(host_send), MPI.BYTE], [_as_bytes(host_recv), MPI.BYTE])
    recv.set(host_recv)


def _as_bytes(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1).view(np.uint8)
