"""NCCL from ``cupy.cuda.nccl``, bootstrapped over the mpi4py communicator."""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from ._ring import RingExchange

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
        self._types = {np.dtype(np.float32): nccl.NCCL_FLOAT32,
                       np.dtype(np.float16): nccl.NCCL_FLOAT16}
        self._ops = {"sum": nccl.NCCL_SUM, "max": nccl.NCCL_MAX}

    def ring(self, first_block) -> RingExchange:
        return _NcclRing(self, first_block)

    def allreduce(self, buffer, op: str) -> None:
        """In place, on the current stream."""
        import cupy

        kind = self._types.get(np.dtype(buffer.dtype))
        if kind is None:
            raise TypeError(f"NCCL allreduce of dtype {buffer.dtype} is not supported here")
        self._nccl.allReduce(buffer.data.ptr, buffer.data.ptr, buffer.size, kind, self._ops[op],
                             cupy.cuda.get_current_stream().ptr)

    def alltoall(self, send, recv) -> None:
        """``send[p]`` goes to rank p and ``recv[p]`` comes from it, on the current stream."""
        import cupy

        stream = cupy.cuda.get_current_stream().ptr
        part = send.nbytes // self.comm.size
        byte = self._byte
        self._lib.groupStart()
        try:
            for peer in range(self.comm.size):
                self._nccl.send(send.data.ptr + peer * part, part, byte, peer, stream)
                self._nccl.recv(recv.data.ptr + peer * part, part, byte, peer, stream)
        finally:
            self._lib.groupEnd()

    def sendrecv(self, send, recv, next_rank: int, prev_rank: int, stream) -> None:
        """Send ``send`` to ``next_rank`` and receive ``recv`` from ``prev_rank`` on ``stream``."""
        self._lib.groupStart()
        try:
            self._nccl.send(send.data.ptr, send.nbytes, self._byte, next_rank, stream.ptr)
            self._nccl.recv(recv.data.ptr, recv.nbytes, self._byte, prev_rank, stream.ptr)
        finally:
            self._lib.groupEnd()

    def close(self) -> None:
        """Destroy the NCCL communicator (idempotent)."""
        if self._nccl is not None:
            self._nccl.destroy()
            self._nccl = None


class _NcclRing(RingExchange):
    def __init__(self, transport: NcclTransport, first_block):
        import cupy

        super().__init__(transport.comm, first_block)
        self._transport = transport
        self._arrived = cupy.cuda.Event(block=False, disable_timing=True)

    def _start(self, send, recv) -> None:
        comm_stream = self._transport.stream
        comm_stream.wait_event(self._ready)  # on the GPU, not on the host
        self._transport.sendrecv(send, recv, self.next, self.prev, comm_stream)
        self._arrived.record(comm_stream)

    def _wait(self) -> None:
        self._stream.wait_event(self._arrived)
