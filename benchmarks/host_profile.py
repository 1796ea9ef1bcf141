"""Where the host time of one GPU call goes: cProfile over many tiny calls.

    PYTHONPATH=. python3 benchmarks/host_profile.py [--calls 2000] [--top 25] [--pieces]

Tiny bf16 inputs (the GPU idle), calls back to back; for each public function and plan
the median host time per call, then the functions with the most own time. --pieces
first times the steps a planned decode call is made of, one by one (what a call could
cost at least).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import cupy
import ml_dtypes
import numpy as np

import seqpar


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--only", default="")
    parser.add_argument("--pieces", action="store_true")
    args = parser.parse_args()
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    new = lambda *shape: cupy.asarray(rng.standard_normal(shape, np.float32).astype(bf16))  # noqa: E731
    q, k, v = new(1, 1, 8, 64), new(1, 64, 8, 64), new(1, 64, 8, 64)
    qs = new(1, 128, 8, 64)
    out, lse = seqpar.attention(qs, qs, qs, return_lse=True)
    lengths = cupy.asarray([40], dtype=cupy.int32)
    plan = seqpar.AttentionPlan(q, k, v)
    kv_plan = seqpar.KVShardedPlan(q, k, v) if hasattr(seqpar, "KVShardedPlan") else None
    if args.pieces:
        pieces(q, k, v, plan, args.calls)
    calls = {
        "AttentionPlan call (decode)": lambda: plan(q, k, v),
        "attention decode": lambda: seqpar.attention(q, k, v),
        "attention decode key_lengths": lambda: seqpar.attention(q, k, v, key_lengths=lengths),
        "attention_backward": lambda: seqpar.attention_backward(qs, qs, qs, qs, out, lse),
        "ring_attention 1 rank": lambda: seqpar.ring_attention(qs, qs, qs),
        "kv_sharded_attention 1 rank": lambda: seqpar.kv_sharded_attention(q, k, v),
    }
    if kv_plan is not None:
        calls["KVShardedPlan call 1 rank"] = lambda: kv_plan(q, k, v)
    for name, call in calls.items():
        if args.only and args.only not in name:
            continue
        for _ in range(50):
            call()
        cupy.cuda.Device().synchronize()
        times = []
        for _ in range(args.calls):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        cupy.cuda.Device().synchronize()
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls // 4):
            call()
        profile.disable()
        cupy.cuda.Device().synchronize()
        print(f"\n=== {name}: median host time {statistics.median(times) * 1e6:.1f} µs per call")
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)


def median_us(fn, calls):
    for _ in range(50):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def pieces(q, k, v, plan, calls):
    """Median host µs of each step of a planned decode call, alone."""
    from seqpar.graphs import graph_memory
    from seqpar.plans import _describe

    decode = plan._run
    stream = cupy.cuda.get_current_stream()
    launch = getattr(decode, "_launch", None)
    steps = {
        "plan(q, k, v)": lambda: plan(q, k, v),
        "plan._call (no description check)": lambda: plan._call(q, k, v, None),
        "decode launches (plan._run)": lambda: decode(q, k, v, None),
        "_describe(q) x3": lambda: (_describe(q), _describe(k), _describe(v)),
        "with graph_memory(q)": lambda: graph_memory(q).__enter__(),
        "cupy.empty((1,1,8,64), bf16)": lambda: cupy.empty(q.shape, q.dtype),
        "cupy.empty x2 (out, lse)": lambda: (cupy.empty(q.shape, q.dtype),
                                            cupy.empty((1, 8, 1), np.float64)),
        "get_current_stream()": cupy.cuda.get_current_stream,
        "stream.is_capturing()": stream.is_capturing,
        "runtime.getDevice()": cupy.cuda.runtime.getDevice,
        "q.data.ptr x3": lambda: (q.data.ptr, k.data.ptr, v.data.ptr),
        "q.device.id": lambda: q.device.id,
    }
    if launch is not None:
        steps["one DirectLaunch (ctypes cuLaunchKernel)"] = lambda: launch(stream.ptr)
    print("\n=== the steps of a planned decode call, each alone (median µs of "
          f"{calls} calls)")
    for name, fn in steps.items():
        print(f"  {name:44s} {median_us(fn, calls):7.2f}")
    cupy.cuda.Device().synchronize()


if __name__ == "__main__":
    main()
