"""The step-by-step block exchange every transport implements.

At each step a rank may send arrays to one rank and receive arrays from another
(either may be absent: ``None``). The transfer of the next step overlaps the
compute on the current one; the caller receives into buffers it owns (two sets,
used in turn), never into its inputs::

    with transport.exchange() as exchange:
        for i, step in enumerate(steps):
            if i + 1 < len(steps):
                exchange.start(sends, dest, source, receive_views_of_the_other_set)
            compute(blocks_of_step_i)       # reading arrays being sent is allowed
            blocks = exchange.wait()        # step i+1's arrivals

For CuPy arrays, "compute" means work queued on the stream that was current when
the exchange was made; :meth:`wait` makes that stream wait for the arrival
without blocking the host where the transport allows it.
Subclasses provide ``_start(sends, recvs, dest, source, tag)``, ``_wait()`` and
``_finish()``. Every array sent or received is C-contiguous: MPI and NCCL see
the very memory the caller and the compute read, never a temporary copy.
"""
from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

__all__ = ["Exchange", "as_bytes"]


def as_bytes(a):
    """A flat uint8 view of a C-contiguous array (never a copy)."""
    if not a.flags.c_contiguous:
        raise ValueError("internal error: a buffer handed to a transport must be C-contiguous")
    return a.reshape(-1).view(np.uint8)


class Exchange:
    """Arrays passed between ranks step by step, one step in flight at a time.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
    gpu : bool
        The arrays are CuPy arrays (ordered on the current stream by events).
    """

    def __init__(self, comm: MPI.Comm, gpu: bool = False):
        self.comm = comm
        self._received: list = []
        self._in_flight = False
        self._open = True
        self._stream = None  # the compute stream, for CuPy arrays
        self.nbytes = 0      # sent by this rank over all steps
        self.steps = 0       # transfers this rank took part in
        if gpu:
            import cupy

            self._stream = cupy.cuda.get_current_stream()
            # recorded by start(): the arrays to send and the buffers to overwrite are
            # final once the kernels queued before it are done
            self._ready = cupy.cuda.Event(block=False, disable_timing=True)
        self._exposed: list = []

    def start(self, sends, dest: int | None, source: int | None, recvs, tag: int = 0) -> None:
        """Post one step: ``sends`` (contiguous arrays) to rank ``dest``, ``recvs``
        (contiguous arrays, filled in order) from rank ``source``; either rank may be
        None (then its arrays are ignored)."""
        if not self._open:
            raise RuntimeError("the exchange is already freed")
        assert not self._in_flight, "one step at a time"
        sends = list(sends) if dest is not None else []
        recvs = list(recvs) if source is not None else []
        if self._stream is not None:
            self._ready.record(self._stream)
        self._start(sends, recvs, dest, source, tag)
        self._received = recvs
        self._in_flight = True
        self.nbytes += sum(a.nbytes for a in sends)
        self.steps += 1

    def wait(self) -> list:
        """Complete the step in flight; returns the received arrays ([] if none)."""
        if self._stream is None:
            begin = time.perf_counter()
            self._wait()
            self._exposed.append(time.perf_counter() - begin)
        else:
            import cupy

            before, after = (cupy.cuda.Event() for _ in range(2))
            before.record(self._stream)
            self._wait()
            after.record(self._stream)
            self._exposed.append((before, after))
        self._in_flight = False
        received, self._received = self._received, []
        return received

    def exposed_seconds(self) -> list[float]:
        """Per completed step, how long compute waited for the transfer.

        On the host, the time spent in :meth:`wait`; for CuPy buffers, the time the
        compute stream stood still between its last kernel and the arrival (this
        synchronises with the stream, so call it after the work, not inside it).
        """
        if self._stream is None:
            return list(self._exposed)
        import cupy

        if self._exposed:
            self._exposed[-1][1].synchronize()
        return [cupy.cuda.get_elapsed_time(a, b) / 1e3 for a, b in self._exposed]

    def free(self) -> None:
        """Finish any transfer in flight."""
        if not self._open:
            return
        try:
            self._finish()
        finally:
            self._open = False

    def __enter__(self) -> "Exchange":
        return self

    def __exit__(self, *exc) -> None:
        self.free()

    def _start(self, sends, recvs, dest, source, tag) -> None:
        raise NotImplementedError

    def _wait(self) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        pass
