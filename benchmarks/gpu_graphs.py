"""One decode call as a decoding loop sees it: direct, and replayed from a CUDA graph.

    PYTHONPATH=. python3 benchmarks/gpu_graphs.py [--keys 4096,65536,262144,1048576]

bf16, one new token, 32 query heads sharing 8 K/V heads, d = 128, batch 1. Each call
is timed on its own and synchronised (host clock around call + stream synchronise),
as a loop that needs the token before the next step sees it: seqpar.attention called
directly, the same call captured once in a CUDA graph (seqpar.graphs) and replayed,
and torch's scaled_dot_product_attention with the FLASH and cuDNN backends on the
same inputs (enable_gqa). Medians of --repeats calls, with the minimum. Then the host
time of one call back to back on tiny inputs (the GPU idle in between), and of the
first call of a new description, which builds its plan, and of kv_sharded_attention
at one rank (planned: its cache, and KVShardedPlan; at several ranks
benchmarks/kv_plans.py --gpu times them). A table last.
"""
from __future__ import annotations

import argparse
import statistics
import time

import cupy
import ml_dtypes
import numpy as np

import seqpar

HEADS, KV_HEADS, D = 32, 8, 128


def per_call(fn, repeats):
    """(median, min) seconds of one synchronised call, after 10 warm-up calls."""
    stream = cupy.cuda.get_current_stream()
    for _ in range(10):
        fn()
    stream.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        stream.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def host_time(fn, repeats):
    """Median host seconds per call of calls issued back to back (tiny inputs)."""
    for _ in range(20):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    cupy.cuda.get_current_stream().synchronize()
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", default="4096,65536,262144,1048576")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention as sdpa
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    stream = cupy.cuda.Stream(non_blocking=True)
    rows = []
    with stream:
        for keys in (int(x) for x in args.keys.split(",")):
            q = cupy.asarray(rng.standard_normal((1, 1, HEADS, D), np.float32).astype(bf16))
            k, v = (cupy.asarray(rng.standard_normal((1, keys, KV_HEADS, D),
                                                     np.float32).astype(bf16)) for _ in range(2))
            row = {"keys": keys}
            row["direct"] = per_call(lambda: seqpar.attention(q, k, v), args.repeats)
            seqpar.attention(q, k, v)
            stream.begin_capture()
            out = seqpar.attention(q, k, v)
            graph = stream.end_capture()
            row["graph"] = per_call(lambda: graph.launch(stream), args.repeats)
            assert bool((out.view(cupy.uint8) ==
                         seqpar.attention(q, k, v).view(cupy.uint8)).all()), "replay differs"
            if torch is not None:
                tq, tk, tv = (torch.from_dlpack(x).transpose(1, 2) for x in (q, k, v))
                with torch.cuda.stream(torch.cuda.ExternalStream(stream.ptr)):
                    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                                          ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                        with sdpa_kernel(backend):
                            try:
                                row[name] = per_call(lambda: sdpa(tq, tk, tv, enable_gqa=True),
                                                     args.repeats)
                            except RuntimeError as exc:  # backend refuses the shape
                                row[name] = None
                                print(f"torch {name} at {keys} keys: {exc}".splitlines()[0])
            rows.append(row)
            seqpar.graphs.release_graph_memory()
        tiny = [cupy.asarray(rng.standard_normal((1, 1, 8, 64), np.float32).astype(bf16))
                for _ in range(3)]
        hosts = {"attention (its plan cache)": host_time(lambda: seqpar.attention(*tiny), 2000)}
        plan = seqpar.AttentionPlan(*tiny)
        hosts["AttentionPlan call"] = host_time(lambda: plan(*tiny), 2000)
        seqpar.plans.clear_plan_cache()
        first = time.perf_counter()
        seqpar.attention(*tiny)
        hosts["attention, first call of a description (plan built)"] = time.perf_counter() - first
        small = cupy.asarray(rng.standard_normal((1, 128, 8, 64), np.float32).astype(bf16))
        out_s, lse_s = seqpar.attention(small, small, small, return_lse=True)
        hosts["attention_backward"] = host_time(
            lambda: seqpar.attention_backward(small, small, small, small, out_s, lse_s), 500)
        hosts["ring_attention, 1 rank"] = host_time(
            lambda: seqpar.ring_attention(small, small, small), 500)
        tiny_kv = [cupy.asarray(rng.standard_normal((1, 64, 8, 64), np.float32).astype(bf16))
                   for _ in range(2)]
        hosts["kv_sharded_attention, 1 rank (its plan cache)"] = host_time(
            lambda: seqpar.kv_sharded_attention(tiny[0], *tiny_kv), 2000)
        kv_plan = seqpar.KVShardedPlan(tiny[0], *tiny_kv)
        hosts["KVShardedPlan call, 1 rank"] = host_time(lambda: kv_plan(tiny[0], *tiny_kv), 2000)
        # at several ranks: python -m seqpar run -n 2 benchmarks/kv_plans.py --gpu
    print(f"device: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, "
          f"CuPy {cupy.__version__}, torch {getattr(torch, '__version__', 'absent')}")
    print("\n| keys | seqpar direct µs | seqpar graph replay µs | torch FLASH µs | torch cuDNN µs "
          "| direct: speed vs best torch | replay: speed vs best torch |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        peers = [row[n][0] for n in ("flash", "cudnn") if row.get(n)]
        best = min(peers) if peers else float("nan")
        cell = lambda t: "-" if not t else f"{t[0] * 1e6:.0f} (min {t[1] * 1e6:.0f})"  # noqa: E731
        print(f"| {row['keys']} | {cell(row['direct'])} | {cell(row['graph'])} | "
              f"{cell(row.get('flash'))} | {cell(row.get('cudnn'))} | "
              f"{best / row['direct'][0]:.2f}x | {best / row['graph'][0]:.2f}x |")
    print("\n| host time per call, tiny input, back to back | µs |")
    print("| --- | --- |")
    for name, seconds in hosts.items():
        print(f"| {name} | {seconds * 1e6:.0f} |")


if __name__ == "__main__":
    main()
