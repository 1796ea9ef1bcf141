"""seqpar.ShardedKVCache: appends spread tokens evenly; attend equals attention over all."""
from __future__ import annotations

import numpy as np
import pytest

import seqpar

from conftest import check_attention, random_array, raises_everywhere

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("group", [1, 4])
def test_append_and_attend(comm, rng, dtype, group):
    batch, kv_heads, d = 2, 2, 8
    cache = seqpar.ShardedKVCache(40, kv_heads, d, batch=batch, dtype=random_array(
        rng, (1,), dtype).dtype, comm=comm)
    ks, vs, rows = [], [], np.zeros(batch, dtype=int)
    for n, counts in ((7, None), (1, None), (5, [5, 2]), (1, [0, 1]), (0, None)):
        k = random_array(rng, (batch, n, kv_heads, d), dtype)
        v = random_array(rng, (batch, n, kv_heads, d), dtype)
        cache.append(k, v, counts=counts)
        ks.append(k), vs.append(v)
        valid = np.full(batch, n) if counts is None else np.asarray(counts)
        rows = rows + valid
        ks[-1] = [k[b, :valid[b]] for b in range(batch)]
        vs[-1] = [v[b, :valid[b]] for b in range(batch)]
        assert np.array_equal(cache.lengths, rows)
        # balanced: per row, ranks differ by at most one token
        everyone = comm.allgather(np.asarray(cache.local_lengths))
        assert np.all(np.ptp(np.stack(everyone), axis=0) <= 1)
        assert np.array_equal(np.sum(everyone, axis=0), rows)
        q = random_array(rng, (batch, 3, kv_heads * group, d), dtype)
        out = cache.attend(q)
        for b in range(batch):  # reference per row over all its tokens so far
            kb = np.concatenate([part[b] for part in ks], axis=0)[None]
            vb = np.concatenate([part[b] for part in vs], axis=0)[None]
            if kb.shape[1]:
                check_attention(out[b:b + 1], q[b:b + 1], kb, vb)
            else:
                assert np.all(out[b] == 0)


def test_full_cache_raises_everywhere(comm, rng):
    cache = seqpar.ShardedKVCache(5, 1, 4, comm=comm)
    k = random_array(rng, (1, 4, 1, 4), "float32")
    cache.append(k, k)
    raises_everywhere(comm, ValueError, r"^rank 0: the cache is full",
                      lambda: cache.append(k[:, :2], k[:, :2]))
    assert np.array_equal(cache.lengths, [4])
    cache.append(k[:, :1], k[:, :1])  # exactly full is fine
    assert np.array_equal(cache.lengths, [5])


def test_bad_append_raises_everywhere(comm, rng):
    cache = seqpar.ShardedKVCache(8, 2, 4, comm=comm)
    bad = random_array(rng, (1, 2, 3, 4), "float32")
    raises_everywhere(comm, ValueError, r"^rank 0: k must have shape \(1, n, 2, 4\)",
                      lambda: cache.append(bad, bad))
    raises_everywhere(comm, TypeError, r"^rank 0: k has dtype float64",
                      lambda: cache.append(np.zeros((1, 1, 2, 4)), np.zeros((1, 1, 2, 4))))
