"""Host time of one K/V-sharded call, planned and not, on tiny inputs, back to back.

    python -m seqpar run -n 2 benchmarks/kv_plans.py [--gpu] [--calls 2000]

One new token (q of shape (1, 1, 8, 64)) against 64 keys per rank of 8 K/V heads:
float32 on the CPU, bfloat16 on the GPU (one GPU per rank; the calls queue, the GPU
idles). For each form of the call, the median host time of one call over --calls
calls, after 50 warm-up calls (the GPU synchronised before and after the timed calls):

- ``KVShardedPlan`` called;
- ``kv_sharded_attention``, which finds its plan in the cache of the communicator;
- the full call, as every call was before plans: the plans forgotten first
  (``seqpar.plans.clear_plan_cache()``), so the call checks, agrees and plans again;
- on the CPU, the NumPy kernel alone (the floor: what a plan cannot save).

Printed by rank 0 as a table, with the machine and the number of ranks. Run it with
``PYTHONPATH`` pointing at an older tree to time that one (rows it lacks are skipped).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
from mpi4py import MPI

import seqpar


def host_time(call, calls: int, synchronise) -> float:
    """Median seconds of one call, calls issued back to back."""
    for _ in range(50):
        call()
    synchronise()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    synchronise()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    xp, dtype = np, np.dtype(np.float32)
    synchronise = comm.Barrier
    if args.gpu:
        import cupy as xp
        import ml_dtypes

        seqpar.use_local_device()
        dtype = np.dtype(ml_dtypes.bfloat16)

        def synchronise():
            xp.cuda.Device().synchronize()
            comm.Barrier()
    rng = np.random.default_rng(comm.rank)
    q = xp.asarray(np.random.default_rng(0).standard_normal((1, 1, 8, 64), np.float32)
                   .astype(dtype))
    k, v = (xp.asarray(rng.standard_normal((1, 64, 8, 64), np.float32).astype(dtype))
            for _ in range(2))
    rows = {}
    plan_class = getattr(seqpar, "KVShardedPlan", None)
    if plan_class is not None:
        plan = plan_class(q, k, v)
        rows["KVShardedPlan call"] = host_time(lambda: plan(q, k, v), args.calls, synchronise)
        rows["kv_sharded_attention (its plan cache)"] = host_time(
            lambda: seqpar.kv_sharded_attention(q, k, v), args.calls, synchronise)

    def full():
        seqpar.plans.clear_plan_cache()
        return seqpar.kv_sharded_attention(q, k, v)

    rows["kv_sharded_attention, full call (check, agreement, plan)"] = host_time(
        full, max(args.calls // 4, 50), synchronise)
    if not args.gpu:  # what no plan can save on the CPU: the NumPy kernel itself
        from seqpar.local import numpy_kernel

        rows["the local kernel alone (numpy_kernel.forward)"] = host_time(
            lambda: numpy_kernel.forward(q, k, v, scale=0.125), args.calls, synchronise)
    if comm.rank == 0:
        device = "GPU " + xp.cuda.runtime.getDeviceProperties(0)["name"].decode() \
            if args.gpu else f"CPU {platform.processor() or platform.machine()}"
        print(f"{comm.size} rank(s), {device}, {dtype.name}; seqpar from {seqpar.__file__}")
        print("\n| call (tiny input, back to back) | host µs per call |")
        print("| --- | --- |")
        for name, seconds in rows.items():
            print(f"| {name} | {seconds * 1e6:.1f} |")


if __name__ == "__main__":
    main()
