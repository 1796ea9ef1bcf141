"""Ring attention over a long random sequence, checked against float64 at the end.

Run with any number of ranks, e.g.::

    mpiexec -n 4 python examples/ring_attention.py --seq 32768 --causal

Each rank builds the same global Q, K, V from one seed, keeps its slice, runs
seqpar.ring_attention, and checks a sample of its own rows against a plain
float64 softmax over all keys. Prints throughput and the worst error; exits 1
if the error is over the float32/float64 tolerance.
"""
import argparse
import time

import numpy as np
from mpi4py import MPI

import seqpar
from seqpar.layout import local_segments


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384, help="global sequence length")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="fewer K/V heads: GQA")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--layout", choices=["contiguous", "zigzag"], default="zigzag")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    kv_heads = args.kv_heads or args.heads

    rng = np.random.default_rng(2026)
    shape = (1, args.seq, args.heads, args.head_dim)
    kv_shape = (1, args.seq, kv_heads, args.head_dim)
    q, k, v = (rng.standard_normal(s).astype(args.dtype) for s in (shape, kv_shape, kv_shape))
    q_local, k_local, v_local = (seqpar.shard(x, layout=args.layout) for x in (q, k, v))

    times = []
    for _ in range(args.repeats):
        comm.Barrier()
        start = time.perf_counter()
        out = seqpar.ring_attention(q_local, k_local, v_local, causal=args.causal,
                                    layout=args.layout)
        times.append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
    best = min(times)

    # check a sample of this rank's rows against float64 over every key
    positions = np.concatenate([np.arange(s, s + n) for s, n in
                                local_segments(args.layout, comm.rank, comm.size, q_local.shape[1])])
    rows = np.random.default_rng(comm.rank).choice(len(positions), size=min(64, len(positions)),
                                                   replace=False)
    ref = _reference_rows(q_local[0, rows], positions[rows], k[0], v[0], args.causal)
    err = np.linalg.norm(out[0, rows] - ref) / np.linalg.norm(ref)
    worst = comm.allreduce(err, op=MPI.MAX)

    flops = 4.0 * args.seq**2 * args.heads * args.head_dim / (2 if args.causal else 1)
    tolerance = 1e-12 if args.dtype == "float64" else 1e-5
    if comm.rank == 0:
        print(f"ring attention: {comm.size} ranks, N={args.seq}, heads={args.heads}/{kv_heads}, "
              f"d={args.head_dim}, {args.dtype}, causal={args.causal}, layout={args.layout}")
        print(f"  time {best * 1e3:.1f} ms (best of {args.repeats}), "
              f"{flops / best / 1e9:.1f} GFLOP/s in all, "
              f"{flops / best / 1e9 / comm.size:.1f} GFLOP/s per rank")
        print(f"  K/V per rank {2 * k_local.nbytes / 2**20:.1f} MiB "
              f"(global {2 * k.nbytes / 2**20:.1f} MiB)")
        print(f"  max relative error vs float64 on sampled rows: {worst:.2e} "
              f"({'PASS' if worst <= tolerance else 'FAIL'}, tolerance {tolerance:g})")
    raise SystemExit(0 if worst <= tolerance else 1)


def _reference_rows(q_rows, q_positions, k, v, causal):
    """Plain float64 softmax attention of some query rows over all keys."""
    heads, kv_heads, d = q_rows.shape[1], k.shape[1], q_rows.shape[2]
    k = np.repeat(k.astype(np.float64), heads // kv_heads, axis=1)
    v = np.repeat(v.astype(np.float64), heads // kv_heads, axis=1)
    scores = np.einsum("ihd,jhd->hij", q_rows.astype(np.float64), k) / np.sqrt(d)
    if causal:
        scores[:, np.arange(k.shape[0])[None, :] > q_positions[:, None]] = -np.inf
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return np.einsum("hij,jhd->ihd", weights, v)


if __name__ == "__main__":
    main()
