"""Ring attention: K/V blocks travel between ranks; each rank merges every block it needs."""
from __future__ import annotations

import functools

import numpy as np

from .. import comms
from ..layout import LAYOUTS, segments
from ..masks import HIDDEN, Mask
from ..transport import get_transport
from ..validation import ATTENTION_SETTINGS, agree, check_attention_inputs
from ._plan import plan_blocks
from ._prepare import check_finite_arrays, prepare

__all__ = ["ring_attention", "RingSchedule"]


def ring_attention(q, k, v, *, comm=None, causal: bool = False,
                   softmax_scale: float | None = None, layout: str = "contiguous",
                   return_lse: bool = False, transport: str = "auto",
                   stats: dict | None = None, window=None, seqlens=None,
                   check_finite: bool = False):
    """Exact attention over a sequence split across the ranks of ``comm``.

    Each rank holds its slice of Q, K and V (see :func:`seqpar.shard` and
    :func:`seqpar.local_indices`). At step t every rank sends its own K/V to the
    rank t places ahead and receives the K/V of the rank t places behind, the
    transfer of the next step overlapping the compute of the current one; each
    rank merges every block into its own (out, lse), in float32 (float64 for
    float64 input) with a float64 lse. Pairs of ranks whose tokens the mask keeps
    apart exchange nothing, and steps nobody needs are skipped: a sliding window
    over many ranks talks to neighbours only.

    Parameters
    ----------
    q : numpy.ndarray or cupy.ndarray, shape (B, S, Hq, D) or (S, Hq, D)
        This rank's queries. With ``layout="contiguous"`` S may differ across
        ranks (0 included): rank r's tokens follow those of ranks < r.
    k, v : shape (B, Sk, Hk, D) or (Sk, Hk, D)
        This rank's keys and values (positions laid out like the queries'), Hq a
        multiple of Hk. Any memory layout; never written.
    comm : mpi4py.MPI.Comm, optional
        Defaults to ``MPI.COMM_WORLD``.
    causal : bool
        Mask by global position: key j is hidden from query i when j > i.
    softmax_scale : float, optional
        Defaults to 1 / sqrt(D).
    layout : {"contiguous", "zigzag"}
        Which global tokens this rank holds: one run after the previous ranks'
        (contiguous), or chunks r and 2P-1-r of 2P equal chunks (zigzag, which
        balances causal work; equal, even local lengths).
    return_lse : bool
        Also return lse, shape (B, Hq, S), float32 (float64 for float64 input).
    transport : {"auto", "host", "nccl", "cuda-aware", "staged"}
        How blocks move (see :mod:`seqpar.transport`): "auto" picks host MPI for
        NumPy, and NCCL, else CUDA-aware MPI, else MPI staged through pinned host
        memory for CuPy.
    stats : dict, optional
        Filled with "transport" (the one that ran), "bytes_per_step" (the largest
        block this rank sent), "bytes_sent", "steps" (transfers this rank took part
        in, of P - 1) and "exposed_seconds" (per step, how long compute waited for
        the next block; for CuPy this synchronises with the stream at the end).
    window : (left, right), optional
        Sliding window by global position: query i sees key j only if
        i - left <= j <= i + right (``None``: unbounded).
    seqlens : sequence of int, optional
        Lengths of the documents packed one after another in the global sequence
        (the same on every rank, summing to the global length): a query sees
        only keys of its own document.
    check_finite : bool
        Raise ValueError on every rank if any rank's q, k or v holds NaN or Inf.

    Returns
    -------
    out : array of q's type, shape and dtype; (out, lse) when ``return_lse``.

    Raises
    ------
    ValueError, TypeError, MemoryError
        On every rank, naming the argument and the rank at fault, before any
        point-to-point traffic.
    """
    with comms.call(comm, "ring_attention") as context:
        comm = context.comm

        def check():
            settings = check_attention_inputs(q, k, v, causal=causal,
                                              softmax_scale=softmax_scale, layout=layout,
                                              transport=transport, comm=context, window=window,
                                              seqlens=seqlens, check_finite=check_finite)
            if layout not in LAYOUTS:
                raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
            s, sk = settings["q length"], settings["k length"]
            if layout == "zigzag" and (s % 2 or sk % 2):
                raise ValueError(f"zigzag layout needs even local lengths (global length "
                                 f"divisible by 2P = {2 * comm.size}), got q length {s}, "
                                 f"k length {sk}")
            if check_finite:
                check_finite_arrays(q=q, k=k, v=v)
            return settings

        def acquire(settings):
            p = prepare(q, k, v, softmax_scale)
            out = p.xp.zeros(p.q.shape, dtype=p.accumulator)
            lse = p.new_lse(p.q.shape[1])
            own = [p.xp.ascontiguousarray(x) for x in (p.k, p.v)]  # sent as they are
            return p, out, lse, own, _buffers(p.xp, own, own[0].size)

        agreement = agree(comm, "ring_attention", check, ATTENTION_SETTINGS, acquire,
                          share=("q length", "k length"))
        p, out, lse, own, buffers = agreement.resources
        q_lengths = tuple(agreement.shared["q length"].tolist())
        k_lengths = tuple(agreement.shared["k length"].tolist())
        for name, lengths in (("q", q_lengths), ("k", k_lengths)):
            if layout == "zigzag" and len(set(lengths)) != 1:
                raise ValueError(f"zigzag layout needs the same {name} length on every rank, "
                                 f"got {list(lengths)}")
        settings = agreement.settings
        total = sum(k_lengths)
        if settings["seqlens"] is not None and sum(settings["seqlens"]) != total:
            raise ValueError(f"seqlens sum to {sum(settings['seqlens'])} but the global "
                             f"sequence has {total} tokens")
        mask = Mask.build(causal, settings["window"], settings["seqlens"])
        schedule = RingSchedule.make(layout, q_lengths, k_lengths, mask, comm.rank)
        if len(set(k_lengths)) > 1:  # uneven shards (all ranks know): size buffers anew
            needed = schedule.largest_receive * p.k.shape[0] * p.k.shape[2] * p.k.shape[3]
            buffers = agree(comm, "ring_attention", dict, (),
                            lambda _: _buffers(p.xp, own, needed)).resources
        mover = get_transport(context, p.q, transport)
        kv_shape = lambda source: (p.k.shape[0], k_lengths[source]) + p.k.shape[2:]  # noqa: E731

        def attend(kv, source):
            for block in plan_blocks(schedule.q_segments,
                                     segments(layout, k_lengths, source), mask):
                p.kernel.forward(p.q[:, block.q_rows], kv[0][:, block.k_rows],
                                 kv[1][:, block.k_rows], scale=p.scale,
                                 mask=mask if block.masked else None,
                                 q_offset=block.q_offset, k_offset=block.k_offset,
                                 out=out[:, block.q_rows], lse=lse[:, :, block.q_rows],
                                 accumulate=True)

        steps = schedule.steps
        with comms.communicating(), mover.exchange(buffers) as exchange:
            if steps:
                first = steps[0]
                comms.progress(f"step {first.shift}", first.peers)
                exchange.start(own, first.dest, first.source, [kv_shape(first.source)] * 2
                               if first.source is not None else None, tag=first.shift)
            if schedule.needs_own:
                attend(own, comm.rank)
            for i, step in enumerate(steps):
                received = exchange.wait()
                if i + 1 < len(steps):
                    after = steps[i + 1]
                    comms.progress(f"step {after.shift}", after.peers)
                    exchange.start(own, after.dest, after.source, [kv_shape(after.source)] * 2
                                   if after.source is not None else None, tag=after.shift)
                if step.source is not None:
                    attend(received, step.source)
        if stats is not None:
            stats.update(transport=mover.name, bytes_per_step=own[0].nbytes * 2,
                         bytes_sent=exchange.nbytes, steps=exchange.steps,
                         exposed_seconds=exchange.exposed_seconds())
        return p.finish(out, lse, return_lse)


