"""``qkv_format="bhsd"`` (PyTorch's (B, H, S, D)) on every public function, at 1..4 ranks.

Each test builds one global problem, keeps it as contiguous (B, H, S, D) arrays (what a
framework holds), and calls the function twice on this rank's slices: with
``qkv_format="bhsd"`` on those arrays, and with the default on contiguous (B, S, H, D)
copies of them. The results must be the same bits (a transposed view is one more memory
layout, read alike), come back in the caller's format, leave the inputs unwritten and
match the float64 reference within DESIGN.md's tolerance. Bad values of ``qkv_format``
raise the same ValueError, naming it and the rank, on every rank.
"""
from __future__ import annotations

import numpy as np
import pytest

import seqpar

from conftest import TOL, check_attention, raises_everywhere, random_array, random_qkv
from reference import reference_attention_backward, relative_error

pytestmark = pytest.mark.mpi


def as_bhsd(x):
    """A (B, S, H, D) (or (S, H, D)) array as a contiguous (B, H, S, D) one."""
    return np.ascontiguousarray(x.swapaxes(-3, -2))


def as_bshd(x):
    """Inverse of :func:`as_bhsd`: the contiguous (B, S, H, D) copy a bshd caller holds."""
    return np.ascontiguousarray(x.swapaxes(-3, -2))


def assert_same_bits(got, want, label):
    assert got.shape == want.shape and got.dtype == want.dtype, (label, got.shape, want.shape)
    assert np.array_equal(np.ascontiguousarray(got).view(np.uint8),
                          np.ascontiguousarray(want).view(np.uint8)), f"{label}: bits differ"


def check_gradients(grads, dout, q, k, v, visible=None):
    """Global (B, S, H, D) gradients against the float64 analytic ones."""
    name = np.dtype(q.dtype).name
    want = reference_attention_backward(dout, q, k, v, visible=visible)
    for label, got, ref in zip(("dq", "dk", "dv"), grads, want):
        err = relative_error(got, ref)
        assert err <= TOL[name], f"{name} {label}: {err:.3g}"


def causal_pairs(n):
    return np.tril(np.ones((n, n), dtype=bool))


class Sharded:
    """A global problem, sliced along the sequence for this rank, in both formats."""

    def __init__(self, comm, rng, dtype, *, layout="contiguous", hq=None, hk=None,
                 per_rank=6, batch_axis=True):
        self.comm, self.layout = comm, layout
        hk = hk or comm.size
        hq = hq or 2 * hk
        n = per_rank * comm.size
        self.q, self.k, self.v = random_qkv(rng, dtype, b=2, sq=n, hq=hq, hk=hk, d=8,
                                            batch_axis=batch_axis)
        self.dout = random_array(rng, self.q.shape, dtype)
        self.seq = self.q.ndim - 3  # the sequence axis of bshd arrays; bhsd's is one later
        # this rank's slices as a framework holds them: contiguous (B, H, S, D)
        self.bhsd = [np.ascontiguousarray(seqpar.shard(as_bhsd(x), comm, layout=layout,
                                                       axis=self.seq + 1))
                     for x in (self.q, self.k, self.v, self.dout)]
        self.bshd = [as_bshd(x) for x in self.bhsd]
        self.before = [x.copy() for x in self.bhsd]

    def gather_bhsd(self, x):
        """This rank's (B, H, S, D) slices -> the global (B, S, H, D) array."""
        return as_bshd(seqpar.gather(x, self.comm, layout=self.layout, axis=self.seq + 1))

    def assert_unwritten(self):
        for x, was in zip(self.bhsd, self.before):
            assert_same_bits(x, was, "input")


def compare_forward(problem, function, **options):
    """Run ``function`` both ways; the outputs bitwise alike and against the reference."""
    q, k, v = problem.bhsd[:3]
    out, lse = function(q, k, v, qkv_format="bhsd", return_lse=True, **options)
    want_out, want_lse = function(*problem.bshd[:3], return_lse=True, **options)
    assert out.shape == q.shape, (out.shape, q.shape)  # (B, H, S, D), like q
    assert out.swapaxes(-3, -2).flags.c_contiguous  # a view of the (B, S, H, D) result
    assert lse.shape == want_lse.shape == q.shape[:-1]  # (B, H, S) in both formats
    assert_same_bits(out.swapaxes(-3, -2), want_out, "out")
    assert_same_bits(lse, want_lse, "lse")
    problem.assert_unwritten()
    whole = problem.gather_bhsd(out)
    whole_lse = seqpar.gather(lse, problem.comm, layout=problem.layout, axis=problem.seq + 1)
    check_attention(whole, problem.q, problem.k, problem.v, lse=whole_lse,
                    causal=options.get("causal", False))
    return out, lse, want_out, want_lse


