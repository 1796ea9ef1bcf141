"""GPU tests of the attention backward (seqpar.local.cupy_kernel.backward).

Against the float64 analytic gradients (tests/reference.py) of the inputs as cast,
with the DESIGN.md tolerances on each gradient and, for float16/bfloat16, no worse
than 2x the plain computation in that dtype (tests/conftest.py); lse and delta come
from the GPU forward, as the strategies pass them.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import plain_attention_backward, require_gpu

cupy, _ = require_gpu()

from reference import reference_attention_backward, relative_error  # noqa: E402

from seqpar.local import cupy_kernel  # noqa: E402
from seqpar.masks import Mask  # noqa: E402

pytestmark = pytest.mark.gpu

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

TOL = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5}


def _dtype(name):
    if name == "bfloat16":
        if BF16 is None:
            pytest.skip("ml_dtypes not installed")
        return BF16
    return np.dtype(name)


def _inputs(rng, dtype, b, sq, sk, hq, hk, d):
    shapes = ((b, sq, hq, d), (b, sk, hk, d), (b, sk, hk, d), (b, sq, hq, d))
    return [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in shapes]


def _grads(q, k, v, dout, scale, mask=None, q_offset=0, k_offset=0, blocks=None):
    qd, kd, vd, gd = (cupy.asarray(x) for x in (q, k, v, dout))
    out, lse = cupy_kernel.forward(qd, kd, vd, scale=scale, mask=mask, q_offset=q_offset,
                                   k_offset=k_offset)
    delta = cupy_kernel.backward_delta(gd, out)
    if blocks is None:
        return cupy_kernel.backward(gd, qd, kd, vd, lse, delta, scale=scale, mask=mask,
                                    q_offset=q_offset, k_offset=k_offset)
    # as the ring does: every block adds its part (dq over all, dk/dv of its own keys)
    dq, dk, dv = (cupy.zeros(x.shape, np.float32) for x in (q, k, v))
    for lo, hi in blocks:
        cupy_kernel.backward(gd, qd, kd[:, lo:hi], vd[:, lo:hi], lse, delta, scale=scale,
                             mask=mask, q_offset=q_offset, k_offset=k_offset + lo,
                             dq=dq, dk=dk[:, lo:hi], dv=dv[:, lo:hi], accumulate=True)
    return dq, dk, dv


def _check(grads, q, k, v, dout, scale, visible, dtype_name):
    want = reference_attention_backward(dout, q, k, v, softmax_scale=scale, visible=visible)
    plain = plain_attention_backward(dout, q, k, v, softmax_scale=scale, visible=visible) \
        if dtype_name != "float32" else (None,) * 3
    for label, got, ref, other in zip(("dq", "dk", "dv"), grads, want, plain):
        got = got.get().astype(np.float64)
        assert not np.isnan(got).any(), f"{label}: NaN (unwritten?)"
        err = relative_error(got, ref)
        assert err <= TOL[dtype_name], f"{dtype_name} {label}: {err:.3g}"
        if other is not None:
            bound = 2 * relative_error(other.astype(np.float64), ref)
            assert err <= bound, f"{dtype_name} {label}: {err:.3g} > 2x plain"


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("d", [32, 64, 96, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_matrix(dtype_name, d, causal):
    rng = np.random.default_rng([d, int(causal), len(dtype_name)])
    q, k, v, dout = _inputs(rng, _dtype(dtype_name), 2, 150, 203, 4, 2, d)
    mask = Mask.build(causal)
    q_off = 53  # queries sit after the first keys: every row sees some
    grads = _grads(q, k, v, dout, d ** -0.5, mask, q_offset=q_off)
    visible = None if mask is None else mask.visible_pairs(q_off + np.arange(150),
                                                           np.arange(203))
    _check(grads, q, k, v, dout, d ** -0.5, visible, dtype_name)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
@pytest.mark.parametrize("case", ["window", "documents", "both", "dead rows"])
def test_backward_masks(dtype_name, case):
    rng = np.random.default_rng(len(case))
    q, k, v, dout = _inputs(rng, _dtype(dtype_name), 1, 300, 260, 8, 2, 128)
    q_off, k_off = 40, 100
    mask = {"window": Mask.build(True, (70, None)),
            "documents": Mask.build(False, None, [120, 1, 99, 80, 100]),
            "both": Mask.build(True, (50, 3), [150, 250]),
            "dead rows": Mask.build(True)}[case]
    visible = mask.visible_pairs(q_off + np.arange(300), k_off + np.arange(260))
    grads = _grads(q, k, v, dout, 0.088, mask, q_offset=q_off, k_offset=k_off)
    if case == "dead rows":  # queries 40..99 precede every key
        assert bool((grads[0][:, :60] == 0).all())
    _check(grads, q, k, v, dout, 0.088, visible, dtype_name)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
def test_backward_key_blocks_accumulate(dtype_name):
    rng = np.random.default_rng(5)
    q, k, v, dout = _inputs(rng, _dtype(dtype_name), 2, 129, 300, 8, 2, 64)
    mask = Mask.build(True)
    grads = _grads(q, k, v, dout, 0.125, mask, q_offset=171,
                   blocks=[(200, 300), (0, 77), (77, 200)])
    visible = mask.visible_pairs(171 + np.arange(129), np.arange(300))
    _check(grads, q, k, v, dout, 0.125, visible, dtype_name)


def test_backward_deterministic_and_strided():
    rng = np.random.default_rng(6)
    q, k, v, dout = _inputs(rng, _dtype("bfloat16"), 1, 700, 900, 8, 2, 128)
    a = _grads(q, k, v, dout, 0.09, Mask.build(True), q_offset=200)
    b = _grads(q, k, v, dout, 0.09, Mask.build(True), q_offset=200)
    assert all(bool((x == y).all()) for x, y in zip(a, b))
    # (B, H, S, D) storage seen as (B, S, H, D): read in place, not written
    views = [cupy.ascontiguousarray(cupy.asarray(x).transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
             for x in (q, k, v, dout)]
    before = [x.copy() for x in views]
    out, lse = cupy_kernel.forward(*views[:3], scale=0.09, mask=Mask.build(True), q_offset=200)
    delta = cupy_kernel.backward_delta(views[3], out)
    c = cupy_kernel.backward(views[3], *views[:3], lse, delta, scale=0.09,
                             mask=Mask.build(True), q_offset=200)
    assert all(bool((x == y).all()) for x, y in zip(a, c))
    assert all(bool((x == y).all()) for x, y in zip(views, before))
