"""Which global tokens a rank holds; shard and gather between global and local arrays.

``contiguous``: rank r holds one run of tokens, after those of ranks < r; ranks may
hold different numbers of tokens (0 included). ``zigzag``: the sequence is cut
into 2P equal chunks and rank r holds chunks r and 2P-1-r, which balances causal
work; it needs equal chunks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import comms
from ._interop import accepts_dlpack, raise_unconvertible
from ._arrays import array_module, native
from ._typing import Array, Comm
from .validation import agree

__all__ = ["LAYOUTS", "Placement", "segments", "split_lengths", "local_indices", "shard", "gather"]

LAYOUTS = ("contiguous", "zigzag")


def segments(layout: str, lengths: Sequence[int], rank: int) -> list[tuple[int, int]]:
    """(global start, length) of each run of rank ``rank``'s tokens, in local order.

    ``lengths[r]`` is the number of tokens rank r holds (all equal and even for
    zigzag).
    """
    if layout == "contiguous":
        return [(int(sum(lengths[:rank])), int(lengths[rank]))]
    half = int(lengths[rank]) // 2
    size = len(lengths)
    return [(rank * half, half), ((2 * size - 1 - rank) * half, half)]


@dataclass(frozen=True)
class Placement:
    """The global positions of every rank's tokens: per rank, its (start, length) runs
    in local order."""

    runs: tuple

    @classmethod
    def of(cls, layout: str, lengths: Sequence[int]) -> "Placement":
        return cls(tuple(tuple(segments(layout, lengths, r)) for r in range(len(lengths))))

    @classmethod
    def grouped(cls, placement: "Placement", group: int) -> "Placement":
        """Ranks g*group .. (g+1)*group - 1 taken together as rank g, in rank order."""
        runs = placement.runs
        return cls(tuple(sum(runs[g * group:(g + 1) * group], ())
                         for g in range(len(runs) // group)))

    def segments(self, rank: int) -> list[tuple[int, int]]:
        return list(self.runs[rank])

    def length(self, rank: int) -> int:
        return sum(n for _, n in self.runs[rank])

    @property
    def size(self) -> int:
        return len(self.runs)


def split_lengths(n: int, size: int) -> list[int]:
    """Tokens per rank when ``n`` tokens are split as evenly as possible (the first
    ``n % size`` ranks hold one more)."""
    return [n // size + (r < n % size) for r in range(size)]


def _lengths_for(n: int, size: int, layout: str, lengths) -> list[int]:
    """Per-rank lengths: given (checked), or the even split of the layout."""
    if lengths is not None:
        lengths = [int(x) for x in lengths]
        if len(lengths) != size or min(lengths) < 0 or sum(lengths) != n:
            raise ValueError(f"lengths must give a count >= 0 for each of the {size} ranks "
                             f"summing to {n}, got {lengths}")
        if layout == "zigzag" and (len(set(lengths)) != 1 or lengths[0] % 2):
            raise ValueError(f"zigzag layout needs equal, even lengths, got {lengths}")
        return lengths
    if layout == "zigzag":
        if n % (2 * size):
            raise ValueError(f"length {n} is not divisible by 2P = {2 * size} "
                             f"(zigzag layout over {size} ranks)")
        return [n // size] * size
    return split_lengths(n, size)


def local_indices(n: int, comm: Comm | None = None, layout: str = "contiguous",
                  lengths: Sequence[int] | None = None) -> np.ndarray:
    """The global positions of the tokens this rank holds, in local order.

    Build only your slice of the data from them, e.g. ``x = data[:, idx]`` on a
    memory-mapped file. Not collective.

    Parameters
    ----------
    n : int
        Global sequence length.
    comm : mpi4py.MPI.Comm, optional
        Defaults to ``MPI.COMM_WORLD``.
    layout : {"contiguous", "zigzag"}
    lengths : sequence of int, optional
        Tokens per rank (contiguous layout); by default as even as possible.

    Returns
    -------
    numpy.ndarray of int64, shape (local length,)
    """
    comm = comms.resolve_comm(comm)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    per_rank = _lengths_for(int(n), comm.size, layout, lengths)
    runs = segments(layout, per_rank, comm.rank)
    return np.concatenate([np.arange(start, start + length, dtype=np.int64)
                           for start, length in runs])


@accepts_dlpack("x")
def shard(x: Array, comm: Comm | None = None, layout: str = "contiguous", axis: int = 1,
          lengths: Sequence[int] | None = None, *, tag: int | None = None) -> Array:
    """This rank's slice of a global array that every rank holds.

    Parameters
    ----------
    x : numpy.ndarray or cupy.ndarray
        The global array, the same shape on every rank.
    comm : mpi4py.MPI.Comm, optional
        Defaults to ``MPI.COMM_WORLD``.
    layout : {"contiguous", "zigzag"}
    axis : int
        The sequence axis (1 for (batch, seq, heads, head_dim)).
    lengths : sequence of int, optional
        Tokens per rank (contiguous layout); by default as even as possible
        (zigzag: ``x.shape[axis]`` must be divisible by 2P).
    tag : int, optional
        Pairs this call only with calls of the same tag (0 to 32767) on the other
        ranks; needed for calls from threads other than the main thread, which run
        in a different order on each rank (see :mod:`seqpar.comms`).

    Returns
    -------
    A new C-contiguous array holding this rank's tokens along ``axis``.
    """
    with comms.call(comm, "shard", tag) as context:
        comm = context.comm

        def check():
            _check_layout_args(x, layout, axis)
            n = x.shape[axis]
            if layout == "zigzag" and lengths is None and n % (2 * comm.size):
                raise ValueError(f"x: length {n} along axis {axis} is not divisible by "
                                 f"{2 * comm.size} (zigzag layout over {comm.size} ranks)")
            per_rank = _lengths_for(n, comm.size, layout, lengths)
            return dict(_settings(x, layout, axis), lengths=per_rank)

        per_rank = agree(comm, "shard", check, _AGREE + ("lengths",)).settings["lengths"]
    xp = array_module(x)
    pieces = [_take(x, start, start + n, axis) for start, n in segments(layout, per_rank,
                                                                         comm.rank)]
    return xp.ascontiguousarray(xp.concatenate(pieces, axis=axis))


@accepts_dlpack("x")
def gather(x: Array, comm: Comm | None = None, layout: str = "contiguous", axis: int = 1, *,
           tag: int | None = None) -> Array:
    """The global array, on every rank, from each rank's slice (inverse of :func:`shard`).

    Parameters
    ----------
    x : numpy.ndarray or cupy.ndarray
        This rank's slice; the same shape but for ``axis`` on every rank (which
        may differ in length with the contiguous layout).
    comm, layout, axis, tag : as for :func:`shard`.

    Returns
    -------
    An array of x's type and dtype holding every rank's tokens along ``axis``.
    """
    with comms.call(comm, "gather", tag) as context:
        comm = context.comm

        def check():
            _check_layout_args(x, layout, axis)
            if layout == "zigzag" and x.shape[axis] % 2:
                raise ValueError(f"x: zigzag layout needs an even local length along axis "
                                 f"{axis}, got {x.shape[axis]}")
            other = tuple(n for i, n in enumerate(x.shape) if i != axis % x.ndim)
            return dict(_settings(x, layout, axis), shape=other, length=x.shape[axis])

        agreement = agree(comm, "gather", check, _AGREE_GATHER, share=("length",))
        per_rank = agreement.shared["length"].tolist()
        if layout == "zigzag" and len(set(per_rank)) != 1:
            raise comms.collective(ValueError(
                f"zigzag layout needs the same local length on every rank, got {per_rank}"))
        xp = array_module(x)
        axis = axis % x.ndim
        with comms.communicating():
            host = np.ascontiguousarray(np.moveaxis(_to_host(x), axis, 0))
            row = int(np.prod(host.shape[1:], dtype=np.int64)) * host.dtype.itemsize
            received = np.empty((sum(per_rank),) + host.shape[1:], dtype=host.dtype)
            comms.complete(comm.Iallgatherv(_bytes(host),
                                            [_bytes(received), [n * row for n in per_rank]]))
    whole = np.empty_like(received)
    offset = 0
    for rank in range(comm.size):
        for start, n in segments(layout, per_rank, rank):
            whole[start:start + n] = received[offset:offset + n]
            offset += n
    whole = np.moveaxis(whole, 0, axis)
    return np.ascontiguousarray(whole) if xp is np else xp.ascontiguousarray(xp.asarray(whole))


_AGREE = ("layout", "axis", "x.shape", "x.dtype", "array type")
_AGREE_GATHER = ("layout", "axis", "shape", "x.dtype", "array type")


def _settings(x, layout, axis):
    return {"layout": layout, "axis": axis % x.ndim, "x.shape": x.shape,
            "x.dtype": x.dtype.name, "array type": type(x).__module__.split(".")[0]}


def _check_layout_args(x, layout, axis):
    raise_unconvertible(x)
    try:
        array_module(x)
    except TypeError:
        raise TypeError(f"x must be a numpy.ndarray or cupy.ndarray, "
                        f"got {type(x).__module__}.{type(x).__name__}") from None
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(axis, (int, np.integer)) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for x with {x.ndim} dimensions")


def _take(x, start, stop, axis):
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, stop)
    return x[tuple(index)]


def _to_host(x):
    """A host array in native byte order (it travels as bytes)."""
    return native(x) if isinstance(x, np.ndarray) else x.get()


def _bytes(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1).view(np.uint8)
