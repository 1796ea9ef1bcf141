"""The CPU backend's two kernels (NumPy passes and the compiled numba step) against the
float64 reference and each other: fused steps, the decode kernel, layouts, determinism.

Every test here runs under each kernel (conftest.py parametrizes ``cpu_kernel``).
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import TOL, check_attention, random_qkv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import reference_attention, relative_error

import seqpar
from seqpar.local import numpy_kernel


def _layouts(x):
    """x as C order, Fortran order, a transposed-back view and a read-only array."""
    fortran = np.asfortranarray(x)
    transposed = np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    readonly = x.copy()
    readonly.flags.writeable = False
    return {"C": x, "F": fortran, "transposed": transposed, "readonly": readonly}


def test_chosen_kernel(cpu_kernel):
    expected = None if cpu_kernel == "numpy" else "seqpar.local.numba_kernel"
    chosen = numpy_kernel.compiled()
    assert (chosen and chosen.__name__) == expected


def test_unknown_choice_raises(monkeypatch):
    monkeypatch.setenv("SEQPAR_CPU_KERNEL", "fortran")
    with pytest.raises(ValueError, match="SEQPAR_CPU_KERNEL"):
        numpy_kernel.compiled()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk,d", [(700, 1300, 64), (300, 300, 128)])
def test_several_tiles_against_float64(rng, dtype, causal, sq, sk, d):
    """Several 512 x 512 tiles, partial diagonal tiles, scores far from 0."""
    q, k, v = random_qkv(rng, dtype, b=1, sq=sq, sk=sk, hq=4, hk=2, d=d)
    q *= 3  # peaked rows: the running max moves from tile to tile
    out, lse = seqpar.attention(q, k, v, causal=causal, return_lse=True)
    check_attention(out, q, k, v, causal=causal, lse=lse)


def _count_tile_kernel_calls(monkeypatch, cpu_kernel) -> list[int]:
    """A list that grows by one per call of the compiled tile kernel (numba runs)."""
    calls: list[int] = []
    if cpu_kernel == "numba":
        from seqpar.local import numba_kernel

        kernel = numba_kernel.attend_keys

        def counted(*args):
            calls.append(1)
            return kernel(*args)

        monkeypatch.setattr(numba_kernel, "attend_keys", counted)
    return calls


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("causal, window", [(False, None), (True, None), (True, (150, 20)),
                                            (True, (1, 0))],
                         ids=["full", "causal", "window", "two-keys"])
@pytest.mark.parametrize("d", [32, 64, 128])
def test_tile_kernel_masks_against_float64(rng, cpu_kernel, monkeypatch, dtype, causal, window,
                                           d):
    """The compiled tile kernel (d a multiple of 32): rows of GQA groups of 3 that do
    not fill its 8-row blocks, key tiles that end mid-block, rows of one block that see
    different key columns (a window: some see none of a tile), against float64."""
    sq, sk = 203, 1100
    q, k, v = random_qkv(rng, dtype, b=2, sq=sq, sk=sk, hq=6, hk=2, d=d)
    q *= 2
    calls = _count_tile_kernel_calls(monkeypatch, cpu_kernel)
    mask = seqpar.masks.Mask.build(causal, window)
    out, lse = numpy_kernel.forward(q, k, v, scale=d ** -0.5, mask=mask, q_offset=sk - sq)
    visible = None if mask is None else mask.visible_pairs(np.arange(sk - sq, sk),
                                                           np.arange(sk))
    ref, ref_lse = reference_attention(q, k, v, softmax_scale=d ** -0.5, visible=visible)
    assert relative_error(out, ref) <= TOL[dtype]
    assert relative_error(lse, ref_lse) <= TOL["float64" if dtype == "float64" else "float32"]
    assert bool(calls) == (cpu_kernel == "numba")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("causal, window", [(False, None), (True, None), (True, (150, 20))],
                         ids=["full", "causal", "window"])
def test_pair_kernel_backward_against_float64(rng, cpu_kernel, dtype, causal, window):
    """The compiled backward pair kernel at the real tile sizes: GQA rows that do not
    fill its row blocks, a key tile that ends mid-block, a window."""
    from reference import reference_attention_backward

    sq, sk, d = 203, 1100, 64
    q, k, v = random_qkv(rng, dtype, b=1, sq=sq, sk=sk, hq=6, hk=2, d=d)
    dout = random_qkv(rng, dtype, b=1, sq=sq, sk=1, hq=6, hk=1, d=d)[0]
    mask = seqpar.masks.Mask.build(causal, window)
    visible = None if mask is None else mask.visible_pairs(np.arange(sk - sq, sk),
                                                           np.arange(sk))
    out, lse = numpy_kernel.forward(q, k, v, scale=0.125, mask=mask, q_offset=sk - sq)
    delta = numpy_kernel.backward_delta(dout, out)
    grads = numpy_kernel.backward(dout, q, k, v, lse, delta, scale=0.125, mask=mask,
                                  q_offset=sk - sq)
    ref = reference_attention_backward(dout, q, k, v, softmax_scale=0.125, visible=visible)
    for got, want in zip(grads, ref):
        assert relative_error(got, want) <= TOL[dtype]


@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(sq=st.integers(1, 90), sk=st.integers(1, 200), group=st.sampled_from([1, 3, 4]),
       d=st.sampled_from([32, 64, 96]), causal=st.booleans(),
       window=st.sampled_from([None, (0, None), (7, 3), (40, 0)]),
       q_offset=st.integers(0, 150), dtype=st.sampled_from(["float32", "float64"]),
       tiles=st.sampled_from([(8, 32), (12, 40), (512, 512)]), seed=st.integers(0, 2**32 - 1))
def test_property_tile_kernel_matches_reference(monkeypatch, sq, sk, group, d, causal, window,
                                                q_offset, dtype, tiles, seed):
    """The tile kernel on any row and key count (TILED_ROWS lowered to 1), row tiles
    that cut GQA groups' rows into partial 8-row blocks, key tiles of partial blocks,
    any mask and offset, against float64."""
    monkeypatch.setattr(numpy_kernel, "TILED_ROWS", 1)
    monkeypatch.setattr(numpy_kernel, "_TILE_ROWS", tiles[0])
    monkeypatch.setattr(numpy_kernel, "_TILE_KEYS", tiles[1])
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(rng, dtype, b=1, sq=sq, sk=sk, hq=2 * group, hk=2, d=d)
    mask = seqpar.masks.Mask.build(causal, window)
    positions = np.arange(q_offset, q_offset + sq)
    visible = None if mask is None else mask.visible_pairs(positions, np.arange(sk))
    out, lse = numpy_kernel.forward(q, k, v, scale=0.3, mask=mask, q_offset=q_offset)
    ref, ref_lse = reference_attention(q, k, v, softmax_scale=0.3, visible=visible)
    seen = np.ones(sq, dtype=bool) if visible is None else visible.any(axis=1)
    if not seen.any():
        assert not out.any()
        return
    assert relative_error(out[:, seen], ref[:, seen]) <= TOL[dtype]
    assert not out[:, ~seen].any()
    assert relative_error(lse[..., seen], ref_lse[..., seen]) <= TOL[dtype]


def test_few_rows_keep_the_blas_tiles(rng, cpu_kernel, monkeypatch):
    """Fewer rows per K/V head than TILED_ROWS (16 queries of a GQA group of 4): the
    BLAS products, which need no copy of the keys, against float64."""
    q, k, v = random_qkv(rng, "float32", b=1, sq=16, sk=3000, hq=8, hk=2, d=64)
    assert 16 * 4 < numpy_kernel.TILED_ROWS
    calls = _count_tile_kernel_calls(monkeypatch, cpu_kernel)
    out = seqpar.attention(q, k, v)
    check_attention(out, q, k, v)
    assert not calls


def test_tile_kernel_nan_key_propagates(rng, cpu_kernel):
    """A NaN key in one key tile: that tile runs the NumPy passes, which make NaN the
    rows that see it; other heads keep the tile kernel's result."""
    q, k, v = random_qkv(rng, "float32", b=1, sq=1500, sk=1500, hq=2, hk=2, d=64)
    k[0, 1200, 1, 7] = np.nan
    out = seqpar.attention(q, k, v, causal=True)
    rows_seeing_it = np.arange(1500) >= 1200
    assert np.isnan(out[0, rows_seeing_it, 1]).all()
    assert not np.isnan(out[0, ~rows_seeing_it, 1]).any() and not np.isnan(out[0, :, 0]).any()
    check_attention(out[:, :, :1], q[:, :, :1], k[:, :, :1], v[:, :, :1], causal=True)


