"""Ring attention: K/V blocks travel around the ring; each rank merges every block."""
from __future__ import annotations

import numpy as np

from ..layout import LAYOUTS, local_segments
from ..transport import get_transport
from ..validation import ATTENTION_SETTINGS, check_attention_inputs, resolve_comm, validate
from ._plan import plan_blocks
from ._prepare import prepare

__all__ = ["ring_attention"]


def ring_attention(q, k, v, *, comm=None, causal: bool = False,
                   softmax_scale: float | None = None, layout: str = "contiguous",
                   return_lse: bool = False, transport: str = "auto",
                   stats: dict | None = None):
    """Exact attention over a sequence split across the ranks of ``comm``.

    Each rank holds its slice of Q, K and V (see :func:`seqpar.shard`). K/V blocks
    pass around the ring; the transfer of the next block overlaps the compute of
    the current one, and each rank merges every block into its own (out, lse) in
    float32 (float64 for float64 input). Blocks that causality hides entirely
    are skipped.

    Parameters
    ----------
    q : numpy.ndarray or cupy.ndarray, shape (B, S, Hq, D) or (S, Hq, D)
        This rank's queries; S is the same on every rank.
    k, v : shape (B, Sk, Hk, D) or (Sk, Hk, D)
        This rank's keys and values, Hq a multiple of Hk; Sk == S when causal.
    comm : mpi4py.MPI.Comm, optional
        Defaults to ``MPI.COMM_WORLD``.
    causal : bool
        Mask by global position: key j is hidden from query i when j > i.
    softmax_scale : float, optional
        Defaults to 1 / sqrt(D).
    layout : {"contiguous", "zigzag"}
        Which global tokens this rank holds: rank r holds [r*S, (r+1)*S)
        (contiguous), or chunks r and 2P-1-r of 2P equal chunks (zigzag, which
        balances causal work; S must be even).
    return_lse : bool
        Also return lse, shape (B, Hq, S), float32 (float64 for float64 input).
    transport : {"auto", "host", "nccl", "cuda-aware", "staged"}
        How blocks move (see :mod:`seqpar.transport`): "auto" picks host MPI for
        NumPy, and NCCL, else CUDA-aware MPI, else MPI staged through pinned host
        memory for CuPy.
    stats : dict, optional
        Filled with "transport" (the one that ran), "bytes_per_step" and
        "exposed_seconds" (per step, how long compute waited for the next block;
        for CuPy this synchronises with the stream at the end).

    Returns
    -------
    out : array of q's type, shape and dtype; (out, lse) when ``return_lse``.

    Raises
    ------
    ValueError, TypeError
        On every rank, naming the argument and the rank at fault, before any
        point-to-point traffic.
    """
    comm = resolve_comm(comm)

    def check():
        settings = check_attention_inputs(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                          layout=layout, transport=transport, comm=comm)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        s, sk = settings["q length"], settings["k length"]
        if causal and s != sk:
            raise ValueError(f"causal ring attention needs as many keys as queries per rank, "
                             f"got q length {s} and k length {sk}")
        if layout == "zigzag" and (s % 2 or sk % 2):
            raise ValueError(f"zigzag layout needs even local lengths (global length divisible "
                             f"by 2P = {2 * comm.size}), got q length {s}, k length {sk}")
        return settings

    validate(comm, check, ATTENTION_SETTINGS)
    p = prepare(q, k, v, softmax_scale)
    xp, acc = p.xp, p.accumulator
    batch, s, hq, _ = p.q.shape
    sk = p.k.shape[1]
    out = xp.zeros(p.q.shape, dtype=acc)
    lse = xp.full((batch, hq, s), -np.inf, dtype=acc)
    q_segments = local_segments(layout, comm.rank, comm.size, s)
    mover = get_transport(comm, p.q, transport)

    with mover.ring(xp.stack([p.k, p.v])) as ring:
        for step in range(comm.size):
            if step + 1 < comm.size:
                ring.start()
            source = (comm.rank - step) % comm.size
            k_segments = local_segments(layout, source, comm.size, sk)
            kv = ring.current
            for block in plan_blocks(q_segments, k_segments, causal):
                p.kernel.forward(p.q[:, block.q_rows], kv[0][:, block.k_rows],
                                 kv[1][:, block.k_rows], scale=p.scale, causal=block.causal,
                                 q_offset=block.q_offset, k_offset=block.k_offset,
                                 out=out[:, block.q_rows], lse=lse[:, :, block.q_rows],
                                 accumulate=True)
            if step + 1 < comm.size:
                ring.wait()
    if stats is not None:
        stats.update(transport=mover.name, bytes_per_step=ring.nbytes,
                     exposed_seconds=ring.exposed_seconds())
    return p.finish(out, lse, return_lse)
