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


def _host_transport(comm):
    from seqpar import comms

    return get_transport(comms.context_of(comm), np.empty(1), "host")


@pytest.mark.parametrize("shape, dtype", [((2, 3, 5, 7), np.float32), ((1, 1001), np.float64),
                                          ((2, 0, 4), np.float32)])
def test_exchange_moves_every_block(comm, shape, dtype):
    """Every shift, two arrays a step, into buffers the exchange owns; uneven sizes."""
    mover = _host_transport(comm)
    size, rank = comm.size, comm.rank

    def arrays(r):  # rank r's arrays: their length depends on r (uneven shards)
        first = (shape[0] + r % 2,) + shape[1:]
        return [_block(r, first, dtype), _block(50 + r, first, dtype)]

    mine = arrays(rank)
    seen = []
    with mover.exchange() as exchange:
        for shift in range(1, size):
            source, dest = (rank - shift) % size, (rank + shift) % size
            into = [np.empty(a.shape, dtype) for a in arrays(source)]
            exchange.start(mine, dest, source, into, tag=shift)
            received = exchange.wait()
            assert all(r is i for r, i in zip(received, into))
            for got, want in zip(received, arrays(source)):
                assert np.array_equal(got, want), f"shift {shift}"
                assert not np.shares_memory(got, want)
            seen.append(source)
    assert sorted(seen) == sorted(r for r in range(size) if r != rank)
    assert len(exchange.exposed_seconds()) == size - 1
    assert all(t >= 0 for t in exchange.exposed_seconds())


def test_exchange_one_sided_steps(comm):
    """A step may only send or only receive (the mask keeps some pairs apart)."""
    mover = _host_transport(comm)
    size, rank = comm.size, comm.rank
    with mover.exchange() as exchange:
        # rank r sends to r+1 only when r is even; r+1 receives only then
        sender = (rank - 1) % size
        dest = (rank + 1) % size if rank % 2 == 0 and size > 1 else None
        source = sender if sender % 2 == 0 and size > 1 else None
        exchange.start([_block(rank, (6,), np.float64)], dest, source, [np.empty(6)], tag=1)
        received = exchange.wait()
    if source is None:
        assert received == []
    else:
        assert np.array_equal(received[0], _block(source, (6,), np.float64))


def test_allreduce_and_alltoall(comm, rng):
    mover = _host_transport(comm)
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
    # uneven parts: rank r sends r + p + 1 values to rank p
    parts = [_block(7 * comm.rank + p, (comm.rank + p + 1,), np.float64) for p in range(comm.size)]
    send = np.concatenate(parts)
    recv = np.empty(sum(p + comm.rank + 1 for p in range(comm.size)))
    mover.alltoall(send, recv, [x.nbytes for x in parts],
                   [8 * (p + comm.rank + 1) for p in range(comm.size)])
    offset = 0
    for p in range(comm.size):
        n = p + comm.rank + 1
        assert np.array_equal(recv[offset:offset + n], _block(7 * p + comm.rank, (n,), np.float64))
        offset += n


def test_ring_reports_its_transport(comm, rng):
    q, k, v = random_qkv(rng, "float32", b=1, sq=8 * comm.size, hq=2, hk=1, d=8)
    parts = [seqpar.shard(x, comm, layout="zigzag") for x in (q, k, v)]
    stats = {}
    out = seqpar.ring_attention(*parts, comm=comm, causal=True, layout="zigzag",
                                transport="host", stats=stats)
    assert stats["transport"] == "host"
    assert stats["bytes_per_step"] == 2 * parts[1].nbytes
    assert stats["steps"] == comm.size - 1  # causal zigzag: every rank needs every other
    # ... but not every key: a rank's late chunk is hidden from the ranks whose chunks
    # all come earlier, so only the visible part of a block travels
    assert 0 < stats["bytes_sent"] <= stats["steps"] * stats["bytes_per_step"] or comm.size == 1
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
