"""seqpar.ring_attention against the float64 reference of the global problem.

Every rank builds the same global arrays (the ``rng`` fixture is seeded from the
test id), takes its slice with seqpar.shard, runs the ring, and gathers the
result with seqpar.gather to compare the whole output on every rank.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from mpi4py import MPI

import seqpar
from seqpar.local import numpy_kernel

from conftest import check_attention, check_rounded_once, random_qkv, same_on_every_rank

pytestmark = pytest.mark.mpi


def ring_global(comm, q, k, v, *, layout="contiguous", **kwargs):
    """Shard the global q, k, v, run the ring, gather (out, lse) back to global."""
    seq = q.ndim - 3
    ql, kl, vl = (seqpar.shard(x, comm, layout=layout, axis=seq) for x in (q, k, v))
    out, lse = seqpar.ring_attention(ql, kl, vl, comm=comm, layout=layout, return_lse=True,
                                     **kwargs)
    assert out.shape == ql.shape and out.dtype == q.dtype
    assert lse.shape == ql.shape[:-3] + (ql.shape[-2], ql.shape[-3])
    return (seqpar.gather(out, comm, layout=layout, axis=seq),
            seqpar.gather(lse, comm, layout=layout, axis=-1))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_ring_matrix(comm, rng, layout, causal, group, dtype):
    s = 6 * comm.size
    q, k, v = random_qkv(rng, dtype, b=2, sq=s, sk=s, hq=2 * group, hk=2, d=8)
    out, lse = ring_global(comm, q, k, v, layout=layout, causal=causal)
    check_attention(out, q, k, v, causal=causal, lse=lse)


@pytest.mark.parametrize("draw", range(8))
def test_ring_random_configurations(comm, rng, draw):
    """Shapes and options drawn from the shared rng (the same draw on every rank)."""
    layout = ["contiguous", "zigzag"][rng.integers(2)]
    causal = bool(rng.integers(2))
    dtype = ["float64", "float32"][rng.integers(2)]
    hk = int(rng.integers(1, 4))
    group = int(rng.choice([1, 2, 3]))
    s = 2 * int(rng.integers(1, 5))
    sk = s if causal else 2 * int(rng.integers(1, 5))
    scale = None if rng.integers(2) else float(rng.uniform(0.1, 1.5))
    q, k, v = random_qkv(rng, dtype, b=int(rng.integers(1, 3)), sq=s * comm.size,
                         sk=sk * comm.size, hq=hk * group, hk=hk, d=int(rng.choice([1, 4, 8])))
    out, lse = ring_global(comm, q, k, v, layout=layout, causal=causal, softmax_scale=scale)
    check_attention(out, q, k, v, causal=causal, softmax_scale=scale, lse=lse)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_ring_low_precision(comm, rng, dtype):
    s = 8 * comm.size
    q, k, v = random_qkv(rng, dtype, b=1, sq=s, sk=s, hq=4, hk=2, d=16)
    out, lse = ring_global(comm, q, k, v, layout="zigzag", causal=True)
    check_attention(out, q, k, v, causal=True, lse=lse)
    # partial results stay float32 between hops: out is rounded to the dtype once
    check_rounded_once(out, q, k, v, causal=True)
    out, _ = ring_global(comm, q, k, v, layout="contiguous")
    check_rounded_once(out, q, k, v)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
def test_ring_three_dimensional(comm, rng, layout, causal):
    s = 4 * comm.size
    q, k, v = random_qkv(rng, "float64", sq=s, sk=s, hq=4, hk=1, d=8, batch_axis=False)
    out, lse = ring_global(comm, q, k, v, layout=layout, causal=causal, softmax_scale=0.6)
    assert out.ndim == 3 and lse.shape == (4, s)
    check_attention(out, q, k, v, causal=causal, softmax_scale=0.6, lse=lse)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_ring_noncausal_different_lengths(comm, rng, layout):
    """Non-causal: per rank 4 queries and 6 keys (and the other way round)."""
    for sq, sk in ((4, 6), (6, 2)):
        q, k, v = random_qkv(rng, "float64", b=2, sq=sq * comm.size, sk=sk * comm.size,
                             hq=2, hk=1, d=8)
        out, lse = ring_global(comm, q, k, v, layout=layout)
        check_attention(out, q, k, v, lse=lse)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_ring_return_lse_flag_and_own_slice(comm, rng, layout):
    s = 4 * comm.size
    q, k, v = random_qkv(rng, "float32", b=2, sq=s, sk=s, hq=4, hk=2, d=8)
    ql, kl, vl = (seqpar.shard(x, comm, layout=layout) for x in (q, k, v))
    out = seqpar.ring_attention(ql, kl, vl, comm=comm, causal=True, layout=layout)
    assert isinstance(out, np.ndarray)
    out2, lse = seqpar.ring_attention(ql, kl, vl, comm=comm, causal=True, layout=layout,
                                      return_lse=True)
    assert np.array_equal(out.view(np.uint8), out2.view(np.uint8))
    assert lse.dtype == np.float32 and lse.shape == (2, 4, 4)
    # this rank's slice against the reference at this rank's global positions
    positions = seqpar.shard(np.arange(s), comm, layout=layout, axis=0)
    check_attention(out, ql, k, v, causal=True, lse=lse, q_positions=positions,
                    k_positions=np.arange(s))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_ring_multi_tile(monkeypatch, comm, rng, layout):
    """Small kernel tiles: causal masks inside tiles at every ring step."""
    monkeypatch.setattr(numpy_kernel, "_TILE_ROWS", 4)
    monkeypatch.setattr(numpy_kernel, "_TILE_KEYS", 3)
    s = 10 * comm.size
    q, k, v = random_qkv(rng, "float64", b=1, sq=s, sk=s, hq=4, hk=2, d=8)
    out, lse = ring_global(comm, q, k, v, layout=layout, causal=True)
    check_attention(out, q, k, v, causal=True, lse=lse)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_ring_deterministic(comm, rng, dtype):
    s = 6 * comm.size
    q, k, v = random_qkv(rng, dtype, b=2, sq=s, sk=s, hq=4, hk=2, d=8)
    ql, kl, vl = (seqpar.shard(x, comm, layout="zigzag") for x in (q, k, v))
    runs = [seqpar.ring_attention(ql, kl, vl, comm=comm, causal=True, layout="zigzag",
                                  return_lse=True) for _ in range(3)]
    for out, lse in runs[1:]:
        assert out.view(np.uint8).tobytes() == runs[0][0].view(np.uint8).tobytes()
        assert lse.tobytes() == runs[0][1].tobytes()
    check_attention(seqpar.gather(runs[0][0], comm, layout="zigzag"), q, k, v, causal=True)


def test_ring_sub_communicators(comm, rng):
    """Two interleaved halves of the world (renumbered in reverse), each its own problem."""
    color = comm.rank % 2
    sub = comm.Split(color, key=-comm.rank)
    try:
        assert sub.size == len(range(color, comm.size, 2))
        problems = [random_qkv(rng, "float64", b=1, sq=4 * n, sk=4 * n, hq=2, hk=2, d=8)
                    for n in (len(range(0, comm.size, 2)), len(range(1, comm.size, 2)))]
        q, k, v = problems[color]
        for layout in ("contiguous", "zigzag"):
            out, lse = ring_global(sub, q, k, v, layout=layout, causal=True)
            check_attention(out, q, k, v, causal=True, lse=lse)
    finally:
        sub.Free()


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("causal", [False, True])
def test_ring_worked_example_three_ranks(comm, causal):
    """Tokens x = [1, 2, 3] (q = k = x), values [2, 4, 8], one token per rank, scale 1.

    Rank r's query x_r sees keys x_j (j <= r when causal) with weights exp(x_r x_j);
    rank 0 non-causal: (2e + 4e^2 + 8e^3) / (e + e^2 + e^3).
    """
    sub = comm.Split(0 if comm.rank < 3 else MPI.UNDEFINED, key=comm.rank)
    if sub == MPI.COMM_NULL:
        return  # ranks beyond the first three take no part
    try:
        x, vals = np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 8.0])
        r = sub.rank
        tok = np.array([[[x[r]]]])                                 # (S=1, H=1, D=1)
        out, lse = seqpar.ring_attention(tok, tok, np.array([[[vals[r]]]]), comm=sub,
                                         causal=causal, softmax_scale=1.0, return_lse=True)
        seen = slice(0, r + 1) if causal else slice(0, 3)
        w = np.exp(x[r] * x[seen])
        want = float(np.sum(w * vals[seen]) / np.sum(w))
        assert out[0, 0, 0] == pytest.approx(want, rel=1e-14)
        assert lse[0, 0] == pytest.approx(math.log(np.sum(w)), rel=1e-14)
        if r == 0 and not causal:
            e = math.e
            assert out[0, 0, 0] == pytest.approx((2 * e + 4 * e**2 + 8 * e**3) / (e + e**2 + e**3),
                                                 rel=1e-14)
        # every rank's query [1]: every rank gets the rank-0 number (non-causal)
        if not causal:
            one = np.ones((1, 1, 1))
            out1 = seqpar.ring_attention(one, np.array([[[x[r]]]]), np.array([[[vals[r]]]]),
                                         comm=sub, softmax_scale=1.0)
            e = math.e
            assert out1[0, 0, 0] == pytest.approx((2 * e + 4 * e**2 + 8 * e**3)
                                                  / (e + e**2 + e**3), rel=1e-14)
    finally:
        sub.Free()


def test_ring_results_identical_for_repeated_global_problem(comm, rng):
    """The gathered output is the same bytes on every rank (gather is an Allgather)."""
    s = 4 * comm.size
    q, k, v = random_qkv(rng, "float32", b=1, sq=s, sk=s, hq=2, hk=1, d=8)
    out, lse = ring_global(comm, q, k, v, layout="zigzag", causal=True)
    assert same_on_every_rank(comm, out) and same_on_every_rank(comm, lse)
    check_attention(out, q, k, v, causal=True, lse=lse)
