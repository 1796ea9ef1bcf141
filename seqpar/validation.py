"""Collective agreement: every rank raises the same clear error, or none does.

Each rank checks its own arguments and, if they are fine, acquires what the call
needs (outputs, buffers); then ONE fixed-size message per rank, gathered by rank
0 and broadcast back, tells every rank which function every other rank called,
with which settings, whether its check or its allocation failed, and its local
lengths. So a bad argument, a MemoryError, mismatched calls (different functions
or settings on different ranks) or an interrupted rank give the same error on
every rank before any point-to-point message, and the message never depends on
what the other ranks called (a size mismatch would be an MPI error or a hang).
Only on the error path do ranks exchange more: the text of the offending rank's
message, or the values that differ. Rank 0 receives the messages one by one, so
when the watchdog (on by default for this step; ``seqpar.comms``) ends a wait there
it names the ranks that never arrived.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from mpi4py import MPI

from . import comms, memory
from .comms import collective, resolve_comm

__all__ = ["resolve_comm", "agree", "report_failure", "Agreement", "ATTENTION_SETTINGS",
           "check_attention_inputs", "check_backward_inputs"]

_MESSAGE_BYTES = 1024
_HASH_MASK = (1 << 62) - 1
_MAX_SETTINGS = 24
_MAX_SHARED = 4
_MEMORY_LIMITS = 4  # limits a rank reports with its memory demand
# slots: status, function, how many settings a dispatcher added, settings hashes, shared
# ints, the memory demand (seqpar.memory.Demand.to_ints)
_STATUS, _FUNCTION, _DISPATCHED, _SETTINGS = 0, 1, 2, 3
_SHARED = _SETTINGS + _MAX_SETTINGS
_MEMORY = _SHARED + _MAX_SHARED
_WIDTH = _MEMORY + 2 + 2 * _MEMORY_LIMITS
# what a failed rank reports, in this order; anything else is "failed"
_KINDS = (ValueError, TypeError, MemoryError)
_TAG = 32767  # the agreement's messages to rank 0 (MPI guarantees tags up to 32767)


@dataclass
class Agreement:
    """What :func:`agree` returns: this rank's settings and resources, and the
    shared integers of every rank (``shared[name][r]``)."""

    settings: Mapping[str, Any]
    resources: Any
    shared: Mapping[str, np.ndarray]


def agree(comm: MPI.Comm, function: str, check: Callable[[], Mapping[str, Any]],
          agree_on: Sequence[str], acquire: Callable[[Mapping[str, Any]], Any] | None = None,
          share: Sequence[str] = (), inputs: Sequence[Any] = (),
          extra_bytes: Callable[[Mapping[str, Any]], int] | None = None) -> Agreement:
    """Check, acquire and agree, collectively over ``comm``.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
        The communicator the call runs on (seqpar's private duplicate).
    function : str
        The public function called; every rank must call the same.
    check : callable
        Raises ValueError or TypeError for a problem with this rank's arguments,
        naming the argument; else returns {name: value} for at least the names in
        ``agree_on`` and ``share``.
    agree_on : sequence of str
        Settings that must be equal on every rank (at most 24).
    acquire : callable, optional
        Called with the settings when the local check passed; allocates what the
        call needs before any point-to-point message. A MemoryError (CuPy's
        OutOfMemoryError included) is reported to every rank.
    share : sequence of str
        Integer settings every rank learns from every other (e.g. local lengths).
    inputs : sequence of arrays
        The caller's arrays: what ``acquire`` returns that is one of them (or a view)
        is no new memory.
    extra_bytes : callable, optional
        Host bytes the call will allocate after the agreement besides what
        ``acquire`` returned (given the settings).

    The host memory the acquired buffers will commit when written (NumPy reserves
    pages lazily) is checked against the limits each rank sees (cgroup, RAM; ranks
    of one node add up against the limit they share, :mod:`seqpar.memory`): a call
    that does not fit raises MemoryError on every rank instead of being killed by
    the kernel mid-call.

    Raises
    ------
    ValueError, TypeError, MemoryError
        On every rank, with the same message naming the rank at fault.
    RuntimeError
        On every rank but the one at fault, when a rank failed in another way
        (which re-raises its own exception).
    """
    record = comms.current_call()
    # called by a dispatcher (sequence_parallel_attention): what its choice rests on is
    # compared first, even where a rank's check failed (a choice that differs is why)
    chosen_by: Mapping[str, Any] = {} if record is None or record.dispatch is None \
        else record.dispatch[1]
    if chosen_by:
        function = record.dispatch[0]
        agree_on = tuple(chosen_by) + tuple(agree_on)
        check = _with_settings(check, chosen_by)
    assert len(agree_on) <= _MAX_SETTINGS and len(share) <= _MAX_SHARED
    settings: Mapping[str, Any] = {}
    resources = None
    failure: BaseException | None = None
    mine = np.zeros(_WIDTH, dtype=np.int64)
    mine[_DISPATCHED] = len(chosen_by)
    for i, name in enumerate(chosen_by):
        mine[_SETTINGS + i] = _fingerprint(chosen_by[name])
    try:
        if record is not None and record.deferred is not None:
            raise record.deferred  # found before the agreement (comm, thread, timeout)
        settings = check()
        if acquire is not None:
            resources = acquire(settings)
        extra = 0 if extra_bytes is None else int(extra_bytes(settings))
        if extra or not inputs or isinstance(inputs[0], np.ndarray):  # GPU memory is eager
            need = memory.demand(resources, inputs, extra=extra,
                                 sharers=1 if record is None else record.node_ranks)
            mine[_MEMORY:] = need.to_ints(_MEMORY_LIMITS)
        for i, name in enumerate(agree_on):
            mine[_SETTINGS + i] = _fingerprint(settings[name])
        for i, name in enumerate(share):
            mine[_SHARED + i] = int(settings[name])
    except BaseException as exc:  # noqa: BLE001 - reported to every rank, re-raised below
        failure = exc
        mine[_STATUS] = 1 + next((i for i, t in enumerate(_KINDS) if isinstance(exc, t)),
                                 len(_KINDS))
    mine[_FUNCTION] = _fingerprint(function)
    everyone = _exchange(comm, mine, function)
    if record is not None:
        record.agreed = True  # from here, an exception on one rank alone ends the job
    comms.progress("agreed with every rank")

    if np.all(everyone[:, _DISPATCHED] == len(chosen_by)):  # decided alike on every rank
        _raise_if_differs(comm, function, everyone, tuple(chosen_by), chosen_by)
    failed = np.flatnonzero(everyone[:, _STATUS])
    if failed.size:  # the cause comes first: a failed rank may also differ in its call
        culprit = int(failed[0])
        status = int(everyone[culprit, _STATUS])
        text = ""
        if failure is not None:
            text = str(failure) if status <= len(_KINDS) else f"{type(failure).__name__}: {failure}"
        text = _broadcast_text(comm, text, culprit)
        if comm.rank == culprit:
            if status <= len(_KINDS):
                error = collective(_KINDS[status - 1](f"rank {culprit}: {text}"))
                # the message says it all: the check that raised stays reachable as
                # __context__, out of the printed traceback
                error.__context__, error.__suppress_context__ = failure, True
                raise error
            raise collective(failure, printed_once=False)
        kind = _KINDS[status - 1] if status <= len(_KINDS) else RuntimeError
        raise collective(kind(f"rank {culprit}: {text}" if status <= len(_KINDS) else
                              f"{function} failed on rank {culprit}: {text}"))
    if np.any(everyone[:, _FUNCTION] != everyone[0, _FUNCTION]):
        names = _gather_text(comm, function)
        calls = ", ".join(f"rank {r} called {name}" for r, name in enumerate(names))
        raise collective(ValueError(f"the ranks called different seqpar functions ({calls}); "
                                    "every rank of the communicator must make the same call"))
    _raise_if_differs(comm, function, everyone, agree_on, settings)
    short = memory.shortfall([memory.Demand.from_ints(row) for row in everyone[:, _MEMORY:]])
    if short is not None:
        raise collective(MemoryError(f"{function}: {short}"))
    shared = {name: everyone[:, _SHARED + i].copy() for i, name in enumerate(share)}
    return Agreement(settings, resources, shared)


def _raise_if_differs(comm, function, everyone, names, settings) -> None:
    """ValueError on every rank naming the first of ``names`` (the first settings
    slots) whose value differs across ranks."""
    hashes = everyone[:, _SETTINGS:_SETTINGS + len(names)]
    differs = np.flatnonzero(np.any(hashes != hashes[0], axis=0))
    if differs.size:
        name = names[int(differs[0])]
        values = _gather_text(comm, repr(settings[name]))
        other = next(r for r, value in enumerate(values) if value != values[0])
        raise collective(ValueError(f"{function}: {name} differs across ranks: rank 0 has "
                                    f"{values[0]}, rank {other} has {values[other]}; it must "
                                    "be the same on every rank"))


def _with_settings(check, extra):
    def checked():
        return {**check(), **extra}
    return checked


def report_failure(comm: MPI.Comm, function: str, error: BaseException) -> None:
    """Take part in the agreement of ``function`` on ``comm`` as a rank that failed
    with ``error`` before it could check its arguments: every rank raises."""
    def check():
        raise error

    agree(comm, function, check, ())


def _exchange(comm: MPI.Comm, mine: np.ndarray, function: str) -> np.ndarray:
    """Every rank's message, on every rank: gathered by rank 0, then broadcast."""
    size = comm.size
    everyone = np.empty((size, mine.size), dtype=np.int64)
    if size == 1:
        everyone[0] = mine
        return everyone
    if comm.rank == 0:
        everyone[0] = mine
        requests = [comm.Irecv(everyone[r], source=r, tag=_TAG) for r in range(1, size)]
        missing = set(range(1, size))

        def absent() -> str:
            ranks = sorted(missing)
            listed = ", ".join(map(str, ranks[:16])) + (" ..." if len(ranks) > 16 else "")
            return (f"rank{'s' if len(ranks) > 1 else ''} {listed} of {size}, which "
                    f"did not call {function} (or another seqpar function) on this "
                    "communicator")

        comms.progress("checking arguments with every rank", absent)
        while missing:
            missing.difference_update(i + 1 for i in comms.complete_some(requests))
    else:
        comms.complete(comm.Isend(mine, dest=0, tag=_TAG))  # may wait for rank 0's receive
        # rank 0 names the ranks that never came: give it time to say so first
        comms.progress("checking arguments with every rank",
                       f"rank 0, which gathers every rank's check of {function}", 1.25)
    comms.complete(comm.Ibcast(everyone, root=0))
    return everyone


def _fingerprint(value: object) -> int:
    digest = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") & _HASH_MASK) | 1  # never 0: 0 is "unset"


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


# qkv_format first: when it differs, the shapes read through it differ too, and it is the cause
ATTENTION_SETTINGS = ("qkv_format", "array type", "dtype", "batch", "heads of q", "heads of k/v",
                      "head_dim", "causal", "softmax_scale", "layout", "transport",
                      "window", "seqlens", "check_finite", "captured in a CUDA graph")


def check_attention_inputs(q, k, v, *, causal=False, softmax_scale=None,
                           layout="contiguous", transport=None, comm=None, window=None,
                           seqlens=None, check_finite=False, qkv_format="bshd") -> dict:
    """Local checks of attention arguments; returns the settings ranks must share.

    ``transport`` (with the ``comm`` it runs on) is checked where given. q, k, v are
    (B, S, H, D) here whatever ``qkv_format`` the caller named (a "bhsd" caller's
    arrays arrive as views with those axes swapped: :func:`seqpar.strategies._prepare.
    accepts_qkv_format`); the format itself is checked here, with the other arguments.
    Raises TypeError or ValueError that names the argument at fault.
    """
    from .strategies._prepare import check_qkv_format

    check_qkv_format(qkv_format)
    try:
        settings = _check_arrays(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                 layout=layout, transport=transport, comm=comm, window=window,
                                 seqlens=seqlens, check_finite=check_finite)
    except ValueError as exc:
        if qkv_format == "bshd":
            raise
        raise ValueError(f"{exc} (qkv_format={qkv_format!r}: shapes shown as (batch, seq, "
                         "heads, head_dim), the inputs' heads and seq axes swapped)") from None
    settings["qkv_format"] = qkv_format
    return settings


def _check_arrays(q, k, v, *, causal, softmax_scale, layout, transport, comm, window,
                  seqlens, check_finite) -> dict:
    from ._arrays import array_module, dtype_name, is_supported_dtype
    from ._interop import raise_unconvertible
    from .graphs import capturing
    from .masks import check_mask_arguments

    raise_unconvertible(q, k, v)
    arrays = {"q": q, "k": k, "v": v}
    for name, x in arrays.items():
        try:
            array_module(x)
        except TypeError:
            raise TypeError(f"{name} must be a numpy.ndarray, a cupy.ndarray or an array with "
                            f"__dlpack__ (PyTorch, JAX, ...), got "
                            f"{type(x).__module__}.{type(x).__name__}") from None
    for name, x in arrays.items():
        if type(x) is not type(q):
            raise TypeError(f"{name} is a {type(x).__module__}.{type(x).__name__} but q is a "
                            f"{type(q).__module__}.{type(q).__name__}: pass all NumPy or all "
                            "CuPy arrays")
        if x.ndim not in (3, 4):
            raise ValueError(f"{name} must have 4 dimensions (batch, seq, heads, head_dim) "
                             f"or 3 (seq, heads, head_dim), got shape {x.shape}")
        if x.ndim != q.ndim:
            raise ValueError(f"{name} has {x.ndim} dimensions but q has {q.ndim}")
        if not is_supported_dtype(x.dtype):
            raise TypeError(f"{name} has dtype {dtype_name(x.dtype)}; supported: "
                            "float16, bfloat16, float32, float64")
        if dtype_name(x.dtype) != dtype_name(q.dtype):  # byte order aside (read natively)
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
    if not isinstance(check_finite, (bool, np.bool_)):
        raise TypeError(f"check_finite must be a bool, got {check_finite!r}")
    if softmax_scale is not None and not (
            isinstance(softmax_scale, (int, float, np.floating))
            and not isinstance(softmax_scale, (bool, np.bool_))
            and np.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a finite number > 0 or None, "
                         f"got {softmax_scale!r}")
    if type(q).__module__.startswith("cupy") and dtype_name(q.dtype) == "float64":
        raise TypeError("q: float64 runs on the CPU only; on the GPU use float32, "
                        "float16 or bfloat16")
    window, seqlens = check_mask_arguments(window, seqlens)
    captured = capturing(q)
    if captured and check_finite:
        raise ValueError("check_finite=True reads its answer on the host, which a CUDA graph "
                         "capture cannot replay: check the inputs before capturing")
    if transport is not None:
        from .transport import check_transport

        check_transport(comm, transport, q)
    return {"array type": type(q).__module__.split(".")[0], "dtype": dtype_name(q.dtype),
            "batch": q.shape[0] if q.ndim == 4 else 1, "heads of q": hq, "heads of k/v": hk,
            "head_dim": q.shape[-1], "causal": bool(causal),
            "softmax_scale": None if softmax_scale is None else float(softmax_scale),
            "layout": layout, "transport": transport, "window": window, "seqlens": seqlens,
            "check_finite": bool(check_finite), "captured in a CUDA graph": captured,
            "q length": q.shape[-3], "k length": k.shape[-3]}


def _as_given(shape, transposed: bool) -> tuple:
    """A (B, S, H, D) shape as the caller gave it: (B, H, S, D) for qkv_format="bhsd"."""
    if not transposed or len(shape) < 3:
        return tuple(shape)
    return tuple(shape[:-3]) + (shape[-2], shape[-3], shape[-1])


def check_backward_inputs(dout, q, k, v, out, lse, **options) -> dict:
    """Local checks of a backward call's arguments: those of the forward
    (:func:`check_attention_inputs`), then ``dout`` and ``out`` like q and ``lse`` of
    shape (B, Hq, Sq) (or (Hq, Sq) for 3-D input), float32 or float64."""
    from ._interop import raise_unconvertible

    raise_unconvertible(dout, out, lse)
    settings = check_attention_inputs(q, k, v, **options)
    transposed = settings["qkv_format"] != "bshd"
    for name, x in (("dout", dout), ("out", out)):
        if type(x) is not type(q):
            raise TypeError(f"{name} is a {type(x).__module__}.{type(x).__name__} but q is a "
                            f"{type(q).__module__}.{type(q).__name__}")
        if x.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {_as_given(q.shape, transposed)}, "
                             f"got {_as_given(x.shape, transposed)}")
        if x.dtype.name != q.dtype.name:
            raise TypeError(f"{name} has dtype {x.dtype.name} but q has {q.dtype.name}")
    if type(lse) is not type(q):
        raise TypeError(f"lse is a {type(lse).__module__}.{type(lse).__name__} but q is a "
                        f"{type(q).__module__}.{type(q).__name__}")
    want = q.shape[:-3] + (q.shape[-2], q.shape[-3])
    if lse.shape != want:
        raise ValueError(f"lse must have shape {want} (batch, heads, seq), got {lse.shape}")
    if lse.dtype.name not in ("float32", "float64"):
        raise TypeError(f"lse must be float32 or float64 (as the forward returns it), "
                        f"got {lse.dtype.name}")
    from ._arrays import array_module
    from .local import kernel_for

    if not hasattr(kernel_for(array_module(q)), "backward"):
        raise TypeError(f"q: this build has no backward kernel for {type(q).__module__} "
                        "arrays")
    if settings["captured in a CUDA graph"] and settings["dtype"] == "float32":
        raise TypeError("q: the float32 backward runs cuBLAS, which CuPy does not capture in "
                        "a CUDA graph; capture float16 or bfloat16, or call it directly")
    return settings
