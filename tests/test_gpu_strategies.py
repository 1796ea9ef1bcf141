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
