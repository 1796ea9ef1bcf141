"""Plans: :func:`seqpar.attention` checked and set up once, then called for launches only.

The convention of FFTW, cuFFT and FlashInfer: a plan is built for the shapes, strides,
dtypes, device and settings of a call, and holds what the call would otherwise work out
every time (the checks, the kernel choice, the split counts, the launch parameters, a
workspace per stream). Calling it with arrays of that description costs only the
launches. :func:`seqpar.attention` keeps a small cache of plans keyed on that
description, so repeated calls get the same speed without a plan in sight.

What a planned call still checks: that the arrays are of the description the plan was
built for (else ``ValueError``) and, on the GPU, 16-byte aligned data. What it no longer
does: the argument checks, which the description decides; key lengths given as a
device array are clamped by the kernel, as in a direct call.
"""
from __future__ import annotations

import dataclasses
import threading

import numpy as np

from ._arrays import native
from ._typing import Array, Output, Seqlens, Window
from .graphs import graph_memory
from .masks import Mask

__all__ = ["AttentionPlan"]

_CACHE_SIZE = 64
_cache: dict = {}
_cache_lock = threading.Lock()


def _describe(x):
    """What a plan depends on in an array: type, shape, strides, dtype and device."""
    device = getattr(x, "device", None)
    return (type(x), x.shape, x.strides, x.dtype, getattr(device, "id", device))


class AttentionPlan:
    """:func:`seqpar.attention` for arrays like ``q``, ``k``, ``v``, planned once.

    Parameters
    ----------
    q, k, v : numpy.ndarray or cupy.ndarray
        Arrays of the shapes, strides, dtypes and device later calls pass (their values
        do not matter): (B, Sq, Hq, D) and (B, Sk, Hk, D), or 3-D, or (B, H, S, D) with
        ``qkv_format="bhsd"``.
    causal, softmax_scale, return_lse, window, seqlens, q_offset, qkv_format :
        As for :func:`seqpar.attention`, fixed for the plan.
    key_lengths : array of shape (B,), optional
        An example of the device int32 array later calls pass (None: calls pass none).
        Host key lengths are checked value by value, so plans take only a CuPy array
        on the GPU (and a NumPy one on the CPU, checked per call).

    Notes
    -----
    ``plan(q, k, v, key_lengths=None)`` returns what :func:`seqpar.attention` returns for
    those arrays and the plan's settings, bitwise. Arrays of another description raise
    ``ValueError`` naming the argument. Plans are safe to share between threads; CUDA
    graph capture works as for a direct call (:mod:`seqpar.graphs`).
    """

    def __init__(self, q: Array, k: Array, v: Array, *, causal: bool = False,
                 softmax_scale: float | None = None, return_lse: bool = False,
                 window: Window = None, seqlens: Seqlens = None,
                 key_lengths: Array | None = None, q_offset: int = 0,
                 qkv_format: str = "bshd"):
        from .strategies._prepare import _swap, check_key_lengths, prepare
        from .strategies.local import _check_positions
        from .validation import check_attention_inputs

        self._transposed = qkv_format == "bhsd"
        views = [_swap(x) for x in (q, k, v)] if self._transposed else (q, k, v)
        settings = check_attention_inputs(*views, causal=causal, softmax_scale=softmax_scale,
                                          window=window, seqlens=seqlens,
                                          qkv_format=qkv_format)
        _check_positions(settings, q_offset)
        p = prepare(*views, softmax_scale)
        lengths = check_key_lengths(key_lengths, p.q.shape[0], p.k.shape[1], p.xp)
        self._host_lengths = key_lengths is not None and p.xp is np
        # device key lengths of another dtype or layout: converted per call, as directly
        self._convert_lengths = lengths is not key_lengths and not self._host_lengths
        # what later calls need of p, without holding the example arrays alive
        self._prepared = dataclasses.replace(p, q=p.xp.empty(0, p.q.dtype), k=None, v=None)
        self._return_lse = bool(return_lse)
        self._descriptions = tuple(_describe(x) for x in (q, k, v))
        self._lengths = None if key_lengths is None else (
            "host key lengths" if self._host_lengths else _describe(key_lengths))
        mask = Mask.build(causal, settings["window"], settings["seqlens"])
        if p.xp is np:  # read in native byte order, as a direct call does
            def run(q, k, v, lengths):
                q, k, v = (native(x) for x in (q, k, v))
                return p.kernel.forward(q, k, v, scale=p.scale, mask=mask, q_offset=q_offset,
                                        key_lengths=lengths)
            self._run = run
        else:
            self._run = p.kernel.plan_forward(p.q, p.k, p.v, scale=p.scale, mask=mask,
                                              q_offset=int(q_offset), key_lengths=lengths,
                                              need_lse=self._return_lse)

    def __call__(self, q: Array, k: Array, v: Array, *, key_lengths: Array | None = None
                 ) -> Output:
        for name, x, want in zip("qkv", (q, k, v), self._descriptions):
            if _describe(x) != want:
                raise ValueError(f"{name}: this plan was built for {_format(want)}, got "
                                 f"{_format(_describe(x))}")
        if (key_lengths is None) != (self._lengths is None) or (
                key_lengths is not None and not self._host_lengths
                and _describe(key_lengths) != self._lengths):
            built = self._lengths
            raise ValueError("key_lengths: this plan was built for " + (
                "none" if built is None else built if isinstance(built, str) else _format(built)))
        with graph_memory(q):
            return self._call(q, k, v, key_lengths)

    def _call(self, q, k, v, key_lengths):
        """The call for arrays known to fit the plan."""
        p = self._prepared
        if self._transposed:
            q, k, v = (x.swapaxes(-3, -2) for x in (q, k, v))
        if p.squeeze:
            q, k, v = q[None], k[None], v[None]
        if self._host_lengths:
            from .strategies._prepare import check_key_lengths

            key_lengths = check_key_lengths(key_lengths, q.shape[0], k.shape[1], np)
        elif self._convert_lengths:
            key_lengths = p.xp.ascontiguousarray(key_lengths, dtype=np.int32)
        out, lse = self._run(q, k, v, key_lengths)
        result = p.finish(out, lse, self._return_lse)
        if not self._transposed:
            return result
        if isinstance(result, tuple):
            return (result[0].swapaxes(-3, -2),) + result[1:]
        return result.swapaxes(-3, -2)