def test_tile_kernel_same_bytes_any_thread_count(rng, cpu_kernel, monkeypatch):
    """No BLAS in the tile kernel: one thread and the pool give the same bytes, twice."""
    if cpu_kernel != "numba":
        pytest.skip("the tile kernel's property")
    q, k, v = random_qkv(rng, "float32", b=1, sq=1200, sk=1200, hq=4, hk=2, d=64)
    first = seqpar.attention(q, k, v, causal=True, return_lse=True)
    try:
        monkeypatch.setenv("SEQPAR_NUM_THREADS", "1")
        numpy_kernel._threads.cache_clear()
        for _ in range(2):
            again = seqpar.attention(q, k, v, causal=True, return_lse=True)
            assert all(np.array_equal(a, b) for a, b in zip(first, again))
    finally:
        monkeypatch.delenv("SEQPAR_NUM_THREADS")
        numpy_kernel._threads.cache_clear()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("layout", ["C", "F", "transposed", "readonly"])
def test_layouts_read_in_place(rng, dtype, layout):
    q, k, v = random_qkv(rng, dtype, b=2, sq=40, sk=600, hq=4, hk=2, d=32)
    arrays = [_layouts(x)[layout] for x in (q, k, v)]
    before = [x.copy() for x in arrays]
    out = seqpar.attention(*arrays, causal=True, window=(100, None))
    for x, y in zip(arrays, before):
        assert np.array_equal(x, y)
    visible = seqpar.masks.Mask.build(True, (100, None)).visible_pairs(np.arange(40),
                                                                       np.arange(600))
    check_attention(out, q, k, v, visible=visible)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("queries,hq,hk", [(1, 8, 2), (2, 4, 4), (16, 8, 2)])
