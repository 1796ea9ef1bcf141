"""Decoding on the CPU: one query against a long K/V cache is memory-bound.

Reports seqpar.attention's K/V read bandwidth for few queries against the machine's
own read and copy bandwidth (and, where numba imports, a compiled sum's read rate on
one and two threads), measured in the same run, with the compiled kernels
(numba, the default where it imports) and with the pure NumPy path
(``SEQPAR_CPU_KERNEL=numpy``); "per thread" divides by the threads that ran (two here,
the cores: the BLAS tiles run one job per K/V head, the decode kernel one per piece of
keys)::

    python benchmarks/cpu_decode.py            # one rank; prints a markdown table
"""
import os
import time
from concurrent.futures import ThreadPoolExecutor

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
    """One-thread read and copy rates (bytes/s) over arrays far beyond the caches, and
    (numba only, else None) the read rate of a compiled sum on one and on two threads."""
    big = rng.standard_normal(1 << 27, dtype=np.float32)  # 512 MiB
    other = np.empty_like(big)
    read = big.nbytes / best_of(lambda: big.sum())
    copy = 2 * big.nbytes / best_of(lambda: np.copyto(other, big))
    try:
        from numba import njit
    except ImportError:
        return read, copy, None, None

    @njit(nogil=True, fastmath={"reassoc"})
    def total(x):
        s = np.float32(0)
        for i in range(x.shape[0]):
            s += x[i]
        return s

    halves = (big[:big.size // 2], big[big.size // 2:])
    pool = ThreadPoolExecutor(2)
    compiled = big.nbytes / best_of(lambda: total(big))
    both = big.nbytes / best_of(lambda: list(pool.map(total, halves)))
    return read, copy, compiled, both


def main():
    rng = np.random.default_rng(0)
    read, copy, compiled, both = memory_bandwidth(rng)
    print(f"machine: {os.cpu_count()} cores; one-thread read {read / 1e9:.1f} GB/s "
          f"(numpy sum), copy {copy / 1e9:.1f} GB/s (read + write)")
    if compiled is not None:
        print(f"compiled sum (numba): one thread {compiled / 1e9:.1f} GB/s, two threads "
              f"{both / 1e9:.1f} GB/s together")
    print()
    threads = min(2, len(os.sched_getaffinity(0)))
    print("| queries | heads q/kv | d | K/V length | kernel | ms | K/V GB/s | vs read, per thread "
          "| vs copy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for sq, d, length in ((1, 64, 65536), (1, 64, 262144), (1, 64, 1048576),
                          (1, 128, 262144), (16, 128, 262144)):
        q = rng.standard_normal((1, sq, 8, d), dtype=np.float32)
        k = rng.standard_normal((1, length, 2, d), dtype=np.float32)
        v = rng.standard_normal((1, length, 2, d), dtype=np.float32)
        for kernel in ("numba", "numpy"):
            os.environ["SEQPAR_CPU_KERNEL"] = kernel
            seconds = best_of(lambda: seqpar.attention(q, k, v))
            rate = (k.nbytes + v.nbytes) / seconds
            print(f"| {sq} | 8/2 | {d} | {length} | {kernel} | {seconds * 1e3:.1f} | "
                  f"{rate / 1e9:.1f} | {rate / read / threads:.2f} | {rate / copy:.2f} |")
        del os.environ["SEQPAR_CPU_KERNEL"]


if __name__ == "__main__":
    main()
