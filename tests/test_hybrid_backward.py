"""hybrid_attention_backward at 1..4 ranks against the float64 analytic gradients.

Structured like tests/test_backward.py: each rank builds the same global problem, runs
hybrid_attention and hybrid_attention_backward on its slices for a Ulysses group size U,
and the gathered gradients are compared with reference_attention_backward: DESIGN.md's
tolerance on each gradient and no worse than 2x the plain computation in that dtype
(with conftest's floor of a tenth of the tolerance for float32/float64, where both sit
at a few ulps). U runs over 1, 2, 3, 4 where it divides the ranks (U = 1 is the ring's
backward across all ranks, U = P Ulysses').
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    PLAIN_FLOOR,
    TOL,
    plain_attention_backward,
    raises_everywhere,
    random_array,
    random_qkv,
)
from reference import reference_attention_backward, relative_error

import seqpar
from seqpar.masks import Mask

pytestmark = pytest.mark.mpi

GROUP_SIZES = (1, 2, 3, 4)


def _need(comm, ulysses_size):
    if comm.size % ulysses_size:
        pytest.skip(f"ulysses_size {ulysses_size} does not divide {comm.size} ranks")


def _visible(n, causal=False, window=None, seqlens=None):
    mask = Mask.build(causal, window, seqlens)
    return None if mask is None else mask.visible_pairs(np.arange(n), np.arange(n))


def check_gradients(grads, dout, q, k, v, visible=None):
    """dq, dk, dv (global) against float64, within TOL and 2x the plain backward."""
    name = np.dtype(q.dtype).name
    want = reference_attention_backward(dout, q, k, v, visible=visible)
    plain = plain_attention_backward(dout, q, k, v, visible=visible)
    for label, got, ref, like, other in zip(("dq", "dk", "dv"), grads, want, (q, k, v), plain):
        assert got.dtype == like.dtype and got.shape == like.shape, label
        assert not np.isnan(got.astype(np.float64)).any(), f"NaN in {label}"
        err = relative_error(got, ref)
        assert err <= TOL[name], f"{name} {label}: {err:.3g}"
        bound = max(2 * relative_error(other, ref), PLAIN_FLOOR[name])
        assert err <= bound, f"{name} {label}: {err:.3g} > 2x plain ({bound:.3g})"


def _global(comm, rng, dtype, group=2, per_rank=6):
    # K/V heads: the ranks' count, so that every U dividing the ranks divides them
    hk = comm.size
    q, k, v = random_qkv(rng, dtype, b=2, sq=per_rank * comm.size, hq=group * hk, hk=hk, d=8)
    return q, k, v, random_array(rng, q.shape, dtype)


def _same_bytes(a, b):
    return all(np.array_equal(x.view(np.uint8), y.view(np.uint8)) for x, y in zip(a, b))


@pytest.mark.parametrize("ulysses_size", GROUP_SIZES)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_hybrid_backward(comm, rng, ulysses_size, layout, causal, group, dtype):
    _need(comm, ulysses_size)
    q, k, v, dout = _global(comm, rng, dtype, group=group)
    parts = [seqpar.shard(x, comm, layout=layout) for x in (q, k, v, dout)]
    opts = {"ulysses_size": ulysses_size, "comm": comm, "causal": causal, "layout": layout}
    out, lse = seqpar.hybrid_attention(*parts[:3], return_lse=True, **opts)
    grads = seqpar.hybrid_attention_backward(parts[3], *parts[:3], out, lse, **opts)
    check_gradients([seqpar.gather(g, comm, layout=layout) for g in grads], dout, q, k, v,
                    _visible(q.shape[1], causal))
    again = seqpar.hybrid_attention_backward(parts[3], *parts[:3], out, lse, **opts)
    assert _same_bytes(grads, again), "two calls differ"


@pytest.mark.parametrize("ulysses_size", GROUP_SIZES)
@pytest.mark.parametrize("window, docs", [((3, 1), False), (None, True), ((2, None), True)])
def test_hybrid_backward_with_masks_and_uneven_shards(comm, rng, ulysses_size, window, docs):
    _need(comm, ulysses_size)
    lengths = [4 + 3 * r for r in range(comm.size)]
    if comm.size > 2:
        lengths[1] = 0
    n = sum(lengths)
    q, k, v = random_qkv(rng, "float64", b=1, sq=n, hq=2 * comm.size, hk=comm.size, d=8)
    dout = random_array(rng, q.shape, "float64")
    seqlens = [n // 2, n - n // 2] if docs else None
    parts = [seqpar.shard(x, comm, lengths=lengths) for x in (q, k, v, dout)]
    masks = {"causal": True, "window": window, "seqlens": seqlens}
    opts = dict(masks, ulysses_size=ulysses_size, comm=comm)
    out, lse = seqpar.hybrid_attention(*parts[:3], return_lse=True, **opts)
    grads = seqpar.hybrid_attention_backward(parts[3], *parts[:3], out, lse, **opts)
    check_gradients([seqpar.gather(g, comm) for g in grads], dout, q, k, v, _visible(n, **masks))


@pytest.mark.parametrize("ulysses_size", GROUP_SIZES)
def test_hybrid_backward_window_not_causal(comm, rng, ulysses_size):
    """A two-sided window over the zigzag layout: keys on both sides of each query."""
    _need(comm, ulysses_size)
    q, k, v, dout = _global(comm, rng, "float32", group=2, per_rank=8)
    parts = [seqpar.shard(x, comm, layout="zigzag") for x in (q, k, v, dout)]
    opts = {"ulysses_size": ulysses_size, "comm": comm, "layout": "zigzag", "window": (5, 3)}
    out, lse = seqpar.hybrid_attention(*parts[:3], return_lse=True, **opts)
    grads = seqpar.hybrid_attention_backward(parts[3], *parts[:3], out, lse, **opts)
    check_gradients([seqpar.gather(g, comm, layout="zigzag") for g in grads], dout, q, k, v,
                    _visible(q.shape[1], window=(5, 3)))


def _layouts(x, rng):
    """The same values as ``x`` (B, S, H, D) in other memory layouts, read-only."""
    views = [np.asfortranarray(x),
             np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3),
             np.ascontiguousarray(x[:, ::-1, :, ::-1])[:, ::-1, :, ::-1]]
    packed = np.asarray(rng.standard_normal(x.shape[:2] + (3,) + x.shape[2:]), x.dtype)
    packed[:, :, 1] = x
    views.append(packed[:, :, 1])
    for view in views:
        view.flags.writeable = False
    return views


@pytest.mark.parametrize("ulysses_size", GROUP_SIZES)
def test_hybrid_backward_any_layout_read_only_never_written(comm, rng, ulysses_size):
    """Strided and read-only inputs (dout, q, k, v, out, lse) give the contiguous
    inputs' gradients (to float32 rounding: the local kernel's summation order may
    follow the layout, as in tests/test_backward_local.py) and are never written;
    3-D input drops the batch axis."""
    _need(comm, ulysses_size)
    q, k, v, dout = _global(comm, rng, "float32", group=2)
    parts = [seqpar.shard(x, comm) for x in (q, k, v, dout)]
    opts = {"ulysses_size": ulysses_size, "comm": comm, "causal": True}
    out, lse = seqpar.hybrid_attention(*parts[:3], return_lse=True, **opts)
    base = seqpar.hybrid_attention_backward(parts[3], *parts[:3], out, lse, **opts)
    check_gradients([seqpar.gather(g, comm) for g in base], dout, q, k, v,
                    _visible(q.shape[1], True))
    lse_view = np.asfortranarray(lse)
    lse_view.flags.writeable = False
    for kind, views in enumerate(zip(*(_layouts(x, rng) for x in (parts[3], *parts[:3], out)))):
        snapshot = [x.copy() for x in views + (lse_view,)]
        grads = seqpar.hybrid_attention_backward(*views, lse_view, **opts)
        for x, before in zip(views + (lse_view,), snapshot):
            assert x.tobytes() == before.tobytes(), f"layout {kind}: an input was written"
        for got, want in zip(grads, base):
            assert relative_error(got, want) <= 1e-6, f"layout {kind}: gradients differ"
        check_gradients([seqpar.gather(g, comm) for g in grads], dout, q, k, v,
                        _visible(q.shape[1], True))
    flat = seqpar.hybrid_attention_backward(parts[3][0], *(x[0] for x in parts[:3]), out[0],
                                            lse[0], **opts)
    assert all(g.shape == x.shape[1:] for g, x in zip(flat, parts[:3]))
    assert _same_bytes(flat, [g[0] for g in base])


def test_hybrid_backward_bad_input_raises_everywhere(comm, rng):
    """One rank's bad lse, or a group size that does not divide the ranks: the same
    error on every rank, from the one agreement, and the next call still works."""
    q, k, v, dout = _global(comm, rng, "float32")
    parts = [seqpar.shard(x, comm) for x in (q, k, v, dout)]
    u = comm.size
    out, lse = seqpar.hybrid_attention(*parts[:3], ulysses_size=u, comm=comm, return_lse=True)
    bad = lse[:, :1] if comm.rank == comm.size - 1 else lse
    raises_everywhere(comm, ValueError, rf"^rank {comm.size - 1}: lse must have shape",
                      lambda: seqpar.hybrid_attention_backward(parts[3], *parts[:3], out, bad,
                                                               ulysses_size=u, comm=comm))
    raises_everywhere(comm, ValueError, r"ulysses_size must be a divisor",
                      lambda: seqpar.hybrid_attention_backward(
                          parts[3], *parts[:3], out, lse, ulysses_size=comm.size + 1,
                          comm=comm))
    with pytest.raises(TypeError):  # keyword-only, as the other backwards
        seqpar.hybrid_attention_backward(parts[3], *parts[:3], out, lse, u)
    grads = seqpar.hybrid_attention_backward(parts[3], *parts[:3], out, lse, ulysses_size=u,
                                             comm=comm, deterministic=False)
    check_gradients([seqpar.gather(g, comm) for g in grads], dout, q, k, v)