def compare_backward(problem, backward, out, lse, want_out, want_lse, visible=None, **options):
    dout, (q, k, v) = problem.bhsd[3], problem.bhsd[:3]
    grads = backward(dout, q, k, v, out, lse, qkv_format="bhsd", **options)
    want = backward(problem.bshd[3], *problem.bshd[:3], want_out, want_lse, **options)
    for label, got, ref, like in zip(("dq", "dk", "dv"), grads, want, (q, k, v)):
        assert got.shape == like.shape, (label, got.shape, like.shape)
        assert_same_bits(got.swapaxes(-3, -2), ref, label)
    problem.assert_unwritten()
    check_gradients([problem.gather_bhsd(g) for g in grads], problem.dout, problem.q,
                    problem.k, problem.v, visible)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_ring(comm, rng, dtype, causal, layout):
    problem = Sharded(comm, rng, dtype, layout=layout, hk=2)
    options = {"comm": comm, "causal": causal, "layout": layout}
    result = compare_forward(problem, seqpar.ring_attention, **options)
    compare_backward(problem, seqpar.ring_attention_backward, *result,
                     visible=causal_pairs(problem.q.shape[1]) if causal else None, **options)


def test_ring_without_batch_axis(comm, rng):
    """3-D input: (H, S, D) in, (H, S, D) out."""
    problem = Sharded(comm, rng, "float64", hk=2, batch_axis=False)
    q, k, v = problem.bhsd[:3]
    out = seqpar.ring_attention(q, k, v, comm=comm, causal=True, qkv_format="bhsd")
    want = seqpar.ring_attention(*problem.bshd[:3], comm=comm, causal=True)
    assert out.shape == q.shape
    assert_same_bits(out.swapaxes(0, 1), want, "out")
    check_attention(problem.gather_bhsd(out), problem.q, problem.k, problem.v, causal=True)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
def test_ulysses(comm, rng, causal, layout):
    problem = Sharded(comm, rng, "float32", layout=layout)
    options = {"comm": comm, "causal": causal, "layout": layout}
    result = compare_forward(problem, seqpar.ulysses_attention, **options)
    compare_backward(problem, seqpar.ulysses_attention_backward, *result,
                     visible=causal_pairs(problem.q.shape[1]) if causal else None, **options)


@pytest.mark.parametrize("causal", [False, True])
def test_hybrid(comm, rng, causal):
    u = 2 if comm.size % 2 == 0 else 1
    problem = Sharded(comm, rng, "float64")
    result = compare_forward(problem, seqpar.hybrid_attention, comm=comm, causal=causal,
                             ulysses_size=u)
    compare_backward(problem, seqpar.hybrid_attention_backward, *result,
                     visible=causal_pairs(problem.q.shape[1]) if causal else None, comm=comm,
                     causal=causal, ulysses_size=u)


@pytest.mark.parametrize("strategy", ["auto", "ring", "ulysses"])
def test_sequence_parallel_attention(comm, rng, strategy):
    """The automatic choice counts the heads on bhsd's heads axis: the same choice
    (and bits) as for the bshd call."""
    problem = Sharded(comm, rng, "float32", hq=4 * comm.size, hk=comm.size)
    stats_h, stats_s = {}, {}
    q, k, v = problem.bhsd[:3]
    out = seqpar.sequence_parallel_attention(q, k, v, comm=comm, strategy=strategy,
                                             causal=True, qkv_format="bhsd", stats=stats_h)
    want = seqpar.sequence_parallel_attention(*problem.bshd[:3], comm=comm, strategy=strategy,
                                              causal=True, stats=stats_s)
    assert stats_h == stats_s
    assert_same_bits(out.swapaxes(1, 2), want, "out")
    check_attention(problem.gather_bhsd(out), problem.q, problem.k, problem.v, causal=True)


