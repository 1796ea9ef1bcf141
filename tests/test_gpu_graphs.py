"""CUDA graph capture of seqpar's GPU calls (seqpar.graphs): replays equal direct calls.

Each case is captured on a non-blocking stream after one direct call (the warm-up that
compiles and loads the kernels, as users of graphs do). Then its outputs are poisoned,
arrays of many sizes are allocated and filled on the capturing stream and on the null
stream (they receive whatever memory CuPy's pool has free, as a user's arrays would),
and the graph is replayed 100 times, each replay compared byte for byte with the
direct call and the filler checked untouched. The direct call is checked against the
float64 reference. At several ranks sharing one GPU the refusal is checked: such a
capture would move its data by MPI from the host, which a replay does not repeat.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import TOL, check_attention, random_qkv, require_gpu

cupy, _ = require_gpu()

from mpi4py import MPI  # noqa: E402
from reference import reference_attention_backward, relative_error  # noqa: E402

import seqpar  # noqa: E402
from seqpar import graphs  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.mpi]

SELF = MPI.COMM_SELF
REPLAYS = 100



@pytest.fixture(autouse=True)
def _local_gpu():
    seqpar.use_local_device()
    yield
    graphs.release_graph_memory()


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


def _same_bytes(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and \
        bool((a.view(cupy.uint8) == b.view(cupy.uint8)).all())


def _filler(stream):
    """Arrays of 1 KiB to 64 MiB filled with 0x5a on ``stream``: they take the pool's
    free blocks, where a captured call's freed temporaries would be."""
    arrays = []
    with stream:
        for shift in range(26, 9, -1):
            for _ in range(2):
                a = cupy.empty(1 << shift, cupy.uint8)
                a.fill(0x5A)
                arrays.append(a)
    return arrays


def _untouched(arrays) -> bool:
    return all(bool((a == 0x5A).all()) for a in arrays)


def replay_matches(call):
    """Capture ``call`` (after one direct call), replay it and compare; returns the
    direct call's outputs as host arrays."""
    direct = [x.copy() for x in _as_tuple(call())]
    cupy.cuda.Device().synchronize()  # the inputs, made on the null stream, are ready
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            captured = _as_tuple(call())
        finally:
            graph = stream.end_capture()
    filler = _filler(stream) + _filler(cupy.cuda.Stream.null)
    with stream:
        for x in captured:
            x.view(cupy.uint8).fill(0xFF)  # NaN in every float dtype: a replay writes it all
        for replay in range(REPLAYS):
            graph.launch(stream)
            if replay % 10 == 0 or replay == REPLAYS - 1:
                for got, want in zip(captured, direct):
                    assert _same_bytes(got, want), f"replay {replay} differs from the direct call"
    stream.synchronize()
    assert _untouched(filler), "a replay wrote into memory the pool handed to other arrays"
    again = _as_tuple(call())  # and direct calls after the capture are unchanged
    for got, want in zip(again, direct):
        assert _same_bytes(got, want), "a direct call after the capture differs"
    return [x.get() for x in direct]


def _gpu(*arrays):
    return [cupy.asarray(x) for x in arrays]


CASES = {  # name: (keyword arguments of attention, q length, k length)
    "dense": ({}, 256, 256),
    "causal": ({"causal": True}, 256, 256),
    "window": ({"window": (64, 0)}, 256, 256),
    "documents": ({"seqlens": [100, 56, 100]}, 256, 256),
}


def _visible(kwargs, sq, sk):
    """Which keys each query sees (global positions 0.. on both sides)."""
    i, j = np.arange(sq)[:, None], np.arange(sk)[None, :]
    visible = np.ones((sq, sk), bool)
    if kwargs.get("causal"):
        visible &= j <= i
    if "window" in kwargs:
        left, right = kwargs["window"]
        visible &= (j >= i - left) & (j <= i + right)
    if "seqlens" in kwargs:
        doc = np.repeat(np.arange(len(kwargs["seqlens"])), kwargs["seqlens"])
        visible &= doc[:, None] == doc[None, :]
    return visible


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_attention_and_backward_replay(rng, case, dtype):
    kwargs, sq, sk = CASES[case]
    q, k, v = random_qkv(rng, dtype, b=2, sq=sq, sk=sk, hq=8, hk=2, d=64)
    dout = random_qkv(rng, dtype, b=2, sq=sq, sk=sk, hq=8, hk=2, d=64)[0]
    gq, gk, gv, gdout = _gpu(q, k, v, dout)
    out, lse = replay_matches(lambda: seqpar.attention(gq, gk, gv, return_lse=True, **kwargs))
    visible = _visible(kwargs, sq, sk)
    check_attention(out, q, k, v, visible=visible, lse=lse)
    gout, glse = cupy.asarray(out), cupy.asarray(lse)
    backward = lambda: seqpar.attention_backward(gdout, gq, gk, gv, gout, glse, **kwargs)  # noqa: E731
    if dtype == "float32":  # cuBLAS, which CuPy refuses to capture: refused up front
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            try:
                with pytest.raises(TypeError, match="float32 backward runs cuBLAS"):
                    backward()
            finally:
                stream.end_capture()
        return
    grads = replay_matches(backward)
    for got, want in zip(grads, reference_attention_backward(dout, q, k, v, visible=visible)):
        assert relative_error(got.astype(np.float64), want) <= TOL[dtype]


