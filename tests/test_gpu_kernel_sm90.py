"""GPU tests of the Hopper forward kernel (seqpar.local.cupy_sm90).

Skipped unless a device of compute capability 9.0 is visible (and cuda.bindings
is importable). The matrix of tests/test_gpu_kernel.py, run against this path:
outputs poisoned with NaN, every result against the float64 reference and the
plain same-dtype computation (tolerance fp16 2e-3, bf16 1e-2, and no worse than
2x the plain error), masks by global position with offsets, GQA, tails,
key_lengths, the in-place accumulate mode, strided inputs, more work tiles than
multiprocessors, and bitwise determinism.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import require_gpu

cupy, _ = require_gpu()

from reference import reference_attention, relative_error  # noqa: E402

from seqpar.local import cupy_kernel, cupy_sm90  # noqa: E402
from seqpar.masks import Mask  # noqa: E402

pytestmark = pytest.mark.gpu

try:
    import cuda.bindings.driver  # noqa: F401

    _HAVE_BINDINGS = True
except ImportError:  # pragma: no cover
    _HAVE_BINDINGS = False

if cupy.cuda.Device().compute_capability != "90" or not _HAVE_BINDINGS:
    pytest.skip("the sm_90a kernel needs a compute capability 9.0 device and cuda.bindings",
                allow_module_level=True)

import ml_dtypes  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
TOL = {"float16": 2e-3, "bfloat16": 1e-2}
DTYPES = ["float16", "bfloat16"]
HEAD_DIMS = list(cupy_sm90.SUPPORTED_HEAD_DIMS)


def _dtype(name):
    return BF16 if name == "bfloat16" else np.dtype(name)


def _inputs(rng, dtype, b, sq, sk, hq, hk, d):
    q = rng.standard_normal((b, sq, hq, d)).astype(np.float32).astype(dtype)
    k = rng.standard_normal((b, sk, hk, d)).astype(np.float32).astype(dtype)
    v = rng.standard_normal((b, sk, hk, d)).astype(np.float32).astype(dtype)
    return q, k, v


def _visible(mask, sq, sk, q_offset, k_offset, key_lengths=None, batch=1):
    """(B, 1, Sq, Sk) boolean visibility, from the mask rule and key_lengths."""
    qpos = q_offset + np.arange(sq)
    kpos = k_offset + np.arange(sk)
    vis = (np.ones((sq, sk), dtype=bool) if mask is None
           else mask.visible_pairs(qpos, kpos))
    vis = np.broadcast_to(vis, (batch, 1, sq, sk)).copy()
    if key_lengths is not None:
        for b, n in enumerate(key_lengths):
            vis[b, :, :, max(0, int(n)):] = False
    return vis


def _plain(q, k, v, dtype, scale, visible, out_dtype):
    """Unfused computation in the dtype (tests/test_gpu_kernel.py)."""
    rnd = lambda x, t=dtype: x.astype(t).astype(np.float32)  # noqa: E731
    q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k32, v32 = np.repeat(k32, g, axis=2), np.repeat(v32, g, axis=2)
    s = rnd(np.einsum("bihd,bjhd->bhij", q32, k32)) * np.float32(scale)
    s = np.where(visible, s, -np.inf).astype(np.float32)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0).astype(np.float32)
    p = np.exp(s - m)
    den = p.sum(axis=-1, keepdims=True)
    p = np.where(den > 0, p / np.where(den > 0, den, 1), 0).astype(np.float32)
    return rnd(np.einsum("bhij,bjhd->bihd", rnd(p), v32), out_dtype)


def _poisoned(shape, dtype):
    x = cupy.empty(shape, dtype=dtype)
    x.view(np.uint8).fill(0xFF)  # NaN for every float type
    return x


def _check(out, lse, q, k, v, dtype_name, *, scale, visible, out_dtype=None):
    dtype = _dtype(dtype_name)
    out_dtype = dtype if out_dtype is None else out_dtype
    ref, ref_lse = reference_attention(q, k, v, softmax_scale=scale, visible=visible)
    out_h = np.asarray(out.get()).astype(np.float64)
    lse_h = lse.get()
    assert lse_h.dtype == np.float64
    assert not np.isnan(out_h).any(), "NaN (unwritten or bad) in out"
    assert not np.isnan(lse_h).any(), "NaN (unwritten or bad) in lse"
    err = relative_error(out_h, ref)
    plain = relative_error(_plain(q, k, v, dtype, scale, visible, out_dtype), ref)
    tol = TOL[dtype_name]
    assert err <= tol, f"rel err {err:.3g} > {tol}"
    assert err <= 2 * plain, f"rel err {err:.3g} > 2 x plain {plain:.3g}"
    fin = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse_h), fin)
    assert np.all(lse_h[~fin] == -np.inf)
    if fin.any():
        lerr = relative_error(lse_h[fin], ref_lse[fin])
        assert lerr <= 1e-5, f"lse rel err {lerr:.3g}"
    dead = ~fin.transpose(0, 2, 1)  # (B, Sq, H)
    assert np.all(out_h[dead] == 0)
    return err, plain


def _run(q, k, v, *, scale, mask=None, q_offset=0, k_offset=0, key_lengths=None,
         out_dtype=None):
    out = _poisoned(q.shape, q.dtype if out_dtype is None else out_dtype)
    lse = _poisoned((q.shape[0], q.shape[2], q.shape[1]), np.float64)
    kl = None if key_lengths is None else cupy.asarray(np.asarray(key_lengths, np.int64))
    cupy_sm90.forward(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), scale=scale,
                      mask=mask, q_offset=q_offset, k_offset=k_offset, key_lengths=kl,
                      out=out, lse=lse)
    return out, lse


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("sq,sk", [(77, 131), (333, 700)])
def test_forward_matrix(dtype_name, d, causal, group, sq, sk):
    dtype = _dtype(dtype_name)
    rng = np.random.default_rng([d, group, int(causal), len(dtype_name), sq])
    b, hk = 2, 2
    q, k, v = _inputs(rng, dtype, b, sq, sk, hk * group, hk, d)
    scale = 1.0 / math.sqrt(d)
    q_off = sk - sq  # causal: bottom-right aligned, every row sees a key
    mask = Mask.build(causal=causal)
    out, lse = _run(q, k, v, scale=scale, mask=mask, q_offset=q_off)
    _check(out, lse, q, k, v, dtype_name, scale=scale,
           visible=_visible(mask, sq, sk, q_off, 0, batch=b))


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("sq,sk,q_off,k_off", [
    (77, 131, 0, 40),      # rows 0..39 see no key at all
    (600, 600, 0, 0),      # square causal, many tiles
    (129, 1000, 500, 0),   # query block in the middle of a long key block
    (200, 70, 1000, 0),    # keys all in the past: nothing masked
    (64, 64, 0, 500),      # keys all in the future: every row dead
])
def test_causal_offsets(dtype_name, d, sq, sk, q_off, k_off):
    dtype = _dtype(dtype_name)
    rng = np.random.default_rng([sq, sk, q_off, k_off, d])
    q, k, v = _inputs(rng, dtype, 1, sq, sk, 4, 2, d)
    scale = 0.7 / math.sqrt(d)
    mask = Mask.build(causal=True)
    out, lse = _run(q, k, v, scale=scale, mask=mask, q_offset=q_off, k_offset=k_off)
    if sq + q_off <= k_off:  # everything hidden
        assert bool((out == 0).all()) and bool((lse == -np.inf).all())
        return
    _check(out, lse, q, k, v, dtype_name, scale=scale,
           visible=_visible(mask, sq, sk, q_off, k_off))


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("causal,window,seqlens,q_off,k_off", [
    (False, (50, 30), None, 0, 0),             # sliding window, both sides
    (True, (100, None), None, 0, 0),           # causal + left window
    (False, None, (100, 250, 7, 343), 0, 0),   # packed documents
    (True, (64, None), (300, 400), 0, 0),      # all three
    (True, None, (130, 270, 300), 200, 150),   # documents by global position, offsets
    (False, (0, 0), None, 0, 0),               # each query sees only its own key
])
def test_masks(dtype_name, d, causal, window, seqlens, q_off, k_off):
    dtype = _dtype(dtype_name)
    rng = np.random.default_rng([d, q_off, k_off, int(causal), len(dtype_name)])
    sq, sk = 500, 550
    q, k, v = _inputs(rng, dtype, 1, sq, sk, 4, 2, d)
    scale = 1.0 / math.sqrt(d)
    mask = Mask.build(causal=causal, window=window, seqlens=seqlens)
    out, lse = _run(q, k, v, scale=scale, mask=mask, q_offset=q_off, k_offset=k_off)
    _check(out, lse, q, k, v, dtype_name, scale=scale,
           visible=_visible(mask, sq, sk, q_off, k_off))


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_key_lengths(dtype_name, causal):
    dtype = _dtype(dtype_name)
    rng = np.random.default_rng([int(causal), len(dtype_name), 17])
    b, sq, sk, d = 4, 150, 400, 128
    q, k, v = _inputs(rng, dtype, b, sq, sk, 8, 2, d)
    lengths = [400, 0, 1, 257]
    mask = Mask.build(causal=causal)
    out, lse = _run(q, k, v, scale=0.1, mask=mask, q_offset=sk - sq, key_lengths=lengths)
    _check(out, lse, q, k, v, dtype_name, scale=0.1,
           visible=_visible(mask, sq, sk, sk - sq, 0, key_lengths=lengths, batch=b))


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("out_f32", [True, False])
def test_accumulate_blocks(dtype_name, d, causal, out_f32):
    """Split K/V into 3 odd blocks, merge with accumulate=True, as the ring does."""
    dtype = _dtype(dtype_name)
    rng = np.random.default_rng([d, int(causal), int(out_f32), 7])
    sq, sk, hq, hk = 293, 451, 8, 2
    q, k, v = _inputs(rng, dtype, 2, sq, sk, hq, hk, d)
    scale = 1.0 / math.sqrt(d)
    q_off = 140
    bounds = [(300, 451), (0, 157), (157, 300)]
    out_dtype = np.float32 if out_f32 else dtype
    out = _poisoned(q.shape, out_dtype)
    lse = _poisoned((2, hq, sq), np.float64)
    mask = Mask.build(causal=causal)
    qd = cupy.asarray(q)
    for i, (lo, hi) in enumerate(bounds):
        cupy_sm90.forward(qd, cupy.asarray(k[:, lo:hi]), cupy.asarray(v[:, lo:hi]),
                          scale=scale, mask=mask, q_offset=q_off, k_offset=lo,
                          out=out, lse=lse, accumulate=i > 0)
    vis = _visible(mask, sq, sk, q_off, 0, batch=2)
    if out_f32:
        _check(out, lse, q, k, v, dtype_name, scale=scale, visible=vis, out_dtype=out_dtype)
    else:
        ref, _ = reference_attention(q, k, v, softmax_scale=scale, visible=vis)
        err = relative_error(out.get().astype(np.float64), ref)
        assert err <= TOL[dtype_name], err


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_accumulate_dead_block_leaves_rows(dtype_name):
    """A block that no row can see changes nothing, bit for bit."""
    dtype = _dtype(dtype_name)
    rng = np.random.default_rng(11)
    q, k, v = _inputs(rng, dtype, 1, 150, 280, 4, 4, 64)
    qd, kd, vd = (cupy.asarray(x) for x in (q, k, v))
    mask = Mask.build(causal=True)
    out, lse = cupy_sm90.forward(qd, kd[:, :140], vd[:, :140], scale=0.125, mask=mask,
                                 q_offset=300, k_offset=0,
                                 out=cupy.empty(q.shape, np.float32))
    before = (out.copy(), lse.copy())
    cupy_sm90.forward(qd, kd[:, 140:], vd[:, 140:], scale=0.125, mask=mask, q_offset=300,
                      k_offset=1000, out=out, lse=lse, accumulate=True)
    assert bool((out == before[0]).all()) and bool((lse == before[1]).all())


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_strided_views(dtype_name, d):
    """q, k, v as views of a packed (B, S, 3, H, D) buffer; out a strided view too."""
    dtype = _dtype(dtype_name)
    rng = np.random.default_rng([d, 3])
    b, s, h = 2, 373, 4
    qkv = rng.standard_normal((b, s, 3, h, d)).astype(np.float32).astype(dtype)
    dev = cupy.asarray(qkv)
    q, k, v = dev[:, :, 0], dev[:, :, 1], dev[:, :, 2]
    assert not q.flags.c_contiguous
    big = _poisoned((b, s, 2, h, d), dtype)
    out = big[:, :, 1]
    lse = _poisoned((b, h, s), np.float64)
    scale = 1.0 / math.sqrt(d)
    mask = Mask.build(causal=True)
    cupy_sm90.forward(q, k, v, scale=scale, mask=mask, out=out, lse=lse)
    _check(out, lse, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dtype_name, scale=scale,
           visible=_visible(mask, s, s, 0, 0, batch=b))
    q2, k2, v2 = dev[:, ::2, 0], dev[:, 1::2, 1], dev[:, 1::2, 2]
    out2, lse2 = cupy_sm90.forward(q2, k2, v2, scale=scale)
    _check(out2, lse2, qkv[:, ::2, 0], qkv[:, 1::2, 1], qkv[:, 1::2, 2], dtype_name,
           scale=scale, visible=_visible(None, q2.shape[1], k2.shape[1], 0, 0, batch=b))


@pytest.mark.parametrize("causal", [False, True])
def test_many_work_tiles(causal):
    """More (batch, head, query block) tiles than multiprocessors: the persistent
    loop runs several rounds; rows checked on a sample."""
    rng = np.random.default_rng([int(causal), 99])
    b, s, hq, hk, d = 2, 1536, 8, 4, 64
    q, k, v = _inputs(rng, BF16, b, s, s, hq, hk, d)
    mask = Mask.build(causal=causal)
    out, lse = _run(q, k, v, scale=0.125, mask=mask)
    rows = np.arange(3, s, 29)
    vis = _visible(mask, s, s, 0, 0, batch=b)[:, :, rows]
    ref, ref_lse = reference_attention(q[:, rows], k, v, softmax_scale=0.125, visible=vis)
    got = out.get()[:, rows].astype(np.float64)
    assert not np.isnan(out.get().astype(np.float32)).any()
    assert relative_error(got, ref) <= TOL["bfloat16"]
    assert relative_error(lse.get()[:, :, rows], ref_lse) <= 1e-5


@pytest.mark.parametrize("heavy_group", [1, 3, 8, 64])
@pytest.mark.parametrize("b,s,hq,hk", [
    (1, 100, 1, 1),     # a single work tile
    (3, 1000, 6, 2),    # 8 query blocks a head (a part group of 3, 8 | 8), 144 > SM tiles
    (2, 1300, 5, 5),    # 11 query blocks: uneven at every group size
])
def test_causal_orders(monkeypatch, heavy_group, b, s, hq, hk):
    """The longest-first order deals every (batch, head, query block) tile exactly once
    at any group size, whatever the counts (all rows checked)."""
    monkeypatch.setattr(cupy_sm90, "heavy_group", lambda *_: heavy_group)
    rng = np.random.default_rng([heavy_group, b, s, hq])
    q, k, v = _inputs(rng, BF16, b, s, s, hq, hk, 64)
    mask = Mask.build(causal=True)
    out, lse = _run(q, k, v, scale=0.125, mask=mask)
    _check(out, lse, q, k, v, "bfloat16", scale=0.125,
           visible=_visible(mask, s, s, 0, 0, batch=b))


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_deterministic(dtype_name):
    dtype = _dtype(dtype_name)
    rng = np.random.default_rng(5)
    q, k, v = (cupy.asarray(x) for x in _inputs(rng, dtype, 1, 700, 900, 8, 2, 128))
    mask = Mask.build(causal=True)
    a = cupy_sm90.forward(q, k, v, scale=0.09, mask=mask, q_offset=200)
    c = cupy_sm90.forward(q, k, v, scale=0.09, mask=mask, q_offset=200)
    assert a[0].view(np.uint8).get().tobytes() == c[0].view(np.uint8).get().tobytes()
    assert a[1].get().tobytes() == c[1].get().tobytes()


@pytest.mark.parametrize("config", [
    cupy_sm90.Config(bn=128, nwg=2, stages=2, pingpong=False, preg=24, creg=240),
    cupy_sm90.Config(bn=176, nwg=2, stages=2, pingpong=True, preg=24, creg=240),
    cupy_sm90.Config(bn=128, nwg=3, stages=2, pingpong=True, preg=24, creg=160),
])
def test_other_configs(config):
    """The tile shapes the benchmark compares compute the same function."""
    rng = np.random.default_rng(config.bn + config.nwg)
    for d in (64, 128):
        if config.nwg == 3 and d == 128:
            continue
        q, k, v = _inputs(rng, BF16, 2, 333, 700, 8, 2, d)
        mask = Mask.build(causal=True)
        out = _poisoned(q.shape, BF16)
        lse = _poisoned((2, 8, 333), np.float64)
        cupy_sm90.forward(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), scale=0.1,
                          mask=mask, q_offset=367, out=out, lse=lse, config=config)
        _check(out, lse, q, k, v, "bfloat16", scale=0.1,
               visible=_visible(mask, 333, 700, 367, 0, batch=2))


def test_choice_table(monkeypatch):
    """Compute capability 9.0 picks the sm_90a kernel where it can run; SEQPAR_KERNEL
    forces a row; the table's choice computes the same function bit for bit."""
    rng = np.random.default_rng(8)
    q, k, v = (cupy.asarray(x) for x in _inputs(rng, BF16, 1, 200, 300, 4, 2, 128))
    monkeypatch.delenv("SEQPAR_KERNEL", raising=False)
    pick = cupy_kernel.choose_kernel
    assert pick(BF16, 128, (9, 0), rows=400) == "sm90"
    assert pick(BF16, 128, (9, 0), rows=400, sm90_reads=False) == "mma"
    assert pick(np.dtype(np.float16), 32, (9, 0), rows=400) == "mma"
    assert pick(np.dtype(np.float32), 64, (9, 0), rows=400) == "f32"
    assert pick(BF16, 128, (8, 0), rows=400) == "mma"
    mask = Mask.build(causal=True)
    a = cupy_kernel.forward(q, k, v, scale=0.1, mask=mask, q_offset=100)
    b = cupy_sm90.forward(q, k, v, scale=0.1, mask=mask, q_offset=100)
    assert a[0].view(np.uint8).get().tobytes() == b[0].view(np.uint8).get().tobytes()
    monkeypatch.setenv("SEQPAR_KERNEL", "mma")
    assert pick(BF16, 128, (9, 0), rows=400) == "mma"
    monkeypatch.setenv("SEQPAR_KERNEL", "sm90")
    with pytest.raises(ValueError, match="SEQPAR_KERNEL=sm90"):
        pick(np.dtype(np.float16), 32, (9, 0), rows=400)