def _buffers(xp, own, size):
    """Two sets of flat receive buffers (one per array of a block), used in turn."""
    return [[xp.empty(size, dtype=x.dtype) for x in own] for _ in range(2)]


class _Step:
    __slots__ = ("shift", "dest", "source")

    def __init__(self, shift, dest, source):
        self.shift, self.dest, self.source = shift, dest, source

    @property
    def peers(self) -> str:
        ranks = sorted({r for r in (self.dest, self.source) if r is not None})
        return " and ".join(f"rank {r}" for r in ranks)


class RingSchedule:
    """Which blocks this rank sends and receives at each shift, from global positions."""

    def __init__(self, q_segments, steps, needs_own, largest_receive):
        # largest_receive: the most tokens one received block holds
        self.q_segments = q_segments
        self.steps = steps
        self.needs_own = needs_own
        self.largest_receive = largest_receive

    @classmethod
    @functools.lru_cache(maxsize=64)
    def make(cls, layout, q_lengths, k_lengths, mask, rank) -> "RingSchedule":
        size = len(q_lengths)

        def sees(a, b):  # do rank a's queries see any of rank b's keys?
            if mask is None:
                return q_lengths[a] > 0 and k_lengths[b] > 0
            return any(mask.classify(qs, ql, ks, kl) != HIDDEN
                       for qs, ql in segments(layout, q_lengths, a)
                       for ks, kl in segments(layout, k_lengths, b))

        steps, largest = [], 0
        for shift in range(1, size):
            source, dest = (rank - shift) % size, (rank + shift) % size
            source = source if sees(rank, source) else None
            dest = dest if sees(dest, rank) else None
            if source is not None or dest is not None:
                steps.append(_Step(shift, dest, source))
            if source is not None:
                largest = max(largest, k_lengths[source])
        return cls(segments(layout, q_lengths, rank), steps, sees(rank, rank), largest)
