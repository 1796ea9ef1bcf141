"""seqpar.kv_sharded_attention: the same queries everywhere, K/V split across ranks."""
from __future__ import annotations

import math

import numpy as np
import pytest
from mpi4py import MPI

import seqpar

from conftest import (check_attention, check_rounded_once, random_array, random_qkv,
                      same_on_every_rank)

pytestmark = pytest.mark.mpi


def split_points(rng, total, parts, allow_empty=True):
    """Random cut points of [0, total) into ``parts`` runs (equal on every rank)."""
    low = 0 if allow_empty else 1
    while True:
        cuts = np.sort(rng.integers(low, total - low + 1, parts - 1))
        edges = np.r_[0, cuts, total]
        if allow_empty or np.all(np.diff(edges) > 0):
            return edges


def kv_sharded_global(comm, q, k, v, edges, **kwargs):
    r = comm.rank
    seq = q.ndim - 3
    take = (slice(None),) * seq + (slice(edges[r], edges[r + 1]),)
    kl, vl = np.ascontiguousarray(k[take]), np.ascontiguousarray(v[take])
    return seqpar.kv_sharded_attention(q, kl, vl, comm=comm, return_lse=True, **kwargs)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_kv_sharded_matrix(comm, rng, group, dtype):
    sk = 7 * comm.size + 3
    q, k, v = random_qkv(rng, dtype, b=2, sq=5, sk=sk, hq=2 * group, hk=2, d=8)
    edges = split_points(rng, sk, comm.size, allow_empty=False)
    out, lse = kv_sharded_global(comm, q, k, v, edges)
    check_attention(out, q, k, v, lse=lse)
    assert same_on_every_rank(comm, out) and same_on_every_rank(comm, lse)
    if dtype in ("float16", "bfloat16"):
        check_rounded_once(out, q, k, v)


@pytest.mark.parametrize("scale", [None, 0.8])
def test_kv_sharded_three_dimensional(comm, rng, scale):
    sk = 5 * comm.size
    q, k, v = random_qkv(rng, "float64", sq=3, sk=sk, hq=4, hk=1, d=8, batch_axis=False)
    out, lse = kv_sharded_global(comm, q, k, v, np.arange(comm.size + 1) * 5,
                                 softmax_scale=scale)
    assert out.shape == q.shape and lse.shape == (4, 3)
    check_attention(out, q, k, v, softmax_scale=scale, lse=lse)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_kv_sharded_empty_slice(comm, rng, dtype):
    """Rank 1 holds no keys (Sk = 0), and with 3+ ranks rank 0 none either."""
    sk = 6 * comm.size
    q, k, v = random_qkv(rng, dtype, b=2, sq=4, sk=sk, hq=4, hk=2, d=8)
    holders = [r for r in range(comm.size) if r > 1] or [0]
    sizes = np.zeros(comm.size, dtype=int)
    sizes[holders] = sk // len(holders)
    sizes[holders[-1]] += sk - sizes.sum()
    edges = np.r_[0, np.cumsum(sizes)]
    sizes = np.diff(edges)
    assert sizes[1] == 0 and sizes.sum() == sk
    out, lse = kv_sharded_global(comm, q, k, v, edges)
    check_attention(out, q, k, v, lse=lse)
    assert same_on_every_rank(comm, out)


def test_kv_sharded_no_keys_anywhere(comm, rng):
    q = random_array(rng, (1, 3, 2, 4), "float32")
    empty = np.empty((1, 0, 2, 4), np.float32)
    out, lse = seqpar.kv_sharded_attention(q, empty, empty.copy(), comm=comm, return_lse=True)
    assert np.all(out == 0) and not np.isnan(out).any()
    assert np.all(lse == -np.inf)


@pytest.mark.mpi(min_size=3)
def test_kv_sharded_worked_example_three_ranks(comm):
    """q = [1] on every rank; rank r holds key r+1 and value 2^(r+1); scale 1:
    out = (2e + 4e^2 + 8e^3) / (e + e^2 + e^3), lse = log(e + e^2 + e^3)."""
    sub = comm.Split(0 if comm.rank < 3 else MPI.UNDEFINED, key=comm.rank)
    if sub == MPI.COMM_NULL:
        return
    try:
        r = sub.rank
        q = np.ones((1, 1, 1))
        k = np.array([[[r + 1.0]]])
        v = np.array([[[2.0 ** (r + 1)]]])
        out, lse = seqpar.kv_sharded_attention(q, k, v, comm=sub, softmax_scale=1.0,
                                               return_lse=True)
        e = math.e
        assert out[0, 0, 0] == pytest.approx((2 * e + 4 * e**2 + 8 * e**3) / (e + e**2 + e**3),
                                             rel=1e-14)
        assert lse[0, 0] == pytest.approx(math.log(e + e**2 + e**3), rel=1e-14)
        assert same_on_every_rank(sub, out)
    finally:
        sub.Free()


def test_kv_sharded_return_lse_flag(comm, rng):
    sk = 4 * comm.size
    q, k, v = random_qkv(rng, "float32", b=1, sq=6, sk=sk, hq=2, hk=2, d=8)
    edges = np.arange(comm.size + 1) * 4
    out, lse = kv_sharded_global(comm, q, k, v, edges)
    r = comm.rank
    only = seqpar.kv_sharded_attention(q, k[:, edges[r]:edges[r + 1]],
                                       v[:, edges[r]:edges[r + 1]], comm=comm)
    assert isinstance(only, np.ndarray)
    assert np.array_equal(only, out)
    assert lse.dtype == np.float32 and lse.shape == (1, 2, 6)
    check_attention(out, q, k, v, lse=lse)


def test_kv_sharded_deterministic(comm, rng):
    sk = 9 * comm.size
    q, k, v = random_qkv(rng, "float32", b=2, sq=5, sk=sk, hq=4, hk=2, d=8)
    edges = split_points(rng, sk, comm.size)
    first = kv_sharded_global(comm, q, k, v, edges)
    again = kv_sharded_global(comm, q, k, v, edges)
    assert first[0].tobytes() == again[0].tobytes() and first[1].tobytes() == again[1].tobytes()
    check_attention(first[0], q, k, v, lse=first[1])


def test_kv_sharded_sub_communicator(comm, rng):
    color = comm.rank % 2
    sub = comm.Split(color, key=-comm.rank)
    try:
        problems = [random_qkv(rng, "float64", b=1, sq=3, sk=5 * n, hq=2, hk=1, d=4)
                    for n in (len(range(0, comm.size, 2)), len(range(1, comm.size, 2)))]
        q, k, v = problems[color]
        out, lse = kv_sharded_global(sub, q, k, v, np.arange(sub.size + 1) * 5)
        check_attention(out, q, k, v, lse=lse)
    finally:
        sub.Free()
