"""Attention on one rank (no communication)."""
from __future__ import annotations

import numpy as np

from .._interop import accepts_dlpack
from .._typing import Array, Gradients, Output, Seqlens, Window
from ..masks import Mask
from ..plans import cached_attention
from ..validation import check_attention_inputs, check_backward_inputs
from ._prepare import (
    QKV_FORMATS,
    accepts_qkv_format,
    check_finite_arrays,
    check_key_lengths,
    prepare,
)

__all__ = ["attention", "attention_backward"]


@accepts_dlpack("q", "k", "v", "key_lengths")
@accepts_qkv_format("q", "k", "v")
def attention(q: Array, k: Array, v: Array, *, causal: bool = False,
              softmax_scale: float | None = None, return_lse: bool = False, window: Window = None,
              seqlens: Seqlens = None, key_lengths: Array | None = None, q_offset: int = 0,
              check_finite: bool = False, qkv_format: str = "bshd") -> Output:
    """Exact softmax attention on this process's device, fused and tiled.

    Parameters
    ----------
    q : numpy.ndarray or cupy.ndarray, shape (B, Sq, Hq, D) or (Sq, Hq, D)
    k, v : same type and dtype as q, shape (B, Sk, Hk, D) or (Sk, Hk, D)
        Hq must be a multiple of Hk (grouped-query attention). Any memory layout;
        never written. dtypes: float16, bfloat16 (``ml_dtypes.bfloat16``),
        float32, float64 (CPU only).
    causal : bool
        Hide key j from query i when j > i.
    softmax_scale : float, optional
        Defaults to 1 / sqrt(D).
    return_lse : bool
        Also return the log-sum-exp of each row's scaled scores.
    window : (left, right), optional
        Query i sees key j only if i - left <= j <= i + right (``None``: unbounded).
    seqlens : sequence of int, optional
        Lengths of documents packed one after another; a query sees only keys of
        its own document. Positions are those of the keys (0..Sk-1).
    key_lengths : int array of shape (B,), optional
        Number of valid keys of each batch row (a preallocated cache); keys at
        index >= key_lengths[b] are ignored; 0 is allowed.
    q_offset : int
        Position of the first query (keys are at 0..Sk-1); for decoding with
        ``causal``, the position of the new tokens, e.g. ``cache_length - Sq``.
    check_finite : bool
        Raise ValueError if q, k or v holds NaN or Inf (one pass over the inputs).
    qkv_format : {"bshd", "bhsd"}
        The order of the axes of q, k, v and out: "bshd" as above, or "bhsd", (B, H,
        S, D) ((H, S, D) for 3-D input), PyTorch's. "bhsd" arrays are read as views
        (no copy) and out comes back as a (B, H, S, D) view; lse keeps its shape.

    Returns
    -------
    out : array, shape and dtype of q
    lse : array, shape (B, Hq, Sq) (or (Hq, Sq)), float32 (float64 for float64 input)
        Only when ``return_lse``. A row with no visible key has out 0 and lse -inf.
    """
    if qkv_format in QKV_FORMATS:  # arrays already (B, S, H, D) here (accepts_qkv_format)
        planned = cached_attention(q, k, v, causal, softmax_scale, return_lse, window, seqlens,
                                   key_lengths, q_offset, check_finite, "bshd")
        if planned is not None:
            return planned
    settings = check_attention_inputs(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                      window=window, seqlens=seqlens, check_finite=check_finite,
                                      qkv_format=qkv_format)
    _check_positions(settings, q_offset)
    p = prepare(q, k, v, softmax_scale)
    lengths = check_key_lengths(key_lengths, p.q.shape[0], p.k.shape[1], p.xp)
    if check_finite:
        check_finite_arrays(q=q, k=k, v=v)
    mask = Mask.build(causal, settings["window"], settings["seqlens"])
    out, lse = p.kernel.forward(p.q, p.k, p.v, scale=p.scale, mask=mask, q_offset=int(q_offset),
                                key_lengths=lengths)
    return p.finish(out, lse, return_lse)


@accepts_dlpack("dout", "q", "k", "v", "out", "lse")
@accepts_qkv_format("dout", "q", "k", "v", "out", returns="gradients")
def attention_backward(dout: Array, q: Array, k: Array, v: Array, out: Array, lse: Array, *,
                       causal: bool = False, softmax_scale: float | None = None,
                       window: Window = None, seqlens: Seqlens = None, q_offset: int = 0,
                       deterministic: bool = True, qkv_format: str = "bshd") -> Gradients:
    """Gradients of :func:`attention` with respect to q, k and v.

    Parameters
    ----------
    dout : array like q
        Gradient of the loss with respect to the forward's output.
    q, k, v : the forward's inputs (any memory layout; never written)
    out, lse : the forward's output (q's shape and dtype) and log-sum-exp
        (``return_lse=True``; shape (B, Hq, Sq), float32 or float64).
    causal, softmax_scale, window, seqlens, q_offset : as for the forward.
    deterministic : bool
        True (the default): the same bytes on every run. False lets the Hopper
        backward add dq in any order (faster; rounding then varies run to run).
    qkv_format : {"bshd", "bhsd"}
        As for the forward: the order of the axes of dout, q, k, v, out and of the
        gradients returned (lse is (B, Hq, Sq) either way).

    Returns
    -------
    dq, dk, dv : arrays of the shapes and dtypes of q, k, v. With grouped-query
        attention dk and dv sum over the query heads that share a K/V head.
        Rows that saw no key contribute nothing.
    """
    settings = check_backward_inputs(dout, q, k, v, out, lse, causal=causal,
                                     softmax_scale=softmax_scale, window=window,
                                     seqlens=seqlens, qkv_format=qkv_format)
    _check_positions(settings, q_offset)
    p = prepare(q, k, v, softmax_scale)
    dout, out, lse = p.extras(dout, out, lse)
    delta = p.kernel.backward_delta(dout, out)
    mask = Mask.build(causal, settings["window"], settings["seqlens"])
    dq, dk, dv = p.kernel.backward(dout, p.q, p.k, p.v, lse, delta, scale=p.scale, mask=mask,
                                   q_offset=int(q_offset), deterministic=deterministic)
    return p.finish_gradients(dq, dk, dv)


def _check_positions(settings, q_offset) -> None:
    if isinstance(q_offset, (bool, np.bool_)) or not isinstance(q_offset, (int, np.integer)):
        raise TypeError(f"q_offset must be an int, got {q_offset!r}")
    total = max(settings["k length"], q_offset + settings["q length"])
    if settings["seqlens"] is not None and sum(settings["seqlens"]) != total:
        raise ValueError(f"seqlens sum to {sum(settings['seqlens'])}, but the sequence has "
                         f"{total} tokens")
