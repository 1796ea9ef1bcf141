"""``seqpar check``: every strategy against a float64 softmax, and every backward
against float64 gradients, on small random problems."""
from __future__ import annotations

from typing import Callable

import numpy as np
from mpi4py import MPI

from .. import (
    attention,
    attention_backward,
    gather,
    hybrid_attention,
    hybrid_attention_backward,
    kv_sharded_attention,
    kv_sharded_attention_backward,
    ring_attention,
    ring_attention_backward,
    shard,
    ulysses_attention,
    ulysses_attention_backward,
)
from ..progress import Progress
from ._common import TOLERANCE, UsageError, array_module, dtype_for, say

__all__ = ["check"]

# Small enough to check in a second at any rank count; 24 tokens per rank split into
# zigzag's 2P chunks, 8 query heads over 4 K/V heads (grouped-query attention).
BATCH, TOKENS_PER_RANK, HEADS, KV_HEADS, HEAD_DIM = 2, 24, 8, 4, 32


def check(args) -> int:
    """Compare each strategy, dtype and mask with a float64 softmax; 1 if any is off."""
    comm = MPI.COMM_WORLD
    xp = array_module(args.gpu)
    dtypes, notes = [], []
    for name in ("float32", "float16", "bfloat16") if args.gpu else \
            ("float64", "float32", "float16", "bfloat16"):
        try:
            dtypes.append((name, dtype_for(name)))
        except UsageError as exc:
            notes.append(f"skip {name}: {exc}")
    strategies = _strategies(comm.size, args.transport, notes)
    cases = [(dtype, causal, name, run, reference) for dtype in dtypes for causal in (False, True)
             for name, run, with_causal, reference in strategies if with_causal or not causal]
    rng = np.random.default_rng(7)
    n = TOKENS_PER_RANK * comm.size
    q, k, v, dout = (rng.standard_normal((BATCH, n, h, HEAD_DIM))
                     for h in (HEADS, KV_HEADS, KV_HEADS, HEADS))
    failures, stats = 0, {}
    with Progress(len(cases), "check", comm=comm) as progress:
        for note in notes:
            progress.write(note)
        for (dtype_name, dtype), causal, name, run, reference in cases:
            cast = [x.astype(dtype) for x in (q, k, v, dout)]
            refs = reference(*cast, causal)
            outs = run(*(xp.asarray(x) for x in cast), causal, stats)
            outs = outs if isinstance(outs, tuple) else (outs,)
            # the worst of the outputs (dq, dk, dv for a backward), each by its own norm
            err = max(float(np.linalg.norm(_host(o).astype(np.float64) - r) / np.linalg.norm(r))
                      for o, r in zip(outs, refs))
            err = comm.allreduce(err, op=MPI.MAX)
            ok = err <= TOLERANCE[dtype_name]
            failures += not ok
            progress.write(f"{'ok  ' if ok else 'FAIL'} {name:20s} {dtype_name:8s} "
                           f"causal={causal!s:5s} error {err:.1e} "
                           f"(tolerance {TOLERANCE[dtype_name]:g})")
            progress.update(note=name)
    say(f"check: {comm.size} rank(s), transport {stats.get('transport', '-')}: "
        f"{len(cases) - failures} passed, {failures} failed", comm=comm)
    return 1 if failures else 0


