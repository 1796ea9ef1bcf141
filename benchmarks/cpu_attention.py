"""CPU benchmarks of seqpar (issue: seqpar core on the CPU).

1. One rank, float32: seqpar.attention vs PyTorch's CPU scaled_dot_product_attention
   on the same inputs in the same run (GFLOP/s, ratio, geometric mean).
2. Peak memory of seqpar.attention at N=32768, d=64, one head, causal, beyond the inputs.
3. ring_attention at 1, 2 and 4 ranks for one global N (runs mpiexec).

    pip install torch==2.13.0 && python benchmarks/cpu_attention.py > benchmarks/cpu_attention.log

FLOPs are counted as 4*B*H*N*N*d, halved when causal. Times are medians of 3
runs after one warm-up.
"""
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

import seqpar

HEADS = 8


def median_time(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def single_rank():
    import torch

    rows = []
    for n in (4096, 8192):
        for d in (64, 128):
            for causal in (False, True):
                rng = np.random.default_rng(n + d)
                q, k, v = (rng.standard_normal((1, n, HEADS, d), dtype=np.float32)
                           for _ in range(3))
                # torch wants (B, H, N, d): the same memory, transposed views
                tq, tk, tv = (torch.from_numpy(x).transpose(1, 2) for x in (q, k, v))
                ours = median_time(lambda: seqpar.attention(q, k, v, causal=causal))
                theirs = median_time(lambda: torch.nn.functional.scaled_dot_product_attention(
                    tq, tk, tv, is_causal=causal))
                out = seqpar.attention(q, k, v, causal=causal)
                ref = torch.nn.functional.scaled_dot_product_attention(
                    tq.double(), tk.double(), tv.double(), is_causal=causal).transpose(1, 2).numpy()
                err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
                flops = 4.0 * n * n * d * HEADS / (2 if causal else 1)
                rows.append((n, d, causal, flops / ours / 1e9, flops / theirs / 1e9,
                             theirs / ours, err))
                print(f"N={n} d={d} causal={causal}: seqpar {ours:.3f}s torch {theirs:.3f}s",
                      file=sys.stderr, flush=True)
    print(f"\n### One rank, float32, batch 1, {HEADS} heads (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)\n")
    print("| N | d | causal | seqpar GFLOP/s | torch SDPA GFLOP/s | ratio | rel. error vs float64 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n, d, causal, ours, theirs, ratio, err in rows:
        print(f"| {n} | {d} | {causal} | {ours:.1f} | {theirs:.1f} | {ratio:.2f} | {err:.1e} |")
    geo = float(np.exp(np.mean(np.log([r[5] for r in rows]))))
    print(f"\nGeometric mean ratio seqpar / torch: **{geo:.2f}**")


def peak_memory():
    n, d = 32768, 64
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, n, 1, d), dtype=np.float32) for _ in range(3))
    inputs = q.nbytes + k.nbytes + v.nbytes
    tracemalloc.start()
    start = time.perf_counter()
    out = seqpar.attention(q, k, v, causal=True)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"\n### Peak memory, N={n}, d={d}, one head, causal, float32\n")
    print(f"inputs {inputs / 2**20:.1f} MiB; peak allocated by seqpar.attention (tracemalloc, "
          f"output included): **{peak / 2**20:.1f} MiB** (a full score matrix would be "
          f"{n * n * 4 / 2**30:.1f} GiB); time {elapsed:.2f}s; process max RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    del out


def ring_scaling():
    n = 16384
    print(f"\n### ring_attention, global N={n}, {HEADS} heads, d=64, float32, zigzag, causal\n")
    print("| ranks | time (median of 3) | GFLOP/s per rank |")
    print("| --- | --- | --- |")
    for ranks in (1, 2, 4):
        # seqpar run adds what this machine's mpiexec needs (Open MPI as root, oversubscribing)
        with tempfile.TemporaryDirectory() as folder:
            results = os.path.join(folder, "bench.json")
            subprocess.run([sys.executable, "-m", "seqpar", "run", "-n", str(ranks),
                            "-m", "seqpar", "bench", "--seq", str(n), "--heads", str(HEADS),
                            "--head-dim", "64", "--causal", "--json", results],
                           check=True, capture_output=True, text=True)
            with open(results) as saved:
                record = json.load(saved)["records"][0]
        print(f"| {ranks} | {record['median_s'] * 1e3:.1f} ms | "
              f"{record['tflops'] * 1e3 / ranks:.1f} |")


if __name__ == "__main__":
    print(f"## CPU benchmarks, {datetime.date.today()}\n")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"numpy {np.__version__}; seqpar {seqpar.__version__}")
    print(f"Command: `python {' '.join(sys.argv)}`")
    single_rank()
    peak_memory()
    ring_scaling()
