"""seqpar on 1 or more GPUs (one rank each): ring forward, forward + backward, masks,
and K/V-sharded decoding; one JSON line per measurement on rank 0.

    python -m seqpar run -n 2 benchmarks/gpu_scaling.py --out results.jsonl

bf16, 16 heads (decoding: 32 query / 8 K/V heads), d = 128. Causal runs use the
zigzag layout, others contiguous. TFLOP/s per GPU count 4*N^2*H*d (halved when
causal) for the forward and 2.5x that for the backward; masked runs count only the
visible pairs. Times: the median of a few calls, every rank synchronised, the
slowest rank's time.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", default="32768,131072")
    parser.add_argument("--backward-seq", default="131072")
    parser.add_argument("--mask-seq", type=int, default=1048576)
    parser.add_argument("--dense-seq", type=int, default=262144,
                        help="dense causal reference rate for the masked runs")
    parser.add_argument("--decode-keys", type=int, default=1048576)
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    import cupy
    import ml_dtypes
    from mpi4py import MPI

    import seqpar

    comm = MPI.COMM_WORLD
    seqpar.use_local_device()
    bf16 = np.dtype(ml_dtypes.bfloat16)
    heads, d = 16, 128
    records = []

    def say(record):
        record.update(ranks=comm.size)
        if comm.rank == 0:
            print(json.dumps(record), flush=True)
            records.append(record)

    def timed(call, repeats=3):
        call()
        times = []
        for _ in range(repeats):
            comm.Barrier()
            cupy.cuda.get_current_stream().synchronize()
            start = time.perf_counter()
            call()
            cupy.cuda.get_current_stream().synchronize()
            times.append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
        return float(np.median(times))

    def local(n, layout, h=heads, seed=0):
        idx = seqpar.local_indices(n, comm, layout=layout)
        rs = cupy.random.RandomState(seed + comm.rank)
        return [rs.standard_normal((1, idx.size, h, d), dtype=np.float32).astype(bf16)
                for _ in range(3)]

    # ring forward
    for n in map(int, args.seq.split(",")):
        for causal in (False, True):
            layout = "zigzag" if causal else "contiguous"
            q, k, v = local(n, layout)
            stats = {}
            seconds = timed(lambda: seqpar.ring_attention(q, k, v, causal=causal, layout=layout,
                                                          stats=stats))
            flops = 4.0 * n * n * heads * d / (2 if causal else 1)
            say({"what": "ring forward", "N": n, "causal": causal, "ms": seconds * 1e3,
                 "tflops_per_gpu": flops / seconds / comm.size / 1e12,
                 "transport": stats["transport"],
                 "exposed_ms": 1e3 * comm.allreduce(sum(stats["exposed_seconds"]),
                                                    op=MPI.MAX)})
    # ring forward + backward
    for n in map(int, args.backward_seq.split(",")):
        for causal in (False, True):
            layout = "zigzag" if causal else "contiguous"
            q, k, v = local(n, layout)
            dout = local(n, layout, seed=99)[0]

            def step():
                out, lse = seqpar.ring_attention(q, k, v, causal=causal, layout=layout,
                                                 return_lse=True)
                return seqpar.ring_attention_backward(dout, q, k, v, out, lse, causal=causal,
                                                      layout=layout)

            seconds = timed(step)
            flops = 3.5 * 4.0 * n * n * heads * d / (2 if causal else 1)
            say({"what": "ring forward+backward", "N": n, "causal": causal,
                 "ms": seconds * 1e3, "tflops_per_gpu": flops / seconds / comm.size / 1e12})
    # masks: a 4k window and packed documents over a long sequence, vs dense causal
    n = args.dense_seq
    q, k, v = local(n, "zigzag")
    seconds = timed(lambda: seqpar.ring_attention(q, k, v, causal=True, layout="zigzag"))
    say({"what": "dense causal reference", "N": n, "ms": seconds * 1e3,
         "tflops_per_gpu": 2.0 * n * n * heads * d / seconds / comm.size / 1e12})
    n = args.mask_seq
    q, k, v = local(n, "contiguous")
    window = 4096
    visible = window * (window + 1) // 2 + (n - window) * (window + 1)  # pairs the mask shows
    stats = {}
    seconds = timed(lambda: seqpar.ring_attention(q, k, v, causal=True, window=(window, None),
                                                  stats=stats))
    say({"what": "sliding window 4096, causal", "N": n, "ms": seconds * 1e3,
         "tflops_per_gpu": 4.0 * visible * heads * d / seconds / comm.size / 1e12,
         "steps": stats["steps"], "bytes_sent_per_rank": stats["bytes_sent"]})
    rng = np.random.default_rng(2026)
    lengths = []
    while sum(lengths) < n:
        lengths.append(int(rng.integers(2048, 65536)))
    lengths[-1] -= sum(lengths) - n
    visible = sum(x * (x + 1) // 2 for x in lengths)
    stats = {}
    seconds = timed(lambda: seqpar.ring_attention(q, k, v, causal=True, seqlens=lengths,
                                                  stats=stats))
    say({"what": f"packed documents ({len(lengths)} of 2k-64k), causal", "N": n,
         "ms": seconds * 1e3,
         "tflops_per_gpu": 4.0 * visible * heads * d / seconds / comm.size / 1e12,
         "steps": stats["steps"], "bytes_sent_per_rank": stats["bytes_sent"]})
    q = k = v = None
    cupy.get_default_memory_pool().free_all_blocks()
    # decoding: one query against a cache of decode-keys tokens split over the ranks
    keys = args.decode_keys
    idx = seqpar.local_indices(keys, comm)
    rs = cupy.random.RandomState(7 + comm.rank)
    kc, vc = (rs.standard_normal((1, idx.size, 8, d), dtype=np.float32).astype(bf16)
              for _ in range(2))
    for queries in (1, 16):
        qd = cupy.random.RandomState(3).standard_normal((1, queries, 32, d),
                                                        dtype=np.float32).astype(bf16)
        call = (lambda: seqpar.attention(qd, kc, vc)) if comm.size == 1 else \
            (lambda: seqpar.kv_sharded_attention(qd, kc, vc))
        seconds = timed(call, repeats=20)
        say({"what": "decoding", "queries": queries, "keys": keys, "ms": seconds * 1e3,
             "kv_tbps": 2 * keys * 8 * d * 2 / seconds / 1e12})
        # as a decoding loop issues them: back to back, no wait for the GPU in between
        call()
        comm.Barrier()
        cupy.cuda.get_current_stream().synchronize()
        start = time.perf_counter()
        for _ in range(50):
            call()
        cupy.cuda.get_current_stream().synchronize()
        seconds = comm.allreduce(time.perf_counter() - start, op=MPI.MAX) / 50
        say({"what": "decoding, calls back to back", "queries": queries, "keys": keys,
             "ms": seconds * 1e3, "kv_tbps": 2 * keys * 8 * d * 2 / seconds / 1e12})
    if args.out and comm.rank == 0:
        with open(args.out, "a") as fh:
            for record in records:
                fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
