"""Collective input validation: every rank raises the same clear error, or none does.

Each rank checks its own arguments, then one small Allreduce(MAX) tells every rank
the lowest rank that found a problem and whether the settings that must agree
(shapes, dtypes, flags) do. Only on the error path do ranks exchange more: the
message of the offending rank, or the values that differ. So a mistake on one
rank never leaves the others waiting in point-to-point traffic.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Mapping, Sequence

import numpy as np
from mpi4py import MPI

__all__ = ["resolve_comm", "validate"]

_ERROR_TYPES = (ValueError, TypeError)
_MESSAGE_BYTES = 1024
_HASH_MASK = (1 << 62) - 1  # hashes stay positive and their negation fits int64


def resolve_comm(comm) -> MPI.Comm:
    """``comm``, or ``MPI.COMM_WORLD`` when it is None."""
    if comm is None:
        return MPI.COMM_WORLD
    if not isinstance(comm, MPI.Comm) or comm == MPI.COMM_NULL:
        raise TypeError(f"comm must be an mpi4py.MPI.Comm, got {comm!r}")
    return comm


def validate(comm: MPI.Comm, check: Callable[[], Mapping[str, object]],
             agree: Sequence[str]) -> Mapping[str, object]:
    """Run ``check`` on every rank and compare settings across ranks, collectively.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
    check : callable
        Raises ValueError or TypeError for a local problem with the arguments, else
        returns {name: value} for at least the names in ``agree``.
    agree : sequence of str
        Names of the settings that must be equal on every rank.

    Returns
    -------
    What ``check`` returned.

    Raises
    ------
    ValueError or TypeError
        On every rank, with the same message naming the rank at fault, when any
        rank's check failed (the lowest such rank is reported) or a setting differs.
    """
    error: Exception | None = None
    settings: Mapping[str, object] = {}
    try:
        settings = check()
    except _ERROR_TYPES as exc:
        error = exc
    n_fields = len(agree)
    summary = np.zeros(1 + 2 * n_fields, dtype=np.int64)
    if error is not None:
        code = next(i for i, t in enumerate(_ERROR_TYPES) if isinstance(error, t))
        summary[0] = (comm.size - comm.rank) * len(_ERROR_TYPES) + code
    else:
        hashes = np.array([_fingerprint(settings[name]) for name in agree], dtype=np.int64)
        summary[1:1 + n_fields] = hashes
        summary[1 + n_fields:] = -hashes
    comm.Allreduce(MPI.IN_PLACE, summary, op=MPI.MAX)

    if summary[0]:
        culprit = comm.size - int(summary[0]) // len(_ERROR_TYPES)
        kind = _ERROR_TYPES[int(summary[0]) % len(_ERROR_TYPES)]
        text = _broadcast_text(comm, str(error) if error is not None else "", culprit)
        if error is not None and comm.rank == culprit:
            raise kind(f"rank {culprit}: {text}") from error
        raise kind(f"rank {culprit}: {text}")
    differs = np.flatnonzero(summary[1:1 + n_fields] != -summary[1 + n_fields:])
    if differs.size:
        name = agree[int(differs[0])]
        values = _gather_text(comm, repr(settings[name]))
        other = next(r for r, value in enumerate(values) if value != values[0])
        raise ValueError(f"{name} differs across ranks: rank 0 has {values[0]}, "
                         f"rank {other} has {values[other]}; it must be the same on every rank")
    return settings


def _fingerprint(value: object) -> int:
    digest = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _HASH_MASK


def _broadcast_text(comm: MPI.Comm, text: str, root: int) -> str:
    buffer = bytearray(_MESSAGE_BYTES)
    if comm.rank == root:
        encoded = text.encode()[:_MESSAGE_BYTES]
        buffer[:len(encoded)] = encoded
    comm.Bcast([buffer, MPI.BYTE], root=root)
    return bytes(buffer).rstrip(b"\0").decode(errors="replace")


def _gather_text(comm: MPI.Comm, text: str) -> list[str]:
    mine = bytearray(_MESSAGE_BYTES)
    encoded = text.encode()[:_MESSAGE_BYTES]
    mine[:len(encoded)] = encoded
    everyone = bytearray(_MESSAGE_BYTES * comm.size)
    comm.Allgather([mine, MPI.BYTE], [everyone, MPI.BYTE])
    return [bytes(everyone[r * _MESSAGE_BYTES:(r + 1) * _MESSAGE_BYTES]).rstrip(b"\0")
            .decode(errors="replace") for r in range(comm.size)]


ATTENTION_SETTINGS = ("array type", "dtype", "batch", "heads of q", "heads of k/v",
                      "head_dim", "causal", "softmax_scale", "layout", "transport",
                      "q length", "k length")


def check_attention_inputs(q, k, v, *, causal=False, softmax_scale=None,
                           layout="contiguous", transport=None, comm=None) -> dict:
    """Local checks of attention arguments; returns the settings ranks must share.

    ``transport`` (with the ``comm`` it runs on) is checked where given.
    Raises TypeError or ValueError that names the argument at fault.
    """
    from ._arrays import array_module, dtype_name, is_supported_dtype

    arrays = {"q": q, "k": k, "v": v}
    for name, x in arrays.items():
        try:
            array_module(x)
        except TypeError:
            raise TypeError(f"{name} must be a numpy.ndarray or cupy.ndarray, "
                            f"got {type(x).__module__}.{type(x).__name__}") from None
    for name, x in arrays.items():
        if type(x) is not type(q):
            raise TypeError(f"{name} is a {type(x).__module__}.{type(x).__name__} but q is a "
                            f"{type(q).__module__}.{type(q).__name__}: pass all NumPy or all CuPy arrays")
        if x.ndim not in (3, 4):
            raise ValueError(f"{name} must have 4 dimensions (batch, seq, heads, head_dim) "
                             f"or 3 (seq, heads, head_dim), got shape {x.shape}")
        if x.ndim != q.ndim:
            raise ValueError(f"{name} has {x.ndim} dimensions but q has {q.ndim}")
        if not is_supported_dtype(x.dtype):
            raise TypeError(f"{name} has dtype {dtype_name(x.dtype)}; supported: "
                            "float16, bfloat16, float32, float64")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {dtype_name(x.dtype)} but q has "
                            f"{dtype_name(q.dtype)}: q, k and v must share one dtype")
        if getattr(x, "device", None) != getattr(q, "device", None):
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    if q.ndim == 4 and q.shape[0] != k.shape[0]:
        raise ValueError(f"batch of q ({q.shape[0]}) and of k/v ({k.shape[0]}) differ")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"head_dim of q ({q.shape[-1]}) and of k/v ({k.shape[-1]}) differ")
    if q.shape[-1] == 0:
        raise ValueError("head_dim must be positive, got 0")
    hq, hk = q.shape[-2], k.shape[-2]
    if hk == 0 or hq % hk:
        raise ValueError(f"heads of q ({hq}) must be a multiple of heads of k/v ({hk})")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float, np.floating))
                                          and np.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a finite number > 0 or None, "
                         f"got {softmax_scale!r}")
    if type(q).__module__.startswith("cupy") and dtype_name(q.dtype) == "float64":
        raise TypeError("q: float64 runs on the CPU only; on the GPU use float32, "
                        "float16 or bfloat16")
    if transport is not None:
        from .transport import check_transport

        check_transport(comm, transport, q)
    return {"array type": type(q).__module__.split(".")[0], "dtype": dtype_name(q.dtype),
            "batch": q.shape[0] if q.ndim == 4 else 1, "heads of q": hq, "heads of k/v": hk,
            "head_dim": q.shape[-1], "causal": bool(causal),
            "softmax_scale": None if softmax_scale is None else float(softmax_scale),
            "layout": layout, "transport": transport,
            "q length": q.shape[-3], "k length": k.shape[-3]}
