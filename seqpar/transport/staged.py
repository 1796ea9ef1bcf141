"""MPI staged through pinned host memory: CuPy buffers over any MPI."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
from mpi4py import MPI

from ._ring import RingExchange
from .mpi import MPI_OPS

__all__ = ["StagedTransport"]


class StagedTransport:
    """device -> pinned host -> MPI -> pinned host -> device, for MPIs that cannot
    read GPU memory.

    A ring step moves its block in chunks through two pinned send and two pinned
    receive buffers: while chunk i crosses MPI, chunk i+1 is copied down from the
    device and chunk i-1 up to it, on two copy streams of their own, so PCIe in
    both directions and MPI all work at once.
    """

    name = "staged"
    chunk_bytes = 16 << 20

    def __init__(self, comm: MPI.Comm, device_id: int):
        import cupy

        self.comm = comm
        self.device_id = device_id
        with cupy.cuda.Device(device_id):
            self.down = cupy.cuda.Stream(non_blocking=True)
            self.up = cupy.cuda.Stream(non_blocking=True)
            # "chunk k's upload is done": its pinned receive buffer may be refilled
            self.uploaded = [cupy.cuda.Event(block=False, disable_timing=True) for _ in range(2)]
        self._pinned: tuple[list[np.ndarray], list[np.ndarray]] | None = None

    def pinned(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Two send and two receive buffers of ``chunk_bytes``, allocated once."""
        if self._pinned is None:
            import cupy

            def buffer():
                memory = cupy.cuda.alloc_pinned_memory(self.chunk_bytes)
                return np.frombuffer(memory, np.uint8, self.chunk_bytes)

            self._pinned = ([buffer(), buffer()], [buffer(), buffer()])
        return self._pinned

    def ring(self, first_block) -> RingExchange:
        return _StagedRing(self, first_block)

    def allreduce(self, buffer, op: str) -> None:
        host = buffer.get()  # waits for the current stream
        self.comm.Allreduce(MPI.IN_PLACE, host, op=MPI_OPS[op])
        buffer.set(host)

    def alltoall(self, send, recv) -> None:
        host_send, host_recv = send.get(), np.empty(recv.shape, recv.dtype)
        self.comm.Alltoall([host_send.reshape(-1).view(np.uint8), MPI.BYTE],
                           [host_recv.reshape(-1).view(np.uint8), MPI.BYTE])
        recv.set(host_recv)


class _StagedRing(RingExchange):
    def __init__(self, transport: StagedTransport, first_block):
        import cupy

        super().__init__(transport.comm, first_block)
        self._transport = transport
        self._arrived = cupy.cuda.Event(block=False, disable_timing=True)
        threaded = MPI.Query_thread() >= MPI.THREAD_SERIALIZED and transport.comm.size > 1
        # without MPI threads the transfer runs inside wait(): correct, not overlapped
        self._worker = (ThreadPoolExecutor(1, thread_name_prefix="seqpar-staged")
                        if threaded else None)
        self._job = None

    def _start(self, send, recv) -> None:
        job = partial(self._transfer, send, recv)
        self._job = self._worker.submit(job) if self._worker is not None else job

    def _wait(self) -> None:
        job, self._job = self._job, None
        job.result() if self._worker is not None else job()
        self._stream.wait_event(self._arrived)

    def _finish(self) -> None:
        try:
            if self._job is not None and self._worker is not None:
                self._job.result()
        finally:
            self._job = None
            if self._worker is not None:
                self._worker.shutdown(wait=True)
                self._worker = None

    def _transfer(self, send, recv) -> None:
        import cupy

        runtime = cupy.cuda.runtime
        t = self._transport
        runtime.setDevice(t.device_id)  # the current device is per thread
        chunk, total = t.chunk_bytes, send.nbytes
        offsets = range(0, total, chunk)
        host_send, host_recv = t.pinned()
        downloaded = [cupy.cuda.Event(block=False, disable_timing=True) for _ in range(2)]
        t.down.wait_event(self._ready)
        t.up.wait_event(self._ready)

        def download(i: int) -> None:
            size = min(chunk, total - offsets[i])
            runtime.memcpyAsync(host_send[i % 2].ctypes.data, send.data.ptr + offsets[i], size,
                                runtime.memcpyDeviceToHost, t.down.ptr)
            downloaded[i % 2].record(t.down)

        download(0)
        for i, offset in enumerate(offsets):
            size = min(chunk, total - offset)
            if i + 1 < len(offsets):
                download(i + 1)  # its buffer's last Sendrecv has returned
            downloaded[i % 2].synchronize()
            t.uploaded[i % 2].synchronize()
            self.comm.Sendrecv([host_send[i % 2][:size], MPI.BYTE], self.next, 0,
                               [host_recv[i % 2][:size], MPI.BYTE], self.prev, 0)
            runtime.memcpyAsync(recv.data.ptr + offset, host_recv[i % 2].ctypes.data, size,
                                runtime.memcpyHostToDevice, t.up.ptr)
            t.uploaded[i % 2].record(t.up)
        self._arrived.record(t.up)
