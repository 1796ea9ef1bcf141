"""Masks by global position across ranks: window, packed documents, uneven shards, and
the ring moving only the keys a rank's queries can see."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest

import seqpar
from seqpar.masks import FULL, HIDDEN, PARTIAL, Mask

from conftest import check_attention, random_qkv, raises_everywhere

pytestmark = pytest.mark.mpi


def _draw_mask(rng, n):
    cuts = np.sort(rng.choice(np.arange(1, n), size=int(rng.integers(0, min(4, n))),
                              replace=False)) if n > 1 else np.array([], dtype=int)
    seqlens = np.diff(np.r_[0, cuts, n]).tolist() if rng.integers(2) else None
    window = None
    if rng.integers(2):
        window = tuple(None if rng.integers(3) == 0 else int(rng.integers(0, n // 2 + 1))
                       for _ in range(2))
    return bool(rng.integers(2)), window, seqlens


def test_classify_against_brute_force(rng):
    for _ in range(400):
        n = int(rng.integers(2, 40))
        mask = Mask.build(*_draw_mask(rng, n))
        if mask is None:
            continue
        qs, ks = int(rng.integers(0, n)), int(rng.integers(0, n))
        ql, kl = int(rng.integers(1, n - qs + 1)), int(rng.integers(1, n - ks + 1))
        vis = mask.visible_pairs(np.arange(qs, qs + ql), np.arange(ks, ks + kl))
        want = HIDDEN if not vis.any() else FULL if vis.all() else PARTIAL
        assert mask.classify(qs, ql, ks, kl) == want


@pytest.mark.parametrize("draw", range(6))
@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
def test_random_masks_and_shards(comm, rng, draw, strategy):
    """Random windows and documents (crossing rank borders), uneven shards with an
    empty rank, GQA, both layouts where they apply."""
    size = comm.size
    lengths = [int(x) for x in rng.integers(0, 9, size=size)]
    lengths[0] += 1
    layout = "contiguous"
    if rng.integers(2):  # zigzag needs equal, even lengths
        layout, lengths = "zigzag", [4] * size
    n = sum(lengths)
    causal, window, seqlens = _draw_mask(rng, n)
    q, k, v = random_qkv(rng, "float64", b=2, sq=n, hq=2 * size, hk=size, d=4)
    parts = [seqpar.shard(x, comm, layout=layout,
                          lengths=lengths if layout == "contiguous" else None) for x in (q, k, v)]
    call = seqpar.ring_attention if strategy == "ring" else seqpar.ulysses_attention
    out = call(*parts, comm=comm, layout=layout, causal=causal, window=window, seqlens=seqlens)
    mask = Mask.build(causal, window, seqlens)
    visible = None if mask is None else mask.visible_pairs(np.arange(n), np.arange(n))
    check_attention(seqpar.gather(out, comm, layout=layout), q, k, v, visible=visible)


@pytest.mark.parametrize("causal", [False, True])
def test_window_moves_only_the_visible_keys(comm, rng, causal):
    """A window smaller than a rank's share: one neighbour each way (none ahead when
    causal), and only the window's keys travel, whatever P."""
    share, window, heads, d = 16, 5, 2, 4
    q, k, v = random_qkv(rng, "float32", b=1, sq=share * comm.size, hq=heads, hk=heads, d=d)
    parts = [seqpar.shard(x, comm) for x in (q, k, v)]
    stats = {}
    out = seqpar.ring_attention(*parts, comm=comm, causal=causal, window=(window, window),
                                stats=stats)
    mask = Mask.build(causal, (window, window))
    n = share * comm.size
    check_attention(seqpar.gather(out, comm), q, k, v,
                    visible=mask.visible_pairs(np.arange(n), np.arange(n)))
    neighbours = (comm.rank > 0) + (comm.rank < comm.size - 1) if not causal else \
        (comm.rank < comm.size - 1)
    assert stats["bytes_sent"] == neighbours * window * heads * d * 4 * 2
    assert stats["steps"] <= (1 if causal else 2)


def test_seqlens_that_do_not_add_up_raise_everywhere(comm, rng):
    q, k, v = random_qkv(rng, "float32", b=1, sq=4, hq=2, hk=2, d=4)
    raises_everywhere(comm, ValueError, r"seqlens sum to 3 but the global sequence has",
                      lambda: seqpar.ring_attention(q, k, v, comm=comm, seqlens=[1, 2]),
                      same_message=True)


@pytest.mark.parametrize("window, match", [((-1, 2), "window left bound must be >= 0"),
                                           ((1.5, 2), "window left bound must be an int"),
                                           ((1,), "window must be \\(left, right\\)"),
                                           ((-10**30, None), "window left bound must be >= 0"),
                                           ((0, np.int64(-3)), "window right bound must be >= 0"),
                                           ((True, 2), "window left bound must be an int"),
                                           ((2, np.bool_(False)), "window right bound must be"),
                                           ((0, math.inf), "window right bound must be an int"),
                                           (("4", 2), "window left bound must be an int")])
def test_bad_window_raises_everywhere(comm, rng, window, match):
    q, k, v = random_qkv(rng, "float32", b=1, sq=4, hq=2, hk=2, d=4)
    raises_everywhere(comm, (ValueError, TypeError), match,
                      lambda: seqpar.ring_attention(q, k, v, comm=comm, window=window))


HUGE = [10**30, 2**60, sys.maxsize, int(np.iinfo(np.int64).max), np.uint64(2**64 - 1)]


@pytest.mark.parametrize("huge", HUGE, ids=["1e30", "2**60", "maxsize", "int64-max", "uint64-max"])
@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
def test_huge_window_bounds_mean_unbounded(comm, rng, huge, strategy):
    """A bound at or beyond 2**60 is no bound (exactly: no position is that far away),
    where it overflowed int64 position arithmetic deep inside (OverflowError, or worse,
    wrapped silently)."""
    size = comm.size
    q, k, v = random_qkv(rng, "float64", b=1, sq=6 * size, hq=size, hk=size, d=4)
    parts = [seqpar.shard(x, comm) for x in (q, k, v)]
    call = seqpar.ring_attention if strategy == "ring" else seqpar.ulysses_attention
    out = call(*parts, comm=comm, window=(huge, huge))
    check_attention(seqpar.gather(out, comm), q, k, v)  # no mask at all
    out = call(*parts, comm=comm, window=(huge, 0))  # everything behind: causal
    check_attention(seqpar.gather(out, comm), q, k, v, causal=True)
    n = q.shape[1]
    out = call(*parts, comm=comm, window=(2, huge))  # two back, everything ahead
    check_attention(seqpar.gather(out, comm), q, k, v,
                    visible=np.arange(n)[None, :] >= np.arange(n)[:, None] - 2)
    assert Mask.build(False, (huge, None)) is None
    assert Mask.build(True, (huge, 1)).window == (None, 1)
    assert seqpar.masks.check_mask_arguments((huge, 2**60 - 1), None)[0] == (None, 2**60 - 1)
