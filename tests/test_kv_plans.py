"""Plans of K/V-sharded attention on the CPU: KVShardedPlan and the cache behind
kv_sharded_attention give the bytes of the full call (check_finite=True is never
planned: its agreement runs every time), agree with the float64 reference, and bad
input after planning still raises the same error on every rank."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import check_attention, raises_everywhere, random_array, random_qkv
from mpi4py import MPI

import seqpar
from seqpar.strategies import kv_plan

pytestmark = pytest.mark.mpi


def _slices(rng, comm, total, empty_rank=None):
    """Every rank's [start, stop) of ``total`` keys (the same draw on every rank); the
    ``empty_rank`` holds none."""
    cuts = np.sort(rng.integers(0, total + 1, comm.size - 1))
    edges = np.r_[0, cuts, total]
    if empty_rank is not None and comm.size > 1:
        edges[empty_rank + 1:] = np.maximum(edges[empty_rank + 1:], edges[empty_rank])
        edges[empty_rank + 1] = edges[empty_rank]
        edges[-1] = total
    return slice(int(edges[comm.rank]), int(edges[comm.rank + 1]))


def _same(a, b) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


class _CountAgreements:
    """Counts the full agreements of kv_sharded calls (patched on every rank alike)."""

    def __init__(self, monkeypatch):
        self.count = 0
        real = kv_plan.agree

        def counted(*args, **kwargs):
            self.count += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(kv_plan, "agree", counted)


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("return_lse", [False, True])
def test_plan_and_cache_equal_the_full_call(comm, rng, dtype, return_lse, monkeypatch):
    """Fresh values each call, the last rank's slice empty at 2+ ranks."""
    q, k, v = random_qkv(rng, dtype, b=2, sq=3, sk=9 * comm.size, hq=4, hk=2, d=16)
    mine = _slices(rng, comm, k.shape[1], empty_rank=comm.size - 1)
    plan = seqpar.KVShardedPlan(q, k[:, mine], v[:, mine], return_lse=return_lse)
    agreements = _CountAgreements(monkeypatch)
    for _ in range(3):
        q, k, v = random_qkv(rng, dtype, b=2, sq=3, sk=9 * comm.size, hq=4, hk=2, d=16)
        kl, vl = np.ascontiguousarray(k[:, mine]), np.ascontiguousarray(v[:, mine])
        got = plan(q, kl, vl)
        cached = seqpar.kv_sharded_attention(q, kl, vl, return_lse=return_lse)
        before = agreements.count
        full = seqpar.kv_sharded_attention(q, kl, vl, return_lse=return_lse, check_finite=True)
        assert agreements.count == before + 1  # the full call agrees, every time
        assert _same(got, full) and _same(cached, full)
    # one agreement for the first cached call, then none: the plan was reused
    assert agreements.count == 1 + 3
    out, lse = got if return_lse else (got, None)
    check_attention(out, q, k, v, lse=lse)


def test_one_rank_is_attention(rng):
    """At one rank the slice is everything: no merge, the bytes of seqpar.attention."""
    self = MPI.COMM_SELF
    for dtype in ("float64", "float32", "bfloat16"):
        q, k, v = random_qkv(rng, dtype, b=2, sq=3, sk=40, hq=8, hk=2, d=16)
        lengths = np.array([40, 7])
        want, want_lse = seqpar.attention(q, k, v, return_lse=True, key_lengths=lengths)
        plan = seqpar.KVShardedPlan(q, k, v, comm=self, return_lse=True, key_lengths=lengths)
        assert _same(plan(q, k, v, key_lengths=lengths), (want, want_lse))
        for _ in range(2):  # the first builds the cached plan, the second uses it
            got = seqpar.kv_sharded_attention(q, k, v, comm=self, return_lse=True,
                                              key_lengths=lengths)
            assert _same(got, (want, want_lse))
        check_attention(want[:1], q[:1], k[:1], v[:1], lse=want_lse[:1])


