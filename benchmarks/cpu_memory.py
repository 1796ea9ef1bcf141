"""Peak memory of one ring_attention call per rank, against what it must hold.

    python -m seqpar run -n 4 benchmarks/cpu_memory.py --seq 262144

Each rank makes its own slice, then measures with tracemalloc (NumPy reports its
allocations to it) the peak of one call above what the inputs already hold, and
the resident set size before and after. What a ring call must hold beyond its
inputs: the output (the float32 accumulator itself for float32 input) and the K/V
blocks in flight (two receive buffers of one block each).
"""
import argparse
import resource
import time
import tracemalloc

import numpy as np
from mpi4py import MPI

import seqpar


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=262144)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    idx = seqpar.local_indices(args.seq, comm)
    rng = np.random.default_rng(comm.rank)
    q, k, v = (rng.standard_normal((1, idx.size, args.heads, args.head_dim), dtype=np.float32)
               for _ in range(3))
    inputs = q.nbytes + k.nbytes + v.nbytes
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    start = time.perf_counter()
    out = seqpar.ring_attention(q, k, v, comm=comm, causal=args.causal)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    extra = peak - base
    must = out.nbytes + 2 * (k.nbytes + v.nbytes)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = comm.gather((comm.rank, inputs, extra, must, rss, seconds))
    if comm.rank == 0:
        print(f"ring_attention, N = {args.seq} on {comm.size} ranks, float32, "
              f"{args.heads} head(s), d = {args.head_dim}, causal={args.causal}\n")
        print("| rank | inputs MiB | call's peak above inputs MiB | x inputs | "
              "output + 2 K/V blocks MiB | max RSS MiB | s |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r, inp, ext, need, res, sec in rows:
            print(f"| {r} | {inp / 2**20:.1f} | {ext / 2**20:.1f} | {ext / inp:.2f} | "
                  f"{need / 2**20:.1f} | {res / 2**20:.0f} | {sec:.1f} |")


if __name__ == "__main__":
    main()
