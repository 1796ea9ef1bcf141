"""The host (NumPy) transport and the transport= argument, on the CPU."""
from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

import seqpar
from seqpar.transport import cuda_aware_mpi, get_transport

from conftest import check_attention, random_qkv, raises_everywhere, same_on_every_rank

pytestmark = pytest.mark.mpi


def _block(rank, shape, dtype):
    """Random data that says which rank made it."""
    return np.random.default_rng(1000 + rank).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("shape, dtype", [((2, 3, 5, 7), np.float32), ((1, 1001), np.float64),
                                          ((2, 0, 4), np.float32)])
def test_ring_exchange_moves_every_block(comm, shape, dtype):
    mover = get_transport(comm, np.empty(1), "host")
    with mover.ring(_block(comm.rank, shape, dtype)) as ring:
        for step in range(comm.size):
            if step + 1 < comm.size:
                ring.start()
            source = (comm.rank - step) % comm.size
            assert np.array_equal(ring.current, _block(source, shape, dtype)), f"step {step}"
            if step + 1 < comm.size:
                ring.wait()
    assert len(ring.exposed_seconds()) == comm.size - 1
    assert all(t >= 0 for t in ring.exposed_seconds())


def test_allreduce_and_alltoall(comm, rng):
    mover = get_transport(comm, np.empty(1))
    mine = _block(comm.rank, (3, 4), np.float64)
    everyone = [_block(r, (3, 4), np.float64) for r in range(comm.size)]
    total = mine.copy()
    mover.allreduce(total, "sum")
    np.testing.assert_allclose(total, np.sum(everyone, axis=0), rtol=1e-14)
    largest = mine.copy()
    mover.allreduce(largest, "max")
    assert np.array_equal(largest, np.max(everyone, axis=0))

    send = np.stack([_block(100 * comm.rank + p, (2, 3), np.float32) for p in range(comm.size)])
    recv = np.empty_like(send)
    mover.alltoall(send, recv)
    for p in range(comm.size):
        assert np.array_equal(recv[p], _block(100 * p + comm.rank, (2, 3), np.float32))


def test_ring_reports_its_transport(comm, rng):
    q, k, v = random_qkv(rng, "float32", b=1, sq=8 * comm.size, hq=2, hk=1, d=8)
    parts = [seqpar.shard(x, comm, layout="zigzag") for x in (q, k, v)]
    stats = {}
    out = seqpar.ring_attention(*parts, comm=comm, causal=True, layout="zigzag",
                                transport="host", stats=stats)
    assert stats["transport"] == "host"
    assert stats["bytes_per_step"] == 2 * parts[1].nbytes
    assert len(stats["exposed_seconds"]) == comm.size - 1
    auto = seqpar.ring_attention(*parts, comm=comm, causal=True, layout="zigzag")
    assert np.array_equal(out, auto)
    check_attention(seqpar.gather(out, comm, layout="zigzag"), q, k, v, causal=True)


@pytest.mark.parametrize("strategy", ["ring", "kv_sharded", "ulysses"])
@pytest.mark.parametrize("transport, match", [("carrier-pigeon", "transport must be one of"),
                                              ("nccl", "transport 'nccl' moves CuPy arrays"),
                                              ("staged", "NumPy arrays use 'host'")])
def test_bad_transport_raises_everywhere(comm, rng, strategy, transport, match):
    q, k, v = random_qkv(rng, "float32", b=1, sq=4, hq=comm.size, hk=comm.size, d=8)
    call = getattr(seqpar, f"{strategy}_attention")
    message = raises_everywhere(comm, ValueError, match,
                                lambda: call(q, k, v, comm=comm, transport=transport))
    assert message.startswith("rank 0:")


@pytest.mark.skipif(MPI.COMM_WORLD.size < 2, reason="needs 2 ranks")
def test_transport_must_agree(comm, rng):
    q, k, v = random_qkv(rng, "float32", b=1, sq=4, hq=2, hk=2, d=8)
    transport = "host" if comm.rank == comm.size - 1 else "auto"
    message = raises_everywhere(comm, ValueError, "transport differs across ranks",
                                lambda: seqpar.ring_attention(q, k, v, comm=comm,
                                                              transport=transport))
    assert f"rank {comm.size - 1} has 'host'" in message


def test_cuda_aware_detection_can_be_forced(comm, monkeypatch):
    detected = cuda_aware_mpi()
    assert same_on_every_rank(comm, detected)
    monkeypatch.setenv("SEQPAR_CUDA_AWARE_MPI", "1")
    assert cuda_aware_mpi()
    monkeypatch.setenv("SEQPAR_CUDA_AWARE_MPI", "0")
    assert not cuda_aware_mpi()
