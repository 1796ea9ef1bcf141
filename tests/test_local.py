"""seqpar.attention and the NumPy kernel (no communication; every rank runs these)."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seqpar
from seqpar.local import numpy_kernel
from seqpar.masks import Mask

from conftest import (DTYPES, as_dtype, check_attention, check_lse, check_rounded_once,
                      random_qkv)
from reference import reference_attention, relative_error


# ---------------------------------------------------------------- the main matrix

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("sq,sk", [(13, 13), (7, 19), (19, 7)])
def test_attention_matrix(rng, dtype, causal, group, sq, sk):
    hk = 2
    q, k, v = random_qkv(rng, dtype, b=2, sq=sq, sk=sk, hq=hk * group, hk=hk, d=16)
    out, lse = seqpar.attention(q, k, v, causal=causal, return_lse=True)
    check_attention(out, q, k, v, causal=causal, lse=lse)
    if dtype in ("float16", "bfloat16"):
        check_rounded_once(out, q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_three_dimensional_input(rng, dtype, causal):
    q, k, v = random_qkv(rng, dtype, sq=11, sk=11, hq=4, hk=1, d=8, batch_axis=False)
    out, lse = seqpar.attention(q, k, v, causal=causal, return_lse=True)
    assert out.shape == q.shape and lse.shape == (4, 11)
    check_attention(out, q, k, v, causal=causal, lse=lse)
    # the same numbers as with an explicit batch axis of 1
    out4 = seqpar.attention(q[None], k[None], v[None], causal=causal)
    assert np.array_equal(out4[0].view(np.uint8), out.view(np.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_return_lse_shape_and_dtype(rng, dtype):
    q, k, v = random_qkv(rng, dtype, b=3, sq=5, sk=9, hq=6, hk=3, d=8)
    res = seqpar.attention(q, k, v, softmax_scale=0.3, return_lse=True)
    assert isinstance(res, tuple) and len(res) == 2
    out, lse = res
    assert lse.shape == (3, 6, 5)
    assert lse.dtype == (np.float64 if dtype == "float64" else np.float32)
    check_attention(out, q, k, v, softmax_scale=0.3, lse=lse)
    only = seqpar.attention(q, k, v, softmax_scale=0.3)
    assert isinstance(only, np.ndarray)
    assert np.array_equal(only.view(np.uint8), out.view(np.uint8))


@pytest.mark.parametrize("scale", [None, 0.05, 1.7])
def test_softmax_scale(rng, scale):
    q, k, v = random_qkv(rng, "float64", sq=9, sk=10, hq=2, hk=2, d=12)
    out = seqpar.attention(q, k, v, softmax_scale=scale)
    check_attention(out, q, k, v, softmax_scale=scale)


def test_strided_views(rng):
    """q, k, v as views of one packed (B, S, 3, H, D) array."""
    qkv = rng.standard_normal((2, 14, 3, 4, 8))
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.flags.c_contiguous
    out = seqpar.attention(q, k, v, causal=True)
    check_attention(out, q, k, v, causal=True)
    q2, k2, v2 = qkv[:, ::2, 0], qkv[:, 1::2, 1], qkv[:, 1::2, 2]
    check_attention(seqpar.attention(q2, k2, v2), q2, k2, v2)


# ---------------------------------------------------------------- the kernel directly

CAUSAL = Mask(causal=True)


def _mask(causal):
    return CAUSAL if causal else None


def _public(lse, q):
    """The kernel carries lse in float64; users get float32 for inputs other than float64."""
    return lse.astype(np.float64 if q.dtype == np.float64 else np.float32)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_fully_masked_rows(rng, dtype):
    """q_offset < k_offset: the first rows see no key: out 0, lse -inf, no NaN."""
    q, k, v = random_qkv(rng, dtype, b=2, sq=20, sk=15, hq=4, hk=2, d=8)
    q_off, k_off = 3, 10  # rows 0..6 see nothing; row i sees keys 0..i-7
    with np.errstate(all="raise"):
        out, lse = numpy_kernel.forward(q, k, v, scale=0.4, mask=CAUSAL,
                                        q_offset=q_off, k_offset=k_off)
    qpos, kpos = q_off + np.arange(20), k_off + np.arange(15)
    assert np.all(out[:, :7] == 0) and np.all(lse[:, :, :7] == -np.inf)
    assert np.isfinite(lse[:, :, 7:]).all()
    check_attention(out, q, k, v, causal=True, softmax_scale=0.4, lse=_public(lse, q),
                    q_positions=qpos, k_positions=kpos)


def test_every_row_masked(rng):
    q, k, v = random_qkv(rng, "float32", sq=6, sk=6)
    out, lse = numpy_kernel.forward(q, k, v, scale=0.25, mask=CAUSAL, q_offset=0, k_offset=6)
    assert np.all(out == 0) and not np.isnan(out).any()
    assert np.all(lse == -np.inf)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("group", [1, 3])
def test_multi_tile(monkeypatch, rng, dtype, causal, group):
    """Small tiles: many row tiles and key tiles, masks crossing tile borders."""
    monkeypatch.setattr(numpy_kernel, "_TILE_ROWS", 6)
    monkeypatch.setattr(numpy_kernel, "_TILE_KEYS", 5)
    q, k, v = random_qkv(rng, dtype, b=2, sq=23, sk=31, hq=2 * group, hk=2, d=8)
    q_off, k_off = (12, 3) if causal else (0, 0)  # some leading rows see nothing
    out, lse = numpy_kernel.forward(q, k, v, scale=0.35, mask=_mask(causal),
                                    q_offset=q_off, k_offset=k_off)
    qpos, kpos = q_off + np.arange(23), k_off + np.arange(31)
    check_attention(out, q, k, v, causal=causal, softmax_scale=0.35, lse=_public(lse, q),
                    q_positions=qpos, k_positions=kpos)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("causal", [False, True])
def test_accumulate(rng, dtype, causal):
    """Key blocks in ring-like order, merged with accumulate=True, equal the one-shot result."""
    sq, sk = 17, 29
    q, k, v = random_qkv(rng, dtype, b=2, sq=sq, sk=sk, hq=4, hk=2, d=8)
    acc = np.float64 if dtype == "float64" else np.float32
    q_off = 9  # rows 0..8 see keys 0..9+i; the last block is partly hidden
    bounds = [(20, 29), (0, 7), (7, 20)]
    out = np.empty(q.shape, dtype=acc)
    lse = np.empty((2, 4, sq), dtype=np.float64)  # the carry is float64
    for i, (lo, hi) in enumerate(bounds):
        numpy_kernel.forward(q, k[:, lo:hi], v[:, lo:hi], scale=0.3, mask=_mask(causal),
                             q_offset=q_off, k_offset=lo, out=out, lse=lse, accumulate=i > 0)
    qpos, kpos = q_off + np.arange(sq), np.arange(sk)
    check_attention(out.astype(q.dtype), q, k, v, causal=causal, softmax_scale=0.3,
                    lse=lse.astype(acc),
                    q_positions=qpos, k_positions=kpos)
    ref, _ = reference_attention(q, k, v, causal=causal, softmax_scale=0.3,
                                 q_positions=qpos, k_positions=kpos)
    limit = 1e-12 if dtype == "float64" else 1e-5  # accumulator precision, before rounding
    assert relative_error(out, ref) <= limit


def test_accumulate_hidden_block_changes_nothing(rng):
    q, k, v = random_qkv(rng, "float32", sq=10, sk=16)
    out, lse = numpy_kernel.forward(q, k[:, :8], v[:, :8], scale=0.3, mask=CAUSAL,
                                    q_offset=20, k_offset=0, out=np.empty(q.shape, np.float32))
    before = out.copy(), lse.copy()
    numpy_kernel.forward(q, k[:, 8:], v[:, 8:], scale=0.3, mask=CAUSAL, q_offset=20,
                         k_offset=100, out=out, lse=lse, accumulate=True)
    assert np.array_equal(out, before[0]) and np.array_equal(lse, before[1])


def test_accumulate_into_dead_rows(rng):
    """Rows with lse -inf so far take the new block's result exactly."""
    q, k, v = random_qkv(rng, "float64", sq=8, sk=12)
    out, lse = numpy_kernel.forward(q, k[:, :6], v[:, :6], scale=0.3, mask=CAUSAL,
                                    q_offset=0, k_offset=4)  # rows 0..3 dead
    assert np.all(lse[:, :, :4] == -np.inf)
    numpy_kernel.forward(q, k[:, 6:], v[:, 6:], scale=0.3, out=out, lse=lse,
                         accumulate=True)
    kpos = np.r_[4 + np.arange(6), np.full(6, -1)]  # second block: visible to all
    check_attention(out, q, k, v, causal=True, softmax_scale=0.3, lse=_public(lse, q),
                    q_positions=np.arange(8), k_positions=kpos)