def test_kv_sharded(comm, rng):
    """Queries (and out, dout, dq) the same on every rank; K/V sliced."""
    n = 5 * comm.size
    q, k, v = random_qkv(rng, "float64", b=2, sq=3, sk=n, hq=4, hk=2, d=8)
    dout = random_array(rng, q.shape, "float64")
    qh, douth = as_bhsd(q), as_bhsd(dout)
    kh, vh = (np.ascontiguousarray(seqpar.shard(as_bhsd(x), comm, axis=2)) for x in (k, v))
    out, lse = seqpar.kv_sharded_attention(qh, kh, vh, comm=comm, return_lse=True,
                                           qkv_format="bhsd")
    want_out, want_lse = seqpar.kv_sharded_attention(q, as_bshd(kh), as_bshd(vh), comm=comm,
                                                     return_lse=True)
    assert out.shape == qh.shape
    assert_same_bits(out.swapaxes(1, 2), want_out, "out")
    assert_same_bits(lse, want_lse, "lse")
    check_attention(as_bshd(out), q, k, v, lse=lse)
    grads = seqpar.kv_sharded_attention_backward(douth, qh, kh, vh, out, lse, comm=comm,
                                                 qkv_format="bhsd")
    want = seqpar.kv_sharded_attention_backward(dout, q, as_bshd(kh), as_bshd(vh), want_out,
                                                want_lse, comm=comm)
    for label, got, ref in zip(("dq", "dk", "dv"), grads, want):
        assert_same_bits(got.swapaxes(1, 2), ref, label)
    dq = as_bshd(grads[0])
    dk, dv = (as_bshd(seqpar.gather(g, comm, axis=2)) for g in grads[1:])
    check_gradients((dq, dk, dv), dout, q, k, v)
    # the cache holds its slots as (B, S, H, D); bhsd tokens go in, bhsd queries attend
    cache_h = seqpar.ShardedKVCache(n, 2, 8, batch=2, dtype="float64", comm=comm)
    cache_s = seqpar.ShardedKVCache(n, 2, 8, batch=2, dtype="float64", comm=comm)
    cache_h.append(as_bhsd(k), as_bhsd(v), qkv_format="bhsd")
    cache_s.append(k, v)
    out, lse = cache_h.attend(qh, return_lse=True, qkv_format="bhsd")
    want_out, want_lse = cache_s.attend(q, return_lse=True)
    assert_same_bits(out.swapaxes(1, 2), want_out, "cache out")
    assert_same_bits(lse, want_lse, "cache lse")
    check_attention(as_bshd(out), q, k, v, lse=lse)


@pytest.mark.parametrize("causal", [False, True])
def test_attention(rng, causal):
    """One rank's attention (no communication), 4-D and 3-D."""
    for batch_axis in (True, False):
        q, k, v = random_qkv(rng, "float64", sq=9, hq=4, hk=2, d=8, batch_axis=batch_axis)
        dout = random_array(rng, q.shape, "float64")
        inputs = [as_bhsd(x) for x in (q, k, v, dout)]
        out, lse = seqpar.attention(*inputs[:3], causal=causal, return_lse=True,
                                    qkv_format="bhsd")
        want_out, want_lse = seqpar.attention(q, k, v, causal=causal, return_lse=True)
        assert out.shape == inputs[0].shape
        assert_same_bits(out.swapaxes(-3, -2), want_out, "out")
        assert_same_bits(lse, want_lse, "lse")
        check_attention(as_bshd(out), q, k, v, lse=lse, causal=causal)
        grads = seqpar.attention_backward(inputs[3], *inputs[:3], out, lse, causal=causal,
                                          qkv_format="bhsd")
        want = seqpar.attention_backward(dout, q, k, v, want_out, want_lse, causal=causal)
        for label, got, ref in zip(("dq", "dk", "dv"), grads, want):
            assert_same_bits(got.swapaxes(-3, -2), ref, label)
        lead = (lambda x: x) if batch_axis else (lambda x: x[None])
        check_gradients([lead(as_bshd(g)) for g in grads], lead(dout), lead(q), lead(k),
                        lead(v), causal_pairs(q.shape[-3]) if causal else None)


# ------------------------------------------------------------------ bad values