def test_prepared_launch_reused():
    """A second call with the same arrays reuses the prepared launch; it sees new
    contents of q, k, v, writes into a new out and lse, and computes what a fresh
    launch computes, byte for byte. Calls with key lengths or documents keep nothing."""
    rng = np.random.default_rng(11)
    q, k, v = (cupy.asarray(x) for x in _inputs(rng, BF16, 2, 300, 400, 8, 2, 96))
    mask = Mask.build(causal=True)
    cupy_kernel._PREPARED.clear()
    first = cupy_kernel.forward(q, k, v, scale=0.1, mask=mask, q_offset=100)
    assert len(cupy_kernel._PREPARED) == 1
    q[...] = cupy.asarray(_inputs(rng, BF16, 2, 300, 400, 8, 2, 96)[0])  # same buffer
    out = _poisoned(q.shape, BF16)
    lse = _poisoned((2, 8, 300), np.float64)
    cupy_kernel.forward(q, k, v, scale=0.1, mask=mask, q_offset=100, out=out, lse=lse)
    again = cupy_kernel.forward(q, k, v, scale=0.1, mask=mask, q_offset=100)
    fresh = cupy_sm90.forward(q, k, v, scale=0.1, mask=mask, q_offset=100)
    assert len(cupy_kernel._PREPARED) == 2  # out and lse given: another signature
    for got in ((out, lse), again):
        assert got[0].view(np.uint8).get().tobytes() == fresh[0].view(np.uint8).get().tobytes()
        assert got[1].get().tobytes() == fresh[1].get().tobytes()
    assert first[0].view(np.uint8).get().tobytes() != fresh[0].view(np.uint8).get().tobytes()
    _check(again[0], again[1], q.get(), k.get(), v.get(), "bfloat16", scale=0.1,
           visible=_visible(mask, 300, 400, 100, 0, batch=2))
    docs = Mask.build(causal=True, seqlens=[150, 250])
    cupy_kernel.forward(q, k, v, scale=0.1, mask=docs, q_offset=100)
    cupy_kernel.forward(q, k, v, scale=0.1, key_lengths=cupy.asarray([400, 7]))
    assert len(cupy_kernel._PREPARED) == 2
