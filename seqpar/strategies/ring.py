"""Ring attention: K/V blocks travel between ranks; each rank merges every block it needs."""
from __future__ import annotations

import functools
import logging

import numpy as np

from .. import comms
from .._interop import accepts_dlpack
from .._typing import Array, Comm, Gradients, Output, Seqlens, Window
from ..layout import Placement
from ..log import Steps
from ..masks import UNBOUNDED, Mask
from ..transport import get_transport
from ..validation import ATTENTION_SETTINGS, agree
from ._plan import plan_blocks
from ._prepare import accepts_qkv_format, check_sequence_inputs, prepare

__all__ = ["ring_attention", "ring_attention_backward", "RingSchedule"]

# the steps of long calls, on rank 0 (see seqpar.log); hybrid and the backward run here too
_LOG = logging.getLogger("seqpar.ring")


@accepts_dlpack("q", "k", "v")
@accepts_qkv_format("q", "k", "v")
def ring_attention(q: Array, k: Array, v: Array, *, comm: Comm | None = None, causal: bool = False,
                   softmax_scale: float | None = None, layout: str = "contiguous",
                   return_lse: bool = False, transport: str = "auto",
                   stats: dict | None = None, window: Window = None, seqlens: Seqlens = None,
                   check_finite: bool = False, tag: int | None = None,
                   qkv_format: str = "bshd") -> Output:
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
    tag : int, optional
        Pairs this call only with calls of the same tag (0 to 32767) on the other
        ranks; needed for calls from threads other than the main thread, which run
        in a different order on each rank (see :mod:`seqpar.comms`).
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
        Filled with "transport" (the one that ran), "bytes_per_step" (the block
        this rank sends), "bytes_sent", "steps" (transfers this rank took part in,
        of P - 1) and "exposed_seconds" (per step, how long compute waited for the
        next block; for CuPy this synchronises with the stream at the end).
    window : (left, right), optional
        Sliding window by global position: query i sees key j only if
        i - left <= j <= i + right (``None``: unbounded).
    seqlens : sequence of int, optional
        Lengths of the documents packed one after another in the global sequence
        (the same on every rank, summing to the global length): a query sees
        only keys of its own document.
    check_finite : bool
        Raise ValueError on every rank if any rank's q, k or v holds NaN or Inf.
    qkv_format : {"bshd", "bhsd"}
        The order of the axes of q, k, v and out, the same on every rank: "bshd" as
        above, or "bhsd", (B, H, S, D) ((H, S, D) for 3-D input), PyTorch's. "bhsd"
        arrays are read as views (no copy) and out comes back as a (B, H, S, D)
        view; lse is (B, Hq, S) either way.

    Returns
    -------
    out : array of q's type, shape and dtype; (out, lse) when ``return_lse``.

    Raises
    ------
    ValueError, TypeError, MemoryError
        On every rank, naming the argument and the rank at fault, before any
        point-to-point traffic.
    """
    with comms.call(comm, "ring_attention", tag) as context:
        def acquire(p, own):
            return p.xp.zeros(p.q.shape, dtype=p.accumulator), p.new_lse(p.q.shape[1])

        ring = _Ring.agreed(context, "ring_attention", (q, k, v), softmax_scale, layout, causal,
                            window, seqlens, transport, check_finite, acquire,
                            qkv_format=qkv_format)
        p, (out, lse) = ring.p, ring.resources

        def attend(kv, source, _, keys):
            for block in ring.blocks(source, keys):
                p.kernel.forward(p.q[:, block.q_rows], kv[0][:, block.k_rows],
                                 kv[1][:, block.k_rows], scale=p.scale,
                                 mask=ring.mask if block.masked else None,
                                 q_offset=block.q_offset, k_offset=block.k_offset,
                                 out=out[:, block.q_rows], lse=lse[:, :, block.q_rows],
                                 accumulate=True)

        exchange = ring.run(attend)
        if stats is not None:
            stats.update(transport=ring.mover.name, bytes_per_step=2 * ring.own[0].nbytes,
                         bytes_sent=exchange.nbytes, steps=exchange.steps,
                         exposed_seconds=exchange.exposed_seconds())
        return p.finish(out, lse, return_lse)


@accepts_dlpack("dout", "q", "k", "v", "out", "lse")
@accepts_qkv_format("dout", "q", "k", "v", "out", returns="gradients")
def ring_attention_backward(dout: Array, q: Array, k: Array, v: Array, out: Array, lse: Array, *,
                            comm: Comm | None = None, causal: bool = False,
                            softmax_scale: float | None = None, layout: str = "contiguous",
                            transport: str = "auto", window: Window = None,
                            seqlens: Seqlens = None, stats: dict | None = None,
                            tag: int | None = None, deterministic: bool = True,
                            qkv_format: str = "bshd") -> Gradients:
    """Gradients of :func:`ring_attention` for this rank's slices of q, k and v.

    K/V travel as in the forward; the gradient of each block's keys and values
    (float32, float64 for float64 input) is computed where the block visits and
    sent back to the rank that owns it in the same step, so every rank ends with
    the full dk, dv of its own slice. Per step a rank sends its K/V (as in the
    forward) and one partial dK/dV in the accumulation dtype: for bfloat16 or
    float16 inputs, three times the forward's bytes.

    Parameters
    ----------
    dout : array like q
        Gradient of the loss with respect to this rank's forward output.
    q, k, v : this rank's forward inputs (any memory layout; never written)
    out, lse : this rank's forward output and log-sum-exp (``return_lse=True``:
        (B, Hq, S), float32 or float64).
    comm, causal, softmax_scale, layout, transport, window, seqlens, tag, qkv_format :
        as for the forward, and the same on every rank (``qkv_format`` also orders
        the axes of dout, out and of the gradients returned).
    stats : dict, optional
        Filled like the forward's, for the K/V exchange, plus "gradient_bytes_sent".
    deterministic : bool
        True (the default): the same bytes on every run. False lets the Hopper
        backward add dq in any order (faster; rounding then varies run to run).

    Returns
    -------
    dq, dk, dv : this rank's gradients, of the shapes and dtypes of q, k, v; with
        grouped-query attention dk, dv sum over the query heads sharing a K/V head.
    """
    with comms.call(comm, "ring_attention_backward", tag) as context:
        def acquire(p, own):
            grad, lse4, out4 = p.extras(dout, lse, out)
            delta = p.kernel.backward_delta(grad, out4)
            dq = p.xp.zeros(p.q.shape, dtype=p.accumulator)
            dkv = [p.xp.zeros(x.shape, dtype=p.accumulator) for x in own]
            return grad, lse4, delta, dq, dkv

        ring = _Ring.agreed(context, "ring_attention_backward", (q, k, v), softmax_scale,
                            layout, causal, window, seqlens, transport, False, acquire,
                            extra_inputs=(dout, out, lse), qkv_format=qkv_format)
        p = ring.p
        grad, lse4, delta, dq, dkv = ring.resources
        parts, home = ring.gradient_buffers

        def attend(kv, source, targets, keys):
            for block in ring.blocks(source, keys):
                p.kernel.backward(grad[:, block.q_rows], p.q[:, block.q_rows],
                                  kv[0][:, block.k_rows], kv[1][:, block.k_rows],
                                  lse4[:, :, block.q_rows], delta[:, :, block.q_rows],
                                  scale=p.scale, mask=ring.mask if block.masked else None,
                                  q_offset=block.q_offset, k_offset=block.k_offset,
                                  dq=dq[:, block.q_rows], dk=targets[0][:, block.k_rows],
                                  dv=targets[1][:, block.k_rows], accumulate=True,
                                  deterministic=deterministic)

        gradients = ring.run(attend, own_targets=dkv, visiting_targets=parts,
                             returns=home)
        if stats is not None:
            stats.update(transport=ring.mover.name, gradient_bytes_sent=gradients.nbytes)
        return p.finish_gradients(dq, *dkv)


class _Ring:
    """One ring call on this rank: the placements, the schedule, buffers, the step loop."""

    def __init__(self, context, p, own, q_place, k_place, mask, mover, buffers, resources):
        self.context, self.p, self.own, self.mask, self.mover = context, p, own, mask, mover
        self.q_place, self.k_place, self.resources = q_place, k_place, resources
        self._kv_buffers, self.gradient_buffers = buffers
        self.schedule = RingSchedule.make(q_place, k_place, mask, context.comm.rank)

    @classmethod
    def agreed(cls, context, function, qkv, softmax_scale, layout, causal, window, seqlens,
               transport, check_finite, acquire, extra_inputs=None,
               qkv_format="bshd") -> "_Ring":
        """Check the arguments and acquire everything with every rank, for q, k, v laid
        out by ``layout``; ``acquire(p, own)`` allocates the caller's outputs."""
        q, k, v = qkv
        comm = context.comm
        backward = extra_inputs is not None

        def check():
            return check_sequence_inputs(qkv, extra_inputs, layout=layout, causal=causal,
                                         softmax_scale=softmax_scale, transport=transport,
                                         comm=context, window=window, seqlens=seqlens,
                                         check_finite=check_finite, qkv_format=qkv_format)

        def acquire_all(settings):
            p = prepare(q, k, v, softmax_scale)
            own = [p.xp.ascontiguousarray(x) for x in (p.k, p.v)]  # sent as they are
            return p, own, _block_buffers(p, own, own[0].size, backward), acquire(p, own)

        inputs = tuple(qkv) + tuple(extra_inputs or ())
        agreement = agree(comm, function, check, ATTENTION_SETTINGS, acquire_all,
                          share=("q length", "k length"), inputs=inputs)
        p, own, buffers, resources = agreement.resources
        q_lengths = tuple(agreement.shared["q length"].tolist())
        k_lengths = tuple(agreement.shared["k length"].tolist())
        for name, lengths in (("q", q_lengths), ("k", k_lengths)):
            if layout == "zigzag" and len(set(lengths)) != 1:
                raise comms.collective(ValueError(
                    f"zigzag layout needs the same {name} length on every rank, got "
                    f"{list(lengths)}"))
        settings = agreement.settings
        if settings["seqlens"] is not None and sum(settings["seqlens"]) != sum(k_lengths):
            raise comms.collective(ValueError(
                f"seqlens sum to {sum(settings['seqlens'])} but the global sequence has "
                f"{sum(k_lengths)} tokens"))
        mask = Mask.build(causal, settings["window"], settings["seqlens"])
        q_place, k_place = Placement.of(layout, q_lengths), Placement.of(layout, k_lengths)
        if len(set(k_lengths)) > 1:  # uneven shards (all ranks know): size buffers anew
            capacity = _capacity(p, own, q_place, k_place, mask, comm.rank)
            buffers = agree(comm, function, dict, (), lambda _: _block_buffers(
                p, own, capacity, backward), inputs=inputs).resources
        return cls(context, p, own, q_place, k_place, mask,
                   get_transport(context, p.q, transport), buffers, resources)

    @classmethod
    def placed(cls, context, everyone, function, p, q_place, k_place, mask, transport,
               acquire, backward=False) -> _Ring:
        """A ring on ``context``'s communicator for arguments already agreed on the wider
        communicator ``everyone``, which also agrees that every rank could allocate the
        buffers (before any point-to-point message); ``backward``: with the buffers of
        the partial dK/dV that travel home (:attr:`gradient_buffers`)."""
        def allocate(_):
            own = [p.xp.ascontiguousarray(x) for x in (p.k, p.v)]
            capacity = _capacity(p, own, q_place, k_place, mask, context.comm.rank)
            return own, _block_buffers(p, own, capacity, backward), acquire(p, own)

        own, buffers, resources = agree(everyone, function, dict, (), allocate,
                                        inputs=(p.q, p.k, p.v)).resources
        return cls(context, p, own, q_place, k_place, mask,
                   get_transport(context, p.q, transport), buffers, resources)

    def blocks(self, source, keys=None):
        """The kernel calls between this rank's queries and rank ``source``'s keys
        (only its local keys [keys[0], keys[1]) when given: what was sent)."""
        runs = self.k_place.segments(source)
        if keys is not None:
            runs = _restrict(runs, *keys)
        return plan_blocks(self.q_place.segments(self.context.comm.rank), runs, self.mask)

    def run(self, attend, own_targets=None, visiting_targets=None, returns=None):
        """The step loop: ``attend(kv, source, targets, keys)`` for this rank's own
        block and every block it receives (``keys``: which of the source's keys came),
        the next transfer overlapping the current compute.

        With ``returns`` (receive buffers), the arrays ``attend`` filled for a visiting
        block (``visiting_targets``, two sets used in turn, zeroed first) travel back to
        the block's owner in the same step and are added into ``own_targets``; returns
        that exchange, else the K/V exchange.
        """
        comm, steps, mover = self.context.comm, self.schedule.steps, self.mover
        size, sets = comm.size, self._kv_buffers
        record = comms.current_call()  # the user's call (hybrid's, not its ring's group)
        log = Steps(_LOG, record.function if record else "ring", len(steps) +
                    self.schedule.needs_own, report=(record.comm if record else comm).rank == 0)
        with comms.communicating(), mover.exchange() as exchange:
            back = mover.exchange(after=exchange) if returns is not None else None
            try:
                if steps:
                    self._start(exchange, steps[0], sets[0])
                if self.schedule.needs_own:
                    comms.progress("own block")
                    attend(self.own, comm.rank, own_targets, None)
                    log.done()
                pending = None  # the step whose gradients travel home
                for i, step in enumerate(steps):
                    with comms.waiting(f"step {step.shift}: waiting for the transfer",
                                       step.peers):
                        exchange.wait()
                    received = self._blocks_in(sets[i % 2], step.recv)
                    if i + 1 < len(steps):
                        self._start(exchange, steps[i + 1], sets[(i + 1) % 2])
                    targets = None
                    if step.source is not None:
                        comms.progress(f"step {step.shift}: block of rank {step.source}")
                        if back is not None:
                            targets = [flat[:a.size].reshape(a.shape) for flat, a in
                                       zip(visiting_targets[i % 2], received)]
                            for t in targets:
                                t.fill(0)
                        attend(received, step.source, targets, step.recv)
                    if back is not None:
                        if pending is not None:
                            self._add_home(self._wait_home(back, pending), own_targets,
                                           pending.send)
                        # this block's gradient goes home; ours comes from where ours went
                        back.start(targets or [], step.source, step.dest,
                                   self._blocks_in(returns, step.send) if step.dest is not None
                                   else [], tag=size + step.shift)
                        pending = step
                    log.done()
                if back is not None and pending is not None:
                    self._add_home(self._wait_home(back, pending), own_targets, pending.send)
            finally:
                if back is not None:
                    back.free()
        return back if back is not None else exchange

    def _blocks_in(self, flats, keys):
        """(B, keys, H, D) views of flat buffers for a range of keys (or [])."""
        if keys is None:
            return []
        shape = (self.p.k.shape[0], keys[1] - keys[0]) + self.p.k.shape[2:]
        count = int(np.prod(shape))
        return [flat[:count].reshape(shape) for flat in flats]

    def _start(self, exchange, step, flats):
        """Post a step: our keys [send) row by row of the batch, the source's into flats."""
        comms.progress(f"step {step.shift}: posting the transfer")
        sends = []
        if step.dest is not None:
            a, b = step.send
            sends = [x[i, a:b] for x in self.own for i in range(x.shape[0])]
        recvs = [block[i] for block in self._blocks_in(flats, step.recv)
                 for i in range(block.shape[0])]
        exchange.start(sends, step.dest, step.source, recvs, tag=step.shift)

    @staticmethod
    def _wait_home(back, step):
        with comms.waiting(f"step {step.shift}: waiting for gradients to come home",
                           step.peers):
            return back.wait()

    @staticmethod
    def _add_home(arrived, own_targets, keys):
        for target, part in zip(own_targets, arrived):
            target[:, keys[0]:keys[1]] += part


