"""hybrid_attention (Ulysses groups x ring) and the strategy chooser."""
from __future__ import annotations

import numpy as np
import pytest

import seqpar
from seqpar.masks import Mask
from seqpar.strategies.auto import communication_per_token

from conftest import check_attention, random_qkv, raises_everywhere

pytestmark = pytest.mark.mpi


def _divisors(n):
    return [u for u in range(1, n + 1) if n % u == 0]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_hybrid_every_group_size(comm, rng, layout, causal, dtype):
    size = comm.size
    q, k, v = random_qkv(rng, dtype, b=2, sq=6 * size, hq=2 * size, hk=size, d=8)
    parts = [seqpar.shard(x, comm, layout=layout) for x in (q, k, v)]
    for u in _divisors(size):
        out, lse = seqpar.hybrid_attention(*parts, ulysses_size=u, comm=comm, causal=causal,
                                           layout=layout, return_lse=True)
        check_attention(seqpar.gather(out, comm, layout=layout), q, k, v, causal=causal,
                        lse=seqpar.gather(lse, comm, layout=layout, axis=2))


def test_hybrid_with_masks_and_uneven_shards(comm, rng):
    size = comm.size
    lengths = [3 + 2 * r for r in range(size)]
    n = sum(lengths)
    q, k, v = random_qkv(rng, "float64", b=1, sq=n, hq=2 * size, hk=size, d=4)
    seqlens = [n // 3, n - n // 3]
    parts = [seqpar.shard(x, comm, lengths=lengths) for x in (q, k, v)]
    for u in _divisors(size):
        out = seqpar.hybrid_attention(*parts, ulysses_size=u, comm=comm, causal=True,
                                      window=(4, None), seqlens=seqlens)
        visible = Mask.build(True, (4, None), seqlens).visible_pairs(np.arange(n), np.arange(n))
        check_attention(seqpar.gather(out, comm), q, k, v, visible=visible)


def test_hybrid_bad_group_size_raises_everywhere(comm, rng):
    q, k, v = random_qkv(rng, "float32", b=1, sq=4, hq=comm.size, hk=comm.size, d=4)
    raises_everywhere(comm, ValueError, r"ulysses_size must be a divisor",
                      lambda: seqpar.hybrid_attention(q, k, v, ulysses_size=comm.size + 1,
                                                      comm=comm))


@pytest.mark.parametrize("queries", ["sharded", "replicated"])
def test_sequence_parallel_attention_auto(comm, rng, queries):
    size = comm.size
    q, k, v = random_qkv(rng, "float64", b=1, sq=4 * size, hq=4 * size, hk=size, d=8)
    stats = {}
    if queries == "replicated":
        mine = seqpar.local_indices(k.shape[1], comm)
        out = seqpar.sequence_parallel_attention(q, k[:, mine], v[:, mine], comm=comm,
                                                 queries="replicated", stats=stats)
        check_attention(out, q, k, v)
        assert stats["strategy"] == "kv_sharded"
        return
    parts = [seqpar.shard(x, comm) for x in (q, k, v)]
    out = seqpar.sequence_parallel_attention(*parts, comm=comm, causal=True, stats=stats)
    check_attention(seqpar.gather(out, comm), q, k, v, causal=True)
    want = seqpar.choose_strategy(size, 4 * size, size)
    assert (stats["strategy"], stats["ulysses_size"]) == want


def test_choose_strategy_rule():
    # the volume formula at its ends: U = 1 is the ring, U = P is Ulysses
    assert communication_per_token(4, 8, 8, 1) == 3 * 2 * 8
    assert communication_per_token(4, 8, 8, 4) == 0.75 * 32
    assert seqpar.choose_strategy(2, 16, 16) == ("ring", 1)          # a tie: the ring
    assert seqpar.choose_strategy(4, 16, 16) == ("ulysses", 4)
    assert seqpar.choose_strategy(4, 8, 2) == ("ring", 1)            # few K/V heads
    assert seqpar.choose_strategy(16, 64, 8) == ("hybrid", 8)
    assert seqpar.choose_strategy(8, 32, 8, window=(128, 0)) == ("ring", 1)
    assert seqpar.choose_strategy(8, 32, 8, queries="replicated") == ("kv_sharded", 1)
    with pytest.raises(ValueError, match="queries must be"):
        seqpar.choose_strategy(2, 2, 2, queries="both")
