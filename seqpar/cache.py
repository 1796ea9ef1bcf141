"""A key/value cache split across ranks, for decoding with K/V-sharded attention."""
from __future__ import annotations

import numpy as np

from . import comms
from ._interop import accepts_dlpack
from ._arrays import dtype_name, is_supported_dtype
from ._typing import Array, Comm, Output
from .strategies._prepare import accepts_qkv_format, check_qkv_format
from .strategies.kv_sharded import kv_sharded_attention
from .validation import agree

__all__ = ["ShardedKVCache"]


class ShardedKVCache:
    """A preallocated K/V cache whose tokens are spread over the ranks of ``comm``.

    Placement: token t of a batch row (counting from 0) lives on rank t mod P, in
    local slot t // P. Every rank therefore holds the same number of tokens of a
    row, give or take one, whatever is appended, and each rank's tokens of a row
    sit in one contiguous run of slots, so :meth:`attend` reads them in place
    through ``key_lengths`` (no copy per step). Where a token lives never changes
    the result: K/V-sharded attention merges the ranks' slices exactly.

    Parameters
    ----------
    capacity : int
        Tokens per batch row, over all ranks together.
    kv_heads, head_dim : int
        Shape of one token's keys (and values).
    batch : int
        Batch rows (sequences decoded together).
    dtype : dtype
        float16, bfloat16 (``ml_dtypes.bfloat16``), float32, float64 (CPU only).
    comm : mpi4py.MPI.Comm, optional
        Defaults to ``MPI.COMM_WORLD``.
    tag : int, optional
        The channel of every call of this cache (see :func:`seqpar.ring_attention`):
        needed when the cache is used from a thread other than the main thread.
    gpu : bool
        Keep the cache in CuPy arrays on the current device (see
        :func:`seqpar.use_local_device`).

    Attributes
    ----------
    k, v : arrays of shape (batch, ceil(capacity / P), kv_heads, head_dim)
        This rank's slots.
    """

    def __init__(self, capacity: int, kv_heads: int, head_dim: int, *, batch: int = 1,
                 dtype="float32", comm: Comm | None = None, gpu: bool = False,
                 tag: int | None = None):
        with comms.call(comm, "ShardedKVCache", tag) as context:
            def check():
                for name, value in (("capacity", capacity), ("kv_heads", kv_heads),
                                    ("head_dim", head_dim), ("batch", batch)):
                    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                            or value < (0 if name == "capacity" else 1):
                        raise ValueError(f"{name} must be a positive int, got {value!r}")
                if not is_supported_dtype(dtype):
                    raise TypeError(f"dtype {dtype!r} is not supported (float16, bfloat16, "
                                    "float32, float64)")
                if gpu and dtype_name(dtype) == "float64":
                    raise TypeError("dtype float64 runs on the CPU only")
                return {"shape": (int(capacity), int(kv_heads), int(head_dim), int(batch)),
                        "dtype": dtype_name(dtype), "gpu": bool(gpu)}

            def acquire(settings):
                xp = np
                if gpu:
                    import cupy as xp
                local = -(-int(capacity) // context.comm.size)
                shape = (int(batch), local, int(kv_heads), int(head_dim))
                return xp, xp.empty(shape, dtype=dtype), xp.empty(shape, dtype=dtype)

            agreement = agree(context.comm, "ShardedKVCache", check, ("shape", "dtype", "gpu"),
                              acquire)
        self._xp, self.k, self.v = agreement.resources
        self.comm, self.tag = comm, tag
        self.capacity = int(capacity)
        self._size, self._rank = context.comm.size, context.comm.rank
        self._lengths = np.zeros(int(batch), dtype=np.int64)   # global, per row
        self._local = self._xp.zeros(int(batch), dtype=np.int32)  # this rank's, per row

    @property
    def lengths(self) -> np.ndarray:
        """Tokens held per batch row, over all ranks (a copy)."""
        return self._lengths.copy()

    @property
    def local_lengths(self):
        """Tokens of each batch row held on this rank (on the cache's device)."""
        return self._local

    @accepts_dlpack("k", "v", "counts")
    @accepts_qkv_format("k", "v")
    def append(self, k: Array, v: Array, counts: Array | None = None, *,
               qkv_format: str = "bshd") -> None:
        """Append new tokens' keys and values, the same on every rank (collective).

        Parameters
        ----------
        k, v : arrays of shape (batch, n, kv_heads, head_dim), the cache's dtype
            (NumPy or CuPy; copied to the cache's device).
        counts : int array of shape (batch,), optional
            How many of the n tokens are real for each row (the rest are ignored);
            by default all n.
        qkv_format : {"bshd", "bhsd"}
            The order of the axes of k and v: as above, or (batch, kv_heads, n,
            head_dim), PyTorch's (read as views), the same on every rank.

        Raises
        ------
        ValueError
            On every rank, when a row would exceed the capacity or shapes differ.
        """
        batch, _, kv_heads, head_dim = self.k.shape
        with comms.call(self.comm, "ShardedKVCache.append", self.tag) as context:
            def check():
                check_qkv_format(qkv_format)
                for name, x in (("k", k), ("v", v)):
                    if getattr(x, "ndim", None) != 4 or x.shape[0] != batch or \
                            x.shape[2:] != (kv_heads, head_dim):
                        raise ValueError(f"{name} must have shape ({batch}, n, {kv_heads}, "
                                         f"{head_dim}), got {getattr(x, 'shape', None)}")
                    if x.dtype.name != self.k.dtype.name:
                        raise TypeError(f"{name} has dtype {x.dtype.name}, the cache holds "
                                        f"{self.k.dtype.name}")
                if k.shape != v.shape:
                    raise ValueError(f"k and v shapes differ: {k.shape} and {v.shape}")
                n = k.shape[1]
                new = np.full(batch, n) if counts is None else np.asarray(counts)
                if new.shape != (batch,) or not np.issubdtype(new.dtype, np.integer) \
                        or new.min(initial=0) < 0 or new.max(initial=0) > n:
                    raise ValueError(f"counts must be {batch} ints in [0, {n}], got {counts!r}")
                if np.any(self._lengths + new > self.capacity):
                    raise ValueError(f"the cache is full: appending {new.tolist()} tokens to "
                                     f"rows holding {self._lengths.tolist()} exceeds the "
                                     f"capacity of {self.capacity}")
                return {"shape": k.shape, "counts": new.tolist(), "qkv_format": qkv_format}

            new = np.asarray(agree(context.comm, "ShardedKVCache.append", check,
                                   ("qkv_format", "shape", "counts")).settings["counts"])
        size, rank = self._size, self._rank
        local = self._local_counts(self._lengths)
        for b in range(batch):
            start = int(self._lengths[b])
            first = (rank - start) % size  # offset of this rank's first new token
            mine = max(0, -(-(int(new[b]) - first) // size))
            if mine:
                slots = slice(int(local[b]), int(local[b]) + mine)
                picked = slice(first, first + (mine - 1) * size + 1, size)
                self.k[b, slots] = self._xp.asarray(k[b, picked])
                self.v[b, slots] = self._xp.asarray(v[b, picked])
        self._lengths += new
        self._local[...] = self._xp.asarray(self._local_counts(self._lengths))

    @accepts_dlpack("q")
    def attend(self, q: Array, *, softmax_scale: float | None = None, return_lse: bool = False,
               transport: str = "auto", qkv_format: str = "bshd") -> Output:
        """Attention of ``q`` (the same on every rank) over every cached token.

        Parameters
        ----------
        q : array of shape (batch, Sq, heads, head_dim), heads a multiple of kv_heads
        softmax_scale, return_lse, transport : as for :func:`seqpar.kv_sharded_attention`
        qkv_format : {"bshd", "bhsd"}
            The order of the axes of q and out: as above, or (batch, heads, Sq,
            head_dim), PyTorch's (q read as a view, out returned as one).

        Returns
        -------
        out (and lse) as :func:`seqpar.kv_sharded_attention` returns them, the same on
        every rank.
        """
        k, v = self.k, self.v
        if qkv_format == "bhsd":  # views the call swaps back: the slots as they are
            k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
        return kv_sharded_attention(q, k, v, comm=self.comm, tag=self.tag,
                                    softmax_scale=softmax_scale, return_lse=return_lse,
                                    transport=transport, key_lengths=self._local,
                                    qkv_format=qkv_format)

    def _local_counts(self, lengths) -> np.ndarray:
        """Tokens of each row on this rank: those t < length with t mod P == rank."""
        return np.maximum(0, (lengths - self._rank + self._size - 1) // self._size).astype(
            np.int32)
