"""Attention on one rank (no communication)."""
from __future__ import annotations

from ..validation import check_attention_inputs
from ._prepare import prepare

__all__ = ["attention"]


def attention(q, k, v, *, causal: bool = False, softmax_scale: float | None = None,
              return_lse: bool = False):
    """Exact softmax attention on this process's device, fused and tiled.

    Parameters
    ----------
    q : numpy.ndarray or cupy.ndarray, shape (B, Sq, Hq, D) or (Sq, Hq, D)
    k, v : same type and dtype as q, shape (B, Sk, Hk, D) or (Sk, Hk, D)
        Hq must be a multiple of Hk (grouped-query attention).
        dtypes: float16, bfloat16 (``ml_dtypes.bfloat16``), float32, float64.
    causal : bool
        Hide key j from query i when j > i (positions 0..S-1 on both sides).
    softmax_scale : float, optional
        Defaults to 1 / sqrt(D).
    return_lse : bool
        Also return the log-sum-exp of each row's scaled scores.

    Returns
    -------
    out : array, shape and dtype of q
    lse : array, shape (B, Hq, Sq) (or (Hq, Sq)), float32 (float64 for float64 input)
        Only when ``return_lse``. A row with no visible key has out 0 and lse -inf.
    """
    check_attention_inputs(q, k, v, causal=causal, softmax_scale=softmax_scale)
    p = prepare(q, k, v, softmax_scale)
    out, lse = p.kernel.forward(p.q, p.k, p.v, scale=p.scale, causal=causal)
    return p.finish(out, lse, return_lse)