def test_decode_with_key_lengths(rng, dtype, queries, hq, hk):
    """Few rows against a long cache (the decode kernel, then BLAS tiles at 16 queries),
    with per-batch-row valid lengths, 0 included."""
    q, k, v = random_qkv(rng, dtype, b=3, sq=queries, sk=3000, hq=hq, hk=hk, d=64)
    lengths = np.array([3000, 1234, 0])
    out, lse = seqpar.attention(q, k, v, key_lengths=lengths, return_lse=True)
    for b, n in enumerate(lengths):
        if n == 0:
            assert not out[b].any() and np.all(lse[b] == -np.inf)
            continue
        # the float64 reference only: with 1 query the plain float32 error of so few
        # outputs is itself noise, too small a yardstick for the 2x rule
        ref, ref_lse = reference_attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n])
        assert relative_error(out[b:b + 1], ref) <= TOL[dtype]
        assert relative_error(lse[b:b + 1], ref_lse) <= TOL[dtype]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fully_masked_rows_give_zero(rng, dtype):
    """A window leaves the first 40 rows of a block without keys: 0 and -inf."""
    q, k, v = random_qkv(rng, dtype, b=1, sq=64, sk=64, hq=2, hk=1, d=16)
    mask = seqpar.masks.Mask.build(True, (3, None), None)
    out, lse = numpy_kernel.forward(q, k, v, scale=0.25, mask=mask, q_offset=0, k_offset=40)
    assert not np.isnan(out).any()
    assert np.all(lse[:, :, :40] == -np.inf) and not out[:, :40].any()
    ref, ref_lse = reference_attention(q[:, 40:], k, v, softmax_scale=0.25,
                                       visible=mask.visible_pairs(np.arange(40, 64),
                                                                  40 + np.arange(64)))
    assert relative_error(out[:, 40:], ref) <= TOL[dtype]
    assert relative_error(lse[:, :, 40:], ref_lse) <= TOL[dtype]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_bitwise_deterministic(rng, dtype):
    q, k, v = random_qkv(rng, dtype, b=1, sq=600, sk=1100, hq=4, hk=1, d=64)
    dout = rng.standard_normal(q.shape).astype(dtype)
    first = seqpar.attention(q, k, v, causal=True, return_lse=True)
    grads = seqpar.attention_backward(dout, q, k, v, *first, causal=True)
    for _ in range(2):
        again = seqpar.attention(q, k, v, causal=True, return_lse=True)
        assert all(np.array_equal(a, b) for a, b in zip(first, again))
        regrads = seqpar.attention_backward(dout, q, k, v, *again, causal=True)
        assert all(np.array_equal(a, b) for a, b in zip(grads, regrads))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_kernels_agree(rng, dtype, monkeypatch):
    """The compiled step and the NumPy passes within the dtype's tolerance."""
    pytest.importorskip("numba")
    q, k, v = random_qkv(rng, dtype, b=1, sq=520, sk=1030, hq=2, hk=2, d=64)
    results = {}
    for name in ("numpy", "numba"):
        monkeypatch.setenv("SEQPAR_CPU_KERNEL", name)
        results[name] = seqpar.attention(q, k, v, causal=True)
    assert relative_error(results["numba"], results["numpy"].astype(np.float64)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiled_exp(dtype):
    """The numba kernels' exp against NumPy's over the range they see (x <= 0)."""
    pytest.importorskip("numba")
    from numba import njit

    from seqpar.local.numba_math import exp_nonpositive

    @njit
    def apply(x):
        out = np.empty_like(x)
        for i in range(x.shape[0]):
            out[i] = exp_nonpositive(x[i])
        return out

    x = -np.concatenate([np.linspace(0, 120, 100001), [np.inf, 1e-30, 5e-8]]).astype(dtype)
    got, want = apply(x), np.exp(x.astype(np.float64))
    ulps = 4 * np.finfo(dtype).eps
    tiny = np.finfo(dtype).tiny * 2 ** 10  # within the smallest normals: 0 is allowed
    assert np.all((np.abs(got - want) <= ulps * want) | ((want < tiny) & (got <= tiny)))
    assert got[-3] == 0 and got[0] == 1


# The all-heads decode kernel (float32, head dims that are multiples of 32, up to
# _DECODE_ROWS rows per K/V head): several key pieces and a tail of less than 16 keys.
_LONG = 2 * numpy_kernel._DECODE_PIECE + 37


@pytest.mark.parametrize("d", [32, 96, 128])
@pytest.mark.parametrize("queries,hq,hk", [(1, 8, 2), (2, 4, 1), (1, 3, 3), (1, 1, 1)])
def test_all_heads_decode_against_float64(rng, cpu_kernel, d, queries, hq, hk):
    q, k, v = random_qkv(rng, "float32", b=2, sq=queries, sk=_LONG, hq=hq, hk=hk, d=d)
    q *= 2  # peaked rows: the running max moves between chunks and pieces
    if cpu_kernel == "numba":
        assert numpy_kernel._decodes_all_heads(q, k)
    lengths = np.array([_LONG, 20000])
    out, lse = seqpar.attention(q, k, v, key_lengths=lengths, return_lse=True)
    for b, n in enumerate(lengths):
        ref, ref_lse = reference_attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n])
        assert relative_error(out[b:b + 1], ref) <= TOL["float32"]
        assert relative_error(lse[b:b + 1], ref_lse) <= TOL["float32"]