# ---------------------------------------------------------------- threads

@pytest.fixture
def threads(monkeypatch):
    """Set SEQPAR_NUM_THREADS and rebuild the kernel's pool; every pool made here is
    shut down and the default restored afterwards."""
    pools = []

    def use(n):
        monkeypatch.setenv("SEQPAR_NUM_THREADS", str(n))
        numpy_kernel._threads.cache_clear()
        made = numpy_kernel._threads()
        pools.append(made[0])
        return made

    yield use
    pools.append(numpy_kernel._threads()[0])
    for pool in pools:
        if pool is not None:
            pool.shutdown(wait=True)
    monkeypatch.undo()
    numpy_kernel._threads.cache_clear()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("causal", [False, True])
def test_thread_pool_and_single_thread(monkeypatch, threads, rng, dtype, causal):
    monkeypatch.setattr(numpy_kernel, "_TILE_ROWS", 4)  # many tile jobs
    monkeypatch.setattr(numpy_kernel, "_TILE_KEYS", 8)
    q, k, v = random_qkv(rng, dtype, b=2, sq=21, sk=21, hq=4, hk=2, d=8)
    pool, _ = threads(3)
    assert pool is not None
    multi, multi_lse = seqpar.attention(q, k, v, causal=causal, return_lse=True)
    check_attention(multi, q, k, v, causal=causal, lse=multi_lse)
    assert threads(1) == (None, None)
    single, single_lse = seqpar.attention(q, k, v, causal=causal, return_lse=True)
    check_attention(single, q, k, v, causal=causal, lse=single_lse)
    # each tile job does the same arithmetic either way
    tol = 1e-14 if dtype == "float64" else 1e-6
    assert relative_error(multi, single.astype(np.float64)) <= tol


