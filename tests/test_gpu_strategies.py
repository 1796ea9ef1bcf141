"""Every strategy on CuPy arrays (one GPU per rank, or ranks sharing one GPU)."""
import numpy as np
import pytest

from conftest import check_attention, random_qkv, require_gpu

cupy, _ = require_gpu()

from mpi4py import MPI  # noqa: E402

import seqpar  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.mpi]


@pytest.fixture(autouse=True)
def _local_gpu():
    seqpar.use_local_device()


def _gpu(*arrays):
    return [cupy.asarray(x) for x in arrays]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_ring(rng, dtype, layout, causal, kv_heads):
    size = MPI.COMM_WORLD.size
    q, k, v = random_qkv(rng, dtype, b=2, sq=2 * 70 * size, hq=4, hk=kv_heads, d=64)
    parts = _gpu(*(seqpar.shard(x, layout=layout) for x in (q, k, v)))
    out, lse = seqpar.ring_attention(*parts, causal=causal, layout=layout, return_lse=True)
    assert isinstance(out, cupy.ndarray) and out.dtype == q.dtype
    again = seqpar.ring_attention(*parts, causal=causal, layout=layout)
    assert bool((out.view(cupy.uint8) == again.view(cupy.uint8)).all()), "not deterministic"
    whole = seqpar.gather(out, layout=layout).get()
    whole_lse = seqpar.gather(lse, layout=layout, axis=2).get()
    check_attention(whole, q, k, v, causal=causal, lse=whole_lse)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_kv_sharded_with_an_empty_slice(rng, dtype):
    comm = MPI.COMM_WORLD
    q, k, v = random_qkv(rng, dtype, b=1, sq=5, sk=96 * comm.size, hq=8, hk=2, d=128)
    bounds = np.linspace(0, k.shape[1], comm.size + 1).astype(int)
    if comm.size > 1:  # the last rank holds no key at all
        bounds[-2] = bounds[-1]
    keys = slice(bounds[comm.rank], bounds[comm.rank + 1])
    out, lse = seqpar.kv_sharded_attention(*_gpu(q, k[:, keys], v[:, keys]), return_lse=True)
    check_attention(out.get(), q, k, v, lse=lse.get())


@pytest.mark.parametrize("causal", [False, True])
def test_ulysses(rng, causal):
    size = MPI.COMM_WORLD.size
    q, k, v = random_qkv(rng, "bfloat16", b=1, sq=64 * size, hq=2 * size, hk=size, d=128)
    parts = _gpu(*(seqpar.shard(x, layout="zigzag") for x in (q, k, v)))
    out = seqpar.ulysses_attention(*parts, causal=causal, layout="zigzag")
    check_attention(seqpar.gather(out, layout="zigzag").get(), q, k, v, causal=causal)


def test_attention_three_dimensional(rng):
    q, k, v = random_qkv(rng, "float16", sq=300, sk=200, hq=6, hk=3, d=96, batch_axis=False)
    out = seqpar.attention(*_gpu(q, k, v), causal=True)
    assert out.shape == q.shape
    check_attention(out.get(), q, k, v, causal=True)


# ------------------------------------------------- masks, uneven shards, layouts, decoding

def _gather_host(x, layout="contiguous", axis=1):
    return seqpar.gather(x, layout=layout, axis=axis).get()


@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_masks_across_ranks(rng, strategy, dtype):
    """Documents crossing rank borders, a window smaller than a rank's share, causal."""
    from reference import reference_attention  # noqa: F401 - the reference under check_attention
    from seqpar.masks import Mask

    size = MPI.COMM_WORLD.size
    n = 96 * size
    q, k, v = random_qkv(rng, dtype, b=1, sq=n, hq=2 * size, hk=size, d=64)
    cuts = np.sort(rng.choice(np.arange(1, n), 4, replace=False))
    seqlens = np.diff(np.r_[0, cuts, n]).tolist()
    call = seqpar.ring_attention if strategy == "ring" else seqpar.ulysses_attention
    for window, docs in (((40, 0), None), (None, seqlens), ((17, 5), seqlens)):
        parts = _gpu(*(seqpar.shard(x) for x in (q, k, v)))
        out = call(*parts, causal=True, window=window, seqlens=docs)
        mask = Mask.build(True, window, docs)
        visible = mask.visible_pairs(np.arange(n), np.arange(n))
        check_attention(_gather_host(out), q, k, v, visible=visible)


def test_uneven_shards_ring(rng):
    size = MPI.COMM_WORLD.size
    lengths = [70 + 33 * r for r in range(size)]
    if size > 1:
        lengths[-1] = 0  # a rank with no token at all
    q, k, v = random_qkv(rng, "float16", b=2, sq=sum(lengths), hq=4, hk=2, d=128)
    parts = _gpu(*(seqpar.shard(x, lengths=lengths) for x in (q, k, v)))
    out = seqpar.ring_attention(*parts, causal=True)
    check_attention(_gather_host(out), q, k, v, causal=True)


