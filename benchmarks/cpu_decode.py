"""Decoding on the CPU: one query against a long K/V cache is memory-bound.

Reports seqpar.attention's K/V read bandwidth for few queries against the machine's
own read and copy bandwidth, measured in the same run::

    python benchmarks/cpu_decode.py            # one rank; prints a markdown table
"""
import os
import time

import numpy as np

import seqpar


def best_of(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def memory_bandwidth(rng):
    """One-thread read and copy rates (bytes/s) over arrays far beyond the caches."""
    big = rng.standard_normal(1 << 27, dtype=np.float32)  # 512 MiB
    other = np.empty_like(big)
    read = big.nbytes / best_of(lambda: big.sum())
    copy = 2 * big.nbytes / best_of(lambda: np.copyto(other, big))
    return read, copy


def main():
    rng = np.random.default_rng(0)
    read, copy = memory_bandwidth(rng)
    print(f"machine: {os.cpu_count()} cores; one-thread read {read / 1e9:.1f} GB/s "
          f"(numpy sum), copy {copy / 1e9:.1f} GB/s (read + write)\n")
    print("| queries | heads q/kv | d | K/V length | ms | K/V GB/s | vs read | vs copy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for sq, d, length in ((1, 64, 65536), (1, 64, 262144), (1, 64, 1048576),
                          (1, 128, 262144), (16, 128, 262144)):
        q = rng.standard_normal((1, sq, 8, d), dtype=np.float32)
        k = rng.standard_normal((1, length, 2, d), dtype=np.float32)
        v = rng.standard_normal((1, length, 2, d), dtype=np.float32)
        seconds = best_of(lambda: seqpar.attention(q, k, v))
        rate = (k.nbytes + v.nbytes) / seconds
        print(f"| {sq} | 8/2 | {d} | {length} | {seconds * 1e3:.1f} | {rate / 1e9:.1f} | "
              f"{rate / read:.2f} | {rate / copy:.2f} |")


if __name__ == "__main__":
    main()
