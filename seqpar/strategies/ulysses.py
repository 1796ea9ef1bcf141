"""Ulysses attention: all-to-all from sequence shards to head shards and back."""
from __future__ import annotations

import numpy as np

from ..layout import LAYOUTS, local_segments
from ..transport import get_transport
from ..validation import ATTENTION_SETTINGS, check_attention_inputs, resolve_comm, validate
from ._plan import plan_blocks
from ._prepare import prepare

__all__ = ["ulysses_attention"]


def ulysses_attention(q, k, v, *, comm=None, causal: bool = False,
                      softmax_scale: float | None = None, layout: str = "contiguous",
                      return_lse: bool = False, transport: str = "auto"):
    """Exact attention by head parallelism: every head still sees every token.

    An all-to-all turns "S/P tokens, all heads" into "all tokens, H/P heads" on each
    rank; local attention runs on those heads; a second all-to-all turns the result
    back. Exact because one head's softmax is never split.

    Parameters
    ----------
    q : numpy.ndarray or cupy.ndarray, shape (B, S, Hq, D) or (S, Hq, D)
        This rank's queries; S is the same on every rank.
    k, v : shape (B, S, Hk, D) or (S, Hk, D)
        Hq and Hk must both be multiples of the number of ranks P, and Hq of Hk.
    comm : mpi4py.MPI.Comm, optional
        Defaults to ``MPI.COMM_WORLD``.
    causal : bool
        Mask by global position.
    softmax_scale : float, optional
        Defaults to 1 / sqrt(D).
    layout : {"contiguous", "zigzag"}
        Which global tokens this rank holds (see :func:`seqpar.ring_attention`).
    return_lse : bool
        Also return lse, shape (B, Hq, S), float32 (float64 for float64 input).
    transport : {"auto", "host", "nccl", "cuda-aware", "staged"}
        How data moves between ranks (see :func:`seqpar.ring_attention`).

    Returns
    -------
    out : array of q's type, shape and dtype; (out, lse) when ``return_lse``.
    """
    comm = resolve_comm(comm)
    size = comm.size

    def check():
        settings = check_attention_inputs(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                          layout=layout, transport=transport, comm=comm)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if settings["q length"] != settings["k length"]:
            raise ValueError(f"q length {settings['q length']} and k length "
                             f"{settings['k length']} differ")
        if layout == "zigzag" and settings["q length"] % 2:
            raise ValueError(f"zigzag layout needs an even local length, got {settings['q length']}")
        for name in ("heads of q", "heads of k/v"):
            if settings[name] % size:
                raise ValueError(f"{name} ({settings[name]}) must be a multiple of the "
                                 f"number of ranks ({size}) for Ulysses attention")
        return settings

    validate(comm, check, ATTENTION_SETTINGS)
    p = prepare(q, k, v, softmax_scale)
    xp, acc = p.xp, p.accumulator
    batch, s, hq, d = p.q.shape
    mover = get_transport(comm, p.q, transport)
    q_all, k_all, v_all = (_to_head_shards(xp, mover, x) for x in (p.q, p.k, p.v))

    segments = []  # global positions of the gathered tokens: source ranks in order
    for source in range(size):
        segments += local_segments(layout, source, size, s)
    out = xp.zeros(q_all.shape, dtype=acc)
    lse = xp.full((batch, hq // size, size * s), -np.inf, dtype=acc)
    for block in plan_blocks(segments, segments, causal):
        p.kernel.forward(q_all[:, block.q_rows], k_all[:, block.k_rows], v_all[:, block.k_rows],
                         scale=p.scale, causal=block.causal, q_offset=block.q_offset,
                         k_offset=block.k_offset, out=out[:, block.q_rows],
                         lse=lse[:, :, block.q_rows], accumulate=True)
    out = _to_sequence_shards(xp, mover, out)
    if return_lse:  # (B, H/P, P*S) -> (B, S*P, H/P, 1) to reuse the same exchange
        lse = _to_sequence_shards(xp, mover, lse.transpose(0, 2, 1)[..., None])[..., 0]
        lse = xp.ascontiguousarray(lse.transpose(0, 2, 1))
    return p.finish(out, lse, return_lse)


def _to_head_shards(xp, mover, x):
    """(B, S, H, D) sequence shard -> (B, P*S, H/P, D) head shard, tokens by source rank."""
    size = mover.comm.size
    batch, s, h, d = x.shape
    send = xp.ascontiguousarray(x.reshape(batch, s, size, h // size, d).transpose(2, 0, 1, 3, 4))
    recv = xp.empty_like(send)
    mover.alltoall(send, recv)
    return xp.ascontiguousarray(recv.transpose(1, 0, 2, 3, 4)).reshape(batch, size * s, h // size, d)


def _to_sequence_shards(xp, mover, x):
    """Inverse of :func:`_to_head_shards`."""
    size = mover.comm.size
    batch, n, h_local, d = x.shape
    s = n // size
    send = xp.ascontiguousarray(x.reshape(batch, size, s, h_local, d).transpose(1, 0, 2, 3, 4))
    recv = xp.empty_like(send)
    mover.alltoall(send, recv)
    return xp.ascontiguousarray(recv.transpose(1, 2, 0, 3, 4)).reshape(batch, s, size * h_local, d)
