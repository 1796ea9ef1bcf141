"""The ring-exchange protocol every transport implements."""
from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

__all__ = ["RingExchange"]


class RingExchange:
    """Passes a fixed-size block one step around the ring of ``comm``.

    Rank r sends to r+1 and receives from r-1, into a second buffer, so that the
    transfer of the next block overlaps the compute on the current one::

        with transport.ring(first_block) as ring:
            for step in range(comm.size):
                if step + 1 < comm.size:
                    ring.start()       # send ring.current, receive into the spare
                compute(ring.current)  # reading a block being sent is allowed
                if step + 1 < comm.size:
                    ring.wait()        # the received block becomes ring.current

    For CuPy blocks, "compute" means work queued on the stream that was current
    when the exchange was made; :meth:`wait` makes that stream wait for the
    arrival without blocking the host where the transport allows it.
    Subclasses provide ``_start(send, recv)``, ``_wait()`` and ``_finish()``.
    """

    def __init__(self, comm: MPI.Comm, first_block):
        self.comm = comm
        self.next = (comm.rank + 1) % comm.size
        self.prev = (comm.rank - 1) % comm.size
        self._blocks = [first_block, None]  # the spare is made on the first start()
        self.nbytes = first_block.nbytes  # sent per step
        self._current = 0
        self._stream = None  # the compute stream, for CuPy blocks
        if not isinstance(first_block, np.ndarray):
            import cupy

            self._stream = cupy.cuda.get_current_stream()
            # recorded by start(): the block to send and the spare to overwrite are
            # final once the kernels queued before it are done
            self._ready = cupy.cuda.Event(block=False, disable_timing=True)
        self._exposed: list = []

    @property
    def current(self):
        """The block to compute on now."""
        if self._blocks is None:
            raise RuntimeError("the ring exchange is already freed")
        return self._blocks[self._current]

    def start(self) -> None:
        """Post the transfer of :attr:`current` to the next rank and of the previous
        rank's block into the spare buffer."""
        spare = 1 - self._current
        if self._blocks[spare] is None:
            self._blocks[spare] = _empty_like(self.current)
        if self._stream is not None:
            self._ready.record(self._stream)
        self._start(self.current, self._blocks[spare])

    def wait(self) -> None:
        """Complete the transfer; the received block becomes :attr:`current`."""
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
        self._current = 1 - self._current

    def exposed_seconds(self) -> list[float]:
        """Per completed step, how long compute waited for the transfer.

        On the host, the time spent in :meth:`wait`; for CuPy blocks, the time the
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
        """Finish any transfer in flight and release the buffers."""
        if self._blocks is None:
            return
        try:
            self._finish()
        finally:
            self._blocks = None

    def __enter__(self) -> "RingExchange":
        return self

    def __exit__(self, *exc) -> None:
        self.free()

    def _start(self, send, recv) -> None:
        raise NotImplementedError

    def _wait(self) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        pass


def _empty_like(block):
    if isinstance(block, np.ndarray):
        return np.empty_like(block)
    import cupy

    return cupy.empty_like(block)
