"""The NumPy attention backward kernel (no communication; every rank runs these)."""
from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from seqpar.local import numpy_backward, numpy_kernel
from seqpar.masks import FULL, HIDDEN, PARTIAL, Mask

from conftest import (DTYPES, TOL, as_dtype, plain_attention_backward,
                      random_array, random_qkv)
from reference import (reference_attention_backward, reference_attention_masked,
                       relative_error)

# (causal, window, seqlens) of Mask.build; seqlens sum to more than any test sequence
MASKS = {
    "none": (False, None, None),
    "causal": (True, None, None),
    "window": (False, (3, 2), None),
    "window-left": (False, (4, None), None),
    "window-right": (False, (None, 1), None),
    "documents": (False, None, (9, 4, 14, 40)),
    "causal-window-documents": (True, (5, None), (11, 3, 50)),
}


def _mask_and_visible(name, sq, sk, q_offset, k_offset):
    """The Mask for a MASKS entry and its boolean (Sq, Sk) matrix of visible pairs."""
    causal, window, seqlens = MASKS[name]
    mask = Mask.build(causal=causal, window=window, seqlens=seqlens)
    if mask is None:
        return None, np.ones((sq, sk), dtype=bool)
    return mask, mask.visible_pairs(q_offset + np.arange(sq), k_offset + np.arange(sk))


def _forward_state(dout, q, k, v, scale, visible, out_dtype=None):
    """(out, lse float64) as the forward hands them to the backward: the exact output
    rounded once to ``out_dtype`` (default q's dtype), the log-sum-exp over every key."""
    out, lse = reference_attention_masked(q, k, v, softmax_scale=scale, visible=visible)
    return out.astype(q.dtype if out_dtype is None else out_dtype), lse


def _backward(dout, q, k, v, scale, mask, visible, q_offset=0, k_offset=0, **kwargs):
    out, lse = _forward_state(dout, q, k, v, scale, visible)
    delta = numpy_kernel.backward_delta(dout, out)
    return numpy_kernel.backward(dout, q, k, v, lse, delta, scale=scale, mask=mask,
                                 q_offset=q_offset, k_offset=k_offset, **kwargs)


def check_gradients(grads, dout, q, k, v, *, scale, visible):
    """Each gradient against the float64 reference: at most TOL[dtype] and, for
    fp16/bf16, at most 2x the error of the plain computation in that dtype; in the
    accumulation dtype, of the input's shape, no NaN. Returns the three errors.

    float32/float64 get no 2x-plain bound: in rows that see few keys dS = P (dP - delta)
    cancels, both errors are rounding noise amplified alike, and which one is larger
    is luck (the forward's check has a floor for the same reason).
    """
    name = np.dtype(q.dtype).name
    acc = np.float64 if name == "float64" else np.float32
    ref = reference_attention_backward(dout, q, k, v, softmax_scale=scale, visible=visible)
    low = name in ("float16", "bfloat16")
    plain = (plain_attention_backward(dout, q, k, v, softmax_scale=scale, visible=visible)
             if low else (None, None, None))
    errors = []
    for label, got, want, plain_got, like in zip(("dq", "dk", "dv"), grads, ref, plain,
                                                 (q, k, v)):
        assert got.dtype == acc and got.shape == like.shape, (label, got.dtype, got.shape)
        assert not np.isnan(got).any(), f"NaN in {label}"
        err = relative_error(got, want)
        assert err <= TOL[name], f"{name} {label}: relative error {err:.3g} > {TOL[name]}"
        if low:
            plain_err = relative_error(plain_got, want)
            assert err <= 2 * plain_err, \
                f"{name} {label}: relative error {err:.3g} > 2 x plain {plain_err:.3g}"
        errors.append(err)
    return errors


def _set_tiles(monkeypatch, rows, keys):
    """Tile sizes of the backward (and of the forward, which some tests run too); the
    compiled tile kernels take tiles of any number of rows, so that these small cases
    run them too (d a multiple of 32)."""
    for module in (numpy_backward, numpy_kernel):
        monkeypatch.setattr(module, "_TILE_ROWS", rows)
        monkeypatch.setattr(module, "_TILE_KEYS", keys)
        monkeypatch.setattr(module, "TILED_ROWS", 1)