@pytest.mark.parametrize("layout", ["C", "F", "transposed", "readonly"])
@pytest.mark.parametrize("window", [None, (5000, None), (40, None)])
def test_all_heads_decode_masks_and_layouts(rng, layout, window):
    """The last queries of a causal sequence (a window hides the first pieces or all
    but 41 keys), the cache in every layout, read in place and left unchanged."""
    sq, sk = 2, 20000 + 19
    q, k, v = random_qkv(rng, "float32", b=2, sq=sq, sk=sk, hq=4, hk=2, d=64)
    arrays = [_layouts(x)[layout] for x in (q, k, v)]
    before = [x.copy() for x in arrays]
    mask = seqpar.masks.Mask.build(True, window)
    out, lse = numpy_kernel.forward(*arrays, scale=0.125, mask=mask, q_offset=sk - sq,
                                    k_offset=0)
    for x, y in zip(arrays, before):
        assert np.array_equal(x, y)
    visible = mask.visible_pairs(np.arange(sk - sq, sk), np.arange(sk))
    ref, ref_lse = reference_attention(q, k, v, softmax_scale=0.125, visible=visible)
    assert relative_error(out, ref) <= TOL["float32"]
    assert relative_error(lse, ref_lse) <= TOL["float32"]


def test_all_heads_decode_nan_key_propagates(rng, monkeypatch):
    """A NaN key makes NaN the rows of its K/V head, as the NumPy passes do; the other
    batch row keeps the decode kernel's result."""
    q, k, v = random_qkv(rng, "float32", b=2, sq=1, sk=_LONG, hq=4, hk=2, d=64)
    k[0, 17000, 1, 5] = np.nan
    out = seqpar.attention(q, k, v)
    monkeypatch.setenv("SEQPAR_CPU_KERNEL", "numpy")
    want = seqpar.attention(q, k, v)
    assert np.array_equal(np.isnan(out), np.isnan(want))
    assert np.isnan(out[0, :, 2:]).all() and not np.isnan(out[0, :, :2]).any()
    assert relative_error(out[1], want[1].astype(np.float64)) <= TOL["float32"]


