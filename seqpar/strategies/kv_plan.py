"""Plans of K/V-sharded attention: checked and agreed once, then run as the local pass,
two Allreduces and the merge.

A K/V-sharded call (the same queries on every rank, each rank a slice of the keys: the
shape of decoding) runs the local kernel, an Allreduce(MAX) of the lse, a local rescale,
one Allreduce(SUM) of the rescaled [numerators | denominators] packed in one buffer,
and a normalisation (:mod:`seqpar.merge`); at one rank only the local kernel, no
collective. What it needs besides (the argument checks, the agreement between the
ranks, the transport, the kernel's launch parameters, the buffers) depends only on the
arrays' description and the settings, so :class:`_Execution` holds it for one
description, :class:`KVShardedPlan` is one as an object, and each channel (communicator
and tag) keeps the last few :func:`seqpar.kv_sharded_attention` made.

What a planned call still checks, collectively (one Allreduce(MAX) of three integers,
at several ranks only): that every rank's arrays fit a plan, and that every rank's plan
was agreed on the same settings (a fingerprint of them). Where either fails on any rank,
every rank makes the full call instead (the agreement of :mod:`seqpar.validation`),
which raises the same error on every rank, or plans anew. What it no longer does: the
argument checks the description decides, the memory check, the finiteness check (a
call with ``check_finite=True`` is never planned: that is how to have every check of a
call made again). What may differ across ranks and calls without a new plan: the
number of keys of a rank and the strides of k and v (and key lengths, of course).
"""
from __future__ import annotations

import dataclasses
import threading
import weakref

import numpy as np
from mpi4py import MPI

from .. import comms
from .._arrays import native
from ..graphs import capturing, graph_memory, workspace
from ..merge import CARRY_DTYPE, carry_parts, new_carry
from ..plans import _describe
from ..transport import get_transport
from ..validation import ATTENTION_SETTINGS, _fingerprint, agree, check_attention_inputs
from ._prepare import (
    _swap,
    check_finite_arrays,
    check_key_lengths,
    prepare,
    public_lse_dtype,
)

__all__ = [
    "AGREE",
    "KVShardedPlan",
    "channel_of",
    "clear_kv_plans",
    "full_agreement",
    "full_check",
    "plan_key",
]

# the key length may differ across ranks (an empty slice is fine); all else must agree,
# the number of queries too (the Allreduces add one buffer of that size)
AGREE = tuple(name for name in ATTENTION_SETTINGS
              if name not in ("window", "seqlens")) + ("q length",)

CHANNEL = "kv_sharded plans"  # the key of a channel's plans in its CallContext.cache
_CACHE_SIZE = 16              # plans per channel
_RUNNERS = 4                  # local kernel plans per plan (k/v lengths and strides)
_channels: weakref.WeakSet[_Channel] = weakref.WeakSet()


class _Channel:
    """The K/V-sharded plans of one channel and the communicator their per-call check
    runs on: a duplicate of the channel's, made with its first plan (every rank makes
    its first plan at the same call), so the check never meets another call's messages."""

    def __init__(self, comm: MPI.Comm):
        self.comm = comm.Dup()
        self.size = comm.size
        self.plans: dict = {}
        self._check = np.zeros(3, dtype=np.int64)
        _channels.add(self)

    def agree(self, fits: bool, fingerprint: int) -> bool:
        """Whether every rank's arrays fit its plan and every rank's plan has this
        fingerprint; one Allreduce(MAX) of (misfit, fingerprint, -fingerprint)."""
        if self.size == 1:
            return fits
        check = self._check
        check[0], check[1], check[2] = (0 if fits else 1), fingerprint, -fingerprint
        comms.progress("checking the plan with every rank", "every rank")
        with comms.communicating():  # a collective begun on one rank: failing here strands
            comms.complete(self.comm.Iallreduce(MPI.IN_PLACE, check, op=MPI.MAX))
        comms.progress("planned call")
        return bool(check[0] == 0 and check[1] == -check[2])

    def store(self, key, execution) -> None:
        if len(self.plans) >= _CACHE_SIZE:
            self.plans.pop(next(iter(self.plans)))  # the oldest
        self.plans[key] = execution

    def close(self) -> None:
        """Free the check's communicator (with the channel's; idempotent)."""
        self.plans.clear()
        _channels.discard(self)
        if self.comm != MPI.COMM_NULL and not MPI.Is_finalized():
            self.comm.Free()