def test_formats_and_key_lengths(comm, rng):
    """3-D and bhsd arrays, and key lengths per rank changed between calls (the cache's
    decode path); a rank whose rows are all empty (length 0) is fine."""
    sk = 6
    q, k, v = random_qkv(rng, "float32", b=2, sq=2, sk=sk * comm.size, hq=4, hk=2, d=8)
    mine = slice(sk * comm.rank, sk * (comm.rank + 1))
    kl, vl = k[:, mine], v[:, mine]
    plan = seqpar.KVShardedPlan(q, kl, vl, key_lengths=np.array([1, 1]), return_lse=True)
    lengths = [np.array([sk, 2]), np.array([0, sk]), np.array([0, 0])]
    for fill in lengths:
        got = plan(q, kl, vl, key_lengths=fill)
        want = seqpar.kv_sharded_attention(q, kl, vl, key_lengths=fill, return_lse=True,
                                           check_finite=True)
        assert _same(got, want)
        assert not np.isnan(got[0]).any()
    # the last: no rank has a key for any row: out 0, lse -inf
    assert np.all(got[0] == 0) and np.all(got[1] == -np.inf)
    fill = lengths[0]
    got = plan(q, kl, vl, key_lengths=fill)
    visible = np.zeros((2, k.shape[1]), bool)  # per batch row: which global keys count
    everyone = comm.allgather(fill)
    for r, n in enumerate(everyone):
        for b in range(2):
            visible[b, sk * r:sk * r + n[b]] = True
    for b in range(2):
        check_attention(got[0][b:b + 1], q[b:b + 1], k[b:b + 1, visible[b]],
                        v[b:b + 1, visible[b]], lse=got[1][b:b + 1])
    # 3-D, and PyTorch's (B, H, S, D) layout
    plan3 = seqpar.KVShardedPlan(q[0], kl[0], vl[0])
    assert _same(plan3(q[0], kl[0], vl[0]),
                 seqpar.kv_sharded_attention(q[0], kl[0], vl[0], check_finite=True))
    bhsd = [np.ascontiguousarray(x.swapaxes(1, 2)) for x in (q, kl, vl)]
    plan_t = seqpar.KVShardedPlan(*bhsd, qkv_format="bhsd")
    got = plan_t(*bhsd)
    assert got.shape == bhsd[0].shape
    assert _same(np.ascontiguousarray(got.swapaxes(1, 2)),
                 seqpar.kv_sharded_attention(q, kl, vl, check_finite=True))
    check_attention(np.ascontiguousarray(got.swapaxes(1, 2)), q, k, v)


def test_growing_keys_reuse_the_plan(comm, rng, monkeypatch):
    """A cache grown by concatenation: each step one rank's slice gets longer (a new
    shape there only); the call stays planned, with the float64 result."""
    q = random_array(rng, (1, 1, 4, 8), "float64")
    k = random_array(rng, (1, 2, 2, 8), "float64")
    v = random_array(rng, (1, 2, 2, 8), "float64")
    seqpar.kv_sharded_attention(q, k, v)  # the plan
    agreements = _CountAgreements(monkeypatch)
    for step in range(2 * comm.size):
        new_k = random_array(rng, (1, 1, 2, 8), "float64")
        new_v = random_array(rng, (1, 1, 2, 8), "float64")
        if step % comm.size == comm.rank:
            k, v = np.concatenate([k, new_k], axis=1), np.concatenate([v, new_v], axis=1)
        q = random_array(rng, (1, 1, 4, 8), "float64")
        out = seqpar.kv_sharded_attention(q, k, v)
    assert agreements.count == 0
    everyone_k = comm.allgather(k)
    everyone_v = comm.allgather(v)
    check_attention(out, q, np.concatenate(everyone_k, axis=1),
                    np.concatenate(everyone_v, axis=1))


def test_sharded_cache_attend_is_planned(comm, rng, monkeypatch):
    cache = seqpar.ShardedKVCache(64, 2, 8, batch=2, comm=comm)
    q = random_array(rng, (2, 1, 4, 8), "float32")
    cache.append(*(random_array(rng, (2, 1, 2, 8), "float32") for _ in range(2)))
    cache.attend(q)  # the plan
    agreements = _CountAgreements(monkeypatch)
    for _ in range(5):
        k, v = (random_array(rng, (2, 3, 2, 8), "float32") for _ in range(2))
        cache.append(k, v)
        q = random_array(rng, (2, 1, 4, 8), "float32")
        out = cache.attend(q)  # planned
        # the full call (no check_finite: the cache's free slots hold garbage): after
        # forgetting the plans on every rank; it plans again
        seqpar.plans.clear_plan_cache()
        want = seqpar.kv_sharded_attention(q, cache.k, cache.v, key_lengths=cache.local_lengths)
        assert _same(out, want)
    assert agreements.count == 5  # the full calls' only
    assert len(kv_plan.channel_of(seqpar.comms.context_of(comm), False).plans) >= 1
    # every rank's cached tokens, gathered: the reference of the last step
    everyone = comm.allgather((np.asarray(cache.local_lengths), cache.k, cache.v))
    for b in range(2):
        kb = np.concatenate([kk[b, :n[b]] for n, kk, _ in everyone])[None]
        vb = np.concatenate([vv[b, :n[b]] for n, _, vv in everyone])[None]
        check_attention(out[b:b + 1], q[b:b + 1], kb, vb)


