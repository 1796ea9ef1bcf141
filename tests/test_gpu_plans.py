"""AttentionPlan and seqpar.attention's plan cache on the GPU: planned calls equal the
unplanned computation bitwise and the float64 reference; outputs poisoned first."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import check_attention, random_qkv, require_gpu

cupy, _ = require_gpu()

import seqpar  # noqa: E402
from seqpar import plans  # noqa: E402
from seqpar.local import cupy_kernel  # noqa: E402
from seqpar.masks import Mask  # noqa: E402

pytestmark = pytest.mark.gpu


def _same(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and \
        bool((a.view(cupy.uint8) == b.view(cupy.uint8)).all())


def _unplanned(q, k, v, **options):
    """The kernel called as an unplanned seqpar.attention calls it."""
    lengths = options.pop("key_lengths", None)
    mask = Mask.build(options.get("causal", False), options.get("window"),
                      options.get("seqlens"))
    out, _ = cupy_kernel.forward(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask,
                                 q_offset=options.get("q_offset", 0), key_lengths=lengths)
    return out


CASES = {
    "decode": dict(sq=1, sk=5000, hq=32, hk=8, d=128, options={}),
    "decode causal offset": dict(sq=4, sk=3000, hq=16, hk=4, d=64,
                                 options={"causal": True, "q_offset": 2996}),
    "decode window": dict(sq=2, sk=4096, hq=8, hk=8, d=128,
                          options={"window": (1000, 0), "causal": True, "q_offset": 4094}),
    "decode documents": dict(sq=1, sk=777, hq=8, hk=2, d=64,
                             options={"seqlens": [300, 477], "q_offset": 776}),
    "forward kernel": dict(sq=300, sk=300, hq=8, hk=4, d=128, options={"causal": True}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_plan_equals_unplanned(rng, case, dtype):
    c = CASES[case]
    q, k, v = random_qkv(rng, dtype, b=2, sq=c["sq"], sk=c["sk"], hq=c["hq"], hk=c["hk"],
                         d=c["d"])
    gq, gk, gv = (cupy.asarray(x) for x in (q, k, v))
    plan = seqpar.AttentionPlan(gq, gk, gv, **c["options"])
    want = _unplanned(gq, gk, gv, **c["options"])
    for _ in range(3):
        out = plan(gq, gk, gv)
        assert _same(out, want)
        out.view(cupy.uint8).fill(0xFF)  # a later call must write everything again
    cached = seqpar.attention(gq, gk, gv, **c["options"])
    assert _same(cached, want)
    check_attention(cached.get(), q, k, v, visible=_visible(c["options"], c["sq"], c["sk"]))


def _visible(options, sq, sk):
    """Which keys each query sees, queries at q_offset + 0.., keys at 0.."""
    i = np.arange(sq)[:, None] + options.get("q_offset", 0)
    j = np.arange(sk)[None, :]
    visible = np.ones((sq, sk), bool)
    if options.get("causal"):
        visible &= j <= i
    if "window" in options:
        left, right = options["window"]
        visible &= (j >= i - left) & (j <= i + right)
    if "seqlens" in options:
        doc = np.repeat(np.arange(len(options["seqlens"])), options["seqlens"])
        visible &= doc[i] == doc[j]
    return visible


@pytest.mark.parametrize("lengths_dtype", [np.int32, np.int64])
def test_key_lengths_device_array(rng, lengths_dtype):
    q, k, v = random_qkv(rng, "bfloat16", b=3, sq=1, sk=2048, hq=32, hk=8, d=128)
    gq, gk, gv = (cupy.asarray(x) for x in (q, k, v))
    lengths = cupy.asarray([2048, 1000, 0], dtype=lengths_dtype)
    plan = seqpar.AttentionPlan(gq, gk, gv, key_lengths=lengths)
    for fill in ([2048, 1000, 0], [7, 2048, 1]):
        lengths[...] = cupy.asarray(fill, dtype=lengths_dtype)
        out = plan(gq, gk, gv, key_lengths=lengths)
        assert _same(out, _unplanned(gq, gk, gv, key_lengths=lengths.astype(np.int32)))
        assert _same(seqpar.attention(gq, gk, gv, key_lengths=lengths), out)
    host = out.get()
    for b, n in enumerate([7, 2048, 1]):
        check_attention(host[b:b + 1], q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n])


def test_misaligned_and_other_arrays(rng):
    q, k, v = random_qkv(rng, "bfloat16", b=1, sq=1, sk=1024, hq=8, hk=8, d=64)
    gq, gk, gv = (cupy.asarray(x) for x in (q, k, v))
    plan = seqpar.AttentionPlan(gq, gk, gv)
    # the same description, data 2 bytes off 16-byte alignment: the unplanned path
    big = cupy.asarray(np.concatenate([q.reshape(-1), q.reshape(-1)[:8]]))
    odd = big[1:1 + q.size].reshape(q.shape)
    assert odd.strides == gq.strides and odd.data.ptr % 16
    assert _same(plan(odd, gk, gv), _unplanned(cupy.ascontiguousarray(odd), gk, gv))
    with pytest.raises(ValueError, match="k: this plan was built for a cupy array"):
        plan(gq, gk[:, :512], gv)


def test_cache_is_bounded_and_clears(rng):
    plans.clear_plan_cache()
    for n in range(plans._CACHE_SIZE + 5):
        q, k, v = (cupy.asarray(x) for x in
                   random_qkv(rng, "float16", b=1, sq=1, sk=64 + n, hq=4, hk=4, d=64))
        seqpar.attention(q, k, v)
    assert len(plans._cache) == plans._CACHE_SIZE
    plans.clear_plan_cache()
    assert not plans._cache


# ------------------------------------------- K/V-sharded plans (KVShardedPlan, the cache)

KV_CASES = {  # keys per rank; rows = sq * hq / hk <= 64 runs the decode kernel (16-bit)
    "decode GQA": {"sq": 1, "sk": 3000, "hq": 32, "hk": 8, "d": 128},
    "decode 4 queries": {"sq": 4, "sk": 1000, "hq": 16, "hk": 4, "d": 64},
    "forward kernel": {"sq": 80, "sk": 300, "hq": 8, "hk": 4, "d": 128},
}


def _kv_problem(rng, comm, dtype, c, lengths):
    """Global q, k, v; this rank's slices on the GPU; device key lengths (rank 0's second
    row empty) or None; and which global keys each batch row sees."""
    q, k, v = random_qkv(rng, dtype, b=2, sq=c["sq"], sk=c["sk"] * comm.size, hq=c["hq"],
                         hk=c["hk"], d=c["d"])
    mine = slice(c["sk"] * comm.rank, c["sk"] * (comm.rank + 1))
    parts = [cupy.asarray(q), cupy.asarray(k[:, mine]), cupy.asarray(v[:, mine])]
    fill = np.array([c["sk"], (c["sk"] // 3) * (comm.rank % 2)])
    key_lengths = cupy.asarray(fill, dtype=cupy.int32) if lengths else None
    visible = np.zeros((2, k.shape[1]), bool)
    for r, n in enumerate(comm.allgather(fill if lengths else np.array([c["sk"]] * 2))):
        for b in range(2):
            visible[b, c["sk"] * r:c["sk"] * r + n[b]] = True
    return (q, k, v), parts, key_lengths, visible


@pytest.mark.mpi
@pytest.mark.parametrize("case", sorted(KV_CASES))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("lengths", [False, True])
def test_kv_sharded_plan_equals_full_call(rng, case, dtype, lengths):
    """Planned and cached calls give the bytes of the full call (check_finite=True is
    never planned), outputs poisoned between calls; then the float64 reference."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    seqpar.use_local_device()
    (q, k, v), (gq, gk, gv), key_lengths, visible = _kv_problem(rng, comm, dtype,
                                                                 KV_CASES[case], lengths)
    plan = seqpar.KVShardedPlan(gq, gk, gv, return_lse=True, key_lengths=key_lengths)
    want = seqpar.kv_sharded_attention(gq, gk, gv, return_lse=True, key_lengths=key_lengths,
                                       check_finite=True)
    for call in [lambda: plan(gq, gk, gv, key_lengths=key_lengths)] * 3 + [
            lambda: seqpar.kv_sharded_attention(gq, gk, gv, return_lse=True,
                                                key_lengths=key_lengths)] * 3:
        out, lse = call()
        assert _same(out, want[0]) and _same(lse, want[1])
        out.view(cupy.uint8).fill(0xFF)  # a later call must write everything again
    host, host_lse = want[0].get(), want[1].get()
    for b in range(2):
        if not visible[b].any():  # no rank holds a key of this row: zeros, lse -inf
            assert not host[b].any() and np.isneginf(host_lse[b]).all()
            continue
        check_attention(host[b:b + 1], q[b:b + 1], k[b:b + 1, visible[b]],
                         v[b:b + 1, visible[b]], lse=host_lse[b:b + 1])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_kv_sharded_at_one_rank_is_attention(rng, dtype):
    """One rank: the local pass is everything (no merge): seqpar.attention's bytes."""
    from mpi4py import MPI

    q, k, v = random_qkv(rng, dtype, b=1, sq=1, sk=4096, hq=32, hk=8, d=128)
    gq, gk, gv = (cupy.asarray(x) for x in (q, k, v))
    lengths = cupy.asarray([3000], dtype=cupy.int32)
    want = seqpar.attention(gq, gk, gv, key_lengths=lengths, return_lse=True)
    plan = seqpar.KVShardedPlan(gq, gk, gv, comm=MPI.COMM_SELF, key_lengths=lengths,
                                return_lse=True)
    for got in (plan(gq, gk, gv, key_lengths=lengths),
                seqpar.kv_sharded_attention(gq, gk, gv, comm=MPI.COMM_SELF, return_lse=True,
                                            key_lengths=lengths)):
        assert _same(got[0], want[0]) and _same(got[1], want[1])
    check_attention(want[0].get(), q, k[:, :3000], v[:, :3000], lse=want[1].get())


