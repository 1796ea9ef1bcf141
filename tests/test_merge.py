"""seqpar.merge: the log-sum-exp merge of partial results (no communication)."""
from __future__ import annotations

import numpy as np
import pytest

from seqpar.merge import CARRY_DTYPE, merge_into, merge_weights

from reference import reference_attention, relative_error


def _partials(q, k, v, blocks, scale):
    """(o_b, lse_b) of each key block from the float64 reference, cast to acc."""
    return [reference_attention(q, k[:, lo:hi], v[:, lo:hi], softmax_scale=scale)
            for lo, hi in blocks]


@pytest.mark.parametrize("acc", ["float64", "float32"])
@pytest.mark.parametrize("n_blocks", [2, 3, 4])
def test_merge_blocks_in_random_order(rng, acc, n_blocks):
    b, sq, sk, h, d = 2, 7, 23, 3, 8
    q = rng.standard_normal((b, sq, h, d))
    k = 1.5 * rng.standard_normal((b, sk, h, d))
    v = rng.standard_normal((b, sk, h, d))
    cuts = np.sort(rng.choice(np.arange(1, sk), n_blocks - 1, replace=False))
    edges = np.r_[0, cuts, sk]
    blocks = list(zip(edges[:-1], edges[1:]))
    parts = _partials(q, k, v, blocks, 0.4)
    ref, ref_lse = reference_attention(q, k, v, softmax_scale=0.4)
    order = rng.permutation(n_blocks)
    out = parts[order[0]][0].astype(acc)
    lse = parts[order[0]][1].astype(CARRY_DTYPE)
    for i in order[1:]:
        merge_into(out, lse, parts[i][0].astype(acc), parts[i][1])
    assert out.dtype == acc and lse.dtype == CARRY_DTYPE
    tol = 1e-14 if acc == "float64" else 1e-6
    assert relative_error(out, ref) <= tol
    assert relative_error(lse, ref_lse) <= 1e-14  # the float64 carry


def test_merge_order_does_not_matter_beyond_rounding(rng):
    q = rng.standard_normal((1, 5, 2, 4))
    k = rng.standard_normal((1, 12, 2, 4))
    v = rng.standard_normal((1, 12, 2, 4))
    parts = _partials(q, k, v, [(0, 3), (3, 8), (8, 12)], 0.5)
    results = []
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        out, lse = parts[order[0]][0].copy(), parts[order[0]][1].copy()
        for i in order[1:]:
            merge_into(out, lse, parts[i][0], parts[i][1])
        results.append(out)
    for other in results[1:]:
        assert relative_error(other, results[0]) <= 1e-15


@pytest.mark.parametrize("acc", ["float64", "float32"])
def test_both_minus_inf(rng, acc):
    # whatever the partial outputs hold, rows with no key on either side end at 0
    out = rng.standard_normal((1, 3, 2, 4)).astype(acc)
    block = rng.standard_normal((1, 3, 2, 4)).astype(acc)
    out[...] = 0  # contract: a row that saw no key holds 0
    lse = np.full((1, 2, 3), -np.inf, dtype=CARRY_DTYPE)
    block_lse = lse.copy()
    merge_into(out, lse, block, block_lse)
    assert np.all(out == 0) and not np.isnan(out).any()
    assert np.all(lse == -np.inf)
    w_old, w_new, merged = merge_weights(np.array([-np.inf]), np.array([-np.inf]))
    assert merged[0] == -np.inf and w_new[0] == 0 and not np.isnan(w_old).any()


@pytest.mark.parametrize("acc", ["float64", "float32"])
@pytest.mark.parametrize("dead_side", ["old", "new"])
def test_one_minus_inf_leaves_the_other_unchanged(rng, acc, dead_side):
    live = rng.standard_normal((2, 4, 3, 5)).astype(acc)
    live_lse = 3 * rng.standard_normal((2, 3, 4))
    dead = np.zeros_like(live)
    dead_lse = np.full_like(live_lse, -np.inf)
    if dead_side == "new":
        out, lse = live.copy(), live_lse.copy()
        merge_into(out, lse, dead, dead_lse)
    else:
        out, lse = dead.copy(), dead_lse.copy()
        merge_into(out, lse, live, live_lse)
    assert np.array_equal(out, live) and np.array_equal(lse, live_lse)


def test_mixed_rows(rng):
    """Per row: some rows dead in both, some in one, some alive in both."""
    o1 = rng.standard_normal((1, 4, 1, 3))
    o2 = rng.standard_normal((1, 4, 1, 3))
    l1 = np.array([[[-np.inf, -np.inf, 0.5, 1.0]]])
    l2 = np.array([[[-np.inf, 2.0, -np.inf, -1.0]]])
    o1[0, 0] = o1[0, 1] = 0
    o2[0, 0] = o2[0, 2] = 0
    out, lse = o1.copy(), l1.copy()
    merge_into(out, lse, o2, l2)
    assert np.all(out[0, 0] == 0) and lse[0, 0, 0] == -np.inf
    assert np.array_equal(out[0, 1], o2[0, 1]) and lse[0, 0, 1] == 2.0
    assert np.array_equal(out[0, 2], o1[0, 2]) and lse[0, 0, 2] == 0.5
    want_lse = np.logaddexp(1.0, -1.0)
    want = (np.exp(1.0 - want_lse) * o1[0, 3] + np.exp(-1.0 - want_lse) * o2[0, 3])
    assert abs(lse[0, 0, 3] - want_lse) <= 1e-15
    assert relative_error(out[0, 3], want) <= 1e-15


