"""MPI staged through pinned host memory: CuPy buffers over any MPI."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
from mpi4py import MPI

from ._exchange import Exchange
from .mpi import MPI_OPS, alltoallv_bytes

__all__ = ["StagedTransport"]


class StagedTransport:
    """device -> pinned host -> MPI -> pinned host -> device, for MPIs that cannot
    read GPU memory.

    An exchange step moves its arrays in chunks through two pinned send and two
    pinned receive buffers: while chunk i crosses MPI, chunk i+1 is copied down
    from the device and chunk i-1 up to it, on two copy streams of their own, so
    PCIe in both directions and MPI all work at once.
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

    def exchange(self, after: Exchange | None = None) -> Exchange:
        """An exchange; with ``after``, its transfers queue behind that exchange's on
        the same helper thread (they share the pinned buffers and copy streams)."""
        return _StagedExchange(self, after)

    def allreduce(self, buffer, op: str) -> None:
        if self.comm.size == 1:  # nothing to add: no round trip through the host
            return
        host = buffer.get()  # waits for the current stream
        self.comm.Allreduce(MPI.IN_PLACE, host, op=MPI_OPS[op])
        buffer.set(host)

    def alltoall(self, send, recv, send_counts=None, recv_counts=None) -> None:
        if self.comm.size == 1:
            count = send.nbytes if send_counts is None else send_counts[0]
            recv.reshape(-1).view("u1")[:count] = send.reshape(-1).view("u1")[:count]
            return
        host_send, host_recv = send.get(), np.empty(recv.shape, recv.dtype)
        if send_counts is None:
            self.comm.Alltoall([host_send.reshape(-1).view(np.uint8), MPI.BYTE],
                               [host_recv.reshape(-1).view(np.uint8), MPI.BYTE])
        else:
            alltoallv_bytes(self.comm, host_send, send_counts, host_recv, recv_counts)
        recv.set(host_recv)


class _StagedExchange(Exchange):
    def __init__(self, transport: StagedTransport, after=None):
        import cupy

        super().__init__(transport.comm, True)
        self._transport = transport
        self._arrived = cupy.cuda.Event(block=False, disable_timing=True)
        threaded = MPI.Query_thread() >= MPI.THREAD_SERIALIZED and transport.comm.size > 1
        # without MPI threads the transfer runs inside wait(): correct, not overlapped
        self._owns_worker = after is None
        self._worker = after._worker if after is not None else (
            ThreadPoolExecutor(1, thread_name_prefix="seqpar-staged") if threaded else None)
        self._job = None

    def _start(self, sends, recvs, dest, source, tag) -> None:
        job = partial(self._transfer, sends, recvs, dest, source, tag)
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
            if self._worker is not None and self._owns_worker:
                self._worker.shutdown(wait=True)
            self._worker = None

    def _transfer(self, sends, recvs, dest, source, tag) -> None:
        """All arrays of one step, chunk by chunk; the chunks of one array on either
        side are matched in order (the peer computes the same counts)."""
        import cupy

        runtime = cupy.cuda.runtime
        t = self._transport
        runtime.setDevice(t.device_id)  # the current device is per thread
        chunk = t.chunk_bytes
        out_pieces = [(a, off, min(chunk, a.nbytes - off))
                      for a in sends for off in range(0, a.nbytes, chunk)]
        in_pieces = [(a, off, min(chunk, a.nbytes - off))
                     for a in recvs for off in range(0, a.nbytes, chunk)]
        host_send, host_recv = t.pinned()
        downloaded = [cupy.cuda.Event(block=False, disable_timing=True) for _ in range(2)]
        t.down.wait_event(self._ready)
        t.up.wait_event(self._ready)

        def download(i: int) -> None:
            array, offset, size = out_pieces[i]
            runtime.memcpyAsync(host_send[i % 2].ctypes.data, array.data.ptr + offset, size,
                                runtime.memcpyDeviceToHost, t.down.ptr)
            downloaded[i % 2].record(t.down)

        if out_pieces:
            download(0)
        for i in range(max(len(out_pieces), len(in_pieces))):
            if i + 1 < len(out_pieces):
                download(i + 1)  # its buffer's last Sendrecv has returned
            send = [MPI.BOTTOM, 0, MPI.BYTE]
            send_to = MPI.PROC_NULL
            if i < len(out_pieces):
                downloaded[i % 2].synchronize()
                send, send_to = [host_send[i % 2][:out_pieces[i][2]], MPI.BYTE], dest
            recv = [MPI.BOTTOM, 0, MPI.BYTE]
            recv_from = MPI.PROC_NULL
            if i < len(in_pieces):
                t.uploaded[i % 2].synchronize()
                recv, recv_from = [host_recv[i % 2][:in_pieces[i][2]], MPI.BYTE], source
            self.comm.Sendrecv(send, send_to, tag, recv, recv_from, tag)
            if i < len(in_pieces):
                array, offset, size = in_pieces[i]
                runtime.memcpyAsync(array.data.ptr + offset, host_recv[i % 2].ctypes.data, size,
                                    runtime.memcpyHostToDevice, t.up.ptr)
                t.uploaded[i % 2].record(t.up)
        self._arrived.record(t.up)