@pytest.fixture
def tiny_tiles(monkeypatch):
    """Tiles of a few rows and keys, so that masks cut through them."""
    def use(rows, keys):
        _set_tiles(monkeypatch, rows, keys)
    use(6, 5)
    return use


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


def _tile_kinds(mask, sq, sk, q_offset, k_offset, group):
    """The kinds (hidden/full/partial) of the kernel's (row tile, key tile) pairs."""
    step = max(1, numpy_backward._TILE_ROWS // group)
    keys = numpy_backward._TILE_KEYS
    return {mask.classify(q_offset + p0, min(step, sq - p0), k_offset + j0, min(keys, sk - j0))
            for p0 in range(0, sq, step) for j0 in range(0, sk, keys)}


# ---------------------------------------------------------------- the reference itself

def test_reference_backward_matches_finite_differences(rng):
    """Central differences of sum(dout * out) in float64, with GQA and a mask that
    leaves one query row without a visible key."""
    q, k, v = random_qkv(rng, "float64", b=2, sq=4, sk=5, hq=4, hk=2, d=3)
    dout = rng.standard_normal(q.shape)
    visible = rng.random((2, 1, 4, 5)) < 0.6
    visible[:, :, 0] = True
    visible[1, :, 2] = False
    scale, eps = 0.7, 1e-6
    grads = reference_attention_backward(dout, q, k, v, softmax_scale=scale, visible=visible)

    def loss(q_, k_, v_):
        out, _ = reference_attention_masked(q_, k_, v_, softmax_scale=scale, visible=visible)
        return float(np.sum(dout * out))

    for which, grad in enumerate(grads):
        args = [q, k, v]
        numeric = np.empty_like(args[which])
        for idx in np.ndindex(args[which].shape):
            up, down = args[which].copy(), args[which].copy()
            up[idx] += eps
            down[idx] -= eps
            numeric[idx] = (loss(*[up if i == which else a for i, a in enumerate(args)])
                            - loss(*[down if i == which else a for i, a in enumerate(args)])
                            ) / (2 * eps)
        assert relative_error(grad, numeric) <= 1e-8, which
    assert np.all(grads[0][1, 2] == 0)  # the row that sees nothing


def test_reference_backward_matches_the_plain_float64_backward(rng):
    """Two independent float64 computations (einsum vs matmul) of the same formulas."""
    q, k, v = random_qkv(rng, "float64", b=2, sq=7, sk=9, hq=6, hk=3, d=5)
    dout = rng.standard_normal(q.shape)
    visible = Mask.build(causal=True).visible_pairs(np.arange(2, 9), np.arange(9))
    ref = reference_attention_backward(dout, q, k, v, softmax_scale=0.4, visible=visible)
    plain = plain_attention_backward(dout, q, k, v, softmax_scale=0.4, visible=visible)
    for got, want in zip(plain, ref):
        assert relative_error(got, want) <= 1e-13


# ---------------------------------------------------------------- the kernel: main matrix

# d = 32 (a multiple of 32) runs the compiled pair kernel, d = 16 or 8 the BLAS products
@pytest.mark.parametrize("d", [16, 32])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("sq,sk,b", [(13, 13, 1), (7, 19, 2), (19, 8, 3)])
def test_dtypes_groups_shapes(rng, tiny_tiles, dtype, group, sq, sk, b, d):
    q, k, v = random_qkv(rng, dtype, b=b, sq=sq, sk=sk, hq=2 * group, hk=2, d=d)
    dout = random_array(rng, q.shape, dtype)
    mask, visible = _mask_and_visible("causal", sq, sk, 4, 2)
    grads = _backward(dout, q, k, v, 0.3, mask, visible, q_offset=4, k_offset=2)
    check_gradients(grads, dout, q, k, v, scale=0.3, visible=visible)


@pytest.mark.parametrize("mask_name", sorted(MASKS))
@pytest.mark.parametrize("q_offset,k_offset", [(0, 0), (9, 3), (2, 11)])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("d", [8, 32])
def test_masks(rng, tiny_tiles, mask_name, q_offset, k_offset, group, d):
    sq, sk = 23, 17
    q, k, v = random_qkv(rng, "float64", b=2, sq=sq, sk=sk, hq=2 * group, hk=2, d=d)
    dout = rng.standard_normal(q.shape)
    mask, visible = _mask_and_visible(mask_name, sq, sk, q_offset, k_offset)
    assert visible.any(), "nothing visible: the test would prove nothing"
    grads = _backward(dout, q, k, v, 0.45, mask, visible, q_offset=q_offset, k_offset=k_offset)
    check_gradients(grads, dout, q, k, v, scale=0.45, visible=visible)


def test_tiny_tiles_cover_every_kind(tiny_tiles):
    """The tile sizes of these tests make hidden, full and partial tiles (guards the
    tests above: a mask that only ever hit whole tiles would prove less)."""
    for group in (1, 4):
        kinds = _tile_kinds(Mask.build(causal=True), 23, 17, 9, 3, group)
        assert kinds == {HIDDEN, FULL, PARTIAL}, (group, kinds)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("masked", [False, True])
def test_default_tiles(rng, dtype, masked):
    """The real tile sizes, with sequences longer than one tile."""
    sq, sk, q_offset = 700, 1100, 400
    q, k, v = random_qkv(rng, dtype, b=1, sq=sq, sk=sk, hq=2, hk=1, d=8)
    dout = random_array(rng, q.shape, dtype)
    mask = Mask.build(causal=True, window=(300, None), seqlens=(500, 900, 2000)) if masked \
        else None
    visible = (np.ones((sq, sk), dtype=bool) if mask is None
               else mask.visible_pairs(q_offset + np.arange(sq), np.arange(sk)))
    grads = _backward(dout, q, k, v, 0.35, mask, visible, q_offset=q_offset)
    check_gradients(grads, dout, q, k, v, scale=0.35, visible=visible)


def test_pipeline_with_the_forward_kernel(rng, tiny_tiles):
    """forward -> backward_delta -> backward, all seqpar kernels, fp16 output as a
    training step would keep it."""
    q, k, v = random_qkv(rng, "float16", b=2, sq=21, sk=21, hq=4, hk=2, d=16)
    dout = random_qkv(rng, "float16", b=2, sq=21, sk=1, hq=4, hk=1, d=16)[0]
    mask, visible = _mask_and_visible("causal-window-documents", 21, 21, 0, 0)
    out, lse = numpy_kernel.forward(q, k, v, scale=0.25, mask=mask)
    delta = numpy_kernel.backward_delta(dout, out)
    grads = numpy_kernel.backward(dout, q, k, v, lse, delta, scale=0.25, mask=mask)
    check_gradients(grads, dout, q, k, v, scale=0.25, visible=visible)


# ---------------------------------------------------------------- blocks and accumulation

@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("mask_name", ["none", "causal", "window", "documents"])
def test_key_blocks_add_up_to_the_whole(rng, tiny_tiles, dtype, mask_name):
    """Key blocks in ring-like order with accumulate=True give the one-shot gradients:
    lse covers every key, so dq adds over blocks and dk, dv are per block."""
    sq, sk, q_offset = 19, 29, 9
    q, k, v = random_qkv(rng, dtype, b=2, sq=sq, sk=sk, hq=4, hk=2, d=8)
    dout = random_array(rng, q.shape, dtype)
    mask, visible = _mask_and_visible(mask_name, sq, sk, q_offset, 0)
    out, lse = _forward_state(dout, q, k, v, 0.3, visible)
    delta = numpy_kernel.backward_delta(dout, out)
    whole = numpy_kernel.backward(dout, q, k, v, lse, delta, scale=0.3, mask=mask,
                                  q_offset=q_offset)
    acc = whole[0].dtype
    dq = np.full(q.shape, np.nan, dtype=acc)  # accumulate=False must overwrite everything
    dk, dv = np.zeros(k.shape, dtype=acc), np.zeros(v.shape, dtype=acc)
    for i, (lo, hi) in enumerate([(20, 29), (0, 7), (7, 20)]):
        numpy_kernel.backward(dout, q, k[:, lo:hi], v[:, lo:hi], lse, delta, scale=0.3,
                              mask=mask, q_offset=q_offset, k_offset=lo, dq=dq,
                              dk=dk[:, lo:hi], dv=dv[:, lo:hi], accumulate=i > 0)
    limit = 1e-14 if dtype == "float64" else 1e-6  # only the order of the dq sums differs
    for blocked, one_shot in zip((dq, dk, dv), whole):
        assert relative_error(blocked, one_shot) <= limit
    check_gradients((dq, dk, dv), dout, q, k, v, scale=0.3, visible=visible)


def test_accumulate_adds_to_what_is_there(rng, tiny_tiles):
    q, k, v = random_qkv(rng, "float32", b=2, sq=11, sk=13, hq=4, hk=1, d=8)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    mask, visible = _mask_and_visible("window", 11, 13, 0, 0)
    fresh = _backward(dout, q, k, v, 0.5, mask, visible)
    before = [rng.standard_normal(x.shape).astype(np.float32) for x in fresh]
    added = _backward(dout, q, k, v, 0.5, mask, visible, dq=before[0].copy(),
                      dk=before[1].copy(), dv=before[2].copy(), accumulate=True)
    for got, base, grad in zip(added, before, fresh):
        np.testing.assert_allclose(got, base + grad, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- edge cases

@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_rows_and_keys_that_see_nothing(rng, tiny_tiles, dtype):
    """Query rows with lse -inf give exactly 0 in dq, keys no query sees exactly 0 in
    dk and dv; no NaN and no floating-point warning on the way."""
    sq, sk, q_offset, k_offset = 20, 15, 3, 10  # rows 0..6 see nothing
    q, k, v = random_qkv(rng, dtype, b=2, sq=sq, sk=sk, hq=4, hk=2, d=8)
    dout = random_array(rng, q.shape, dtype)
    mask = Mask.build(causal=True, window=(4, None))   # keys beyond row 19's window: unseen
    visible = mask.visible_pairs(q_offset + np.arange(sq), k_offset + np.arange(sk))
    out, lse = _forward_state(dout, q, k, v, 0.4, visible)
    assert np.all(lse[:, :, :7] == -np.inf) and np.isfinite(lse[:, :, 7:]).all()
    delta = numpy_kernel.backward_delta(dout, out)
    with np.errstate(all="raise"):
        dq, dk, dv = numpy_kernel.backward(dout, q, k, v, lse, delta, scale=0.4, mask=mask,
                                           q_offset=q_offset, k_offset=k_offset)
    assert np.all(dq[:, :7] == 0)
    unseen = ~visible.any(axis=0)
    assert unseen.any() and np.all(dk[:, unseen] == 0) and np.all(dv[:, unseen] == 0)
    check_gradients((dq, dk, dv), dout, q, k, v, scale=0.4, visible=visible)


def test_every_row_dead(rng):
    q, k, v = random_qkv(rng, "float32", sq=6, sk=6)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    lse = np.full((2, 4, 6), -np.inf)
    delta = np.zeros((2, 4, 6), dtype=np.float32)
    with np.errstate(all="raise"):
        grads = numpy_kernel.backward(dout, q, k, v, lse, delta, scale=0.25,
                                      mask=Mask.build(causal=True), k_offset=6)
    assert all(np.all(g == 0) for g in grads)


def test_empty_blocks(rng):
    """No keys: dq is zero; no queries: dk and dv are zero."""
    q, k, v = random_qkv(rng, "float32", sq=5, sk=0)
    dout = np.ones(q.shape, np.float32)
    lse, delta = np.zeros((2, 4, 5)), np.ones((2, 4, 5), np.float32)
    dq, dk, dv = numpy_kernel.backward(dout, q, k, v, lse, delta, scale=0.3)
    assert dq.shape == q.shape and np.all(dq == 0) and dk.shape == (2, 0, 2, 16)
    q, k, v = random_qkv(rng, "float32", sq=0, sk=4)
    dq, dk, dv = numpy_kernel.backward(q, q, k, v, lse[:, :, :0], delta[:, :, :0], scale=0.3)
    assert dq.shape == q.shape and np.all(dk == 0) and np.all(dv == 0)


def _layouts(x, rng):
    """The same values as ``x`` (B, S, H, D) in other memory layouts."""
    yield "fortran", np.asfortranarray(x)
    yield "bhsd-view", np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    flipped = np.ascontiguousarray(x[:, ::-1, :, ::-1])
    yield "negative-strides", flipped[:, ::-1, :, ::-1]
    packed = np.empty(x.shape[:2] + (3,) + x.shape[2:], dtype=x.dtype)
    packed[:, :, 1] = x
    packed[:, :, 0] = packed[:, :, 2] = np.asarray(rng.standard_normal(x.shape), x.dtype)
    yield "packed-slice", packed[:, :, 1]


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_any_layout_read_only_never_written(rng, tiny_tiles, dtype):
    sq = sk = 14
    q, k, v = random_qkv(rng, dtype, b=2, sq=sq, sk=sk, hq=4, hk=2, d=8)
    dout = random_array(rng, q.shape, dtype)
    mask, visible = _mask_and_visible("causal", sq, sk, 0, 0)
    out, lse = _forward_state(dout, q, k, v, 0.3, visible)
    delta = numpy_kernel.backward_delta(dout, out)
    base = numpy_kernel.backward(dout, q, k, v, lse, delta, scale=0.3, mask=mask)
    tol = 1e-14 if dtype == "float64" else 1e-6
    for arrays in zip(*(_layouts(x, rng) for x in (dout, q, k, v))):
        label = arrays[0][0]
        views = [x for _, x in arrays]
        for x, same in zip(views, (dout, q, k, v)):
            assert np.array_equal(x.astype(np.float64), same.astype(np.float64))
            x.flags.writeable = False
        lse.flags.writeable = delta.flags.writeable = False
        snapshot = [x.copy() for x in views]
        grads = numpy_kernel.backward(*views, lse, delta, scale=0.3, mask=mask)
        for x, before in zip(views, snapshot):
            assert x.tobytes() == before.tobytes(), label
        for got, want in zip(grads, base):
            assert relative_error(got, want) <= tol, label
        check_gradients(grads, *views, scale=0.3, visible=visible)


def test_written_into_any_layout(rng, tiny_tiles):
    """dq, dk, dv given as strided views (e.g. slices of one packed gradient)."""
    q, k, v = random_qkv(rng, "float32", b=2, sq=12, sk=12, hq=4, hk=2, d=8)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    mask, visible = _mask_and_visible("causal", 12, 12, 0, 0)
    packed = np.full((2, 12, 3, 4, 8), np.nan, dtype=np.float32)
    dq = packed[:, :, 0]
    dk, dv = packed[:, :, 1, :2], packed[:, :, 2, 2:][:, :, ::-1]
    grads = _backward(dout, q, k, v, 0.3, mask, visible, dq=dq, dk=dk, dv=dv)
    assert grads[0] is dq and grads[1] is dk and grads[2] is dv
    check_gradients(grads, dout, q, k, v, scale=0.3, visible=visible)


def test_memory_stays_tile_sized(rng):
    """Nothing of size Sq x Sk is allocated: the peak beyond the inputs is the three
    gradients and a few (rows x keys) tiles."""
    n, d = 4096, 16
    q, k, v = random_qkv(rng, "float32", b=1, sq=n, sk=n, hq=1, hk=1, d=d)
    dout = random_array(rng, q.shape, "float32")
    lse = np.full((1, 1, n), 5.0)
    delta = np.zeros((1, 1, n), dtype=np.float32)
    tracemalloc.start()
    try:
        numpy_kernel.backward(dout, q, k, v, lse, delta, scale=0.25,
                              mask=Mask.build(causal=True))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    gradients = 3 * q.nbytes
    tile = 4 * numpy_backward._TILE_ROWS * numpy_backward._TILE_KEYS
    assert peak <= gradients + 8 * tile * len(os.sched_getaffinity(0)), peak
    assert peak < n * n * 4 / 4  # a quarter of one score matrix


# ---------------------------------------------------------------- threads and determinism

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("b,hk", [(1, 1), (2, 2)])
def test_bitwise_deterministic_with_threads(rng, threads, tiny_tiles, dtype, b, hk):
    """Four threads over few (batch, K/V head) pairs: the key tiles are split into
    chunks whose dq partials are reduced in a fixed order, so every run gives the
    same bytes."""
    tiny_tiles(8, 4)
    pool, _ = threads(4)
    assert pool is not None
    q, k, v = random_qkv(rng, dtype, b=b, sq=40, sk=37, hq=4 * hk, hk=hk, d=16)
    dout = random_array(rng, q.shape, dtype)
    mask, visible = _mask_and_visible("causal-window-documents", 40, 37, 5, 0)
    out, lse = _forward_state(dout, q, k, v, 0.3, visible)
    delta = numpy_kernel.backward_delta(dout, out)

    def run():
        return numpy_kernel.backward(dout, q, k, v, lse, delta, scale=0.3, mask=mask,
                                     q_offset=5)

    first = run()
    for _ in range(4):
        again = run()
        for x, y in zip(first, again):
            assert x.tobytes() == y.tobytes()
    check_gradients(first, dout, q, k, v, scale=0.3, visible=visible)
    threads(1)
    single = run()
    for x, y in zip(first, single):  # another split of the dq sums: the same to rounding
        assert relative_error(x, y) <= 1e-6


def test_key_chunks_cover_the_tiles_in_order_and_balance(tiny_tiles):
    """The split of key tiles among jobs: all tiles, in order, of similar causal work,
    each chunk with the span of query positions it touches."""
    tiny_tiles(8, 4)
    tiling = numpy_backward._Tiling((1, 64, 1, 8), (1, 64, 1, 8), Mask.build(causal=True), 0, 0)
    for wanted in (1, 2, 3, 5, 16, 40):
        chunks = tiling.key_chunks(wanted)
        assert [t for tiles, _ in chunks for t in tiles] == tiling.keys
        assert 1 <= len(chunks) <= min(wanted, 16) and all(tiles for tiles, _ in chunks)
        for tiles, (r0, r1) in chunks:  # causal: key j is seen by queries j..63
            assert r0 == tiles[0][0] // 8 * 8 and r1 == 64
    work = [sum(64 - j0 for j0, _ in tiles) for tiles, _ in tiling.key_chunks(2)]
    assert max(work) <= 0.6 * sum(work)  # the first chunk holds fewer, busier key tiles


# ---------------------------------------------------------------- property test

@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 3), sq=st.integers(1, 14), sk=st.integers(1, 14),
       hk=st.integers(1, 2), group=st.sampled_from([1, 2, 4]),
       d=st.sampled_from([4, 8, 16, 32]),  # 32: the compiled pair kernel
       mask_name=st.sampled_from(sorted(MASKS)), q_offset=st.integers(0, 12),
       k_offset=st.integers(0, 12), dtype=st.sampled_from(DTYPES),
       tiles=st.sampled_from([(1, 1), (3, 2), (4, 7), (512, 512)]),
       lse32=st.booleans(), score_std=st.floats(0.1, 1.5),
       seed=st.integers(0, 2**32 - 1))