def test_default_threads_is_cpu_count(threads, monkeypatch):
    monkeypatch.delenv("SEQPAR_NUM_THREADS", raising=False)
    numpy_kernel._threads.cache_clear()
    pool, _ = numpy_kernel._threads()  # shut down by the fixture
    n = len(os.sched_getaffinity(0))
    assert (pool is None) == (n <= 1)
    if pool is not None:
        assert pool._max_workers == n


def test_masked_row_tiles_run_longest_first():
    tiles = [(0, 0, p0, p0 + 4) for p0 in range(0, 16, 4)]
    causal = Mask.build(True)
    ordered = numpy_kernel._longest_first(tiles, causal, 0, 0, 16)
    assert ordered == tiles[::-1]  # the last rows see the most keys
    assert numpy_kernel._longest_first(tiles, None, 0, 0, 16) == tiles
    window = Mask.build(False, window=(2, 2))  # the edges see 6 keys, the middle 8
    ordered = numpy_kernel._longest_first(tiles, window, 0, 0, 16)
    assert ordered == [tiles[1], tiles[2], tiles[0], tiles[3]]


@pytest.mark.parametrize("value", ["", "  ", "0"])
def test_empty_threads_variable_is_the_default(monkeypatch, value):
    monkeypatch.setenv("SEQPAR_NUM_THREADS", value)
    assert numpy_kernel.pool_threads() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("value", ["two", "-3", "1.5"])
def test_bad_threads_variable_names_it(monkeypatch, value):
    monkeypatch.setenv("SEQPAR_NUM_THREADS", value)
    with pytest.raises(ValueError, match="SEQPAR_NUM_THREADS"):
        numpy_kernel.pool_threads()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bitwise_deterministic(monkeypatch, rng, dtype):
    monkeypatch.setattr(numpy_kernel, "_TILE_ROWS", 8)
    monkeypatch.setattr(numpy_kernel, "_TILE_KEYS", 8)
    q, k, v = random_qkv(rng, dtype, b=2, sq=33, sk=33, hq=4, hk=1, d=16)
    first = seqpar.attention(q, k, v, causal=True, return_lse=True)
    for _ in range(3):
        again = seqpar.attention(q, k, v, causal=True, return_lse=True)
        assert first[0].view(np.uint8).tobytes() == again[0].view(np.uint8).tobytes()
        assert first[1].tobytes() == again[1].tobytes()
    check_attention(first[0], q, k, v, causal=True, lse=first[1])


# ---------------------------------------------------------------- worked examples

