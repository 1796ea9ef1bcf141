"""Hybrid attention: Ulysses inside groups of ranks, the ring across the groups."""
from __future__ import annotations

import numpy as np

from .. import comms
from .._interop import accepts_dlpack
from .._typing import Array, Comm, Gradients, Output, Seqlens, Window
from ..layout import Placement
from ..masks import Mask
from ..merge import carried_lse
from ..transport import get_transport
from ..validation import ATTENTION_SETTINGS, agree
from ._prepare import accepts_qkv_format, check_sequence_inputs, prepare
from .ring import _Ring
from .ulysses import (
    _rows_to_head_shards,
    _rows_to_sequence_shards,
    _to_head_shards,
    _to_sequence_shards,
    all_to_all_bytes,
)

__all__ = ["groups_of", "hybrid_attention", "hybrid_attention_backward"]


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
        call = _HybridCall(context, "hybrid_attention", (q, k, v), None, ulysses_size,
                           softmax_scale, layout, causal, window, seqlens, transport,
                           check_finite, qkv_format)
        p, inside, lengths, mask = call.p, call.inside, call.group_lengths, call.mask
        xp = p.xp
        with comms.communicating():
            comms.progress("all-to-all of q, k, v inside the group", "the group's ranks")
            parts = [_to_head_shards(xp, inside, x, lengths) for x in (p.q, p.k, p.v)]
        heads = prepare(*parts, p.scale)

        def acquire(sub, own):
            return (xp.zeros(sub.q.shape, dtype=sub.accumulator), sub.new_lse(sub.q.shape[1]))

        ring = _Ring.placed(call.across, context.comm, "hybrid_attention", heads,
                            call.placement, call.placement, mask, transport, acquire)
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
            out = _to_sequence_shards(xp, inside, out, lengths)
            if return_lse:
                lse = _rows_to_sequence_shards(xp, inside, carried_lse(lse), lengths)
        return p.finish(out, lse, return_lse)


@accepts_dlpack("dout", "q", "k", "v", "out", "lse")
@accepts_qkv_format("dout", "q", "k", "v", "out", returns="gradients")
def hybrid_attention_backward(dout: Array, q: Array, k: Array, v: Array, out: Array, lse: Array,
                              *, ulysses_size: int, comm: Comm | None = None,
                              causal: bool = False, softmax_scale: float | None = None,
                              layout: str = "contiguous", transport: str = "auto",
                              window: Window = None, seqlens: Seqlens = None,
                              tag: int | None = None, deterministic: bool = True,
                              qkv_format: str = "bshd") -> Gradients:
    """Gradients of :func:`hybrid_attention` for this rank's slices of q, k and v.

    The forward's steps, each replaced by its backward: inside each Ulysses group an
    all-to-all turns q, k, v, dout and the per-row lse and delta = rowsum(dout * out)
    into head shards; the groups then run the ring backward over those heads (K/V
    travel as in the forward, each visiting block's partial dK/dV goes back to its
    owner in the same step, see :func:`seqpar.ring_attention_backward`); a last
    all-to-all inside the group turns dq, dk, dv back into sequence shards.

    Parameters
    ----------
    dout : numpy.ndarray or cupy.ndarray, shape (B, S, Hq, D) or (S, Hq, D)
        Gradient of the loss with respect to this rank's forward output (q's dtype).
    q, k, v : this rank's forward inputs, shapes (B, S, Hq, D) and (B, S, Hk, D)
        (or 3-D); any memory layout; never written.
    out : array like q
        This rank's forward output.
    lse : shape (B, Hq, S) or (Hq, S), float32 or float64
        This rank's forward log-sum-exp (``return_lse=True``).
    ulysses_size : int
        U, as for the forward: it must divide the number of ranks, Hq and Hk.
    comm, causal, softmax_scale, layout, transport, window, seqlens, tag, qkv_format :
        as for the forward, and the same on every rank (``qkv_format`` also orders the
        axes of dout, out and of the gradients returned).
    deterministic : bool
        True (the default): the same bytes on every run. False lets the Hopper
        backward add dq in any order (faster; rounding then varies run to run).

    Returns
    -------
    dq, dk, dv : this rank's gradients, of the shapes and dtypes of q, k, v
        (accumulated in float32, float64 for float64 input); with grouped-query
        attention dk, dv sum over the query heads sharing a K/V head.

    Raises
    ------
    ValueError, TypeError, MemoryError
        On every rank, naming the argument and the rank at fault, before any
        communication but the agreement.
    """
    with comms.call(comm, "hybrid_attention_backward", tag) as context:
        call = _HybridCall(context, "hybrid_attention_backward", (q, k, v), (dout, out, lse),
                           ulysses_size, softmax_scale, layout, causal, window, seqlens,
                           transport, False, qkv_format)
        p, inside, lengths, mask = call.p, call.inside, call.group_lengths, call.mask
        xp = p.xp
        grad, out4, lse4 = p.extras(dout, out, lse)
        with comms.communicating():
            comms.progress("all-to-all of q, k, v, dout inside the group", "the group's ranks")
            delta = p.kernel.backward_delta(grad, out4)
            q_h, k_h, v_h, g_h = (_to_head_shards(xp, inside, x, lengths)
                                  for x in (p.q, p.k, p.v, grad))
            lse_h, delta_h = (_rows_to_head_shards(xp, inside, x, lengths)
                              for x in (lse4, delta))
        heads = prepare(q_h, k_h, v_h, p.scale)

        def acquire(sub, own):
            dq = xp.zeros(sub.q.shape, dtype=sub.accumulator)
            return dq, [xp.zeros(x.shape, dtype=sub.accumulator) for x in own]

        ring = _Ring.placed(call.across, context.comm, "hybrid_attention_backward", heads,
                            call.placement, call.placement, mask, transport, acquire,
                            backward=True)
        dq, dkv = ring.resources
        parts, home = ring.gradient_buffers

        def attend(kv, source, targets, keys):
            for block in ring.blocks(source, keys):
                rows, cols = block.q_rows, block.k_rows
                heads.kernel.backward(g_h[:, rows], heads.q[:, rows], kv[0][:, cols],
                                      kv[1][:, cols], lse_h[:, :, rows], delta_h[:, :, rows],
                                      scale=heads.scale, mask=mask if block.masked else None,
                                      q_offset=block.q_offset, k_offset=block.k_offset,
                                      dq=dq[:, rows], dk=targets[0][:, cols],
                                      dv=targets[1][:, cols], accumulate=True,
                                      deterministic=deterministic)

        ring.run(attend, own_targets=dkv, visiting_targets=parts, returns=home)
        with comms.communicating():
            comms.progress("all-to-all of dq, dk, dv inside the group", "the group's ranks")
            grads = tuple(_to_sequence_shards(xp, inside, x, lengths) for x in (dq, *dkv))
        return p.finish_gradients(*grads)


