"""Every GPU transport against the float64 reference, and against each other.

Run with one GPU per rank, or with ranks sharing one GPU (then NCCL is refused
and the test says so on every rank).
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import check_attention, raises_everywhere, random_qkv, require_gpu
from reference import reference_attention, relative_error

cupy, _GPUS = require_gpu()

from mpi4py import MPI  # noqa: E402

import seqpar  # noqa: E402
from seqpar import comms  # noqa: E402
from seqpar.transport import cuda_aware_mpi, get_transport  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.mpi]

_COMM = MPI.COMM_WORLD
_LOCAL = _COMM.Split_type(MPI.COMM_TYPE_SHARED)
_SHARED_GPU = _LOCAL.size > _GPUS
_TRANSPORTS = ["staged"]
if not _SHARED_GPU:
    _TRANSPORTS.append("nccl")
if cuda_aware_mpi():  # forcing it on an MPI that is not would crash the job
    _TRANSPORTS.append("cuda-aware")


@pytest.fixture(autouse=True)
def _local_gpu():
    seqpar.use_local_device()


def _block(rank, shape, dtype):
    return cupy.asarray(np.random.default_rng(1000 + rank).standard_normal(shape).astype(dtype))


def _mover(transport):
    return get_transport(comms.context_of(_COMM), cupy.empty(1), transport)


@pytest.mark.parametrize("transport", _TRANSPORTS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 7_000_001)])  # the second: 84 MB, odd
def test_exchange_moves_every_block(transport, shape):
    """Every shift, two arrays a step (the second longer on odd ranks), into owned buffers."""
    mover = _mover(transport)
    size, rank = _COMM.size, _COMM.rank

    def arrays(r):
        longer = (shape[0] + r % 2,) + shape[1:]
        return [_block(r, shape, np.float32), _block(50 + r, longer, np.float32)]

    mine = arrays(rank)
    with mover.exchange() as exchange:
        for shift in range(1, size):
            source, dest = (rank - shift) % size, (rank + shift) % size
            into = [cupy.empty(a.shape, np.float32) for a in arrays(source)]
            exchange.start(mine, dest, source, into, tag=shift)
            for got, want in zip(exchange.wait(), arrays(source)):
                assert bool((got == want).all()), f"shift {shift}"
    assert len(exchange.exposed_seconds()) == size - 1


@pytest.mark.parametrize("transport", _TRANSPORTS)
def test_allreduce_and_alltoall(transport):
    mover = _mover(transport)
    mine = _block(_COMM.rank, (3, 40), np.float32)
    everyone = np.stack([_block(r, (3, 40), np.float32).get() for r in range(_COMM.size)])
    total = mine.copy()
    mover.allreduce(total, "sum")
    np.testing.assert_allclose(total.get(), everyone.sum(axis=0), rtol=1e-6)
    largest = mine.copy()
    mover.allreduce(largest, "max")
    assert np.array_equal(largest.get(), everyone.max(axis=0))
    wide = cupy.asarray(everyone[_COMM.rank].astype(np.float64))
    mover.allreduce(wide, "max")
    assert np.array_equal(wide.get(), everyone.max(axis=0).astype(np.float64))
    send = cupy.stack([_block(100 * _COMM.rank + p, (2, 9), np.float16)
                       for p in range(_COMM.size)])
    recv = cupy.empty_like(send)
    mover.alltoall(send, recv)
    for p in range(_COMM.size):
        assert bool((recv[p] == _block(100 * p + _COMM.rank, (2, 9), np.float16)).all())
    # uneven parts: rank r sends r + p + 1 values to rank p
    parts = [_block(7 * _COMM.rank + p, (_COMM.rank + p + 1,), np.float32)
             for p in range(_COMM.size)]
    recv = cupy.empty(sum(p + _COMM.rank + 1 for p in range(_COMM.size)), np.float32)
    mover.alltoall(cupy.concatenate(parts), recv, [x.nbytes for x in parts],
                   [4 * (p + _COMM.rank + 1) for p in range(_COMM.size)])
    offset = 0
    for p in range(_COMM.size):
        n = p + _COMM.rank + 1
        want = _block(7 * p + _COMM.rank, (n,), np.float32)
        assert bool((recv[offset:offset + n] == want).all())
        offset += n


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("layout, causal", [("zigzag", True), ("contiguous", True),
                                            ("contiguous", False)])
def test_ring_is_the_same_on_every_transport(rng, dtype, layout, causal):
    q, k, v = random_qkv(rng, dtype, b=1, sq=2 * 96 * _COMM.size, hq=4, hk=2, d=128)
    parts = [cupy.asarray(seqpar.shard(x, layout=layout)) for x in (q, k, v)]
    results = {}
    for transport in _TRANSPORTS:
        stats = {}
        results[transport] = seqpar.ring_attention(*parts, causal=causal, layout=layout,
                                                   transport=transport, stats=stats)
        assert stats["transport"] == transport
        assert len(stats["exposed_seconds"]) == _COMM.size - 1
    first = results[_TRANSPORTS[0]]
    for transport, out in results.items():
        assert bool((out.view(cupy.uint8) == first.view(cupy.uint8)).all()), transport
    check_attention(seqpar.gather(first, layout=layout).get(), q, k, v, causal=causal)


def test_long_blocks_cross_the_staged_pipeline(rng):
    """K/V blocks several pinned chunks long (with a tail): check a sample of rows."""
    s = 24_001  # per rank; 2 * 24001 * 4 * 128 * 2 bytes = 49 MB per block
    q, k, v = random_qkv(rng, "bfloat16", b=1, sq=s * _COMM.size, hq=8, hk=4, d=128)
    parts = [cupy.asarray(seqpar.shard(x)) for x in (q, k, v)]
    out = {t: seqpar.ring_attention(*parts, transport=t) for t in _TRANSPORTS}
    for t in _TRANSPORTS:
        assert bool((out[t].view(cupy.uint8) == out["staged"].view(cupy.uint8)).all()), t
    rows = np.random.default_rng(5).choice(s, 64, replace=False)
    global_rows = _COMM.rank * s + rows
    ref, _ = reference_attention(q[:, global_rows], k, v)
    assert relative_error(out["staged"][:, rows.tolist()].get(), ref) <= 1e-2


@pytest.mark.parametrize("transport", _TRANSPORTS)
def test_kv_sharded_and_ulysses(rng, transport):
    size = _COMM.size
    q, k, v = random_qkv(rng, "float16", b=2, sq=40 * size, hq=2 * size, hk=size, d=64)
    keys = slice(_COMM.rank * 40, (_COMM.rank + 1) * 40)
    out = seqpar.kv_sharded_attention(*(cupy.asarray(x) for x in (q, k[:, keys], v[:, keys])),
                                      transport=transport)
    check_attention(out.get(), q, k, v)
    parts = [cupy.asarray(seqpar.shard(x, layout="zigzag")) for x in (q, k, v)]
    out = seqpar.ulysses_attention(*parts, causal=True, layout="zigzag", transport=transport)
    check_attention(seqpar.gather(out, layout="zigzag").get(), q, k, v, causal=True)


def test_auto_picks_nccl_unless_a_gpu_is_shared(rng):
    q, k, v = random_qkv(rng, "float16", b=1, sq=16 * _COMM.size, hq=2, hk=2, d=64)
    parts = [cupy.asarray(seqpar.shard(x)) for x in (q, k, v)]
    stats = {}
    seqpar.ring_attention(*parts, stats=stats)
    if _COMM.size == 1:
        expected = "staged"  # nothing crosses: no NCCL communicator is made
    elif _SHARED_GPU:
        expected = "cuda-aware" if cuda_aware_mpi() else "staged"
    else:
        expected = "nccl"
    assert stats["transport"] == expected
    if _SHARED_GPU:
        raises_everywhere(_COMM, ValueError, "two ranks share one GPU",
                          lambda: seqpar.ring_attention(*parts, transport="nccl"))


def test_numpy_never_needs_nccl(rng):
    q, k, v = random_qkv(rng, "float32", b=1, sq=8 * _COMM.size, hq=2, hk=2, d=16)
    stats = {}
    parts = [seqpar.shard(x) for x in (q, k, v)]
    seqpar.ring_attention(*parts, stats=stats)
    assert stats["transport"] == "host"

