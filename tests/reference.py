"""Independent float64 reference: plain softmax attention, no tiling, no merging."""
from __future__ import annotations

import numpy as np


def reference_attention(q, k, v, *, causal=False, softmax_scale=None,
                        q_positions=None, k_positions=None, visible=None):
    """Exact attention in float64 on the host.

    q: (B, Sq, Hq, D); k, v: (B, Sk, Hk, D), any float dtype (CuPy arrays are
    copied to the host). Causal masking hides key j from query i when
    k_positions[j] > q_positions[i] (positions default to 0..S-1).
    Returns (out, lse) with out (B, Sq, Hq, D) and lse (B, Hq, Sq), float64;
    a row with no visible key gives out 0 and lse -inf. ``visible``, a boolean
    (Sq, Sk) or (B, 1, Sq, Sk) matrix, hides the pairs where it is False.
    """
    q, k, v = (np.asarray(_host(x), dtype=np.float64) for x in (q, k, v))
    batch, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(d) if softmax_scale is None else softmax_scale
    group = hq // hk
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    scores = np.einsum("bihd,bjhd->bhij", q, k) * scale
    if causal:
        qp = np.arange(sq) if q_positions is None else np.asarray(q_positions)
        kp = np.arange(sk) if k_positions is None else np.asarray(k_positions)
        scores = np.where(kp[None, :] > qp[:, None], -np.inf, scores)
    if visible is not None:
        scores = np.where(np.asarray(visible, dtype=bool), scores, -np.inf)
    m = scores.max(axis=-1, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(scores - m_safe)
    denom = p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = np.log(denom[..., 0]) + m_safe[..., 0]
        weights = np.where(denom > 0, p / np.where(denom > 0, denom, 1.0), 0.0)
    out = np.einsum("bhij,bjhd->bihd", weights, v)
    return out, lse


def relative_error(x, ref):
    """||x - ref|| / ||ref|| in float64; ref must not be all zeros."""
    x = np.asarray(_host(x), dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    norm = np.linalg.norm(ref)
    assert norm > 0, "reference is zero: the test would prove nothing"
    return float(np.linalg.norm(x - ref) / norm)


def _host(x):
    get = getattr(x, "get", None)
    return get() if callable(get) and not isinstance(x, np.ndarray) else x