def test_all_heads_decode_same_bytes_any_thread_count(rng, cpu_kernel, monkeypatch):
    """Fixed key pieces: one thread and the default pool give the same bytes, twice
    (the BLAS tiles need not: BLAS splits its work by its own thread count)."""
    if cpu_kernel != "numba":
        pytest.skip("the decode kernel's property")
    q, k, v = random_qkv(rng, "float32", b=1, sq=1, sk=_LONG, hq=8, hk=2, d=64)
    first = seqpar.attention(q, k, v, return_lse=True)
    try:
        monkeypatch.setenv("SEQPAR_NUM_THREADS", "1")
        numpy_kernel._threads.cache_clear()
        for _ in range(2):
            again = seqpar.attention(q, k, v, return_lse=True)
            assert all(np.array_equal(a, b) for a, b in zip(first, again))
    finally:
        monkeypatch.delenv("SEQPAR_NUM_THREADS")
        numpy_kernel._threads.cache_clear()


@pytest.mark.parametrize("accumulate", [False, True])
def test_all_heads_decode_accumulates(rng, accumulate):
    """forward(accumulate=True) merges the decode kernel's block into out and lse."""
    q, k, v = random_qkv(rng, "float32", b=1, sq=1, sk=3000, hq=4, hk=2, d=64)
    out, lse = numpy_kernel.forward(q, k[:, :1000], v[:, :1000], scale=0.125)
    out, lse = numpy_kernel.forward(q, k[:, 1000:], v[:, 1000:], scale=0.125, out=out,
                                    lse=lse, accumulate=accumulate)
    lo = 0 if accumulate else 1000
    ref, ref_lse = reference_attention(q, k[:, lo:], v[:, lo:], softmax_scale=0.125)
    assert relative_error(out, ref) <= TOL["float32"]
    assert relative_error(lse, ref_lse) <= TOL["float32"]
