"""Decoding on one GPU: few queries against a long K/V cache, seqpar vs PyTorch SDPA.

    PYTHONPATH=. python3 benchmarks/gpu_decode.py [--json FILE] [--splits 33,66,132]

bf16, 32 query heads sharing 8 K/V heads (GQA), d = 128. For each (batch, queries,
keys) of the grid: seqpar.attention (the split-K/V decode kernel) and torch's
scaled_dot_product_attention with the FLASH and cuDNN backends (enable_gqa=True) on
the same inputs (shared through DLPack), timed with CUDA events around many calls issued back to back
(rotating between input sets larger than L2 together), and the K/V read rate
(bytes of K and V / time). Then the crossover between the decode kernel and the
forward kernel (SEQPAR_KERNEL) as the rows per K/V head grow. A table last.
--splits also times the decode kernel at each of those split counts (the K/V range
cut into that many pieces per head) beside the count it chooses itself.
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
from seqpar.plans import clear_plan_cache

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


def chosen_splits(qkv):
    """The split count the decode kernel's launch takes for these arrays."""
    from seqpar.local import cupy_kernel

    q, k, _ = qkv
    return cupy_kernel._decode_geometry(q.shape, k.shape, False, "bf16", True,
                                        q.device.id)[2]


def with_splits(n, measure):
    """measure() with the decode launch cut into n splits (plans made afresh)."""
    from seqpar.local import cupy_kernel

    chosen = cupy_kernel._decode_geometry

    def forced(*args):
        geometry = chosen(*args)  # (kernel, shared bytes, splits, ...)
        return (*geometry[:2], n, *geometry[3:])

    cupy_kernel._decode_geometry = forced
    clear_plan_cache()
    try:
        return measure()
    finally:
        cupy_kernel._decode_geometry = chosen
        clear_plan_cache()


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
    parser.add_argument("--splits", default="")
    parser.add_argument("--keys", default="", help="only the grid rows with these key counts, "
                        "plus one query at each (e.g. 4096,65536)")
    args = parser.parse_args()
    grid = GRID
    if args.keys:
        wanted = [int(x) for x in args.keys.split(",")]
        grid = [r for r in GRID if r[2] in wanted]
        grid += [(1, 1, n) for n in wanted if (1, 1, n) not in grid]
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    rows = []
    for batch, queries, keys in grid:
        kv_bytes = 2 * batch * keys * KV_HEADS * D * 2
        sets = max(1, min(4, math.ceil(200e6 / kv_bytes)))  # > L2 (50-60 MB) in rotation
        data = inputs(batch, queries, keys, sets)
        turn = [0]

        def pick():
            turn[0] = (turn[0] + 1) % sets
            return data[turn[0]]

        row = {"batch": batch, "queries": queries, "keys": keys, "kv_bytes": kv_bytes}
        row["seqpar"] = timed(lambda: seqpar.attention(*pick()), args.repeats)
        if args.splits:
            row["splits"] = chosen_splits(data[0])
            row["seqpar_by_splits"] = {n: with_splits(n, lambda: timed(
                lambda: seqpar.attention(*pick()), args.repeats))
                for n in map(int, args.splits.split(","))}
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
    for queries in () if args.keys else (1, 4, 8, 16, 32):  # rows per K/V head = queries x 4
        data = inputs(1, queries, 65536, 4)
        turn = [0]

        def pick_set():
            turn[0] = (turn[0] + 1) % 4
            return data[turn[0]]

        entry = {"queries": queries, "rows": queries * HEADS // KV_HEADS}
        for kernel in ("decode", "mma"):
            os.environ["SEQPAR_KERNEL"] = kernel
            try:
                entry[kernel] = timed(lambda: seqpar.attention(*pick_set()), args.repeats)
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
    if args.splits:
        print("\nsplit count against kernel time (µs, back to back; * the chosen count):")
        for r in rows:
            cells = ", ".join(f"{n}: {t * 1e6:.0f}" for n, t in r["seqpar_by_splits"].items())
            print(f"  batch {r['batch']} queries {r['queries']} keys {r['keys']}: "
                  f"chosen {r['splits']}* {r['seqpar'] * 1e6:.0f}; {cells}")
    print("\ncrossover at 64k keys (ms): rows per K/V head, decode kernel, forward kernel")
    for e in crossover:
        print(f"  {e['rows']:4d}  {e['decode'] and e['decode'] * 1e3 or '-'}  "
              f"{e['mma'] and e['mma'] * 1e3 or '-'}")


if __name__ == "__main__":
    main()
