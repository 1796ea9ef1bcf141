"""Ring attention on GPUs: seqpar on P ranks (one GPU each), transports, peak memory.

    mpiexec -n 2 python benchmarks/gpu_ring.py run --seq 32768,131072 --causal 0,1
    python benchmarks/gpu_ring.py table results/*.jsonl      # markdown from JSON lines

``run`` prints one JSON line per configuration on rank 0: time (median), TFLOP/s
per GPU (4*N^2*H*d, halved when causal), the transport, the communication that
compute waited for (exposed, summed over steps) and the memory pool size after
the run (CuPy keeps freed blocks, so this is the peak). ``--bandwidth`` also
times one ring step of a bare block per transport. bf16, batch 1; causal runs use
the zigzag layout, others contiguous. benchmarks/gpu_ring.sh runs the whole set
together with the PyTorch peer (benchmarks/torch_cp.py).
"""
import argparse
import json
import sys
import time

import numpy as np


def run(args) -> None:
    import cupy
    import ml_dtypes
    from mpi4py import MPI

    import seqpar
    from seqpar.transport import get_transport

    comm = MPI.COMM_WORLD
    seqpar.use_local_device()
    pool = cupy.get_default_memory_pool()

    def say(record):
        if comm.rank == 0:
            print(json.dumps(record), flush=True)

    def timed(call, repeats):
        times = []
        for _ in range(repeats):
            comm.Barrier()
            cupy.cuda.get_current_stream().synchronize()
            start = time.perf_counter()
            call()
            cupy.cuda.get_current_stream().synchronize()
            times.append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
        return float(np.median(times))

    for n in map(int, args.seq.split(",")):
        for causal in map(int, args.causal.split(",")):
            for transport in args.transport.split(","):
                layout = "zigzag" if causal else "contiguous"
                local = n // comm.size
                rs = cupy.random.RandomState(1000 * comm.rank + 7)
                q, k, v = (rs.standard_normal((1, local, args.heads, args.head_dim),
                                              dtype=np.float32).astype(ml_dtypes.bfloat16)
                           for _ in range(3))
                stats = {}

                def attend():
                    return seqpar.ring_attention(q, k, v, causal=bool(causal), layout=layout,
                                                 transport=transport, stats=stats)

                first = timed(attend, 1)  # compiles the kernel, sets up the transport
                repeats = max(1, min(args.max_repeats, int(args.budget_s / first)))
                # long runs: the first call is the measurement (compiling is ~1 s, once)
                best = timed(attend, repeats) if first < args.budget_s else first
                exposed = comm.allreduce(sum(stats["exposed_seconds"]), op=MPI.MAX)
                peak = comm.allreduce(pool.total_bytes(), op=MPI.MAX)
                flops = 4.0 * n * n * args.heads * args.head_dim / (2 if causal else 1)
                say({"impl": "seqpar", "ranks": comm.size, "N": n, "causal": bool(causal),
                     "heads": args.heads, "d": args.head_dim, "transport": stats["transport"],
                     "ms": best * 1e3, "tflops_per_gpu": flops / best / comm.size / 1e12,
                     "exposed_ms": exposed * 1e3, "bytes_per_step": stats["bytes_per_step"],
                     "peak_gib": peak / 2**30, "repeats": repeats})
                q = k = v = None
                pool.free_all_blocks()

    if args.bandwidth and comm.size > 1:
        for transport in args.bandwidth.split(","):
            for mib in (64, 512):
                block = cupy.ones(mib << 20, dtype=cupy.uint8)
                mover = get_transport(comm, block, transport)

                def step():
                    with mover.ring(block) as ring:
                        ring.start()
                        ring.wait()

                step()
                seconds = timed(step, 5)
                say({"impl": "transport", "transport": mover.name, "ranks": comm.size,
                     "MiB": mib, "ms": seconds * 1e3, "GBps": (mib << 20) / seconds / 1e9})
                block = None
                pool.free_all_blocks()


def table(paths) -> None:
    rows = [json.loads(line) for path in paths for line in open(path) if line.startswith("{")]
    runs = [r for r in rows if r["impl"] == "seqpar"]
    main = {(r["ranks"], r["N"], r["causal"]): r for r in runs
            if r["heads"] == 16 and (r["ranks"] == 1 or r["transport"] == "nccl")}
    peer = {(r["ranks"], r["N"], r["causal"]): r for r in rows if r["impl"].startswith("torch")}
    print("| causal | N | seqpar 1 GPU ms | seqpar 2 GPU ms | speedup | TF/s per GPU "
          "| exposed comm | torch CP 2 GPU ms | torch TF/s per GPU | ratio | peak GiB per GPU |")
    print("| --- " * 11 + "|")
    for (ranks, n, causal), r in sorted(main.items(), key=lambda x: (x[0][2], x[0][1])):
        if ranks != 2:
            continue
        one, theirs = main.get((1, n, causal)), peer.get((2, n, causal))
        cells = [str(causal), f"{n:,}", f"{one['ms']:.1f}" if one else "-", f"{r['ms']:.1f}",
                 f"{one['ms'] / r['ms']:.2f}x" if one else "-", f"{r['tflops_per_gpu']:.0f}",
                 f"{r['exposed_ms']:.1f} ms ({100 * r['exposed_ms'] / r['ms']:.1f}%)",
                 f"{theirs['ms']:.1f}" if theirs else "-",
                 f"{theirs['tflops_per_gpu']:.0f}" if theirs else "-",
                 f"{r['tflops_per_gpu'] / theirs['tflops_per_gpu']:.2f}" if theirs else "-",
                 f"{r['peak_gib']:.1f}"]
        print("| " + " | ".join(cells) + " |")
    print("\n| transport | block | ms | GB/s per rank, each way |\n| --- | --- | --- | --- |")
    for r in rows:
        if r["impl"] == "transport":
            print(f"| {r['transport']} | {r['MiB']} MiB | {r['ms']:.2f} | {r['GBps']:.0f} |")
    print("\n| run | ranks | N | heads | causal | transport | ms | TF/s per GPU | exposed comm "
          "| peak GiB per GPU |\n" + "| --- " * 10 + "|")
    for r in rows:
        if r["impl"] == "seqpar" and r not in main.values() or r["impl"] == "seqpar" \
                and r["ranks"] == 1:
            print(f"| seqpar | {r['ranks']} | {r['N']:,} | {r['heads']} | {r['causal']} "
                  f"| {r['transport']} | {r['ms']:.1f} | {r['tflops_per_gpu']:.0f} "
                  f"| {r['exposed_ms']:.1f} ms | {r['peak_gib']:.1f} |")
        elif r["impl"].startswith("torch"):
            print(f"| {r['impl']} {r['torch']} | {r['ranks']} | {r['N']:,} | 16 | {r['causal']} "
                  f"| - | {r['ms']:.1f} | {r['tflops_per_gpu']:.0f} | - | - |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--seq", default="32768,131072")
    p.add_argument("--causal", default="0,1")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--transport", default="auto", help="comma-separated")
    p.add_argument("--bandwidth", default="", help="transports to time a ring step of")
    p.add_argument("--max-repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=2.0, help="time per configuration")
    t = sub.add_parser("table")
    t.add_argument("paths", nargs="+")
    a = parser.parse_args()
    run(a) if a.command == "run" else table(a.paths)
    sys.exit(0)
