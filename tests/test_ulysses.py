"""Ulysses (head-parallel) attention against the float64 reference."""
import numpy as np
import pytest
from mpi4py import MPI

import seqpar
from reference import reference_attention, relative_error

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-12), ("float32", 1e-5)])
@pytest.mark.parametrize("kv_group", [1, 2])
def test_matches_reference(layout, causal, dtype, tolerance, kv_group):
    comm = MPI.COMM_WORLD
    size = comm.size
    rng = np.random.default_rng([11, size, kv_group, causal])
    n, heads, d = 6 * size, 2 * size * kv_group, 16
    q = rng.standard_normal((2, n, heads, d)).astype(dtype)
    k, v = (rng.standard_normal((2, n, heads // kv_group, d)).astype(dtype) for _ in range(2))
    ref_out, ref_lse = reference_attention(q, k, v, causal=causal)

    parts = [seqpar.shard(x, layout=layout) for x in (q, k, v)]
    out, lse = seqpar.ulysses_attention(*parts, causal=causal, layout=layout, return_lse=True)

    assert out.dtype == q.dtype and out.shape == parts[0].shape
    assert lse.shape == (2, heads, n // size)
    assert relative_error(seqpar.gather(out, layout=layout), ref_out) <= tolerance
    assert relative_error(seqpar.gather(lse, layout=layout, axis=2), ref_lse) <= tolerance


def test_three_dimensional_input_matches_ring():
    comm = MPI.COMM_WORLD
    rng = np.random.default_rng([12, comm.size])
    q, k, v = (rng.standard_normal((4 * comm.size, comm.size, 8)) for _ in range(3))
    ref_out, _ = reference_attention(q[None], k[None], v[None], causal=True)
    parts = [seqpar.shard(x, axis=0) for x in (q, k, v)]
    out = seqpar.ulysses_attention(*parts, causal=True)
    assert out.shape == parts[0].shape
    assert relative_error(seqpar.gather(out, axis=0)[None], ref_out) <= 1e-12


@pytest.mark.mpi(min_size=2)
def test_heads_not_divisible_by_ranks_raises_everywhere():
    comm = MPI.COMM_WORLD
    rng = np.random.default_rng(13)
    q, k, v = (rng.standard_normal((1, 4, comm.size + 1, 8)) for _ in range(3))
    with pytest.raises(ValueError, match=r"rank 0: heads of q .* multiple of the number of ranks"):
        seqpar.ulysses_attention(q, k, v)
