"""Masks on the CPU: a sliding window and packed documents over 64k tokens, on P ranks.

    python -m seqpar run -n 4 benchmarks/cpu_masks.py

float32, batch 1, 8 heads, d = 64, contiguous layout, causal. TFLOP/s counted over the
visible pairs only; the reference rate is dense causal attention through the same code at
16k tokens. Prints a markdown table on rank 0 (time: the slowest rank, best of 2).
"""
import time

import numpy as np
from mpi4py import MPI

import seqpar

N, HEADS, D = 65536, 8, 64


def main():
    comm = MPI.COMM_WORLD
    rng = np.random.default_rng(comm.rank)

    def local(n):
        idx = seqpar.local_indices(n, comm)
        return [rng.standard_normal((1, idx.size, HEADS, D), dtype=np.float32) for _ in range(3)]

    def timed(call):
        best = float("inf")
        for _ in range(2):
            comm.Barrier()
            start = time.perf_counter()
            call()
            best = min(best, comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
        return best

    rows = []
    n = 16384
    q, k, v = local(n)
    pairs = n * (n + 1) // 2
    rows.append(("dense causal, 16k", n, timed(lambda: seqpar.ring_attention(q, k, v, causal=True)),
                 pairs, {}))
    q, k, v = local(N)
    window = 4096
    pairs = window * (window + 1) // 2 + (N - window) * (window + 1)
    stats = {}
    rows.append(("window 4096", N, timed(lambda: seqpar.ring_attention(
        q, k, v, causal=True, window=(window, None), stats=stats)), pairs, dict(stats)))
    lengths, draw = [], np.random.default_rng(2026)
    while sum(lengths) < N:
        lengths.append(int(draw.integers(2048, 65536)))
    lengths[-1] -= sum(lengths) - N
    pairs = sum(x * (x + 1) // 2 for x in lengths)
    stats = {}
    rows.append((f"{len(lengths)} documents of 2k-64k", N, timed(lambda: seqpar.ring_attention(
        q, k, v, causal=True, seqlens=lengths, stats=stats)), pairs, dict(stats)))
    sent = comm.gather([r[4].get("bytes_sent", 0) for r in rows])
    if comm.rank == 0:
        dense = 4.0 * rows[0][3] * HEADS * D / rows[0][2] / comm.size / 1e9
        print(f"{comm.size} ranks, float32, {HEADS} heads, d = {D}, causal, contiguous\n")
        print("| run | N | s | visible-pair GFLOP/s per rank | vs dense | bytes sent per rank (max) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for i, (name, n, seconds, pairs, _) in enumerate(rows):
            rate = 4.0 * pairs * HEADS * D / seconds / comm.size / 1e9
            most = max(s[i] for s in sent)
            print(f"| {name} | {n} | {seconds:.2f} | {rate:.1f} | {rate / dense:.2f} | "
                  f"{most / 2**20:.1f} MiB |")


if __name__ == "__main__":
    main()
