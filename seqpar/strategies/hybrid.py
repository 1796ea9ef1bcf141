"""Hybrid attention: Ulysses inside groups of ranks, the ring across the groups."""
from __future__ import annotations

import numpy as np

from .. import comms
from .._interop import accepts_dlpack
from .._typing import Array, Comm, Output, Seqlens, Window
from ..layout import Placement
from ..masks import Mask
from ..merge import carried_lse
from ..transport import get_transport
from ..validation import ATTENTION_SETTINGS, agree
from ._prepare import accepts_qkv_format, check_sequence_inputs, prepare
from .ring import _Ring
from .ulysses import _rows_to_sequence_shards, _to_head_shards, _to_sequence_shards

__all__ = ["hybrid_attention", "groups_of"]


@accepts_dlpack("q", "k", "v")
@accepts_qkv_format("q", "k", "v")
def hybrid_attention(q: Array, k: Array, v: Array, *, ulysses_size: int, comm: Comm | None = None,
                     causal: bool = False, softmax_scale: float | None = None,
                     layout: str = "contiguous", return_lse: bool = False, transport: str = "auto",
                     window: Window = None, seqlens: Seqlens = None, check_finite: bool = False,
                     tag: int | None = None, qkv_format: str = "bshd") -> Output:
    """Exact attention with the communicator split into U x P/U ranks.

    Ranks r with the same r // U form a Ulysses group: an all-to-all inside it turns
    "my tokens, all heads" into "the group's tokens, H/U heads"; the P/U groups then
    run ring attention over those heads (rank r talks to the ranks with the same
    r mod U); a second all-to-all inside the group turns the result back. U = 1 is
    the ring, U = P is Ulysses. Put a group on one node (U = GPUs per node) so the
    all-to-alls stay on the fast links and only the ring crosses nodes.

    Parameters
    ----------
    q, k, v : as for :func:`seqpar.ring_attention` (this rank's slices, any memory
        layout; S the same for q and k/v on a rank)
    ulysses_size : int
        U: ranks per Ulysses group; it must divide the number of ranks, and the
        heads of q and of k/v.
    comm, causal, softmax_scale, layout, return_lse : as for :func:`seqpar.ring_attention`.
    transport, window, seqlens, check_finite, tag, qkv_format : as for :func:`seqpar.ring_attention`.

    Returns
    -------
    out : array of q's type, shape and dtype; (out, lse) when ``return_lse``.
    """
    with comms.call(comm, "hybrid_attention", tag) as context:
        comm = context.comm
        size = comm.size

        def check():
            if isinstance(ulysses_size, bool) or not isinstance(ulysses_size, (int, np.integer)) \
                    or ulysses_size < 1 or size % ulysses_size:
                raise ValueError(f"ulysses_size must be a divisor of the number of ranks "
                                 f"({size}), got {ulysses_size!r}")
            settings = check_sequence_inputs((q, k, v), None, layout=layout,
                                             heads_divisor=int(ulysses_size), same_length=True,
                                             causal=causal, softmax_scale=softmax_scale,
                                             transport=transport, comm=context, window=window,
                                             seqlens=seqlens, check_finite=check_finite,
                                             qkv_format=qkv_format)
            settings["ulysses_size"] = int(ulysses_size)
            return settings

        agreement = agree(comm, "hybrid_attention", check, ATTENTION_SETTINGS + ("ulysses_size",),
                          lambda _: prepare(q, k, v, softmax_scale), share=("q length",),
                          inputs=(q, k, v))
        p = agreement.resources
        lengths = agreement.shared["q length"].tolist()
        settings = agreement.settings
        if layout == "zigzag" and len(set(lengths)) != 1:
            raise comms.collective(ValueError(
                f"zigzag layout needs the same length on every rank, got {lengths}"))
        if settings["seqlens"] is not None and sum(settings["seqlens"]) != sum(lengths):
            raise comms.collective(ValueError(
                f"seqlens sum to {sum(settings['seqlens'])} but the global sequence has "
                f"{sum(lengths)} tokens"))
        mask = Mask.build(causal, settings["window"], settings["seqlens"])
        group, ring_context = groups_of(context, int(ulysses_size))
        u = int(ulysses_size)
        g = comm.rank // u
        group_lengths = lengths[g * u:(g + 1) * u]
        xp = p.xp
        inside = get_transport(group, p.q, transport)
        with comms.communicating():
            comms.progress("all-to-all of q, k, v inside the group", "the group's ranks")
            parts = [_to_head_shards(xp, inside, x, group_lengths) for x in (p.q, p.k, p.v)]
        heads = prepare(*parts, p.scale)
        placement = Placement.grouped(Placement.of(layout, lengths), u)

        def acquire(sub, own):
            return (xp.zeros(sub.q.shape, dtype=sub.accumulator), sub.new_lse(sub.q.shape[1]))

        ring = _Ring.placed(ring_context, comm, "hybrid_attention", heads, placement, placement,
                            mask, transport, acquire)
        out, lse = ring.resources

        def attend(kv, source, _, keys):
            for block in ring.blocks(source, keys):
                heads.kernel.forward(heads.q[:, block.q_rows], kv[0][:, block.k_rows],
                                     kv[1][:, block.k_rows], scale=heads.scale,
                                     mask=mask if block.masked else None,
                                     q_offset=block.q_offset, k_offset=block.k_offset,
                                     out=out[:, block.q_rows], lse=lse[:, :, block.q_rows],
                                     accumulate=True)

        ring.run(attend)
        with comms.communicating():
            comms.progress("all-to-all of the output inside the group", "the group's ranks")
            out = _to_sequence_shards(xp, inside, out, group_lengths)
            if return_lse:
                lse = _rows_to_sequence_shards(xp, inside, carried_lse(lse), group_lengths)
        return p.finish(out, lse, return_lse)


def groups_of(context, ulysses_size: int):
    """(Ulysses group, ring) contexts of this rank for groups of ``ulysses_size``,
    split from the call's communicator once and cached with it (collective)."""
    key = ("hybrid", ulysses_size)
    if key not in context.cache:
        comm = context.comm
        inside = comm.Split(comm.rank // ulysses_size, comm.rank)
        across = comm.Split(comm.rank % ulysses_size, comm.rank)
        context.cache[key] = _Groups(comms.CallContext(private=inside),
                                     comms.CallContext(private=across))
    groups = context.cache[key]
    return groups.inside, groups.across


class _Groups:
    def __init__(self, inside, across):
        self.inside, self.across = inside, across

    def close(self) -> None:
        self.inside.free()
        self.across.free()
