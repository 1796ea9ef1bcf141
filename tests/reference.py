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


def reference_attention_backward(dout, q, k, v, *, softmax_scale=None, visible=None):
    """Exact gradients of attention in float64 on the host, by the analytic formulas.

    dout, q: (B, Sq, Hq, D); k, v: (B, Sk, Hk, D), any float dtype. ``visible`` is
    a boolean (Sq, Sk) or (B, 1, Sq, Sk) matrix of the pairs a query may see
    (default: all). With ``P = softmax(scale * q k^T)`` over the visible keys and
    ``out = P v``::

        dv = P^T dout                 dP = dout v^T
        dS = P * (dP - rowsum(dout * out))
        dq = scale * dS k             dk = scale * dS^T q

    dk and dv are summed over the query heads that share a K/V head. Returns
    (dq, dk, dv) in float64 with the shapes of q, k, v; a row that sees no key
    contributes nothing.
    """
    dout, q, k, v = (np.asarray(_host(x), dtype=np.float64) for x in (dout, q, k, v))
    batch, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(d) if softmax_scale is None else softmax_scale
    group = hq // hk
    k_rep = np.repeat(k, group, axis=2)
    v_rep = np.repeat(v, group, axis=2)
    p = _probabilities(np.einsum("bihd,bjhd->bhij", q, k_rep) * scale, visible)
    out = np.einsum("bhij,bjhd->bihd", p, v_rep)
    dv = np.einsum("bhij,bihd->bjhd", p, dout)
    dp = np.einsum("bihd,bjhd->bhij", dout, v_rep)
    delta = np.einsum("bihd,bihd->bhi", dout, out)
    ds = p * (dp - delta[..., None])
    dq = scale * np.einsum("bhij,bjhd->bihd", ds, k_rep)
    dk = scale * np.einsum("bhij,bihd->bjhd", ds, q)
    # GQA: the query heads of one group all read the same K/V head
    dk = dk.reshape(batch, sk, hk, group, d).sum(axis=3)
    dv = dv.reshape(batch, sk, hk, group, d).sum(axis=3)
    return dq, dk, dv


def reference_attention_masked(q, k, v, *, softmax_scale=None, visible=None):
    """Attention in float64 under an explicit ``visible`` matrix (as in
    :func:`reference_attention_backward`): the forward whose derivative that gives.

    Returns (out, lse): out (B, Sq, Hq, D), lse (B, Hq, Sq), float64; a row that
    sees no key gives out 0 and lse -inf.
    """
    q, k, v = (np.asarray(_host(x), dtype=np.float64) for x in (q, k, v))
    scale = 1.0 / np.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    group = q.shape[2] // k.shape[2]
    scores = np.einsum("bihd,bjhd->bhij", q, np.repeat(k, group, axis=2)) * scale
    if visible is not None:
        scores = np.where(np.asarray(visible, dtype=bool), scores, -np.inf)
    p = _probabilities(scores, None)
    with np.errstate(divide="ignore"):
        m = scores.max(axis=-1)
        m_safe = np.where(np.isfinite(m), m, 0.0)
        lse = np.log(np.exp(scores - m_safe[..., None]).sum(axis=-1)) + m_safe
    return np.einsum("bhij,bjhd->bihd", p, np.repeat(v, group, axis=2)), lse


def _probabilities(scores, visible):
    """Row softmax of (B, H, Sq, Sk) scores over the visible pairs; 0 for rows that see none."""
    if visible is not None:
        scores = np.where(np.asarray(visible, dtype=bool), scores, -np.inf)
    m = scores.max(axis=-1, keepdims=True)
    p = np.exp(scores - np.where(np.isfinite(m), m, 0.0))
    denom = p.sum(axis=-1, keepdims=True)
    return np.where(denom > 0, p / np.where(denom > 0, denom, 1.0), 0.0)


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