def test_after_planning_one_rank_differs(comm, rng):
    """Planned on every rank, then one rank passes another scale, another shape of q, or
    key lengths out of range: every rank raises the full call's error, naming the rank;
    the next correct call is planned again and right."""
    q, k, v = random_qkv(rng, "float32", b=1, sq=2, sk=4 * comm.size, hq=2, hk=2, d=8)
    mine = slice(4 * comm.rank, 4 * (comm.rank + 1))
    kl, vl = k[:, mine], v[:, mine]
    seqpar.kv_sharded_attention(q, kl, vl)
    last = comm.size - 1
    if comm.size > 1:
        raises_everywhere(comm, ValueError, "^kv_sharded_attention: softmax_scale differs",
                          lambda: seqpar.kv_sharded_attention(
                              q, kl, vl, softmax_scale=0.5 if comm.rank == last else None))
        raises_everywhere(comm, ValueError, "q length differs",
                          lambda: seqpar.kv_sharded_attention(
                              q[:, :1] if comm.rank == last else q, kl, vl))
    raises_everywhere(comm, ValueError, f"^rank {last}: key_lengths must lie in",
                      lambda: seqpar.kv_sharded_attention(
                          q, kl, vl, key_lengths=np.array([5 if comm.rank == last else 1])))
    check_attention(seqpar.kv_sharded_attention(q, kl, vl), q, k, v)


def test_plan_called_with_other_arrays(comm, rng):
    q, k, v = random_qkv(rng, "float32", b=1, sq=2, sk=4 * comm.size, hq=4, hk=2, d=8)
    mine = slice(4 * comm.rank, 4 * (comm.rank + 1))
    kl, vl = k[:, mine], v[:, mine]
    plan = seqpar.KVShardedPlan(q, kl, vl)
    last = comm.size - 1
    raises_everywhere(comm, ValueError, f"^rank {last}: q: this plan was built for",
                      lambda: plan(q[:, :1] if comm.rank == last else q, kl, vl))
    bad = np.ascontiguousarray(kl[:, :, :1])
    raises_everywhere(comm, ValueError, f"^rank {last}: (k|heads of q)",
                      lambda: plan(q, bad if comm.rank == last else kl,
                                   bad if comm.rank == last else vl))
    raises_everywhere(comm, ValueError, f"^rank {last}: key_lengths: this plan was built",
                      lambda: plan(q, kl, vl, key_lengths=np.array([1]) if comm.rank == last
                                   else None))
    # other lengths and layouts of k and v are this plan's too
    longer = np.concatenate([kl, kl], axis=1)
    got = plan(q, longer, np.asfortranarray(np.concatenate([vl, vl], axis=1)))
    assert _same(got, seqpar.kv_sharded_attention(q, longer, np.concatenate([vl, vl], axis=1),
                                                  check_finite=True))
    check_attention(plan(q, kl, vl), q, k, v)


def test_a_rank_that_forgot_its_plans(comm, rng):
    """clear_plan_cache on one rank: that rank's next call is not planned, so every rank
    makes the full call (the check says so), and plans again."""
    q, k, v = random_qkv(rng, "float64", b=1, sq=2, sk=3 * comm.size, hq=2, hk=1, d=8)
    mine = slice(3 * comm.rank, 3 * (comm.rank + 1))
    kl, vl = k[:, mine], v[:, mine]
    first = seqpar.kv_sharded_attention(q, kl, vl)
    if comm.rank == 0:
        seqpar.plans.clear_plan_cache()
    assert _same(seqpar.kv_sharded_attention(q, kl, vl), first)
    assert _same(seqpar.kv_sharded_attention(q, kl, vl), first)
    check_attention(first, q, k, v)


def test_planned_call_from_a_thread_without_tag_raises(comm, rng):
    q, k, v = random_qkv(rng, "float32", b=1, sq=2, sk=3 * comm.size, hq=2, hk=1, d=8)
    mine = slice(3 * comm.rank, 3 * (comm.rank + 1))
    kl, vl = k[:, mine], v[:, mine]
    plan = seqpar.KVShardedPlan(q, kl, vl)
    seqpar.kv_sharded_attention(q, kl, vl)
    outcome = {}

    def worker():
        for name, call in (("plan", lambda: plan(q, kl, vl)),
                           ("cached", lambda: seqpar.kv_sharded_attention(q, kl, vl))):
            try:
                call()
                outcome[name] = "returned"
            except ValueError as exc:
                outcome[name] = str(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    for name in ("plan", "cached"):
        assert "not the main thread, without a tag" in outcome[name], outcome
    check_attention(plan(q, kl, vl), q, k, v)


@pytest.mark.parametrize("shape", [(1, 0, 2, 8), (0, 2, 2, 8)])
def test_empty_queries(comm, rng, shape):
    q = random_array(rng, shape, "float32")
    k = random_array(rng, (shape[0], 3, 2, 8), "float32")
    for _ in range(2):  # full, then planned
        out, lse = seqpar.kv_sharded_attention(q, k, k, return_lse=True)
        assert out.shape == q.shape and lse.shape == (shape[0], 2, shape[1])
