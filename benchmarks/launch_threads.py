"""One seqpar.attention call, timed: compare `python` with `seqpar run -n N` (not a test).

    python benchmarks/launch_threads.py
    python -m seqpar run -n 1 benchmarks/launch_threads.py
"""
import time

import numpy as np

import seqpar

rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 4096, 8, 64), dtype=np.float32) for _ in range(3))
seqpar.attention(q, k, v)  # warm-up: the thread pool and the cache
start = time.perf_counter()
seqpar.attention(q, k, v, causal=False)
elapsed = time.perf_counter() - start
try:
    from mpi4py import MPI
    rank, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
except ImportError:
    rank, size = 0, 1
print(f"rank {rank}/{size}: {elapsed:.3f} s", flush=True)
