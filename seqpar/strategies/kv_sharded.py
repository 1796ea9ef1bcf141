"""K/V-sharded attention: the same queries everywhere, K/V split; one merge by Allreduce."""
from __future__ import annotations


from .. import comms
from .._interop import accepts_dlpack
from .._typing import Array, Comm, Gradients, Output
from ..graphs import capturing
from ..transport import get_transport
from ..validation import agree, check_backward_inputs
from ._prepare import accepts_qkv_format, prepare
from .kv_plan import AGREE as _AGREE
from .kv_plan import channel_of, full_agreement, full_check, plan_key

__all__ = ["kv_sharded_attention", "kv_sharded_attention_backward"]


@accepts_dlpack("q", "k", "v", "key_lengths")
@accepts_qkv_format("q", "k", "v")
def kv_sharded_attention(q: Array, k: Array, v: Array, *, comm: Comm | None = None,
                         softmax_scale: float | None = None, return_lse: bool = False,
                         transport: str = "auto", key_lengths: Array | None = None,
                         check_finite: bool = False, tag: int | None = None,
                         qkv_format: str = "bshd") -> Output:
    """Attention of the same queries on every rank over K/V split across the ranks.

    The shape of decoding: each rank attends its queries to its own K/V slice,
    then an Allreduce(MAX) of the float64 log-sum-exp and an Allreduce(SUM) of the
    rescaled numerators and denominators merge the slices exactly (weights in
    [0, 1]: the result is a convex combination of the slices' outputs).

    Calls are planned (:class:`seqpar.KVShardedPlan`): the first call of a description
    (q's shape, strides and dtype; k's and v's but their lengths and strides; whether
    key lengths are given; the settings) checks, agrees with every rank and sets up
    the buffers; later ones skip all that, after one small Allreduce at several ranks
    that checks every rank's call fits its plan (else every rank makes the full call).
    ``check_finite=True`` calls are never planned.

    Parameters
    ----------
    q : numpy.ndarray or cupy.ndarray, shape (B, Sq, Hq, D) or (Sq, Hq, D)
        The same queries on every rank (only their shape is checked).
    k, v : shape (B, Sk, Hk, D) or (Sk, Hk, D)
        This rank's slice of keys and values; Sk may differ across ranks and may
        be 0. Hq must be a multiple of Hk. Any memory layout; never written.
    comm : mpi4py.MPI.Comm, optional
        Defaults to ``MPI.COMM_WORLD``.
    tag : int, optional
        Pairs this call only with calls of the same tag (0 to 32767) on the other
        ranks; needed for calls from threads other than the main thread, which run
        in a different order on each rank (see :mod:`seqpar.comms`).
    softmax_scale : float, optional
        Defaults to 1 / sqrt(D).
    return_lse : bool
        Also return lse, shape (B, Hq, Sq), float32 (float64 for float64 input).
    transport : {"auto", "host", "nccl", "cuda-aware", "staged"}
        How data moves between ranks (see :func:`seqpar.ring_attention`).
    key_lengths : int array of shape (B,), optional
        Valid keys of each batch row in THIS rank's slice (a preallocated cache):
        keys at index >= key_lengths[b] are ignored; 0 allowed.
    check_finite : bool
        Raise ValueError on every rank if any rank's q, k or v holds NaN or Inf.
    qkv_format : {"bshd", "bhsd"}
        The order of the axes of q, k, v and out (see :func:`seqpar.ring_attention`).

    Returns
    -------
    out : array of q's type, shape and dtype, the same on every rank;
        (out, lse) when ``return_lse``.
    """
    with comms.call(comm, "kv_sharded_attention", tag) as context:
        record = comms.current_call()
        # a call made for a dispatcher (sequence_parallel_attention) agrees on its choice
        # first, and a check_finite one reads every input: those are never planned
        plain = record.dispatch is None and check_finite is False
        channel = channel_of(context, create=False) if record.dispatch is None else None

        def plan_of_call():
            return plan_key(q, k, v, key_lengths, softmax_scale, return_lse, transport,
                            qkv_format) + (capturing(q),)

        key = None
        if channel is not None:  # every rank has one: their calls so far were the same
            execution, lengths = None, None
            try:
                if plain and record.deferred is None:
                    key = plan_of_call()
                    execution = channel.plans.get(key)
                    if execution is not None:
                        lengths = execution.lengths(k, key_lengths)
            except Exception:  # noqa: BLE001 - not planned here: the full check names it
                execution = None
            if channel.agree(execution is not None,
                             0 if execution is None else execution.fingerprint):
                record.agreed = True
                return execution.call(q, k, v, lengths)

        def check():
            return full_check(context, q, k, v, key_lengths, softmax_scale, transport,
                              check_finite, qkv_format)

        agreement = full_agreement(context, "kv_sharded_attention", check, (q, k, v),
                                   softmax_scale, return_lse, transport)
        execution, p, buffers = agreement.resources
        if plain:  # the same on every rank (check_finite and the dispatch were agreed)
            if key is None:
                key = plan_of_call()
            channel_of(context, create=True).store(key, execution)
        return execution.run(p.q, p.k, p.v, agreement.settings["key_lengths"], buffers)