def _calls(comm, rng):
    """name -> call(qkv_format, arrays in that format) for every collective function."""
    problem = Sharded(comm, rng, "float64")
    q, k, v, dout = problem.bshd
    out, lse = seqpar.ring_attention(q, k, v, comm=comm, return_lse=True)
    cache = seqpar.ShardedKVCache(4 * comm.size, k.shape[2], 8, batch=2, dtype="float64",
                                  comm=comm)
    cache.append(k[:, :4], v[:, :4])
    shared = {"comm": comm}
    return {
        "ring_attention": lambda f, t: seqpar.ring_attention(t(q), t(k), t(v), qkv_format=f,
                                                             **shared),
        "ring_attention_backward": lambda f, t: seqpar.ring_attention_backward(
            t(dout), t(q), t(k), t(v), t(out), lse, qkv_format=f, **shared),
        "ulysses_attention": lambda f, t: seqpar.ulysses_attention(
            t(q), t(k), t(v), qkv_format=f, **shared),
        "ulysses_attention_backward": lambda f, t: seqpar.ulysses_attention_backward(
            t(dout), t(q), t(k), t(v), t(out), lse, qkv_format=f, **shared),
        "hybrid_attention": lambda f, t: seqpar.hybrid_attention(
            t(q), t(k), t(v), ulysses_size=1, qkv_format=f, **shared),
        "hybrid_attention_backward": lambda f, t: seqpar.hybrid_attention_backward(
            t(dout), t(q), t(k), t(v), t(out), lse, ulysses_size=1, qkv_format=f, **shared),
        "kv_sharded_attention": lambda f, t: seqpar.kv_sharded_attention(
            t(q), t(k), t(v), qkv_format=f, **shared),
        "kv_sharded_attention_backward": lambda f, t: seqpar.kv_sharded_attention_backward(
            t(dout), t(q), t(k), t(v), t(out), lse, qkv_format=f, **shared),
        "sequence_parallel_attention": lambda f, t: seqpar.sequence_parallel_attention(
            t(q), t(k), t(v), qkv_format=f, **shared),
        "ShardedKVCache.append": lambda f, t: cache.append(t(k[:, :1]), t(v[:, :1]),
                                                           qkv_format=f),
        "ShardedKVCache.attend": lambda f, t: cache.attend(t(q), qkv_format=f),
    }


FUNCTIONS = ("ring_attention", "ring_attention_backward", "ulysses_attention",
             "ulysses_attention_backward", "hybrid_attention", "hybrid_attention_backward",
             "kv_sharded_attention",
             "kv_sharded_attention_backward", "sequence_parallel_attention",
             "ShardedKVCache.append", "ShardedKVCache.attend")


def _same(x):
    return x


@pytest.mark.parametrize("bad", ["BHSD", "sbhd", None, 2])
@pytest.mark.parametrize("function", FUNCTIONS)
def test_bad_value_raises_on_every_rank(comm, rng, function, bad):
    call = _calls(comm, rng)[function]
    raises_everywhere(comm, ValueError,
                      rf"^rank 0: qkv_format must be one of \('bshd', 'bhsd'\), got {bad!r}$",
                      lambda: call(bad, _same))


@pytest.mark.parametrize("function", FUNCTIONS)
def test_bad_value_on_one_rank_raises_on_every_rank(comm, rng, function):
    last = comm.size - 1
    call = _calls(comm, rng)[function]
    raises_everywhere(comm, ValueError, rf"^rank {last}: qkv_format must be one of",
                      lambda: call("bhsd!" if comm.rank == last else "bshd", _same))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("function", FUNCTIONS)
def test_format_differing_across_ranks_raises(comm, rng, function):
    """Rank 0 passes bshd, the others the same slices as bhsd: named as the cause."""
    call = _calls(comm, rng)[function]
    mine = "bshd" if comm.rank == 0 else "bhsd"
    transpose = _same if comm.rank == 0 else (lambda x: x.swapaxes(1, 2))
    raises_everywhere(comm, ValueError,
                      r"qkv_format differs across ranks: rank 0 has 'bshd', rank 1 has 'bhsd'",
                      lambda: call(mine, transpose))


@pytest.mark.parametrize("bad", ["BHSD", None])
def test_bad_value_of_attention_raises(rng, bad):
    q, k, v = random_qkv(rng, "float64")
    with pytest.raises(ValueError, match=r"^qkv_format must be one of"):
        seqpar.attention(q, k, v, qkv_format=bad)
    out, lse = seqpar.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match=r"^qkv_format must be one of"):
        seqpar.attention_backward(out, q, k, v, out, lse, qkv_format=bad)


def test_shape_errors_say_how_bhsd_was_read(rng):
    q, k, v = (as_bhsd(x) for x in random_qkv(rng, "float64"))
    with pytest.raises(ValueError, match=r"qkv_format='bhsd': shapes shown as \(batch, seq"):
        seqpar.attention(q, k[:, :1], v, qkv_format="bhsd")