def _format(description) -> str:
    kind, shape, strides, dtype, device = description
    return (f"a {kind.__module__.split('.')[0]} array of shape {shape}, strides {strides}, "
            f"dtype {getattr(dtype, 'name', dtype)}" +
            ("" if device is None or isinstance(device, str) else f", device {device}"))


def cached_attention(q, k, v, causal, softmax_scale, return_lse, window, seqlens, key_lengths,
                     q_offset, check_finite, qkv_format):
    """:func:`seqpar.attention` through the plan cache where a plan applies (GPU arrays,
    no host key lengths, no finiteness check); None where it does not."""
    if check_finite or not type(q).__module__.startswith("cupy"):
        return None
    try:
        key = (_describe(q), _describe(k), _describe(v),
               None if key_lengths is None else _describe(key_lengths), causal,
               softmax_scale, return_lse, None if window is None else tuple(window),
               None if seqlens is None else tuple(int(n) for n in seqlens), q_offset,
               qkv_format)
        plan = _cache.get(key)
    except (AttributeError, TypeError, ValueError):  # the full check names what is wrong
        return None
    if plan is None:
        if key_lengths is not None and not type(key_lengths).__module__.startswith("cupy"):
            return None
        plan = AttentionPlan(q, k, v, causal=causal, softmax_scale=softmax_scale,
                             return_lse=return_lse, window=window, seqlens=seqlens,
                             key_lengths=key_lengths, q_offset=q_offset, qkv_format=qkv_format)
        with _cache_lock:
            if len(_cache) >= _CACHE_SIZE:
                _cache.pop(next(iter(_cache)))  # the oldest
            _cache[key] = plan
    return plan._call(q, k, v, key_lengths)


def clear_plan_cache() -> None:
    """Forget the plans :func:`seqpar.attention` and :func:`seqpar.kv_sharded_attention`
    keep (they hold workspaces). A rank may clear alone: its next K/V-sharded call is
    then not planned, and every rank makes the full call with it."""
    from .strategies.kv_plan import clear_kv_plans  # the strategies import this module

    with _cache_lock:
        _cache.clear()
    clear_kv_plans()
