"""NCCL from ``cupy.cuda.nccl``, bootstrapped over the mpi4py communicator."""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from ._exchange import Exchange

__all__ = ["NcclTransport"]


class NcclTransport:
    """GPU-to-GPU transfers by NCCL, queued on streams: nothing blocks the host.

    The NCCL communicator is made once per MPI communicator (rank 0's unique id
    is broadcast over MPI) and destroyed when the MPI communicator is freed or the
    process exits (see :mod:`seqpar.transport`). A ring step's send and receive
    run on a stream of their own, ordered after the kernels queued before it by
    an event, and the compute stream waits for the arrival by another event.
    """

    name = "nccl"

    def __init__(self, comm: MPI.Comm, device_id: int):
        import cupy
        from cupy.cuda import nccl

        self.comm = comm
        self.device_id = device_id
        uid = bytearray(128)  # NCCL_UNIQUE_ID_BYTES
        if comm.rank == 0:
            made = nccl.get_unique_id()  # bytes in recent CuPy, a tuple of ints in older
            uid[:] = made if isinstance(made, bytes) else bytes(c & 0xFF for c in made)
        comm.Bcast([uid, MPI.BYTE], root=0)
        with cupy.cuda.Device(device_id):
            try:
                self._nccl = nccl.NcclCommunicator(comm.size, bytes(uid), comm.rank)
            except TypeError:  # older CuPy: signed chars
                signed = tuple(np.frombuffer(bytes(uid), dtype=np.int8).tolist())
                self._nccl = nccl.NcclCommunicator(comm.size, signed, comm.rank)
            self.stream = cupy.cuda.Stream(non_blocking=True)
        self._lib = nccl
        self._byte = next(getattr(nccl, name) for name in ("NCCL_UINT8", "NCCL_INT8", "NCCL_CHAR")
                          if hasattr(nccl, name))
        self._types = {np.dtype(np.float64): nccl.NCCL_FLOAT64,
                       np.dtype(np.float32): nccl.NCCL_FLOAT32,
                       np.dtype(np.float16): nccl.NCCL_FLOAT16}
        self._ops = {"sum": nccl.NCCL_SUM, "max": nccl.NCCL_MAX}

    def exchange(self, after: Exchange | None = None) -> Exchange:
        """An exchange; all exchanges of a transport queue on its one NCCL stream, in
        the order they are started (the same on every rank)."""
        return _NcclExchange(self)

    def allreduce(self, buffer, op: str) -> None:
        """In place, on the current stream."""
        import cupy

        kind = self._types.get(np.dtype(buffer.dtype))
        if kind is None:
            raise TypeError(f"NCCL allreduce of dtype {buffer.dtype} is not supported here")
        self._nccl.allReduce(buffer.data.ptr, buffer.data.ptr, buffer.size, kind, self._ops[op],
                             cupy.cuda.get_current_stream().ptr)

    def alltoall(self, send, recv, send_counts=None, recv_counts=None) -> None:
        """``send[p]`` goes to rank p and ``recv[p]`` comes from it, on the current stream
        (equal parts, or the given byte counts per peer)."""
        import cupy

        stream = cupy.cuda.get_current_stream().ptr
        size = self.comm.size
        if send_counts is None:
            send_counts = [send.nbytes // size] * size
            recv_counts = [recv.nbytes // size] * size
        send_at = np.concatenate([[0], np.cumsum(send_counts)]).tolist()
        recv_at = np.concatenate([[0], np.cumsum(recv_counts)]).tolist()
        byte = self._byte
        self._lib.groupStart()
        try:
            for peer in range(size):
                if send_counts[peer]:
                    self._nccl.send(send.data.ptr + send_at[peer], send_counts[peer], byte,
                                    peer, stream)
                if recv_counts[peer]:
                    self._nccl.recv(recv.data.ptr + recv_at[peer], recv_counts[peer], byte,
                                    peer, stream)
        finally:
            self._lib.groupEnd()

    def sendrecv(self, sends, dest, recvs, source, stream) -> None:
        """Send arrays to ``dest`` and receive arrays from ``source`` (either may be
        None) on ``stream``, in one NCCL group."""
        self._lib.groupStart()
        try:
            for array in sends:
                self._nccl.send(array.data.ptr, array.nbytes, self._byte, dest, stream.ptr)
            for array in recvs:
                self._nccl.recv(array.data.ptr, array.nbytes, self._byte, source, stream.ptr)
        finally:
            self._lib.groupEnd()

    def close(self) -> None:
        """Destroy the NCCL communicator (idempotent)."""
        if self._nccl is not None:
            self._nccl.destroy()
            self._nccl = None


class _NcclExchange(Exchange):
    def __init__(self, transport: NcclTransport):
        import cupy

        super().__init__(transport.comm, True)
        self._transport = transport
        self._arrived = cupy.cuda.Event(block=False, disable_timing=True)

    def _start(self, sends, recvs, dest, source, tag) -> None:
        comm_stream = self._transport.stream
        comm_stream.wait_event(self._ready)  # on the GPU, not on the host
        self._transport.sendrecv(sends, dest, recvs, source, comm_stream)
        self._arrived.record(comm_stream)

    def _wait(self) -> None:
        self._stream.wait_event(self._arrived)