def test_property_matches_reference(monkeypatch, b, sq, sk, hk, group, d, mask_name, q_offset,
                                    k_offset, dtype, tiles, lse32, score_std, seed):
    _set_tiles(monkeypatch, *tiles)
    rng = np.random.default_rng(seed)
    scale = score_std / np.sqrt(d)  # scores of standard deviation score_std
    q, k, v = random_qkv(rng, dtype, b=b, sq=sq, sk=sk, hq=hk * group, hk=hk, d=d)
    dout = random_array(rng, q.shape, dtype)
    mask, visible = _mask_and_visible(mask_name, sq, sk, q_offset, k_offset)
    # dq and dk vanish exactly when no row sees two keys (one key: P = 1, dS = 0), so
    # the relative error would compare rounding noise with rounding noise
    assume((visible.sum(axis=1) > 1).any())
    # out in the accumulation dtype (the forward may return it so): delta then carries
    # no fp16/bf16 rounding, which tiny rows of peaked softmax would amplify in dq, dk
    # (dS = P (dP - delta) cancels) for any implementation, plain or blocked alike
    out, lse = _forward_state(dout, q, k, v, scale, visible,
                              np.float64 if dtype == "float64" else np.float32)
    if lse32 and dtype != "float64":  # the contract takes lse in any float dtype
        lse = lse.astype(np.float32)
    delta = numpy_kernel.backward_delta(dout, out)
    grads = numpy_kernel.backward(dout, q, k, v, lse, delta, scale=scale, mask=mask,
                                  q_offset=q_offset, k_offset=k_offset)
    check_gradients(grads, dout, q, k, v, scale=scale, visible=visible)
    assert as_dtype(dtype) == q.dtype
