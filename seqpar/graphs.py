"""CUDA graph capture of seqpar's GPU calls.

A seqpar call made while CuPy's current stream is capturing (``stream.begin_capture()``
... ``end_capture()``) records its kernels and NCCL transfers into the graph, as any
CuPy work does; the host work around them (checks, the agreement between ranks, the
kernel choice) runs once, at capture. Three things make the replays right:

* Memory. A replay writes every buffer the call used, long after the call returned,
  and CuPy's pool would hand a freed temporary (a split-K partial, a receive buffer,
  the lse of a call that did not return it) to the next array allocated: the replay
  would then overwrite that array. So everything a captured call allocates comes
  from memory seqpar keeps for the graph, never returned to the pool, until
  :func:`release_graph_memory`.
* Host data. Values that live on the host at capture (``seqlens=`` boundaries) are
  copied from pinned buffers that are kept too; ``key_lengths=`` must be a CuPy array
  when capturing (host values would be frozen into the graph), updated in place
  between replays.
* What cannot be replayed raises at capture, on every rank alike: ``check_finite=True``
  (it reads a result on the host), transfers by MPI (``"staged"``, ``"cuda-aware"``:
  the host moves the data, and a replay would move nothing), and the first NCCL call
  on a communicator (it sets NCCL up). Make one call before capturing, as CUDA graph
  users do anyway to compile and load the kernels.

A graph replays on any stream; two replays of one graph, or a replay and the captured
call's outputs read on another stream, must be ordered by the caller, as for any graph.
"""
from __future__ import annotations

import contextlib
import sys
import threading

import numpy as np

__all__ = ["capturing", "graph_memory", "keep_for_graph", "device_constant", "workspace",
           "release_graph_memory", "graph_memory_bytes"]

_kept: list = []          # what captured calls use: device memory, pinned buffers, arrays
_lock = threading.Lock()


def capturing(x) -> bool:
    """Whether ``x`` is a CuPy array and CuPy's current stream is capturing a graph."""
    module = type(x).__module__
    cupy = sys.modules.get("cupy")
    if cupy is None or (module != "cupy" and not module.startswith("cupy.")):
        return False
    return bool(cupy.cuda.get_current_stream().is_capturing())


def _allocate_kept(size: int):
    import cupy

    pointer = cupy.cuda.MemoryPointer(cupy.cuda.Memory(size), 0)
    with _lock:
        _kept.append(pointer)
    return pointer


_NOT_CAPTURING = contextlib.nullcontext()


def graph_memory(first_argument):
    """A context inside which CuPy arrays allocated by this thread come from kept memory
    when the current stream captures (``first_argument`` says whether this is a GPU
    call); a call's every microsecond counts, so no generator when nothing captures."""
    if not capturing(first_argument):
        return _NOT_CAPTURING
    import cupy

    return cupy.cuda.using_allocator(_allocate_kept)


def keep_for_graph(*objects) -> None:
    """Keep ``objects`` (cached device arrays a captured kernel reads) alive as long as
    the graph memory, whatever becomes of the cache that holds them."""
    with _lock:
        _kept.extend(objects)


def workspace(store: dict, like, make):
    """The buffers ``make()`` returns, made once per CUDA stream (once on the CPU) and
    kept in ``store`` for later calls on arrays like ``like``; while the current stream
    captures a graph, made afresh (from the graph's kept memory): replays write them
    long after the call returned, and a direct call on the stream must not meet them."""
    if type(like).__module__.split(".")[0] != "cupy":
        buffers = store.get(None)
        if buffers is None:
            buffers = store[None] = make()
        return buffers
    import cupy

    stream = cupy.cuda.get_current_stream()
    if stream.is_capturing():
        return make()
    buffers = store.get(stream.ptr)
    if buffers is None:
        if len(store) >= 8:  # streams come and go: keep a few
            store.clear()
        buffers = store[stream.ptr] = make()
    return buffers


def device_constant(values: np.ndarray, device_id: int):
    """``values`` as a CuPy array on ``device_id``; while capturing, copied from a
    pinned host buffer kept with the graph (a replay copies it again)."""
    import cupy

    values = np.ascontiguousarray(values)
    with cupy.cuda.Device(device_id):
        stream = cupy.cuda.get_current_stream()
        if not stream.is_capturing():
            return cupy.asarray(values)
        pinned = cupy.cuda.alloc_pinned_memory(max(values.nbytes, 1))
        host = np.frombuffer(pinned, values.dtype, values.size).reshape(values.shape)
        host[...] = values
        array = cupy.empty(values.shape, values.dtype)
        # the runtime's copy: CuPy's own refuses host copies while capturing, though
        # one from pinned memory that stays is what a graph can replay
        cupy.cuda.runtime.memcpyAsync(array.data.ptr, host.ctypes.data, values.nbytes,
                                      cupy.cuda.runtime.memcpyHostToDevice, stream.ptr)
        keep_for_graph(pinned, host, array)
        return array


def graph_memory_bytes() -> int:
    """Device bytes kept for the graphs captured since the last release."""
    import cupy

    with _lock:
        return sum(p.mem.size for p in _kept if isinstance(p, cupy.cuda.MemoryPointer))


def release_graph_memory() -> None:
    """Free what captured seqpar calls kept. Call it only when no graph that captured a
    seqpar call will be replayed again (a replay after it writes freed memory)."""
    with _lock:
        _kept.clear()