def test_attention_without_lse_replays(rng):
    """The lse a call does not return is a temporary: the graph keeps it."""
    q, k, v = random_qkv(rng, "bfloat16", b=1, sq=512, sk=512, hq=8, hk=8, d=128)
    gq, gk, gv = _gpu(q, k, v)
    (out,) = replay_matches(lambda: seqpar.attention(gq, gk, gv, causal=True))
    check_attention(out, q, k, v, causal=True)


@pytest.mark.parametrize("keys", [4096, 65536])
def test_decode_with_key_lengths_replays(rng, keys):
    """One new token of 32/8 heads, d=128, against a preallocated cache whose fill level
    is a device array updated in place between replays."""
    q, k, v = random_qkv(rng, "bfloat16", b=2, sq=1, sk=keys, hq=32, hk=8, d=128)
    gq, gk, gv = _gpu(q, k, v)
    lengths = cupy.asarray([keys // 3, keys], dtype=cupy.int32)
    cupy.cuda.Device().synchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        seqpar.attention(gq, gk, gv, key_lengths=lengths)
        stream.begin_capture()
        try:
            out = seqpar.attention(gq, gk, gv, key_lengths=lengths)
        finally:
            graph = stream.end_capture()
        for fill in (keys // 2, keys - 7, 1):
            lengths[0] = fill
            out.fill(np.nan)
            graph.launch(stream)
            want = seqpar.attention(gq, gk, gv, key_lengths=lengths)
            assert _same_bytes(out, want), f"replay at key length {fill} differs"
    stream.synchronize()
    n = int(lengths[0].get())
    check_attention(out.get()[:1], q[:1], k[:1, :n], v[:1, :n])


@pytest.mark.parametrize("function", ["ring", "ulysses", "kv_sharded", "auto"])
def test_strategies_at_one_rank_replay(rng, function):
    q, k, v = random_qkv(rng, "bfloat16", b=1, sq=384, sk=384, hq=8, hk=4, d=128)
    dout = random_qkv(rng, "bfloat16", b=1, sq=384, sk=384, hq=8, hk=4, d=128)[0]
    gq, gk, gv, gdout = _gpu(q, k, v, dout)
    causal = function != "kv_sharded"
    forward = {
        "ring": lambda: seqpar.ring_attention(gq, gk, gv, comm=SELF, causal=True,
                                              return_lse=True),
        "ulysses": lambda: seqpar.ulysses_attention(gq, gk, gv, comm=SELF, causal=True,
                                                    return_lse=True),
        "kv_sharded": lambda: seqpar.kv_sharded_attention(gq, gk, gv, comm=SELF,
                                                          return_lse=True),
        "auto": lambda: seqpar.sequence_parallel_attention(gq, gk, gv, comm=SELF, causal=True,
                                                           return_lse=True),
    }[function]
    out, lse = replay_matches(forward)
    check_attention(out, q, k, v, causal=causal, lse=lse)
    backward = {
        "ring": seqpar.ring_attention_backward,
        "ulysses": seqpar.ulysses_attention_backward,
        "kv_sharded": seqpar.kv_sharded_attention_backward,
    }.get(function)
    if backward is None:
        return
    gout, glse = cupy.asarray(out), cupy.asarray(lse)
    options = {} if function == "kv_sharded" else {"causal": True}
    grads = replay_matches(lambda: backward(gdout, gq, gk, gv, gout, glse, comm=SELF, **options))
    visible = _visible(options, 384, 384)
    for got, want in zip(grads, reference_attention_backward(dout, q, k, v, visible=visible)):
        assert relative_error(got.astype(np.float64), want) <= TOL["bfloat16"]


def test_sharded_cache_attend_replays(rng):
    q, k, v = random_qkv(rng, "bfloat16", b=1, sq=1, sk=1000, hq=16, hk=4, d=128)
    cache = seqpar.ShardedKVCache(2048, 4, 128, dtype=q.dtype, gpu=True, comm=SELF)
    cache.append(*_gpu(k, v))
    gq = cupy.asarray(q)
    (out,) = replay_matches(lambda: cache.attend(gq))
    check_attention(out, q, k, v)


def test_what_cannot_be_replayed_raises_at_capture(rng):
    """check_finite and host key_lengths raise before anything is queued: the capture
    stays valid and ends normally."""
    q, k, v = _gpu(*random_qkv(rng, "bfloat16", b=2, sq=1, sk=256, hq=8, hk=8, d=64))
    seqpar.attention(q, k, v)
    cupy.cuda.Device().synchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            with pytest.raises(ValueError, match="check_finite=True .* CUDA graph"):
                seqpar.attention(q, k, v, check_finite=True)
            with pytest.raises(TypeError, match="key_lengths: host values"):
                seqpar.attention(q, k, v, key_lengths=np.array([3, 256]))
        finally:
            stream.end_capture()
    assert graphs.graph_memory_bytes() == 0


def test_ranks_sharing_a_gpu_refuse_capture(rng):
    """Ranks sharing one GPU move data by MPI from the host: a replay would move nothing,
    so the capture raises the same error on every rank."""
    comm = MPI.COMM_WORLD
    if comm.size == 1:
        pytest.skip("needs several ranks")
    q, k, v = _gpu(*(seqpar.shard(x) for x in random_qkv(rng, "bfloat16", b=1,
                                                          sq=64 * comm.size, hq=4, hk=4, d=64)))
    seqpar.ring_attention(q, k, v)
    cupy.cuda.Device().synchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            with pytest.raises(ValueError, match="replays NCCL transfers only"):
                seqpar.ring_attention(q, k, v)
        finally:
            stream.end_capture()
    check_attention(seqpar.gather(seqpar.ring_attention(q, k, v)).get(),
                    *(seqpar.gather(x).get() for x in (q, k, v)))


def test_documents_first_seen_while_capturing(rng):
    """Document boundaries the call has not cached yet are copied in the graph from a
    pinned buffer it keeps: replays see them after the cache has moved on."""
    q, k, v = random_qkv(rng, "bfloat16", b=1, sq=300, sk=300, hq=4, hk=4, d=64)
    gq, gk, gv = _gpu(q, k, v)
    seqpar.attention(gq, gk, gv, seqlens=[150, 150])  # compiles and loads the kernel
    cupy.cuda.Device().synchronize()
    seqlens = [int(n) for n in rng.integers(1, 60, 4)]
    seqlens.append(300 - sum(seqlens))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            out = seqpar.attention(gq, gk, gv, seqlens=seqlens)
        finally:
            graph = stream.end_capture()
        out.view(cupy.uint8).fill(0xFF)
        graph.launch(stream)
    stream.synchronize()
    want = seqpar.attention(gq, gk, gv, seqlens=seqlens)
    assert _same_bytes(out, want)
    check_attention(out.get(), q, k, v, visible=_visible({"seqlens": seqlens}, 300, 300))


def test_kv_sharded_plan_replays(rng):
    """KVShardedPlan at one rank, decode-shaped, device key lengths: the replay gives the
    direct call's bytes, for the plan and for the cache behind kv_sharded_attention."""
    q, k, v = random_qkv(rng, "bfloat16", b=2, sq=1, sk=3000, hq=32, hk=8, d=128)
    gq, gk, gv = _gpu(q, k, v)
    lengths = cupy.asarray([3000, 1234], dtype=cupy.int32)
    plan = seqpar.KVShardedPlan(gq, gk, gv, comm=SELF, key_lengths=lengths, return_lse=True)
    out, lse = replay_matches(lambda: plan(gq, gk, gv, key_lengths=lengths))
    cached = replay_matches(lambda: seqpar.kv_sharded_attention(
        gq, gk, gv, comm=SELF, key_lengths=lengths, return_lse=True))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(cached, (out, lse)))
    for b, n in enumerate((3000, 1234)):
        check_attention(out[b:b + 1], q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n],
                        lse=lse[b:b + 1])


def test_kv_sharded_replays_over_nccl(rng):
    """At several ranks, one GPU each: the planned call (two NCCL Allreduces and the
    merge) captured and replayed. Ranks sharing a GPU cannot use NCCL: skipped there
    (test_ranks_sharing_a_gpu_refuse_capture checks the refusal)."""
    comm = MPI.COMM_WORLD
    if comm.size == 1:
        pytest.skip("needs several ranks")
    q, k, v = random_qkv(rng, "bfloat16", b=1, sq=1, sk=2048 * comm.size, hq=32, hk=8, d=128)
    mine = slice(2048 * comm.rank, 2048 * (comm.rank + 1))
    gq, gk, gv = _gpu(q, k[:, mine], v[:, mine])
    try:
        seqpar.kv_sharded_attention(gq, gk, gv, transport="nccl")  # sets NCCL up
    except ValueError as exc:  # raised on every rank alike
        pytest.skip(f"no NCCL here: {exc}")
    plan = seqpar.KVShardedPlan(gq, gk, gv, transport="nccl", return_lse=True)
    out, lse = replay_matches(lambda: plan(gq, gk, gv))
    check_attention(out, q, k, v, lse=lse)
    cache = seqpar.ShardedKVCache(4096 * comm.size, 8, 128, dtype=q.dtype, gpu=True)
    cache.append(*_gpu(k, v))
    (attended,) = replay_matches(lambda: cache.attend(gq, transport="nccl"))
    check_attention(attended, q, k, v)
