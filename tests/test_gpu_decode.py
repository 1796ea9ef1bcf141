"""GPU tests of the split-K/V decode kernel (few queries against many keys).

Forced through the kernel table (SEQPAR_KERNEL=decode) and compared with the
float64 reference with an explicit visibility matrix, the DESIGN.md tolerances
and the 2x-plain-error rule of tests/test_gpu_kernel.py; outputs poisoned first.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import require_gpu

cupy, _ = require_gpu()

from reference import reference_attention, relative_error  # noqa: E402

from seqpar.local import cupy_kernel  # noqa: E402
from seqpar.masks import Mask  # noqa: E402

pytestmark = pytest.mark.gpu

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

TOL = {"float16": 2e-3, "bfloat16": 1e-2}


@pytest.fixture(autouse=True)
def _decode(monkeypatch):
    monkeypatch.setenv("SEQPAR_KERNEL", "decode")


def _dtype(name):
    if name == "bfloat16":
        if BF16 is None:
            pytest.skip("ml_dtypes not installed")
        return BF16
    return np.dtype(name)


def _inputs(rng, dtype, b, sq, sk, hq, hk, d):
    return tuple(rng.standard_normal(shape).astype(np.float32).astype(dtype)
                 for shape in ((b, sq, hq, d), (b, sk, hk, d), (b, sk, hk, d)))


def _plain(q, k, v, visible, scale, dtype):
    """Unfused computation in the dtype: rounded scores, fp32 softmax, rounded P and out."""
    rnd = lambda x: x.astype(dtype).astype(np.float32)  # noqa: E731
    g = q.shape[2] // k.shape[2]
    k32 = np.repeat(k.astype(np.float32), g, axis=2)
    v32 = np.repeat(v.astype(np.float32), g, axis=2)
    s = rnd(np.einsum("bihd,bjhd->bhij", q.astype(np.float32), k32)) * np.float32(scale)
    s = np.where(visible, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0))
    den = p.sum(axis=-1, keepdims=True)
    p = np.where(den > 0, p / np.where(den > 0, den, 1), 0)
    return rnd(np.einsum("bhij,bjhd->bihd", rnd(p), v32))


def _run_and_check(q, k, v, dtype_name, *, scale, mask=None, q_offset=0, k_offset=0,
                   lengths=None):
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    visible = np.ones((b, 1, sq, sk), bool)
    if mask is not None:
        visible &= mask.visible_pairs(q_offset + np.arange(sq), k_offset + np.arange(sk))
    if lengths is not None:
        visible &= np.arange(sk)[None, None, None, :] < np.asarray(lengths)[:, None, None, None]
    out = cupy.empty(q.shape, q.dtype)
    out.view(np.uint8).fill(0xFF)
    lse = cupy.full((b, hq, sq), np.nan)
    cupy_kernel.forward(*(cupy.asarray(x) for x in (q, k, v)), scale=scale, mask=mask,
                        q_offset=q_offset, k_offset=k_offset, out=out, lse=lse,
                        key_lengths=None if lengths is None else
                        cupy.asarray(lengths, dtype=np.int32))
    ref, ref_lse = reference_attention(q, k, v, softmax_scale=scale, visible=visible)
    got = out.get().astype(np.float64)
    got_lse = lse.get()
    assert not np.isnan(got).any() and not np.isnan(got_lse).any(), "unwritten output"
    dead = ~np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(got_lse), ~dead)
    assert np.all(got[dead.transpose(0, 2, 1)] == 0)
    if dead.all():
        return
    err = relative_error(got, ref)
    plain = relative_error(_plain(q, k, v, visible, scale, q.dtype).astype(np.float64), ref)
    assert err <= TOL[dtype_name], f"{err:.3g}"
    assert err <= 2 * plain, f"{err:.3g} > 2 x plain {plain:.3g}"
    assert relative_error(got_lse[~dead], ref_lse[~dead]) <= 1e-5


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [32, 64, 96, 128, 192, 256])
@pytest.mark.parametrize("sq,group", [(1, 1), (1, 4), (1, 8), (3, 4), (16, 4), (8, 8), (64, 1)])
def test_decode_matrix(dtype_name, d, sq, group):
    rng = np.random.default_rng([d, sq, group, len(dtype_name)])
    q, k, v = _inputs(rng, _dtype(dtype_name), 2, sq, 1031, 2 * group, 2, d)
    _run_and_check(q, k, v, dtype_name, scale=d ** -0.5)


@pytest.mark.parametrize("sk", [1, 2, 63, 64, 65, 777, 100_003])
def test_lengths(sk):
    rng = np.random.default_rng(sk)
    q, k, v = _inputs(rng, _dtype("bfloat16"), 1, 2, sk, 8, 2, 128)
    _run_and_check(q, k, v, "bfloat16", scale=0.088)


def test_key_lengths_per_row():
    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, _dtype("float16"), 4, 1, 5000, 8, 2, 128)
    _run_and_check(q, k, v, "float16", scale=0.088, lengths=[0, 1, 4097, 5000])


@pytest.mark.parametrize("case", ["causal", "window", "documents", "all"])
def test_masks(case):
    rng = np.random.default_rng(len(case))
    sq, sk = 6, 3000
    q, k, v = _inputs(rng, _dtype("bfloat16"), 2, sq, sk, 16, 4, 64)
    mask = {"causal": Mask.build(True), "window": Mask.build(True, (700, None)),
            "documents": Mask.build(False, None, [1000, 1999, 7]),
            "all": Mask.build(True, (1500, None), [100, 2800, 106])}[case]
    # queries are the last tokens (decoding): positions sk - sq .. sk - 1
    _run_and_check(q, k, v, "bfloat16", scale=0.125, mask=mask, q_offset=sk - sq)


def test_accumulate_and_lse_precision():
    """Blocks merged with accumulate=True equal the whole, also at large scores."""
    rng = np.random.default_rng(9)
    q, k, v = _inputs(rng, _dtype("float16"), 1, 4, 4000, 8, 2, 64)
    q = (q.astype(np.float32) * 8).astype(np.float16)
    ref, _ = reference_attention(q, k, v, softmax_scale=0.125)
    qd, kd, vd = (cupy.asarray(x) for x in (q, k, v))
    out = cupy.empty(q.shape, np.float32)
    lse = cupy.empty((1, 8, 4), np.float64)
    for i, (lo, hi) in enumerate(((3000, 4000), (0, 1500), (1500, 3000))):
        cupy_kernel.forward(qd, kd[:, lo:hi], vd[:, lo:hi], scale=0.125, k_offset=lo, out=out,
                            lse=lse, accumulate=i > 0)
    whole, _ = cupy_kernel.forward(qd, kd, vd, scale=0.125)
    assert relative_error(out.get(), ref) <= 2 * relative_error(whole.get(), ref) + 1e-6


def test_deterministic_and_inputs_untouched():
    rng = np.random.default_rng(12)
    q, k, v = (cupy.asarray(x) for x in _inputs(rng, _dtype("bfloat16"), 1, 16, 50_000, 32, 8,
                                                128))
    before = [x.copy() for x in (q, k, v)]
    a, la = cupy_kernel.forward(q, k, v, scale=0.088)
    c, lc = cupy_kernel.forward(q, k, v, scale=0.088)
    assert bool((a.view(np.uint16) == c.view(np.uint16)).all()) and bool((la == lc).all())
    assert all(bool((x == y).all()) for x, y in zip((q, k, v), before))


def test_table_picks_decode_for_few_rows(monkeypatch):
    monkeypatch.delenv("SEQPAR_KERNEL")
    assert cupy_kernel.choose_kernel(np.dtype(np.float16), 128, (9, 0), rows=64) == "decode"
    assert cupy_kernel.choose_kernel(np.dtype(np.float16), 128, (9, 0), rows=65) != "decode"
