"""``seqpar check``: every strategy against a float64 softmax, on small random problems."""
from __future__ import annotations

from typing import Callable

import numpy as np
from mpi4py import MPI

from .. import (attention, gather, kv_sharded_attention, ring_attention, shard,
                ulysses_attention)
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
    cases = [(dtype, causal, name, run) for dtype in dtypes for causal in (False, True)
             for name, run, with_causal in strategies if with_causal or not causal]
    rng = np.random.default_rng(7)
    n = TOKENS_PER_RANK * comm.size
    q, k, v = (rng.standard_normal((BATCH, n, h, HEAD_DIM)) for h in (HEADS, KV_HEADS, KV_HEADS))
    failures, stats = 0, {}
    with Progress(len(cases), "check", comm=comm) as progress:
        for note in notes:
            progress.write(note)
        for (dtype_name, dtype), causal, name, run in cases:
            cast = [x.astype(dtype) for x in (q, k, v)]
            ref = _softmax_reference(*cast, causal)
            out = _host(run(*(xp.asarray(x) for x in cast), causal, stats))
            err = float(np.linalg.norm(out.astype(np.float64) - ref) / np.linalg.norm(ref))
            err = comm.allreduce(err, op=MPI.MAX)
            ok = err <= TOLERANCE[dtype_name]
            failures += not ok
            progress.write(f"{'ok  ' if ok else 'FAIL'} {name:18s} {dtype_name:8s} "
                           f"causal={causal!s:5s} error {err:.1e} "
                           f"(tolerance {TOLERANCE[dtype_name]:g})")
            progress.update(note=name)
    say(f"check: {comm.size} rank(s), transport {stats.get('transport', '-')}: "
        f"{len(cases) - failures} passed, {failures} failed", comm=comm)
    return 1 if failures else 0


def _strategies(size: int, transport: str, notes: list) -> list[tuple[str, Callable, bool]]:
    """(name, run, takes causal): each run maps global q, k, v to the global output."""
    def local(q, k, v, causal, stats):
        return attention(q, k, v, causal=causal)

    def ring(layout):
        def run(q, k, v, causal, stats):
            parts = [shard(x, layout=layout) for x in (q, k, v)]
            out = ring_attention(*parts, causal=causal, layout=layout, transport=transport,
                                 stats=stats)
            return gather(out, layout=layout)
        return run

    def kv_sharded(q, k, v, causal, stats):
        # every rank: all queries, its slice of the keys; every rank gets the result
        return kv_sharded_attention(q, shard(k), shard(v), transport=transport)

    def ulysses(q, k, v, causal, stats):
        out = ulysses_attention(*(shard(x) for x in (q, k, v)), causal=causal,
                                transport=transport)
        return gather(out)

    found = [("attention", local, True), ("ring/contiguous", ring("contiguous"), True),
             ("ring/zigzag", ring("zigzag"), True), ("kv_sharded", kv_sharded, False)]
    if HEADS % size == 0 and KV_HEADS % size == 0:
        found.append(("ulysses", ulysses, True))
    else:
        notes.append(f"skip ulysses: its {HEADS} query and {KV_HEADS} K/V heads do not "
                     f"divide by {size} ranks")
    return found


def _host(x) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.get()


def _softmax_reference(q, k, v, causal: bool) -> np.ndarray:
    """Plain float64 softmax attention of the (already cast) inputs."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    s = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1])
    if causal:
        s = np.where(np.triu(np.ones(s.shape[-2:], bool), 1), -np.inf, s)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return np.einsum("bhij,bjhd->bihd", p / p.sum(axis=-1, keepdims=True), v)