def _restrict(runs, first, last):
    """The (global start, length) runs of local indices [first, last) of ``runs``."""
    cut, offset = [], 0
    for start, length in runs:
        a, b = max(first, offset), min(last, offset + length)
        if a < b:
            cut.append((start + a - offset, b - a))
        offset += length
    return cut


def _capacity(p, own, q_place, k_place, mask, rank) -> int:
    """Elements of the largest block this rank will receive (or send)."""
    largest = RingSchedule.make(q_place, k_place, mask, rank).largest_receive
    return max(own[0].size, largest * p.k.shape[0] * p.k.shape[2] * p.k.shape[3])


def _block_buffers(p, own, size, backward):
    """Flat buffers of ``size`` elements, one per array of a block: two sets for the
    K/V that arrive, used in turn; for the backward also two sets for the partial
    dK/dV of a visiting block (one computed while the other travels home) and one
    for what comes home, in the accumulation dtype."""
    def sets(count, dtype):
        return [[p.xp.empty(size, dtype=dtype) for _ in own] for _ in range(count)]

    gradients = (sets(2, p.accumulator), sets(1, p.accumulator)[0]) if backward else None
    return sets(2, own[0].dtype), gradients


class _Step:
    """One shift: send our keys [send[0], send[1]) to ``dest``, receive the keys
    [recv[0], recv[1]) of ``source`` (local indices of the owner); None: no transfer."""

    __slots__ = ("shift", "dest", "source", "send", "recv")

    def __init__(self, shift, dest, source, send, recv):
        self.shift, self.dest, self.source, self.send, self.recv = shift, dest, source, send, recv

    @property
    def peers(self) -> str:
        ranks = sorted({r for r in (self.dest, self.source) if r is not None})
        return " and ".join(f"rank {r}" for r in ranks)