def channel_of(context, create: bool) -> _Channel | None:
    """The plans of a channel (``context``, a CallContext); made (collectively) when
    ``create`` and there are none yet."""
    channel = context.cache.get(CHANNEL)
    if channel is None and create:
        channel = context.cache[CHANNEL] = _Channel(context.comm)
    return channel


def clear_kv_plans() -> None:
    """Forget every channel's K/V-sharded plans (their check communicators stay, so a
    rank that cleared and one that did not still meet in the check)."""
    for channel in list(_channels):
        channel.plans.clear()


def _shape_of_heads(x):
    """An array's description without its number of keys and strides (what may differ
    across ranks and calls): type, dimensions, shape but the key axis, dtype, device."""
    device = getattr(x, "device", None)
    return (type(x), x.ndim, x.shape[:-3] + x.shape[-2:], x.dtype,
            getattr(device, "id", device))


def plan_key(q, k, v, key_lengths, softmax_scale, return_lse, transport, qkv_format):
    """What a plan is for: q's description, k's and v's but their lengths and strides,
    whether key lengths are given, the settings. Raises (AttributeError, TypeError) for
    arguments that are no arrays (the full check names them)."""
    key = (_describe(q), _shape_of_heads(k), _shape_of_heads(v), key_lengths is not None,
           softmax_scale, bool(return_lse), transport, qkv_format)
    hash(key)
    return key


def settings_fingerprint(settings, names) -> int:
    """One int for the agreed settings (equal on every rank where the agreement passed)."""
    return _fingerprint(tuple((name, settings[name]) for name in names))


class _Execution:
    """The work of a K/V-sharded call on arrays of one description, everything but the
    arrays worked out: the kernel's plan per k/v layout, the transport, buffers per
    stream. Planned and direct calls both run it, so they give the same bytes."""

    def __init__(self, p, mover, size: int, return_lse: bool, fingerprint: int):
        # what calls need of p, without holding the example arrays alive
        self._p = dataclasses.replace(p, q=p.xp.empty(0, p.q.dtype), k=None, v=None)
        self._shape = tuple(p.q.shape)
        self._mover, self._size = mover, size
        self._return_lse = bool(return_lse)
        self.fingerprint = fingerprint
        self._runners: dict = {}
        self._buffers: dict = {}

    def lengths(self, k, key_lengths):
        """``key_lengths`` checked (values, when on the host) and converted as a direct
        call does; raises ValueError or TypeError."""
        return check_key_lengths(key_lengths, self._shape[0], k.shape[-3], self._p.xp)

    def call(self, q, k, v, lengths):
        """The call for arrays that fit (as given: 3-D or 4-D, any byte order)."""
        q, k, v = native(q), native(k), native(v)
        if self._p.squeeze:
            q, k, v = q[None], k[None], v[None]
        return self.run(q, k, v, lengths)

    def new_buffers(self):
        """One buffer for the Allreduce(SUM): numerators (B, Sq, Hq, D), then
        denominators (B, Hq, Sq); this rank's carry; the Allreduce(MAX) of its lse."""
        p = self._p
        batch, sq, hq, _ = self._shape
        sums = p.xp.empty(int(np.prod(self._shape)) + batch * hq * sq, dtype=p.accumulator)
        carry = new_carry(p.xp, (batch, hq, sq), split=p.kernel.SPLIT_CARRY)
        return sums, carry, p.xp.empty((batch, hq, sq), dtype=CARRY_DTYPE)

    def _runner(self, q, k, v, lengths):
        """The kernel's plan for this layout of q, k, v (made on first use, locally)."""
        key = (k.shape, k.strides, v.shape, v.strides)
        runner = self._runners.get(key)
        if runner is None:
            if len(self._runners) >= _RUNNERS:
                self._runners.clear()
            p = self._p
            runner = self._runners[key] = p.kernel.plan_forward(
                q, k, v, scale=p.scale, key_lengths=lengths,
                out_dtype=p.q.dtype if self._size == 1 else p.accumulator)
        return runner

    def run(self, q, k, v, lengths, buffers=None):
        """The call on 4-D arrays in native byte order. ``buffers``: those to use (the
        first call's, allocated before its agreement), else this stream's."""
        p = self._p
        runner = self._runner(q, k, v, lengths)
        if self._size == 1:  # the slice is everything: attention, no merge, no collective
            out, lse = runner(q, k, v, lengths)
            return p.finish(out, lse, self._return_lse)
        sums, carry, global_max = workspace(self._buffers, q, (
            self.new_buffers if buffers is None else lambda: buffers))
        xp, kernel, mover = p.xp, p.kernel, self._mover
        batch, sq, hq, _ = self._shape
        size = int(np.prod(self._shape))
        numerators = sums[:size].reshape(self._shape)
        denominators = sums[size:].reshape(batch, hq, sq)
        with comms.communicating():
            comms.progress("local attention")
            runner(q, k, v, lengths, out=numerators, lse=carry)
            top, rest = carry_parts(carry)
            global_max[...] = top  # reduced in place; top stays this rank's
            comms.progress("Allreduce of the largest score", "every rank")
            mover.allreduce(global_max, "max")
            kernel.sum_weights(top, rest, global_max, denominators)
            numerators *= denominators.transpose(0, 2, 1)[..., None]
            comms.progress("Allreduce of numerators and denominators", "every rank")
            mover.allreduce(sums, "sum")
        comms.progress("merge")
        kernel.normalise_sums(numerators, denominators)
        out = numerators.astype(p.q.dtype)  # a copy: the buffer serves the next call
        if self._return_lse:
            lse = xp.empty((batch, hq, sq), dtype=public_lse_dtype(p.q.dtype))
            kernel.sums_lse(denominators, global_max, lse)
        if p.squeeze:
            out = out[0]
            if self._return_lse:
                lse = lse[0]
        return (out, lse) if self._return_lse else out