def _worked_example(shift):
    """q.k_j * scale = [2, 1, 0.5] (+ shift through a 4th component), v_j one-hot."""
    q = np.array([[[[1.0, 0.0, 0.0, 1.0]]]])                       # (1, 1, 1, 4)
    k = np.array([[2.0, 0, 0, shift], [1.0, 0, 0, shift], [0.5, 0, 0, shift]])[None, :, None]
    v = np.eye(3, 4)[None, :, None]                                  # v_j = e_j
    return q, k, v


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_worked_example_weights(dtype):
    q, k, v = (x.astype(dtype) for x in _worked_example(0.0))
    out, lse = seqpar.attention(q, k, v, softmax_scale=1.0, return_lse=True)
    e = math.e
    weights = np.array([e**2, e, e**0.5]) / (e**2 + e + e**0.5)
    assert abs(weights[0] - 0.6285) < 5e-5
    tol = 1e-15 if dtype == "float64" else 1e-7
    np.testing.assert_allclose(out[0, 0, 0, :3], weights, rtol=0, atol=tol)
    assert out[0, 0, 0, 3] == 0
    assert abs(lse[0, 0, 0] - math.log(e**2 + e + e**0.5)) <= 10 * tol
    check_attention(out, q, k, v, softmax_scale=1.0, lse=lse)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_adding_a_constant_to_every_score_changes_nothing(rng, dtype):
    q, k, v = (x.astype(dtype) for x in _worked_example(0.0))
    q10, k10, v10 = (x.astype(dtype) for x in _worked_example(10.0))
    out, lse = seqpar.attention(q, k, v, softmax_scale=1.0, return_lse=True)
    out10, lse10 = seqpar.attention(q10, k10, v10, softmax_scale=1.0, return_lse=True)
    tol = 1e-15 if dtype == "float64" else 1e-6
    np.testing.assert_allclose(out10, out, rtol=0, atol=tol)
    np.testing.assert_allclose(lse10, lse + 10, rtol=tol)
    # and on random data: a large common shift of every score of a row
    q, k, v = random_qkv(rng, "float64", b=1, sq=7, sk=9, hq=2, hk=2, d=8)
    qs = np.concatenate([q, np.ones(q.shape[:-1] + (1,))], axis=-1)
    ks = np.concatenate([k, np.full(k.shape[:-1] + (1,), 300.0)], axis=-1)
    vs = np.concatenate([v, rng.standard_normal(v.shape[:-1] + (1,))], axis=-1)
    shifted, shifted_lse = seqpar.attention(qs, ks, vs, softmax_scale=0.5, return_lse=True)
    plain, plain_lse = seqpar.attention(q, k, v, softmax_scale=0.5, return_lse=True)
    assert relative_error(shifted[..., :-1], plain) <= 1e-12
    np.testing.assert_allclose(shifted_lse, plain_lse + 150.0, rtol=1e-12)


# ---------------------------------------------------------------- property test

@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), sq=st.integers(1, 12), sk=st.integers(1, 12),
       hk=st.integers(1, 3), group=st.sampled_from([1, 2, 4]), d=st.sampled_from([1, 4, 8]),
       causal=st.booleans(), dtype=st.sampled_from(["float64", "float32"]),
       scale=st.one_of(st.none(), st.floats(0.05, 2.0)), seed=st.integers(0, 2**32 - 1),
       three_d=st.booleans())
def test_property_matches_reference(b, sq, sk, hk, group, d, causal, dtype, scale, seed,
                                    three_d):
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(rng, dtype, b=b, sq=sq, sk=sk, hq=hk * group, hk=hk, d=d)
    if three_d:
        q, k, v = q[0], k[0], v[0]
    out, lse = seqpar.attention(q, k, v, causal=causal, softmax_scale=scale, return_lse=True)
    assert out.dtype == as_dtype(dtype) and out.shape == q.shape
    check_attention(out, q, k, v, causal=causal, softmax_scale=scale, lse=lse)


def test_check_lse_helper_catches_wrong_values(rng):
    """The lse check itself fails on a perturbed lse (guards the helper)."""
    q, k, v = random_qkv(rng, "float64", sq=5, sk=5)
    out, lse = seqpar.attention(q, k, v, return_lse=True)
    _, ref_lse = reference_attention(q, k, v)
    with pytest.raises(AssertionError):
        check_lse(lse + 1e-6, ref_lse, "float64")