def test_fused_merge_steps_equal_the_ufuncs(rng):
    """seqpar/local/cupy_merge.py's kernels against seqpar.merge's steps run with CuPy's
    ufuncs on the same arrays (bitwise: the same operations), with -inf rows (a rank
    without keys, no rank with keys), then against NumPy's within float rounding."""
    from seqpar import merge
    from seqpar.local import cupy_merge

    b, s, h, d = 2, 3, 8, 64
    # weights down to exp(-80) at most: normal float32 numbers (the GPU and NumPy were
    # seen to round subnormal weights apart, which a real merge never divides by: the
    # rank holding the maximum adds a weight of 1)
    top = rng.standard_normal((b, h, s)) * 8
    top[0, :2] = -np.inf
    gmax = np.maximum(top, rng.standard_normal((b, h, s)) * 8)
    gmax[0, 0] = -np.inf  # no rank saw a key: top is -inf there too
    num = rng.standard_normal((b, s, h, d)).astype(np.float32)
    results = {}
    for name, module, xp in (("fused", cupy_merge, cupy), ("ufuncs", merge, cupy),
                             ("numpy", merge, np)):
        t, g, n = (xp.asarray(x) for x in (top, gmax, num))
        den = xp.empty((b, h, s), np.float32)
        lse = xp.empty((b, h, s), np.float32)
        module.sum_weights(t, 0.0, g, den)
        n *= den.transpose(0, 2, 1)[..., None]
        module.normalise_sums(n, den)
        module.sums_lse(den, g, lse)
        results[name] = [cupy.asnumpy(x) for x in (den, n, lse)]
    for got, want in zip(results["fused"], results["ufuncs"]):
        assert got.tobytes() == want.tobytes()
    for got, want in zip(results["fused"], results["numpy"]):
        assert np.array_equal(np.isfinite(got), np.isfinite(want))
        fin = np.isfinite(want)
        assert np.allclose(got[fin], want[fin], rtol=1e-6, atol=0)
        assert np.array_equal(got[~fin], want[~fin])
    assert (results["fused"][0][0, :2] == 0).all() and results["fused"][2][0, 0, 0] == -np.inf