class KVShardedPlan:
    """:func:`seqpar.kv_sharded_attention` for arrays like ``q``, ``k``, ``v``, planned
    once (collective over ``comm``: every rank makes its plan at the same point).

    Parameters
    ----------
    q, k, v : numpy.ndarray or cupy.ndarray
        Arrays of the description later calls pass (their values do not matter): q
        (B, Sq, Hq, D) the same on every rank, k and v this rank's slice (B, Sk, Hk, D),
        or 3-D, or (B, H, S, D) with ``qkv_format="bhsd"``. Later calls may pass k and v
        of another number of keys or other strides (a growing cache).
    comm, tag, softmax_scale, return_lse, transport, qkv_format :
        As for :func:`seqpar.kv_sharded_attention`, fixed for the plan.
    key_lengths : int array of shape (B,), optional
        An example of what later calls pass (None: calls pass none).

    Notes
    -----
    ``plan(q, k, v, key_lengths=None)`` returns what :func:`seqpar.kv_sharded_attention`
    returns for those arrays and the plan's settings, bitwise, the same on every rank.
    A call is collective over ``comm``: at several ranks it checks with one small
    Allreduce that every rank's arrays fit its plan and that the ranks' plans agree;
    where not, every rank raises the same ``ValueError`` naming the argument and the
    rank (the full agreement, made then). CUDA graph capture works as for a direct call
    (:mod:`seqpar.graphs`); at several ranks it needs the NCCL transport.
    """

    def __init__(self, q, k, v, *, comm=None, tag: int | None = None,
                 softmax_scale: float | None = None, return_lse: bool = False,
                 transport: str = "auto", key_lengths=None, qkv_format: str = "bshd"):
        self._transposed = isinstance(qkv_format, str) and qkv_format == "bhsd"
        views = [_swap(x) for x in (q, k, v)] if self._transposed else [q, k, v]
        self._comm, self._tag = comm, tag
        self._options = {"softmax_scale": softmax_scale, "return_lse": return_lse,
                         "transport": transport, "qkv_format": qkv_format}
        with comms.call(comm, "KVShardedPlan", tag) as context:
            def check():
                return full_check(context, *views, key_lengths, softmax_scale, transport,
                                  False, qkv_format)

            agreement = full_agreement(context, "KVShardedPlan", check, views, softmax_scale,
                                       return_lse, transport)
            self._execution = agreement.resources[0]
            self._channel = channel_of(context, create=True)
        self._key = plan_key(*views, key_lengths, softmax_scale, return_lse, transport,
                             qkv_format)
        self._nccl = getattr(self._execution._mover, "name", "") == "nccl"

    def __call__(self, q, k, v, *, key_lengths=None):
        views = [_swap(x) for x in (q, k, v)] if self._transposed else [q, k, v]
        alone = (self._channel.size == 1 and self._tag is None
                 and threading.current_thread() is threading.main_thread())
        result = self._alone(views, key_lengths) if alone else None
        if result is None:
            result = self._collective(views, key_lengths)
        if not self._transposed:
            return result
        if isinstance(result, tuple):
            return (_swap(result[0]),) + result[1:]
        return _swap(result)

    def _alone(self, views, key_lengths):
        """The call on a communicator of one rank from the main thread without a tag,
        for arrays that fit the plan: nobody to agree with or to tell of an error, so no
        call record; None where they do not fit (the collective path then names what
        differs). Other threads and tags take the collective path, which applies the
        rules of :mod:`seqpar.comms` at one rank as at many."""
        try:
            if self._key_of(views, key_lengths) != self._key:
                return None
            lengths = self._execution.lengths(views[1], key_lengths)
        except Exception:  # noqa: BLE001 - the full check names it
            return None
        with graph_memory(views[0]):
            return self._execution.call(*views, lengths)

    def _collective(self, views, key_lengths):
        """The call with its agreement: one small Allreduce says every rank's arrays fit
        the plan, else the full check and agreement run."""
        execution, options = self._execution, self._options
        with graph_memory(views[0]), comms.call(self._comm, "KVShardedPlan", self._tag) as context:
            record = comms.current_call()
            lengths, fits = None, False
            try:
                if record.deferred is None and self._key_of(views, key_lengths) == self._key and (
                        self._channel.size == 1 or self._nccl or not capturing(views[0])):
                    lengths, fits = execution.lengths(views[1], key_lengths), True
            except Exception:  # noqa: BLE001 - the full check below names it on every rank
                fits = False
            if self._channel.agree(fits, execution.fingerprint):
                record.agreed = True
                result = execution.call(*views, lengths)
            else:
                def check():
                    settings = full_check(context, *views, key_lengths, options["softmax_scale"],
                                          options["transport"], False, options["qkv_format"])
                    self._check_fits(views, key_lengths)
                    return settings

                agreement = full_agreement(context, "KVShardedPlan", check, views,
                                           options["softmax_scale"], options["return_lse"],
                                           options["transport"], build=False)
                result = execution.call(*views, agreement.settings["key_lengths"])
        return result

    def _key_of(self, views, key_lengths):
        """:func:`plan_key` of a call's arrays with the plan's settings."""
        options = self._options
        return plan_key(*views, key_lengths, options["softmax_scale"], options["return_lse"],
                        options["transport"], options["qkv_format"])

    def _check_fits(self, views, key_lengths) -> None:
        """ValueError naming the first argument of another description than the plan's."""
        names = ("q", "k", "v")
        given = self._key_of(views, key_lengths)
        for name, want, got in zip(names, self._key[:3], given[:3]):
            if want != got:
                what = "" if name == "q" else " (but its number of keys and strides)"
                raise ValueError(f"{name}: this plan was built for {_say(want)}{what}, got "
                                 f"{_say(got)}")
        if given[3] != self._key[3]:
            raise ValueError("key_lengths: this plan was built " +
                             ("with" if self._key[3] else "without") + " key_lengths")