def _strategies(size: int, transport: str, notes: list) -> list[tuple[str, Callable, bool,
                                                                       Callable]]:
    """(name, run, takes causal, reference): each run maps global q, k, v, dout to the
    global output (or gradients), the reference maps them to its float64 value."""
    def local(q, k, v, dout, causal, stats):
        return attention(q, k, v, causal=causal)

    def ring(layout):
        def run(q, k, v, dout, causal, stats):
            parts = [shard(x, layout=layout) for x in (q, k, v)]
            out = ring_attention(*parts, causal=causal, layout=layout, transport=transport,
                                 stats=stats)
            return gather(out, layout=layout)
        return run

    def kv_sharded(q, k, v, dout, causal, stats):
        # every rank: all queries, its slice of the keys; every rank gets the result
        return kv_sharded_attention(q, shard(k), shard(v), transport=transport)

    def ulysses(q, k, v, dout, causal, stats):
        out = ulysses_attention(*(shard(x) for x in (q, k, v)), causal=causal,
                                transport=transport)
        return gather(out)

    def local_backward(q, k, v, dout, causal, stats):
        out, lse = attention(q, k, v, causal=causal, return_lse=True)
        return attention_backward(dout, q, k, v, out, lse, causal=causal)

    def sequence_backward(forward, backward, layout):
        """A sharded strategy's backward (ring, Ulysses): gradients gathered."""
        def run(q, k, v, dout, causal, stats):
            parts = [shard(x, layout=layout) for x in (q, k, v, dout)]
            opts = {"causal": causal, "layout": layout, "transport": transport}
            out, lse = forward(*parts[:3], return_lse=True, **opts)
            grads = backward(parts[3], *parts[:3], out, lse, **opts)
            return tuple(gather(g, layout=layout) for g in grads)
        return run

    def kv_sharded_backward(q, k, v, dout, causal, stats):
        # dq the same on every rank; dk, dv this rank's key slice
        ks, vs = shard(k), shard(v)
        out, lse = kv_sharded_attention(q, ks, vs, transport=transport, return_lse=True)
        dq, dk, dv = kv_sharded_attention_backward(dout, q, ks, vs, out, lse,
                                                   transport=transport)
        return dq, gather(dk), gather(dv)

    def hybrid(u, backward):
        # zigzag: the grouped placement of the ring across groups is the least obvious part
        def run(q, k, v, dout, causal, stats):
            parts = [shard(x, layout="zigzag") for x in (q, k, v, dout)]
            opts = {"ulysses_size": u, "causal": causal, "layout": "zigzag",
                    "transport": transport}
            out, lse = hybrid_attention(*parts[:3], return_lse=True, **opts)
            if not backward:
                return gather(out, layout="zigzag")
            grads = hybrid_attention_backward(parts[3], *parts[:3], out, lse, **opts)
            return tuple(gather(g, layout="zigzag") for g in grads)
        return run

    forward, gradients = _softmax_reference, _gradient_reference
    found = [("attention", local, True, forward),
             ("attention backward", local_backward, True, gradients),
             ("ring/contiguous", ring("contiguous"), True, forward),
             ("ring/zigzag", ring("zigzag"), True, forward),
             ("ring/zigzag backward",
              sequence_backward(ring_attention, ring_attention_backward, "zigzag"), True,
              gradients),
             ("kv_sharded", kv_sharded, False, forward),
             ("kv_sharded backward", kv_sharded_backward, False, gradients)]
    if HEADS % size == 0 and KV_HEADS % size == 0:
        found += [("ulysses", ulysses, True, forward),
                  ("ulysses backward",
                   sequence_backward(ulysses_attention, ulysses_attention_backward,
                                     "contiguous"), True, gradients)]
    else:
        notes.append(f"skip ulysses: its {HEADS} query and {KV_HEADS} K/V heads do not "
                     f"divide by {size} ranks")
    # the smallest group of more than one rank (U = 1 is the ring, checked above), so
    # that a ring across groups runs wherever the ranks allow one (U < P)
    groups = [u for u in range(2, size + 1) if size % u == 0 and KV_HEADS % u == 0]
    if groups:
        u = groups[0]
        found += [(f"hybrid/U={u}", hybrid(u, False), True, forward),
                  (f"hybrid/U={u} backward", hybrid(u, True), True, gradients)]
    else:
        notes.append(f"skip hybrid: no group of U > 1 ranks divides the {size} rank(s), "
                     f"{HEADS} query heads and {KV_HEADS} K/V heads (U = 1 is the ring)")
    return found


def _host(x) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.get()


def _probabilities(q, k, causal: bool) -> np.ndarray:
    """Softmax over the keys, float64, shape (B, H, Sq, Sk) (K/V heads repeated)."""
    s = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1])
    if causal:
        s = np.where(np.triu(np.ones(s.shape[-2:], bool), 1), -np.inf, s)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def _softmax_reference(q, k, v, dout, causal: bool) -> tuple[np.ndarray]:
    """Plain float64 softmax attention of the (already cast) inputs."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    return (np.einsum("bhij,bjhd->bihd", _probabilities(q, k, causal), v),)


def _gradient_reference(q, k, v, dout, causal: bool) -> tuple[np.ndarray, ...]:
    """dq, dk, dv of that attention in float64, by the analytic formulas (dk, dv summed
    over the query heads that share a K/V head)."""
    q, k, v, dout = (x.astype(np.float64) for x in (q, k, v, dout))
    batch, sk, hk, d = k.shape
    group = q.shape[2] // hk
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    p = _probabilities(q, k, causal)
    out = np.einsum("bhij,bjhd->bihd", p, v)
    dp = np.einsum("bihd,bjhd->bhij", dout, v)
    ds = p * (dp - np.einsum("bihd,bihd->bhi", dout, out)[..., None]) / np.sqrt(d)
    dq = np.einsum("bhij,bjhd->bihd", ds, k)
    dk = np.einsum("bhij,bihd->bjhd", ds, q).reshape(batch, sk, hk, group, d).sum(axis=3)
    dv = np.einsum("bhij,bihd->bjhd", p, dout).reshape(batch, sk, hk, group, d).sum(axis=3)
    return dq, dk, dv
