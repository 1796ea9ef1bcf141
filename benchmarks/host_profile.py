"""Where the host time of one GPU call goes: cProfile over many tiny calls.

    PYTHONPATH=. python3 benchmarks/host_profile.py [--calls 2000] [--top 25]

Tiny bf16 inputs (the GPU idle), calls back to back; for each public function the
median host time per call, then the functions with the most own time.
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
    args = parser.parse_args()
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    new = lambda *shape: cupy.asarray(rng.standard_normal(shape, np.float32).astype(bf16))  # noqa: E731
    q, k, v = new(1, 1, 8, 64), new(1, 64, 8, 64), new(1, 64, 8, 64)
    qs = new(1, 128, 8, 64)
    out, lse = seqpar.attention(qs, qs, qs, return_lse=True)
    lengths = cupy.asarray([40], dtype=cupy.int32)
    calls = {
        "attention decode": lambda: seqpar.attention(q, k, v),
        "attention decode key_lengths": lambda: seqpar.attention(q, k, v, key_lengths=lengths),
        "attention_backward": lambda: seqpar.attention_backward(qs, qs, qs, qs, out, lse),
        "ring_attention 1 rank": lambda: seqpar.ring_attention(qs, qs, qs),
        "kv_sharded_attention 1 rank": lambda: seqpar.kv_sharded_attention(q, k, v),
    }
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


if __name__ == "__main__":
    main()
