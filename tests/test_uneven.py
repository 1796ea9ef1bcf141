"""ring_attention over very uneven contiguous shards: one rank holds (almost) every token.

The shapes of the reliability report ([1, N] and [N, 1] tokens per rank), at small N:
the 1-token ranks receive long blocks of keys, the big rank splits its queries into many
row tiles against a single key. Every rank builds the same global arrays, takes its run
with ``seqpar.shard(..., lengths=...)``, and the gathered output is checked against the
float64 reference.
"""
from __future__ import annotations

import numpy as np
import pytest

import seqpar
from seqpar.local import numpy_kernel

from conftest import check_attention, random_qkv

pytestmark = pytest.mark.mpi(min_size=2)


def _one_and_rest(size: int, n: int, big: str) -> list[int]:
    """One token on every rank but one, which holds the rest: the first or the last."""
    lengths = [1] * size
    lengths[0 if big == "first" else -1] = n - (size - 1)
    return lengths


def _ring(comm, lengths, q, k, v, **options):
    parts = [seqpar.shard(x, comm, lengths=lengths) for x in (q, k, v)]
    out, lse = seqpar.ring_attention(*parts, comm=comm, return_lse=True, **options)
    assert out.shape == parts[0].shape and out.dtype == q.dtype
    return seqpar.gather(out, comm), seqpar.gather(lse, comm, axis=-1)


@pytest.mark.parametrize("big", ["first", "last"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_one_token_and_the_rest(comm, rng, big, causal, dtype):
    """[N - 1, 1] and [1, N - 1] (at P ranks: P - 1 ranks of one token)."""
    n = 20 * comm.size
    lengths = _one_and_rest(comm.size, n, big)
    q, k, v = random_qkv(rng, dtype, b=2, sq=n, hq=4, hk=2, d=8)
    out, lse = _ring(comm, lengths, q, k, v, causal=causal)
    check_attention(out, q, k, v, causal=causal, lse=lse)


@pytest.mark.parametrize("big", ["first", "last"])
def test_one_token_and_the_rest_small_tiles(monkeypatch, comm, rng, big):
    """Many row tiles of the big rank against the one key it receives, and key tiles
    of the 1-token ranks over the long block they receive."""
    monkeypatch.setattr(numpy_kernel, "_TILE_ROWS", 4)
    monkeypatch.setattr(numpy_kernel, "_TILE_KEYS", 3)
    n = 15 * comm.size + 1
    lengths = _one_and_rest(comm.size, n, big)
    q, k, v = random_qkv(rng, "float64", b=1, sq=n, hq=2, hk=1, d=8)
    for causal in (False, True):
        out, lse = _ring(comm, lengths, q, k, v, causal=causal, softmax_scale=0.7)
        check_attention(out, q, k, v, causal=causal, softmax_scale=0.7, lse=lse)


def test_both_orders_agree_and_repeat_bitwise(comm, rng):
    """The same global problem split [N - 1, 1, ...] and [..., 1, N - 1]: each matches
    the reference, and a repeated call gives the same bits."""
    n = 12 * comm.size
    q, k, v = random_qkv(rng, "float32", b=1, sq=n, hq=4, hk=4, d=16)
    for big in ("first", "last"):
        lengths = _one_and_rest(comm.size, n, big)
        first, lse = _ring(comm, lengths, q, k, v)
        check_attention(first, q, k, v, lse=lse)
        again, _ = _ring(comm, lengths, q, k, v)
        assert np.array_equal(first.view(np.uint8), again.view(np.uint8))