class RingSchedule:
    """Which keys this rank sends and receives at each shift, from global positions.

    ``steps``: the shifts at which this rank sends (some of) its K/V or receives
    another's; only the keys some query of the receiver can see travel (a window
    or documents cut most of a block away). ``largest_receive``: the most keys one
    received block holds.
    """

    def __init__(self, steps, needs_own, largest_receive):
        self.steps = steps
        self.needs_own = needs_own
        self.largest_receive = largest_receive

    @classmethod
    @functools.lru_cache(maxsize=64)
    def make(cls, q_place: Placement, k_place: Placement, mask, rank) -> "RingSchedule":
        size = q_place.size
        steps, largest = [], 0
        for shift in range(1, size):
            source, dest = (rank - shift) % size, (rank + shift) % size
            recv = visible_keys(q_place, k_place, mask, rank, source)
            send = visible_keys(q_place, k_place, mask, dest, rank)
            if recv is not None or send is not None:
                steps.append(_Step(shift, dest if send else None, source if recv else None,
                                   send, recv))
            if recv is not None:
                largest = max(largest, recv[1] - recv[0])
        return cls(steps, visible_keys(q_place, k_place, mask, rank, rank) is not None, largest)


def visible_keys(q_place: Placement, k_place: Placement, mask, reader: int, owner: int):
    """The local key indices [a, b) of ``owner`` that some query of ``reader`` sees,
    or None. Each query segment sees one interval of positions (the mask's bounds
    never decrease), so the keys to send are one range of the owner's."""
    first, last = None, None
    for qs, ql in q_place.segments(reader):
        if ql <= 0:
            continue
        if mask is None:
            lo, hi = -UNBOUNDED, UNBOUNDED
        else:
            (lo, _), (_, hi) = mask.bounds([qs, qs + ql - 1])
        offset = 0
        for ks, kl in k_place.segments(owner):
            a, b = max(lo, ks), min(hi, ks + kl - 1)
            if kl > 0 and a <= b:
                first = offset + a - ks if first is None else min(first, offset + a - ks)
                last = offset + b - ks + 1 if last is None else max(last, offset + b - ks + 1)
            offset += kl
    return None if first is None else (int(first), int(last))
