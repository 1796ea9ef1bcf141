"""GPU tests of the attention backward (seqpar.local.cupy_kernel.backward).

Against the float64 analytic gradients (tests/reference.py) of the inputs as cast,
with the DESIGN.md tolerances on each gradient and, for float16/bfloat16, no worse
than 2x the plain computation in that dtype (tests/conftest.py); lse and delta come
from the GPU forward, as the strategies pass them. Outputs are poisoned (NaN) before
each call, so an element left unwritten fails. Every test runs twice: on the kernel
the table picks (on Hopper: the fused sm90 kernel for fp16/bf16 at head dims 64 and
128) and with SEQPAR_KERNEL=mma (the mma.sync kernels every GPU has).
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


@pytest.fixture(autouse=True, params=["table", "mma"])
def kernel_path(request, monkeypatch):
    """Which backward kernel runs: the table's choice, or the mma.sync kernels (float32
    has one kernel: the forced row would not apply)."""
    params = getattr(request.node, "callspec", None)
    dtype_name = params.params.get("dtype_name") if params else None
    if request.param == "mma" and dtype_name != "float32":
        monkeypatch.setenv("SEQPAR_KERNEL", "mma")
    else:
        monkeypatch.delenv("SEQPAR_KERNEL", raising=False)
    return request.param


def _on_sm90(dtype, d):
    """Whether the table picks the fused Hopper backward for this dtype and head dim."""
    capability = cupy_kernel._capability(cupy.cuda.Device().id)
    return cupy_kernel.choose_kernel(dtype, d, capability,
                                     table=cupy_kernel.BACKWARD_KERNELS) == "sm90"


def _dtype(name):
    if name == "bfloat16":
        if BF16 is None:
            pytest.skip("ml_dtypes not installed")
        return BF16
    return np.dtype(name)


def _inputs(rng, dtype, b, sq, sk, hq, hk, d):
    shapes = ((b, sq, hq, d), (b, sk, hk, d), (b, sk, hk, d), (b, sq, hq, d))
    return [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in shapes]


def _poisoned(like):
    return cupy.full(like.shape, np.nan, np.float32)


def _grads(q, k, v, dout, scale, mask=None, q_offset=0, k_offset=0, blocks=None,
           deterministic=True):
    qd, kd, vd, gd = (cupy.asarray(x) for x in (q, k, v, dout))
    out, lse = cupy_kernel.forward(qd, kd, vd, scale=scale, mask=mask, q_offset=q_offset,
                                   k_offset=k_offset)
    delta = cupy_kernel.backward_delta(gd, out)
    if blocks is None:
        return cupy_kernel.backward(gd, qd, kd, vd, lse, delta, scale=scale, mask=mask,
                                    q_offset=q_offset, k_offset=k_offset, dq=_poisoned(qd),
                                    dk=_poisoned(kd), dv=_poisoned(vd),
                                    deterministic=deterministic)
    # as the ring does: every block adds its part (dq over all, dk/dv of its own keys)
    dq, dk, dv = (cupy.zeros(x.shape, np.float32) for x in (q, k, v))
    for lo, hi in blocks:
        cupy_kernel.backward(gd, qd, kd[:, lo:hi], vd[:, lo:hi], lse, delta, scale=scale,
                             mask=mask, q_offset=q_offset, k_offset=k_offset + lo,
                             dq=dq, dk=dk[:, lo:hi], dv=dv[:, lo:hi], accumulate=True,
                             deterministic=deterministic)
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
@pytest.mark.parametrize("d", [32, 64, 96, 128, 192, 256])
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


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_many_items(d, causal):
    """More work items than SMs (persistent blocks take several), GQA 4:1, query tiles
    that many key tiles add into: the ordered dq and its byte-for-byte repeat."""
    rng = np.random.default_rng([d, int(causal), 7])
    q, k, v, dout = _inputs(rng, _dtype("bfloat16"), 4, 200, 1300, 8, 2, d)
    mask = Mask.build(causal)
    q_off = 1100
    a = _grads(q, k, v, dout, d ** -0.5, mask, q_offset=q_off)
    b = _grads(q, k, v, dout, d ** -0.5, mask, q_offset=q_off)
    assert all(bool((x == y).all()) for x, y in zip(a, b)), "not the same bytes twice"
    visible = None if mask is None else mask.visible_pairs(q_off + np.arange(200),
                                                           np.arange(1300))
    _check(a, q, k, v, dout, d ** -0.5, visible, "bfloat16")


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_backward_unordered(dtype_name, kernel_path):
    """deterministic=False: the same gradients within the tolerances (any order)."""
    rng = np.random.default_rng(8)
    q, k, v, dout = _inputs(rng, _dtype(dtype_name), 2, 333, 700, 8, 4, 128)
    mask = Mask.build(True, (200, None))
    grads = _grads(q, k, v, dout, 0.1, mask, q_offset=400, deterministic=False)
    visible = mask.visible_pairs(400 + np.arange(333), np.arange(700))
    _check(grads, q, k, v, dout, 0.1, visible, dtype_name)
    if kernel_path == "table" and cupy_kernel._capability(cupy.cuda.Device().id) == (9, 0):
        assert _on_sm90(_dtype(dtype_name), 128), "Hopper should run the fused sm90 backward"