def _say(description) -> str:
    """A description of :func:`plan_key` as words."""
    kind = description[0]
    rest = ", ".join(str(part) for part in description[1:])
    return f"a {kind.__module__.split('.')[0]} array ({rest})"


def full_check(context, q, k, v, key_lengths, softmax_scale, transport, check_finite,
               qkv_format) -> dict:
    """The local checks of a K/V-sharded call; the settings ranks must share, and the
    key lengths as the kernel takes them (``settings["key_lengths"]``)."""
    settings = check_attention_inputs(q, k, v, softmax_scale=softmax_scale,
                                      transport=transport, comm=context,
                                      check_finite=check_finite, qkv_format=qkv_format)
    p = prepare(q, k, v, softmax_scale)
    settings["key_lengths"] = check_key_lengths(key_lengths, p.q.shape[0], p.k.shape[1], p.xp)
    if check_finite:
        check_finite_arrays(q=q, k=k, v=v)
    return settings


def full_agreement(context, function, check, views, softmax_scale, return_lse, transport,
                   build=True):
    """The full call's check and agreement (:func:`seqpar.validation.agree`). With
    ``build``, ``agreement.resources`` is ``(execution, p, buffers)``: the call's
    :class:`_Execution`, its prepared arrays, and buffers allocated before the agreement
    (so its memory check counts them; None at one rank, which needs none)."""
    def acquire(settings):
        p = prepare(*views, softmax_scale)
        execution = _Execution(p, None, context.comm.size, return_lse, 0)
        return execution, p, (execution.new_buffers() if context.comm.size > 1 else None)

    agreement = agree(context.comm, function, check, AGREE, acquire if build else None,
                      inputs=views)
    if build:
        execution, p, _ = agreement.resources
        execution._mover = get_transport(context, p.q, transport)
        execution.fingerprint = settings_fingerprint(agreement.settings, AGREE)
    return agreement