@pytest.mark.parametrize("acc", ["float64", "float32"])
@pytest.mark.parametrize("base", [1e4, -1e4, 1.6e10])
def test_huge_lse_keeps_its_precision(rng, acc, base):
    """lse far from 0 (exp would overflow, a float32 lse would be coarse) merges as
    precisely as lse near 0: the carry is float64 and the weights come from the gap."""
    o1 = rng.standard_normal((1, 6, 2, 4))
    o2 = rng.standard_normal((1, 6, 2, 4))
    d1 = rng.uniform(-3, 3, (1, 2, 6))
    d2 = rng.uniform(-3, 3, (1, 2, 6))
    l1, l2 = base + d1, base + d2
    e1, e2 = l1 - base, l2 - base
    want_lse = base + np.logaddexp(e1, e2)
    w1 = np.exp(e1 - np.logaddexp(e1, e2)).transpose(0, 2, 1)[..., None]
    w2 = np.exp(e2 - np.logaddexp(e1, e2)).transpose(0, 2, 1)[..., None]
    want = w1 * o1 + w2 * o2
    out, lse = o1.astype(acc), l1.copy()
    with np.errstate(over="raise", invalid="raise"):
        merge_into(out, lse, o2.astype(acc), l2)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    tol = 1e-12 if acc == "float64" else 1e-6
    assert relative_error(out, want) <= tol
    assert np.max(np.abs(lse - want_lse)) <= 4 * np.spacing(abs(base)) + 1e-12
    # one huge, one tiny: the tiny one has no weight, nothing overflows
    out, lse = o1.astype(acc), np.full((1, 2, 6), 1e4)
    merge_into(out, lse, o2.astype(acc), np.full((1, 2, 6), -1e4))
    assert np.array_equal(out, o1.astype(acc)) and np.all(lse == 1e4)


@pytest.mark.parametrize("acc", ["float64", "float32"])
def test_weights_are_convex(rng, acc):
    """The weights lie in [0, 1] and sum to 1: merged outputs stay in the inputs' range,
    even when both lse are equal to the last bit at any magnitude."""
    gaps = np.concatenate([rng.uniform(-40, 40, 200), [0.0, 1e-300, -1e-300, 745, -745]])
    for base in (0.0, 1e5, -1e10, 1e15):
        w_old, w_new, _ = merge_weights(np.full(gaps.shape, base), base + gaps)
        assert np.all((w_old >= 0) & (w_old <= 1) & (w_new >= 0) & (w_new <= 1))
        assert np.max(np.abs(w_old + w_new - 1)) <= 2 * np.finfo(np.float64).eps
    top = np.finfo(np.float16).max
    out = np.full((1, 1, 1, 4), top, dtype=acc)
    lse = np.array([[[3e5]]])
    merge_into(out, lse, np.full((1, 1, 1, 4), top, dtype=acc), np.array([[[3e5]]]))
    assert np.all(out <= np.float32(top))


def _offset_problem(rng, dtype, offset, tokens, heads=4, kv_heads=2, d=8):
    """q, k, v whose scores (softmax_scale 1) are ``offset`` + O(1) noise, computed
    exactly in float64: dyadic entries and q[..., 0] = offset against k[..., 0] = 1,
    so any error beyond the one-rank kernel's comes from how blocks are merged."""
    q = rng.integers(-2, 3, (1, tokens, heads, d)) / 4
    k = rng.integers(-2, 3, (1, tokens, kv_heads, d)) / 4
    v = rng.standard_normal((1, tokens, kv_heads, d))
    q[..., 0], k[..., 0] = offset, 1.0
    return tuple(x.astype(dtype) for x in (q, k, v))


@pytest.mark.mpi
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("offset", [1e4, 1e6, 1e10])
def test_strategies_exact_at_any_score_magnitude(rng, comm, dtype, offset):
    """Scores sharing a large offset: every strategy's P-rank error stays within 2x the
    one-rank error (the merges carry (max, log-sum) apart, not their rounded sum)."""
    import seqpar

    tokens = 8 * comm.size
    q, k, v = _offset_problem(rng, dtype, offset, tokens)
    for causal in (False, True):
        ref = reference_attention(q, k, v, softmax_scale=1.0, causal=causal)[0]
        one = relative_error(seqpar.attention(q, k, v, softmax_scale=1.0, causal=causal), ref)
        bound = 2 * max(one, 1e-15 if dtype == "float64" else 1e-7)
        local = [seqpar.shard(x, comm) for x in (q, k, v)]
        runs = {"ring": lambda: seqpar.ring_attention(*local, comm=comm, softmax_scale=1.0,
                                                      causal=causal),
                "ulysses": lambda: seqpar.ulysses_attention(*local, comm=comm,
                                                            softmax_scale=1.0, causal=causal)}
        if comm.size % 2 == 0:
            runs["hybrid"] = lambda: seqpar.hybrid_attention(
                *local, ulysses_size=2, comm=comm, softmax_scale=1.0, causal=causal)
        for name, run in runs.items():
            if name == "ulysses" and 2 % comm.size:
                continue  # Ulysses splits the heads (4 and 2) across the ranks
            error = relative_error(seqpar.gather(run(), comm), ref)
            assert error <= bound, (name, causal, error, one)
    ref = reference_attention(q, k, v, softmax_scale=1.0)[0]
    one = relative_error(seqpar.attention(q, k, v, softmax_scale=1.0), ref)
    out = seqpar.kv_sharded_attention(q, seqpar.shard(k, comm), seqpar.shard(v, comm),
                                      comm=comm, softmax_scale=1.0)
    assert relative_error(out, ref) <= 2 * max(one, 1e-15 if dtype == "float64" else 1e-7)
