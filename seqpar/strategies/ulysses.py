"""Ulysses attention: all-to-all from sequence shards to head shards and back."""
from __future__ import annotations

import numpy as np


from .. import comms
from .._interop import accepts_dlpack
from .._typing import Array, Comm, Gradients, Output, Seqlens, Window
from ..layout import segments
from ..masks import Mask
from ..merge import carried_lse
from ..transport import get_transport
from ..validation import ATTENTION_SETTINGS, agree
from ._plan import plan_blocks
from ._prepare import accepts_qkv_format, check_sequence_inputs, prepare

__all__ = ["ulysses_attention", "ulysses_attention_backward"]


@accepts_dlpack("q", "k", "v")
@accepts_qkv_format("q", "k", "v")
def ulysses_attention(q: Array, k: Array, v: Array, *, comm: Comm | None = None,
                      causal: bool = False, softmax_scale: float | None = None,
                      layout: str = "contiguous", return_lse: bool = False,
                      transport: str = "auto", window: Window = None, seqlens: Seqlens = None,
                      check_finite: bool = False, tag: int | None = None,
                      qkv_format: str = "bshd") -> Output:
    """Exact attention by head parallelism: every head still sees every token.

    An all-to-all turns "S/P tokens, all heads" into "all tokens, H/P heads" on each
    rank; local attention runs on those heads; a second all-to-all turns the result
    back. Exact because one head's softmax is never split.

    Parameters
    ----------
    q : numpy.ndarray or cupy.ndarray, shape (B, S, Hq, D) or (S, Hq, D)
        This rank's queries. With ``layout="contiguous"`` S may differ across ranks.
    k, v : shape (B, S, Hk, D) or (S, Hk, D)
        As many tokens as q on this rank. Hq and Hk must both be multiples of the
        number of ranks P, and Hq of Hk. Any memory layout; never written.
    comm : mpi4py.MPI.Comm, optional
        Defaults to ``MPI.COMM_WORLD``.
    tag : int, optional
        Pairs this call only with calls of the same tag (0 to 32767) on the other
        ranks; needed for calls from threads other than the main thread, which run
        in a different order on each rank (see :mod:`seqpar.comms`).
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
    window, seqlens : optional
        Sliding window and packed documents by global position (see
        :func:`seqpar.ring_attention`).
    check_finite : bool
        Raise ValueError on every rank if any rank's q, k or v holds NaN or Inf.
    qkv_format : {"bshd", "bhsd"}
        The order of the axes of q, k, v and out (see :func:`seqpar.ring_attention`).

    Returns
    -------
    out : array of q's type, shape and dtype; (out, lse) when ``return_lse``.
    """
    with comms.call(comm, "ulysses_attention", tag) as context:
        call = _UlyssesCall(context, "ulysses_attention", (q, k, v), None, softmax_scale,
                            layout, causal, window, seqlens, transport, check_finite,
                            qkv_format)
        p, mover, lengths = call.p, call.mover, call.lengths
        xp = p.xp
        with comms.communicating():
            comms.progress("all-to-all of q, k, v", "every rank")
            q_all, k_all, v_all = (_to_head_shards(xp, mover, x, lengths) for x in (p.q, p.k, p.v))
            batch, _, hq, _ = p.q.shape
            out = xp.zeros(q_all.shape, dtype=p.accumulator)
            lse = p.new_lse(sum(lengths), heads=hq // len(lengths))
            comms.progress("local attention")
            for block in call.blocks():
                p.kernel.forward(q_all[:, block.q_rows], k_all[:, block.k_rows],
                                 v_all[:, block.k_rows], scale=p.scale,
                                 mask=call.mask if block.masked else None,
                                 q_offset=block.q_offset, k_offset=block.k_offset,
                                 out=out[:, block.q_rows], lse=lse[:, :, block.q_rows],
                                 accumulate=True)
            comms.progress("all-to-all of the output", "every rank")
            out = _to_sequence_shards(xp, mover, out, lengths)
            if return_lse:
                lse = _rows_to_sequence_shards(xp, mover, carried_lse(lse), lengths)
        return p.finish(out, lse, return_lse)


@accepts_dlpack("dout", "q", "k", "v", "out", "lse")
@accepts_qkv_format("dout", "q", "k", "v", "out", returns="gradients")
def ulysses_attention_backward(dout: Array, q: Array, k: Array, v: Array, out: Array, lse: Array,
                               *, comm: Comm | None = None, causal: bool = False,
                               softmax_scale: float | None = None, layout: str = "contiguous",
                               transport: str = "auto", window: Window = None,
                               seqlens: Seqlens = None, tag: int | None = None,
                               deterministic: bool = True, qkv_format: str = "bshd") -> Gradients:
    """Gradients of :func:`ulysses_attention` for this rank's slices of q, k and v.

    The forward's all-to-alls, mirrored: q, k, v, dout and the per-row lse and
    delta = rowsum(dout * out) go to head shards, the local backward runs over all
    tokens of H/P heads, and dq, dk, dv come back to sequence shards.

    Parameters
    ----------
    dout : array like q
        Gradient of the loss with respect to this rank's forward output.
    q, k, v : this rank's forward inputs (any memory layout; never written)
    out, lse : this rank's forward output and log-sum-exp (``return_lse=True``).
    comm, causal, softmax_scale, layout, transport, window, seqlens, tag, qkv_format :
        as for the forward (``qkv_format`` also orders the axes of dout, out and of
        the gradients returned).
    deterministic : bool
        True (the default): the same bytes on every run. False lets the Hopper
        backward add dq in any order (faster; rounding then varies run to run).

    Returns
    -------
    dq, dk, dv : this rank's gradients, of the shapes and dtypes of q, k, v.
    """
    with comms.call(comm, "ulysses_attention_backward", tag) as context:
        call = _UlyssesCall(context, "ulysses_attention_backward", (q, k, v), (dout, out, lse),
                            softmax_scale, layout, causal, window, seqlens, transport, False,
                            qkv_format)
        p, mover, lengths = call.p, call.mover, call.lengths
        xp, acc = p.xp, p.accumulator
        grad, out4, lse4 = p.extras(dout, out, lse)
        with comms.communicating():
            comms.progress("all-to-all of q, k, v, dout", "every rank")
            delta = p.kernel.backward_delta(grad, out4)
            q_all, k_all, v_all, g_all = (_to_head_shards(xp, mover, x, lengths)
                                          for x in (p.q, p.k, p.v, grad))
            lse_all, delta_all = (_rows_to_head_shards(xp, mover, x, lengths)
                                  for x in (lse4, delta))
            dq, dk, dv = (xp.zeros(x.shape, dtype=acc) for x in (q_all, k_all, v_all))
            comms.progress("local backward")
            for block in call.blocks():
                rows, keys = block.q_rows, block.k_rows
                p.kernel.backward(g_all[:, rows], q_all[:, rows], k_all[:, keys], v_all[:, keys],
                                  lse_all[:, :, rows], delta_all[:, :, rows], scale=p.scale,
                                  mask=call.mask if block.masked else None,
                                  q_offset=block.q_offset, k_offset=block.k_offset,
                                  dq=dq[:, rows], dk=dk[:, keys], dv=dv[:, keys],
                                  accumulate=True, deterministic=deterministic)
            comms.progress("all-to-all of dq, dk, dv", "every rank")
            grads = tuple(_to_sequence_shards(xp, mover, x, lengths) for x in (dq, dk, dv))
        return p.finish_gradients(*grads)


class _UlyssesCall:
    """Checks and agreement of one Ulysses call (either direction), and its plan."""

    def __init__(self, context, function, qkv, extra_inputs, softmax_scale, layout, causal,
                 window, seqlens, transport, check_finite, qkv_format):
        q, k, v = qkv
        comm = context.comm
        size = comm.size

        def check():
            return check_sequence_inputs(qkv, extra_inputs, layout=layout, heads_divisor=size,
                                         same_length=True, causal=causal,
                                         softmax_scale=softmax_scale, transport=transport,
                                         comm=context, window=window, seqlens=seqlens,
                                         check_finite=check_finite, qkv_format=qkv_format)

        inputs = qkv + (() if extra_inputs is None else tuple(extra_inputs))
        agreement = agree(comm, function, check, ATTENTION_SETTINGS,
                          lambda _: prepare(q, k, v, softmax_scale), share=("q length",),
                          inputs=inputs, extra_bytes=lambda _: all_to_all_bytes(qkv,
                                                                                extra_inputs))
        self.p = agreement.resources
        self.lengths = agreement.shared["q length"].tolist()
        if layout == "zigzag" and len(set(self.lengths)) != 1:
            raise comms.collective(ValueError(
                f"zigzag layout needs the same length on every rank, got {self.lengths}"))
        settings = agreement.settings
        if settings["seqlens"] is not None and sum(settings["seqlens"]) != sum(self.lengths):
            raise comms.collective(ValueError(
                f"seqlens sum to {sum(settings['seqlens'])} but the global sequence has "
                f"{sum(self.lengths)} tokens"))
        self.mask = Mask.build(causal, settings["window"], settings["seqlens"])
        self.layout = layout
        self.mover = get_transport(context, self.p.q, transport)

    def blocks(self):
        """Kernel calls over the gathered tokens (source ranks in order)."""
        gathered = [run for source in range(len(self.lengths))
                    for run in segments(self.layout, self.lengths, source)]
        return plan_blocks(gathered, gathered, self.mask)


def all_to_all_bytes(qkv, extra_inputs) -> int:
    """Host bytes the all-to-alls and the local pass of a Ulysses-style call allocate
    after its agreement (``extra_inputs``: None for the forward, (dout, out, lse) for
    the backward), for :func:`seqpar.validation.agree`'s memory check."""
    q = qkv[0]
    if not isinstance(q, np.ndarray):
        return 0  # device memory is allocated eagerly: CuPy raises in time
    # head shards of the inputs (and dout), their send and receive copies, the output
    # and its way back in the accumulation dtype (twice that for the gradients)
    arrays = tuple(qkv) + (() if extra_inputs is None else tuple(extra_inputs[:1]))
    inputs = sum(x.nbytes for x in arrays)
    outputs = q.size * (8 if q.dtype.name == "float64" else 4)
    return 3 * inputs + (3 if extra_inputs is None else 6) * outputs


def _to_head_shards(xp, mover, x, lengths):
    """(B, S_r, H, D) sequence shard -> (B, sum S, H/P, D) head shard, tokens by source."""
    size = len(lengths)
    batch, s, h, d = x.shape
    send = xp.ascontiguousarray(x.reshape(batch, s, size, h // size, d).transpose(2, 0, 1, 3, 4))
    per_token = batch * (h // size) * d * x.itemsize
    recv = xp.empty(sum(lengths) * per_token // x.itemsize, dtype=x.dtype)
    mover.alltoall(send, recv, [s * per_token] * size, [n * per_token for n in lengths])
    pieces, offset = [], 0
    for n in lengths:  # each source's block is (B, S_source, H/P, D)
        count = n * per_token // x.itemsize
        pieces.append(recv[offset:offset + count].reshape(batch, n, h // size, d))
        offset += count
    return xp.concatenate(pieces, axis=1)


def _to_sequence_shards(xp, mover, x, lengths):
    """Inverse of :func:`_to_head_shards`: (B, sum S, H/P, D) -> (B, S_r, H, D)."""
    size = len(lengths)
    rank = mover.comm.rank
    batch, _, h_local, d = x.shape
    starts = [sum(lengths[:r]) for r in range(size)]
    send = xp.concatenate([xp.ascontiguousarray(x[:, a:a + n]).reshape(-1)
                           for a, n in zip(starts, lengths)])
    per_token = batch * h_local * d * x.itemsize
    mine = lengths[rank]
    recv = xp.empty((size, batch, mine, h_local, d), dtype=x.dtype)
    mover.alltoall(send, recv, [n * per_token for n in lengths], [mine * per_token] * size)
    return xp.ascontiguousarray(recv.transpose(1, 2, 0, 3, 4)).reshape(batch, mine,
                                                                        size * h_local, d)


def _rows_to_head_shards(xp, mover, x, lengths):
    """Per-row values (B, H, S_r) -> (B, H/P, sum S), by the same exchange as tokens."""
    moved = _to_head_shards(xp, mover, xp.ascontiguousarray(x.transpose(0, 2, 1))[..., None],
                            lengths)
    return xp.ascontiguousarray(moved[..., 0].transpose(0, 2, 1))


def _rows_to_sequence_shards(xp, mover, x, lengths):
    """Inverse of :func:`_rows_to_head_shards`: (B, H/P, sum S) -> (B, H, S_r)."""
    moved = _to_sequence_shards(xp, mover, xp.ascontiguousarray(x.transpose(0, 2, 1))[..., None],
                                lengths)
    return xp.ascontiguousarray(moved[..., 0].transpose(0, 2, 1))
