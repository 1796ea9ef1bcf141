"""K/V-sharded attention: the same queries everywhere, K/V split; one merge by Allreduce."""
from __future__ import annotations

import numpy as np

from ..transport import get_transport
from ..validation import ATTENTION_SETTINGS, check_attention_inputs, resolve_comm, validate
from ._prepare import prepare

__all__ = ["kv_sharded_attention"]

# the key length may differ across ranks (an empty slice is fine); all else must agree
_AGREE = tuple(name for name in ATTENTION_SETTINGS if name != "k length")


def kv_sharded_attention(q, k, v, *, comm=None, softmax_scale: float | None = None,
                         return_lse: bool = False, transport: str = "auto"):
    """Attention of the same queries on every rank over K/V split across the ranks.

    The shape of decoding: each rank attends its queries to its own K/V slice,
    then an Allreduce(MAX) of the log-sum-exp and an Allreduce(SUM) of the
    rescaled numerators and denominators merge the slices exactly.

    Parameters
    ----------
    q : numpy.ndarray or cupy.ndarray, shape (B, Sq, Hq, D) or (Sq, Hq, D)
        The same queries on every rank (only their shape is checked).
    k, v : shape (B, Sk, Hk, D) or (Sk, Hk, D)
        This rank's slice of keys and values; Sk may differ across ranks and may
        be 0. Hq must be a multiple of Hk.
    comm : mpi4py.MPI.Comm, optional
        Defaults to ``MPI.COMM_WORLD``.
    softmax_scale : float, optional
        Defaults to 1 / sqrt(D).
    return_lse : bool
        Also return lse, shape (B, Hq, Sq), float32 (float64 for float64 input).
    transport : {"auto", "host", "nccl", "cuda-aware", "staged"}
        How data moves between ranks (see :func:`seqpar.ring_attention`).

    Returns
    -------
    out : array of q's type, shape and dtype, the same on every rank;
        (out, lse) when ``return_lse``.
    """
    comm = resolve_comm(comm)
    validate(comm, lambda: check_attention_inputs(q, k, v, softmax_scale=softmax_scale,
                                                  transport=transport, comm=comm), _AGREE)
    p = prepare(q, k, v, softmax_scale)
    xp, acc = p.xp, p.accumulator
    mover = get_transport(comm, p.q, transport)
    out = xp.empty(p.q.shape, dtype=acc)
    out, lse = p.kernel.forward(p.q, p.k, p.v, scale=p.scale, out=out)

    global_max = lse.copy()
    mover.allreduce(global_max, "max")
    batch, sq, hq, d = out.shape
    # one buffer, one Allreduce: rescaled numerators (B, Sq, Hq, D), then denominators
    sums = xp.empty(out.size + lse.size, dtype=acc)
    numerators = sums[:out.size].reshape(out.shape)
    denominators = sums[out.size:].reshape(lse.shape)
    finite_max = xp.where(global_max == -np.inf, 0, global_max)
    xp.exp(lse - finite_max, out=denominators)  # 0 for a rank that saw no key
    xp.multiply(out, denominators.transpose(0, 2, 1)[..., None], out=numerators)
    mover.allreduce(sums, "sum")

    seen = denominators > 0
    safe = xp.where(seen, denominators, 1)
    xp.divide(numerators, safe.transpose(0, 2, 1)[..., None], out=out)
    lse = xp.where(seen, finite_max + xp.log(safe), -np.inf).astype(acc)
    return p.finish(out, lse, return_lse)
