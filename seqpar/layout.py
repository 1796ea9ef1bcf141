"""Which global tokens a rank holds, and shard/gather between global and local arrays."""
from __future__ import annotations

import numpy as np

from ._arrays import array_module
from .validation import resolve_comm, validate

__all__ = ["LAYOUTS", "local_segments", "shard", "gather"]

LAYOUTS = ("contiguous", "zigzag")


def local_segments(layout: str, rank: int, size: int, local_len: int) -> list[tuple[int, int]]:
    """(global start, length) of each contiguous run of a rank's tokens, in local order.

    ``contiguous``: rank r holds [r*S, (r+1)*S). ``zigzag``: the sequence is cut into
    2P chunks of S/2 and rank r holds chunks r and 2P-1-r, which balances causal work.
    """
    if layout == "contiguous":
        return [(rank * local_len, local_len)]
    half = local_len // 2
    return [(rank * half, half), ((2 * size - 1 - rank) * half, half)]


def _parts(layout: str, size: int) -> int:
    return size if layout == "contiguous" else 2 * size


def shard(x, comm=None, layout: str = "contiguous", axis: int = 1):
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

    Returns
    -------
    A new contiguous array: ``x.shape[axis] / P`` tokens along ``axis``.
    """
    comm = resolve_comm(comm)

    def check():
        _check_layout_args(x, layout, axis)
        n = x.shape[axis]
        if n % _parts(layout, comm.size):
            raise ValueError(f"x: length {n} along axis {axis} is not divisible by "
                             f"{_parts(layout, comm.size)} ({layout} layout over {comm.size} ranks)")
        return _settings(x, layout, axis)

    validate(comm, check, _AGREE)
    xp = array_module(x)
    local_len = x.shape[axis] // comm.size
    pieces = [_take(x, start, start + n, axis)
              for start, n in local_segments(layout, comm.rank, comm.size, local_len)]
    return xp.ascontiguousarray(xp.concatenate(pieces, axis=axis))


def gather(x, comm=None, layout: str = "contiguous", axis: int = 1):
    """The global array, on every rank, from each rank's slice (inverse of :func:`shard`).

    Parameters
    ----------
    x : numpy.ndarray or cupy.ndarray
        This rank's slice; the same shape and dtype on every rank.
    comm, layout, axis : as for :func:`shard`.

    Returns
    -------
    An array of x's type and dtype with ``P * x.shape[axis]`` tokens along ``axis``.
    """
    comm = resolve_comm(comm)

    def check():
        _check_layout_args(x, layout, axis)
        if layout == "zigzag" and x.shape[axis] % 2:
            raise ValueError(f"x: zigzag layout needs an even local length along axis "
                             f"{axis}, got {x.shape[axis]}")
        return _settings(x, layout, axis)

    validate(comm, check, _AGREE)
    xp = array_module(x)
    axis = axis % x.ndim
    host = np.ascontiguousarray(np.moveaxis(_to_host(x), axis, 0))
    received = np.empty((comm.size,) + host.shape, dtype=host.dtype)
    comm.Allgather(_bytes(host), _bytes(received))
    local_len = host.shape[0]
    whole = np.empty((comm.size * local_len,) + host.shape[1:], dtype=host.dtype)
    for rank in range(comm.size):
        offset = 0
        for start, n in local_segments(layout, rank, comm.size, local_len):
            whole[start:start + n] = received[rank, offset:offset + n]
            offset += n
    whole = np.moveaxis(whole, 0, axis)
    return np.ascontiguousarray(whole) if xp is np else xp.ascontiguousarray(xp.asarray(whole))


_AGREE = ("layout", "axis", "x.shape", "x.dtype", "array type")


def _settings(x, layout, axis):
    return {"layout": layout, "axis": axis % x.ndim, "x.shape": x.shape,
            "x.dtype": x.dtype.name, "array type": type(x).__module__.split(".")[0]}


def _check_layout_args(x, layout, axis):
    try:
        array_module(x)
    except TypeError:
        raise TypeError(f"x must be a numpy.ndarray or cupy.ndarray, "
                        f"got {type(x).__module__}.{type(x).__name__}") from None
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for x with {x.ndim} dimensions")


def _take(x, start, stop, axis):
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, stop)
    return x[tuple(index)]


def _to_host(x):
    return x if isinstance(x, np.ndarray) else x.get()


def _bytes(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1).view(np.uint8)
