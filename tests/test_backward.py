"""Backward of every strategy at 1..4 ranks against the float64 analytic gradients.

Each rank builds the same global problem, runs the strategy's forward and backward
on its slices, and the gathered gradients are compared with
reference_attention_backward (DESIGN.md tolerances on each gradient; for
float16/bfloat16 also no worse than 2x the plain computation in that dtype).
"""
from __future__ import annotations

import numpy as np
import pytest

import seqpar
from seqpar.masks import Mask

from conftest import TOL, plain_attention_backward, random_array, random_qkv
from reference import reference_attention_backward, relative_error

pytestmark = pytest.mark.mpi


def _visible(n, causal=False, window=None, seqlens=None):
    mask = Mask.build(causal, window, seqlens)
    return None if mask is None else mask.visible_pairs(np.arange(n), np.arange(n))


def check_gradients(grads, dout, q, k, v, visible=None, scale=None):
    name = np.dtype(q.dtype).name
    want = reference_attention_backward(dout, q, k, v, softmax_scale=scale, visible=visible)
    low = name in ("float16", "bfloat16")
    plain = plain_attention_backward(dout, q, k, v, softmax_scale=scale, visible=visible) \
        if low else (None,) * 3
    for label, got, ref, like, other in zip(("dq", "dk", "dv"), grads, want, (q, k, v), plain):
        assert got.dtype == like.dtype and got.shape == like.shape, label
        assert not np.isnan(got.astype(np.float64)).any(), f"NaN in {label}"
        err = relative_error(got, ref)
        assert err <= TOL[name], f"{name} {label}: {err:.3g}"
        if low:
            bound = 2 * relative_error(np.asarray(other).astype(like.dtype), ref)
            assert err <= bound, f"{name} {label}: {err:.3g} > 2x plain"


def _global(comm, rng, dtype, group=2, hk=None, per_rank=6):
    hk = hk or comm.size
    n = per_rank * comm.size
    q, k, v = random_qkv(rng, dtype, b=2, sq=n, hq=group * hk, hk=hk, d=8)
    return q, k, v, random_array(rng, q.shape, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_ring_backward(comm, rng, layout, causal, group, dtype):
    q, k, v, dout = _global(comm, rng, dtype, group=group, hk=2)
    parts = [seqpar.shard(x, comm, layout=layout) for x in (q, k, v, dout)]
    out, lse = seqpar.ring_attention(*parts[:3], comm=comm, causal=causal, layout=layout,
                                     return_lse=True)
    stats = {}
    grads = seqpar.ring_attention_backward(parts[3], *parts[:3], out, lse, comm=comm,
                                           causal=causal, layout=layout, stats=stats)
    whole = [seqpar.gather(g, comm, layout=layout) for g in grads]
    check_gradients(whole, dout, q, k, v, _visible(q.shape[1], causal))
    again = seqpar.ring_attention_backward(parts[3], *parts[:3], out, lse, comm=comm,
                                           causal=causal, layout=layout)
    assert all(np.array_equal(a.view(np.uint8), b.view(np.uint8)) for a, b in zip(grads, again))
    acc = 8 if dtype == "float64" else 4
    if comm.size > 1 and not causal:  # every step sends one partial dK/dV home
        assert stats["gradient_bytes_sent"] == (comm.size - 1) * 2 * parts[1].size * acc


@pytest.mark.parametrize("window, docs", [((3, 1), False), (None, True), ((2, None), True)])
def test_ring_backward_with_masks_and_uneven_shards(comm, rng, window, docs):
    lengths = [4 + 3 * r for r in range(comm.size)]
    if comm.size > 2:
        lengths[1] = 0
    n = sum(lengths)
    q, k, v = random_qkv(rng, "float64", b=1, sq=n, hq=4, hk=2, d=8)
    dout = random_array(rng, q.shape, "float64")
    seqlens = [n // 2, n - n // 2] if docs else None
    parts = [seqpar.shard(x, comm, lengths=lengths) for x in (q, k, v, dout)]
    opts = dict(causal=True, window=window, seqlens=seqlens)
    out, lse = seqpar.ring_attention(*parts[:3], comm=comm, return_lse=True, **opts)
    grads = seqpar.ring_attention_backward(parts[3], *parts[:3], out, lse, comm=comm, **opts)
    check_gradients([seqpar.gather(g, comm) for g in grads], dout, q, k, v,
                    _visible(n, **opts))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_ulysses_backward(comm, rng, layout, causal, dtype):
    q, k, v, dout = _global(comm, rng, dtype)
    parts = [seqpar.shard(x, comm, layout=layout) for x in (q, k, v, dout)]
    out, lse = seqpar.ulysses_attention(*parts[:3], comm=comm, causal=causal, layout=layout,
                                        return_lse=True)
    grads = seqpar.ulysses_attention_backward(parts[3], *parts[:3], out, lse, comm=comm,
                                              causal=causal, layout=layout)
    check_gradients([seqpar.gather(g, comm, layout=layout) for g in grads], dout, q, k, v,
                    _visible(q.shape[1], causal))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_kv_sharded_backward(comm, rng, dtype):
    q, k, v = random_qkv(rng, dtype, b=2, sq=3, sk=5 * comm.size + 1, hq=4, hk=2, d=8)
    dout = random_array(rng, q.shape, dtype)
    mine = seqpar.local_indices(k.shape[1], comm)
    out, lse = seqpar.kv_sharded_attention(q, k[:, mine], v[:, mine], comm=comm,
                                           return_lse=True)
    dq, dk, dv = seqpar.kv_sharded_attention_backward(dout, q, k[:, mine], v[:, mine], out, lse,
                                                      comm=comm)
    everyone = comm.allgather(dq)
    assert all(np.array_equal(x, everyone[0]) for x in everyone), "dq differs across ranks"
    check_gradients((dq, seqpar.gather(dk, comm), seqpar.gather(dv, comm)), dout, q, k, v)


def test_attention_backward_and_dead_rows(comm, rng):
    """One rank, no communication: rows that see nothing get zero gradient, never NaN."""
    q, k, v = random_qkv(rng, "float32", b=2, sq=7, sk=9, hq=4, hk=2, d=8)
    dout = random_array(rng, q.shape, "float32")
    opts = dict(causal=True, q_offset=-3)  # queries 0..2 sit before every key
    out, lse = seqpar.attention(q, k, v, return_lse=True, **opts)
    dq, dk, dv = seqpar.attention_backward(dout, q, k, v, out, lse, **opts)
    assert np.all(dq[:, :3] == 0) and not np.isnan(dq).any()
    visible = np.arange(9)[None, :] <= np.arange(7)[:, None] - 3
    check_gradients((dq, dk, dv), dout, q, k, v, visible)


def test_backward_bad_lse_raises_everywhere(comm, rng):
    from conftest import raises_everywhere

    q, k, v, dout = _global(comm, rng, "float32", hk=2)
    parts = [seqpar.shard(x, comm) for x in (q, k, v, dout)]
    out, lse = seqpar.ring_attention(*parts[:3], comm=comm, return_lse=True)
    bad = lse[:, :1] if comm.rank == comm.size - 1 else lse
    raises_everywhere(comm, ValueError, rf"^rank {comm.size - 1}: lse must have shape",
                      lambda: seqpar.ring_attention_backward(parts[3], *parts[:3], out, bad,
                                                             comm=comm))