def _layouts(x):
    """The same values in other memory layouts (CuPy arrays)."""
    d = cupy.asarray(x)
    yield "fortran", cupy.asfortranarray(d)
    yield "transposed view", cupy.ascontiguousarray(d.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    yield "negative strides", cupy.ascontiguousarray(d[:, ::-1])[:, ::-1]
    packed = cupy.stack([d, d + 1], axis=-2)  # (B, S, H, 2, D): slice 0 of a packed array
    yield "packed slice", packed[..., 0, :]


@pytest.mark.parametrize("strategy", ["attention", "ring", "kv_sharded", "ulysses"])
def test_any_memory_layout(rng, strategy):
    size = MPI.COMM_WORLD.size
    q, k, v = random_qkv(rng, "bfloat16", b=2, sq=64 * size, hq=2 * size, hk=size, d=64)
    if strategy == "kv_sharded":
        mine = seqpar.local_indices(k.shape[1])
        local = (q, k[:, mine], v[:, mine])
    elif strategy == "attention":
        local = (q, k, v)
    else:
        local = tuple(seqpar.shard(x) for x in (q, k, v))
    call = {"attention": seqpar.attention, "ring": seqpar.ring_attention,
            "kv_sharded": seqpar.kv_sharded_attention,
            "ulysses": seqpar.ulysses_attention}[strategy]
    want = call(*_gpu(*local)).get()
    for (name, qa), (_, ka), (_, va) in zip(*(_layouts(x) for x in local)):
        before = [a.copy() for a in (qa, ka, va)]
        got = call(qa, ka, va).get()
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), name
        for a, b in zip((qa, ka, va), before):
            assert bool((a == b).all()), f"{name}: an input was written"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_sharded_cache_decoding(rng, dtype):
    comm = MPI.COMM_WORLD
    batch, kv_heads, d = 2, 2, 128
    cache = seqpar.ShardedKVCache(3000, kv_heads, d, batch=batch,
                                  dtype=random_qkv(rng, dtype, sq=1)[0].dtype, gpu=True)
    k = random_qkv(rng, dtype, b=batch, sq=2000, hq=kv_heads, hk=kv_heads, d=d)[1]
    v = random_qkv(rng, dtype, b=batch, sq=2000, hq=kv_heads, hk=kv_heads, d=d)[2]
    cache.append(cupy.asarray(k), cupy.asarray(v), counts=[2000, 1501])
    q = random_qkv(rng, dtype, b=batch, sq=1, hq=8, hk=8, d=d)[0]
    out = cache.attend(cupy.asarray(q)).get()
    check_attention(out[:1], q[:1], k[:1], v[:1])
    check_attention(out[1:], q[1:], k[1:, :1501], v[1:, :1501])
    assert comm.allreduce(int(cache.local_lengths.get().sum())) == 3501


def test_magnitude_across_ranks(rng):
    """float32 scores near 1e4: P ranks within 2x the error of one (and within V's range)."""
    from reference import reference_attention, relative_error

    size = MPI.COMM_WORLD.size
    q, k, v = random_qkv(rng, "float32", b=1, sq=64 * size, hq=2, hk=2, d=64)
    q *= 40
    k *= 40  # |score| up to ~1e4 at d = 64
    ref, _ = reference_attention(q, k, v)
    one = relative_error(seqpar.attention(*_gpu(q, k, v)).get(), ref)
    parts = _gpu(*(seqpar.shard(x) for x in (q, k, v)))
    out = _gather_host(seqpar.ring_attention(*parts))
    assert relative_error(out, ref) <= 2 * one + 1e-6
    assert out.max() <= v.max() * (1 + 1e-6) and out.min() >= v.min() * (1 + 1e-6)


# ------------------------------------------------------------------------- backward

def _has_gpu_backward():
    from seqpar.local import cupy_kernel

    return hasattr(cupy_kernel, "backward")


@pytest.mark.skipif(not _has_gpu_backward(), reason="no GPU backward kernel")
@pytest.mark.parametrize("strategy", ["ring", "ulysses", "hybrid", "kv_sharded"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_backward_strategies(rng, strategy, dtype):
    from reference import reference_attention_backward

    size = MPI.COMM_WORLD.size
    causal = strategy != "kv_sharded"
    q, k, v = random_qkv(rng, dtype, b=1, sq=64 * size, hq=2 * size, hk=size, d=64)
    dout = random_qkv(rng, dtype, b=1, sq=64 * size, hq=2 * size, hk=size, d=64)[0]
    n = q.shape[1]
    visible = np.tril(np.ones((n, n), bool)) if causal else None
    want = reference_attention_backward(dout, q, k, v, visible=visible)
    tol = {"bfloat16": 1e-2, "float32": 1e-5}[dtype]
    if strategy == "kv_sharded":
        mine = seqpar.local_indices(k.shape[1])
        args = _gpu(q, k[:, mine], v[:, mine])
        out, lse = seqpar.kv_sharded_attention(*args, return_lse=True)
        dq, dk, dv = seqpar.kv_sharded_attention_backward(cupy.asarray(dout), *args, out, lse)
        got = (dq.get(), _gather_host(dk), _gather_host(dv))
    else:
        fwd = {"ring": seqpar.ring_attention, "ulysses": seqpar.ulysses_attention,
               "hybrid": seqpar.hybrid_attention}[strategy]
        bwd = {"ring": seqpar.ring_attention_backward,
               "ulysses": seqpar.ulysses_attention_backward,
               "hybrid": seqpar.hybrid_attention_backward}[strategy]
        args = _gpu(*(seqpar.shard(x, layout="zigzag") for x in (q, k, v)))
        grad = cupy.asarray(seqpar.shard(dout, layout="zigzag"))
        # the hybrid at every group size U (U = 1: the ring across groups; U = P: Ulysses)
        groups = [{"ulysses_size": u} for u in range(1, size + 1) if size % u == 0] \
            if strategy == "hybrid" else [{}]
        for group in groups:
            opts = {"causal": True, "layout": "zigzag", **group}
            out, lse = fwd(*args, return_lse=True, **opts)
            grads = bwd(grad, *args, out, lse, **opts)
            _check_backward(tuple(_gather_host(g, layout="zigzag") for g in grads), want,
                            q.dtype, tol)
        return
    _check_backward(got, want, q.dtype, tol)


def _check_backward(got, want, dtype, tol):
    from reference import relative_error

    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert g.dtype == dtype
        assert relative_error(g, w) <= tol, name
