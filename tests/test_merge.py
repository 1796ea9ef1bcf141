"""seqpar.merge: the log-sum-exp merge of partial results (no communication)."""
from __future__ import annotations

import numpy as np
import pytest

from seqpar.merge import combined_lse, merge_into

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
    lse = parts[order[0]][1].astype(acc)
    for i in order[1:]:
        merge_into(out, lse, parts[i][0].astype(acc), parts[i][1].astype(acc))
    assert out.dtype == acc and lse.dtype == acc
    tol = 1e-14 if acc == "float64" else 1e-6
    assert relative_error(out, ref) <= tol
    assert relative_error(lse, ref_lse) <= tol
    # combined_lse alone, folded over the blocks
    total = parts[order[0]][1]
    for i in order[1:]:
        total = combined_lse(total, parts[i][1])
    assert relative_error(total, ref_lse) <= 1e-14


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
    lse = np.full((1, 2, 3), -np.inf, dtype=acc)
    block_lse = lse.copy()
    with np.errstate(all="raise"):
        merge_into(out, lse, block, block_lse)
    assert np.all(out == 0) and not np.isnan(out).any()
    assert np.all(lse == -np.inf)
    assert np.all(combined_lse(np.array([-np.inf]), np.array([-np.inf])) == -np.inf)


@pytest.mark.parametrize("acc", ["float64", "float32"])
@pytest.mark.parametrize("dead_side", ["old", "new"])
def test_one_minus_inf_leaves_the_other_unchanged(rng, acc, dead_side):
    live = rng.standard_normal((2, 4, 3, 5)).astype(acc)
    live_lse = (3 * rng.standard_normal((2, 3, 4))).astype(acc)
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
@pytest.mark.parametrize("base", [1e4, -1e4])
def test_huge_lse_does_not_overflow(rng, acc, base):
    """lse near +-1e4 (exp would overflow / underflow) merge like lse near 0."""
    o1 = rng.standard_normal((1, 6, 2, 4))
    o2 = rng.standard_normal((1, 6, 2, 4))
    d1 = rng.uniform(-3, 3, (1, 2, 6))
    d2 = rng.uniform(-3, 3, (1, 2, 6))
    l1 = (base + d1).astype(acc)
    l2 = (base + d2).astype(acc)
    # expected, from the values as stored in acc, in float64 relative to the base
    e1 = l1.astype(np.float64) - base
    e2 = l2.astype(np.float64) - base
    want_lse = base + np.logaddexp(e1, e2)
    w1 = np.exp(e1 - np.logaddexp(e1, e2)).transpose(0, 2, 1)[..., None]
    w2 = np.exp(e2 - np.logaddexp(e1, e2)).transpose(0, 2, 1)[..., None]
    want = w1 * o1 + w2 * o2
    out, lse = o1.astype(acc), l1.copy()
    with np.errstate(over="raise", invalid="raise"):
        merge_into(out, lse, o2.astype(acc), l2)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    # float32 lse at 1e4 has an ulp of ~1e-3, which bounds the weights' precision
    tol = 1e-11 if acc == "float64" else 2e-3
    assert relative_error(out, want) <= tol
    assert np.max(np.abs(lse - want_lse)) <= (1e-11 if acc == "float64" else 2e-3)
    # one huge, one tiny: the tiny one has no weight, nothing overflows
    out, lse = o1.astype(acc), np.full((1, 2, 6), 1e4, dtype=acc)
    merge_into(out, lse, o2.astype(acc), np.full((1, 2, 6), -1e4, dtype=acc))
    assert np.array_equal(out, o1.astype(acc)) and np.all(lse == acc_type(acc)(1e4))


def acc_type(name):
    return np.dtype(name).type
