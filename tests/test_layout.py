"""seqpar.shard / seqpar.gather and the token placement of each layout."""
from __future__ import annotations

import numpy as np
import pytest

import seqpar
from seqpar.layout import segments, split_lengths

from conftest import random_array, same_on_every_rank

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("shape,axis", [((2, 4, 3, 5), 1), ((4, 3, 5), 0), ((3, 2, 4), 2),
                                        ((3, 2, 4), -1), ((4, 2), -2)])
@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_roundtrip(comm, rng, layout, shape, axis, dtype):
    shape = list(shape)
    shape[axis] *= comm.size  # length 4P or 2P along axis: divisible by 2P when even
    if layout == "zigzag" and shape[axis] % (2 * comm.size):
        shape[axis] *= 2
    x = random_array(rng, tuple(shape), dtype)
    mine = seqpar.shard(x, comm, layout=layout, axis=axis)
    assert mine.dtype == x.dtype and mine.flags.c_contiguous
    assert mine.shape[axis] == x.shape[axis] // comm.size
    back = seqpar.gather(mine, comm, layout=layout, axis=axis)
    assert back.dtype == x.dtype and back.shape == x.shape
    assert np.array_equal(back.view(np.uint8), x.view(np.uint8))
    assert same_on_every_rank(comm, back)


def test_contiguous_placement(comm, rng):
    p, s = comm.size, 3
    x = random_array(rng, (2, s * p, 2, 4), "float64")
    mine = seqpar.shard(x, comm, layout="contiguous")
    r = comm.rank
    assert np.array_equal(mine, x[:, r * s:(r + 1) * s])


def test_zigzag_placement(comm, rng):
    """The sequence is cut into 2P chunks; rank r holds chunks r and 2P-1-r, in that order."""
    p, half = comm.size, 3
    x = random_array(rng, (2, 2 * p * half, 2, 4), "float32")
    chunks = np.split(x, 2 * p, axis=1)
    r = comm.rank
    mine = seqpar.shard(x, comm, layout="zigzag")
    assert np.array_equal(mine, np.concatenate([chunks[r], chunks[2 * p - 1 - r]], axis=1))
    # positions: the token ids each rank holds, and that together they cover everything
    ids = seqpar.shard(np.arange(2 * p * half), comm, layout="zigzag", axis=0)
    want = np.r_[np.arange(r * half, (r + 1) * half),
                 np.arange((2 * p - 1 - r) * half, (2 * p - r) * half)]
    assert np.array_equal(ids, want)
    assert sorted(np.concatenate(comm.allgather(ids)).tolist()) == list(range(2 * p * half))
    assert segments("zigzag", [2 * half] * p, r) == [(r * half, half),
                                                     ((2 * p - 1 - r) * half, half)]
    assert np.array_equal(seqpar.local_indices(2 * p * half, comm, layout="zigzag"), want)


def test_gather_of_distinct_slices(comm, rng):
    """gather places each rank's own slice (not a copy of the global array)."""
    local = np.full((1, 4, 2), float(comm.rank)) + random_array(rng, (1, 4, 2), "float64")
    for layout in ("contiguous", "zigzag"):
        whole = seqpar.gather(local, comm, layout=layout)
        slices = comm.allgather(local)
        for r, theirs in enumerate(slices):
            for (start, n), offset in zip(segments(layout, [4] * comm.size, r), (0, 2)):
                got = whole[:, start:start + n]
                want = theirs[:, offset:offset + n] if layout == "zigzag" else theirs
                assert np.array_equal(got, want)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shard_gather_and_shard_again(comm, rng, layout):
    x = random_array(rng, (2 * comm.size * 2, 3), "float32")
    mine = seqpar.shard(x, comm, layout=layout, axis=0)
    again = seqpar.shard(seqpar.gather(mine, comm, layout=layout, axis=0), comm,
                         layout=layout, axis=0)
    assert np.array_equal(mine, again)


@pytest.mark.parametrize("n", [0, 1, 7, 13])
def test_uneven_contiguous_shards(comm, rng, n):
    """Lengths that do not divide: split as evenly as possible, or as given; round trip."""
    x = random_array(rng, (2, n, 3), "float64") if n else np.zeros((2, 0, 3))
    lengths = split_lengths(n, comm.size)
    assert sum(lengths) == n and max(lengths) - min(lengths) <= 1
    mine = seqpar.shard(x, comm)
    idx = seqpar.local_indices(n, comm)
    assert mine.shape[1] == lengths[comm.rank] == idx.size
    assert np.array_equal(mine, x[:, idx])
    assert np.array_equal(seqpar.gather(mine, comm), x)
    # explicit lengths: everything on the last rank
    given = [0] * (comm.size - 1) + [n]
    mine = seqpar.shard(x, comm, lengths=given)
    assert mine.shape[1] == given[comm.rank]
    assert np.array_equal(seqpar.local_indices(n, comm, lengths=given),
                          np.arange(n) if comm.rank == comm.size - 1 else np.arange(0))
    assert np.array_equal(seqpar.gather(mine, comm), x)
