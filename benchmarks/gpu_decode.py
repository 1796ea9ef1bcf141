"""Decoding on one GPU: few queries against a long K/V cache, seqpar vs PyTorch SDPA.

    PYTHONPATH=. python3 benchmarks/gpu_decode.py [--json FILE]

bf16, 32 query heads sharing 8 K/V heads (GQA), d = 128. For each (batch, queries,
keys) of the grid: seqpar.attention (the split-K/V decode kernel) and torch's
scaled_dot_product_attention with the FLASH and cuDNN backends (enable_gqa=True) on
the same inputs (shared through DLPack), timed with CUDA events around many calls issued back to back
(rotating between input sets larger than L2 together), and the K/V read rate
(bytes of K and V / time). Then the crossover between the decode kernel and the
forward kernel (SEQPAR_KERNEL) as the rows per K/V head grow. A table last.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics

import cupy
import ml_dtypes
import numpy as np

import seqpar

GRID = ((1, 1, 65536), (1, 1, 262144), (1, 1, 1048576), (1, 16, 262144), (1, 16, 1048576),
        (8, 1, 131072))
HEADS, KV_HEADS, D = 32, 8, 128


def timed(fn, repeats):
    """Seconds per call: calls issued back to back, as a decoding loop issues them (the
    host prepares the next call while the GPU runs this one), timed with CUDA events
    around ``repeats`` calls; the median of 5 such trials."""
    fn()
    cupy.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(5):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(repeats):
            fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3 / repeats)
    return statistics.median(times)


def inputs(batch, queries, keys, sets):
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rs = cupy.random.RandomState(keys + queries)
    return [tuple(rs.standard_normal(shape, dtype=np.float32).astype(bf16) for shape in (
        (batch, queries, HEADS, D), (batch, keys, KV_HEADS, D), (batch, keys, KV_HEADS, D)))
        for _ in range(sets)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    rows = []
    for batch, queries, keys in GRID:
        kv_bytes = 2 * batch * keys * KV_HEADS * D * 2
        sets = max(1, min(4, math.ceil(200e6 / kv_bytes)))  # > L2 (50-60 MB) in rotation
        data = inputs(batch, queries, keys, sets)
        turn = [0]

        def pick():
            turn[0] = (turn[0] + 1) % sets
            return data[turn[0]]

        row = {"batch": batch, "queries": queries, "keys": keys, "kv_bytes": kv_bytes}
        row["seqpar"] = timed(lambda: seqpar.attention(*pick()), args.repeats)
        tdata = [tuple(torch.from_dlpack(x).transpose(1, 2) for x in triple) for triple in data]
        tturn = [0]

        def tpick():
            tturn[0] = (tturn[0] + 1) % sets
            return tdata[tturn[0]]

        ours = seqpar.attention(*data[0]).astype(np.float32)
        for label, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                               ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    def run():
                        return torch.nn.functional.scaled_dot_product_attention(
                            *tpick(), enable_gqa=True)
                    row[label] = timed(run, args.repeats)
                    ref = torch.nn.functional.scaled_dot_product_attention(
                        *tdata[0], enable_gqa=True).transpose(1, 2).float()
                    theirs = cupy.from_dlpack(ref.contiguous())
                    row[f"{label}_diff"] = float(cupy.linalg.norm(ours - theirs)
                                                 / cupy.linalg.norm(theirs))
            except RuntimeError as exc:  # a backend may refuse a shape
                row[label] = None
                row[f"{label}_error"] = str(exc).splitlines()[0][:120]
        rows.append(row)
        print(json.dumps(row), flush=True)

    crossover = []
    for queries in (1, 4, 8, 16, 32):  # rows per K/V head = queries x 4
        data = inputs(1, queries, 65536, 4)
        turn = [0]

        def pick():
            turn[0] = (turn[0] + 1) % 4
            return data[turn[0]]

        entry = {"queries": queries, "rows": queries * HEADS // KV_HEADS}
        for kernel in ("decode", "mma"):
            os.environ["SEQPAR_KERNEL"] = kernel
            try:
                entry[kernel] = timed(lambda: seqpar.attention(*pick()), args.repeats)
            except ValueError as exc:
                entry[kernel] = None
                entry[f"{kernel}_error"] = str(exc)
        os.environ.pop("SEQPAR_KERNEL", None)
        crossover.append(entry)
        print(json.dumps(entry), flush=True)

    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": name, "grid": rows, "crossover": crossover}, fh, indent=1)

    print(f"\n{name}: decoding, bf16, {HEADS}/{KV_HEADS} heads, d = {D}; ms and K/V TB/s")
    print("| batch | queries | keys | seqpar ms | TB/s | FLASH ms | TB/s | cuDNN ms | TB/s | "
          "vs best torch |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    ratios = []
    for r in rows:
        def cell(t):
            return ("-", "-") if t is None else (f"{t * 1e3:.3f}", f"{r['kv_bytes'] / t / 1e12:.2f}")
        best = min(t for t in (r.get("flash"), r.get("cudnn")) if t is not None)
        ratios.append(best / r["seqpar"])
        print(f"| {r['batch']} | {r['queries']} | {r['keys']} | {' | '.join(cell(r['seqpar']))} | "
              f"{' | '.join(cell(r.get('flash')))} | {' | '.join(cell(r.get('cudnn')))} | "
              f"{best / r['seqpar']:.2f}x |")
    print(f"geometric mean vs the faster torch backend: "
          f"{math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}x")
    print("\ncrossover at 64k keys (ms): rows per K/V head, decode kernel, forward kernel")
    for e in crossover:
        print(f"  {e['rows']:4d}  {e['decode'] and e['decode'] * 1e3 or '-'}  "
              f"{e['mma'] and e['mma'] * 1e3 or '-'}")


if __name__ == "__main__":
    main()
