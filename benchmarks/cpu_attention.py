"""CPU benchmarks of seqpar (issue: seqpar core on the CPU).

1. One rank, float32 and float64: seqpar.attention (compiled numba kernels, and the pure
   NumPy path) vs PyTorch's CPU scaled_dot_product_attention on the same inputs in the
   same run (GFLOP/s, ratio, geometric mean).
2. Peak memory of seqpar.attention at N=32768, d=64, one head, causal, beyond the inputs.
3. ring_attention at 1, 2 and 4 ranks for one global N (runs mpiexec).

    pip install torch==2.13.0 && python benchmarks/cpu_attention.py > benchmarks/cpu_attention.log

FLOPs are counted as 4*B*H*N*N*d, halved when causal. Times are medians of 3
runs after one warm-up in parts 2-3; part 1 takes the best of 3 (1 beyond N=8192), each
after a pause. ``--single`` runs part 1 only; ``--rows`` only the row count from which
the compiled tile kernel beats BLAS (numpy_kernel.TILED_ROWS).
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


def best_time(fn, repeats=3):
    """Best of ``repeats`` after a warm-up and a pause: on 2 cores, threads that torch's
    OpenMP (or OpenBLAS) leave spinning after a call would otherwise slow the next one."""
    fn()
    times = []
    for _ in range(repeats):
        time.sleep(0.3)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# (dtype, N, head dims, causal options) over the range: both head dims and masks
# up to 16k in float32 (32k causal only: a non-causal 32k call takes tens of seconds
# here), float64 up to 8k and causal at 16k
CASES = ([("float32", n, (64, 128), (False, True)) for n in (4096, 8192, 16384)]
         + [("float32", 32768, (64, 128), (True,))]
         + [("float64", n, (64, 128), (False, True)) for n in (4096, 8192)]
         + [("float64", 16384, (64,), (True,))])


def _seqpar_time(q, k, v, causal, kernel, repeats):
    os.environ["SEQPAR_CPU_KERNEL"] = kernel
    try:
        return best_time(lambda: seqpar.attention(q, k, v, causal=causal), repeats)
    finally:
        del os.environ["SEQPAR_CPU_KERNEL"]


def single_rank():
    import torch

    rows = []
    for dtype, n, dims, causals in CASES:
        for d in dims:
            for causal in causals:
                rng = np.random.default_rng(n + d)
                q, k, v = (rng.standard_normal((1, n, HEADS, d)).astype(dtype) for _ in range(3))
                # torch wants (B, H, N, d): the same memory, transposed views
                tq, tk, tv = (torch.from_numpy(x).transpose(1, 2) for x in (q, k, v))
                repeats = 3 if n <= 8192 else 1
                compiled = _seqpar_time(q, k, v, causal, "numba", repeats)
                plain = _seqpar_time(q, k, v, causal, "numpy", repeats) if n <= 8192 else None
                theirs = best_time(lambda: torch.nn.functional.scaled_dot_product_attention(
                    tq, tk, tv, is_causal=causal), repeats)
                out = seqpar.attention(q, k, v, causal=causal)
                if n <= 8192:
                    ref = torch.nn.functional.scaled_dot_product_attention(
                        tq.double(), tk.double(), tv.double(),
                        is_causal=causal).transpose(1, 2).numpy()
                    err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                else:
                    err = None
                flops = 4.0 * n * n * d * HEADS / (2 if causal else 1)
                rows.append((dtype, n, d, causal, flops / compiled / 1e9,
                             None if plain is None else flops / plain / 1e9,
                             flops / theirs / 1e9, theirs / compiled, err))
                print(f"{dtype} N={n} d={d} causal={causal}: seqpar {compiled:.3f}s "
                      f"torch {theirs:.3f}s", file=sys.stderr, flush=True)
    print(f"\n### One rank, batch 1, {HEADS} heads (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)\n")
    print("seqpar with numba (the default where it imports) and with `SEQPAR_CPU_KERNEL=numpy`;"
          " ratio = torch time / seqpar (numba) time.\n")
    print("| dtype | N | d | causal | seqpar GFLOP/s | seqpar numpy GFLOP/s | torch SDPA GFLOP/s "
          "| ratio | rel. error vs float64 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for dtype, n, d, causal, ours, plain, theirs, ratio, err in rows:
        plain_text = "-" if plain is None else f"{plain:.1f}"
        err_text = "-" if err is None else f"{err:.1e}"
        print(f"| {dtype} | {n} | {d} | {causal} | {ours:.1f} | {plain_text} | {theirs:.1f} "
              f"| {ratio:.2f} | {err_text} |")
    for dtype in ("float32", "float64"):
        geo = float(np.exp(np.mean(np.log([r[7] for r in rows if r[0] == dtype]))))
        print(f"\nGeometric mean ratio seqpar / torch, {dtype}: **{geo:.2f}**")


def tile_kernel_rows():
    """Where the compiled tile kernel beats BLAS with the compiled step: queries of a
    GQA group of 4 against 65,536 keys, rows per K/V head 64-512, both paths forced
    (the BLAS one by a head-dim block the kernel cannot take)."""
    from seqpar.local import numba_kernel, numpy_kernel

    keys, columns = 65536, numba_kernel.FUSED_COLUMNS
    print(f"\n### Tile kernel against BLAS + compiled step, {keys} keys, heads 8/2 "
          f"(threshold: numpy_kernel.TILED_ROWS = {numpy_kernel.TILED_ROWS})\n")
    print("| rows per K/V head | d | tile kernel ms | BLAS + step ms | ratio |")
    print("| --- | --- | --- | --- | --- |")
    rng = np.random.default_rng(0)
    saved = numpy_kernel.TILED_ROWS
    try:
        numpy_kernel.TILED_ROWS = 1
        for d in (64, 128):
            k, v = (rng.standard_normal((1, keys, 2, d)).astype(np.float32) for _ in range(2))
            for queries in (16, 32, 64, 128):
                q = rng.standard_normal((1, queries, 8, d)).astype(np.float32)
                tiled = best_time(lambda: seqpar.attention(q, k, v))
                numba_kernel.FUSED_COLUMNS = 7  # no head dim is a multiple: BLAS tiles
                try:
                    blas = best_time(lambda: seqpar.attention(q, k, v))
                finally:
                    numba_kernel.FUSED_COLUMNS = columns
                print(f"| {queries * 4} | {d} | {tiled * 1e3:.1f} | {blas * 1e3:.1f} "
                      f"| {blas / tiled:.2f} |", flush=True)
    finally:
        numpy_kernel.TILED_ROWS = saved


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
    if "--rows" in sys.argv:
        tile_kernel_rows()
        sys.exit(0)
    single_rank()
    if "--single" not in sys.argv:
        peak_memory()
        ring_scaling()