@accepts_dlpack("dout", "q", "k", "v", "out", "lse")
@accepts_qkv_format("dout", "q", "k", "v", "out", returns="gradients")
def kv_sharded_attention_backward(dout: Array, q: Array, k: Array, v: Array, out: Array,
                                  lse: Array, *, comm: Comm | None = None,
                                  softmax_scale: float | None = None, transport: str = "auto",
                                  tag: int | None = None, deterministic: bool = True,
                                  qkv_format: str = "bshd") -> Gradients:
    """Gradients of :func:`kv_sharded_attention`.

    Each rank computes the gradients over its own K/V slice with the forward's
    (global) lse; one Allreduce(SUM) adds the query gradients.

    Parameters
    ----------
    dout, q, out, lse : the same on every rank (as the forward returns them: out and
        lse, ``return_lse=True``, are identical on every rank)
    k, v : this rank's slice, as in the forward
    comm, softmax_scale, transport, tag, qkv_format : as for the forward
        (``qkv_format`` also orders the axes of dout, out and of the gradients)
    deterministic : bool
        True (the default): the same bytes on every run. False lets the Hopper
        backward add dq in any order (faster; rounding then varies run to run).

    Returns
    -------
    dq : the same on every rank (summed over the ranks' key slices)
    dk, dv : this rank's slices' gradients; shapes and dtypes of q, k, v.
    """
    with comms.call(comm, "kv_sharded_attention_backward", tag) as context:
        comm = context.comm

        def check():
            return check_backward_inputs(dout, q, k, v, out, lse, softmax_scale=softmax_scale,
                                         transport=transport, comm=context,
                                         qkv_format=qkv_format)

        def acquire(settings):
            p = prepare(q, k, v, softmax_scale)
            grad, out4, lse4 = p.extras(dout, out, lse)
            dq, dk, dv = (p.xp.empty(x.shape, dtype=p.accumulator) for x in (p.q, p.k, p.v))
            return p, grad, out4, lse4, dq, dk, dv

        agreement = agree(comm, "kv_sharded_attention_backward", check, _AGREE, acquire,
                          inputs=(dout, q, k, v, out, lse))
        p, grad, out4, lse4, dq, dk, dv = agreement.resources
        mover = get_transport(context, p.q, transport)
        with comms.communicating():
            comms.progress("local backward")
            delta = p.kernel.backward_delta(grad, out4)
            p.kernel.backward(grad, p.q, p.k, p.v, lse4, delta, scale=p.scale, dq=dq, dk=dk,
                              dv=dv, deterministic=deterministic)
            comms.progress("Allreduce of dq", "every rank")
            mover.allreduce(dq, "sum")
        return p.finish_gradients(dq, dk, dv)