class _HybridCall:
    """Checks and agreement of one hybrid call (either direction) over the whole
    communicator, then its groups: the Ulysses group's transport and lengths, the
    ring's context, the placement of each group's tokens and the mask."""

    def __init__(self, context, function, qkv, extra_inputs, ulysses_size, softmax_scale,
                 layout, causal, window, seqlens, transport, check_finite, qkv_format):
        q, k, v = qkv
        comm = context.comm
        size = comm.size

        def check():
            if isinstance(ulysses_size, bool) or not isinstance(ulysses_size, (int, np.integer)) \
                    or ulysses_size < 1 or size % ulysses_size:
                raise ValueError(f"ulysses_size must be a divisor of the number of ranks "
                                 f"({size}), got {ulysses_size!r}")
            settings = check_sequence_inputs(qkv, extra_inputs, layout=layout,
                                             heads_divisor=int(ulysses_size), same_length=True,
                                             causal=causal, softmax_scale=softmax_scale,
                                             transport=transport, comm=context, window=window,
                                             seqlens=seqlens, check_finite=check_finite,
                                             qkv_format=qkv_format)
            settings["ulysses_size"] = int(ulysses_size)
            return settings

        inputs = qkv + (() if extra_inputs is None else tuple(extra_inputs))
        # the forward's single agreement allocated nothing beyond prepare(); the
        # backward's all-to-alls do, so their bytes are checked here like Ulysses'
        extra = None if extra_inputs is None else \
            (lambda _: all_to_all_bytes(qkv, extra_inputs))
        agreement = agree(comm, function, check, ATTENTION_SETTINGS + ("ulysses_size",),
                          lambda _: prepare(q, k, v, softmax_scale), share=("q length",),
                          inputs=inputs, extra_bytes=extra)
        self.p = agreement.resources
        lengths = agreement.shared["q length"].tolist()
        settings = agreement.settings
        if layout == "zigzag" and len(set(lengths)) != 1:
            raise comms.collective(ValueError(
                f"zigzag layout needs the same length on every rank, got {lengths}"))
        if settings["seqlens"] is not None and sum(settings["seqlens"]) != sum(lengths):
            raise comms.collective(ValueError(
                f"seqlens sum to {sum(settings['seqlens'])} but the global sequence has "
                f"{sum(lengths)} tokens"))
        self.mask = Mask.build(causal, settings["window"], settings["seqlens"])
        u = int(ulysses_size)
        group, self.across = groups_of(context, u)
        g = comm.rank // u
        self.group_lengths = lengths[g * u:(g + 1) * u]
        self.placement = Placement.grouped(Placement.of(layout, lengths), u)
        self.inside = get_transport(group, self.p.q, transport)


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
