"""Hopper forward kernel vs PyTorch SDPA (FLASH and cuDNN backends), one GPU.

    python benchmarks/gpu_attention_sm90.py [--quick] [--sweep] [--dims 64,128]
        [--sweep-dims 64,96,128,192,256] [--out DIR]

Grid: fp16/bf16 x head dim (--dims) x N {4k, 16k, 64k} x causal, batch 1,
16 heads, forward only; the mma.sync kernel (seqpar.local.cupy_kernel) too where
it runs. TFLOP/s = 4 B H N^2 d / time (halved when causal). Each time is the
median of CUDA-event timings after warm-up; every backend reads the same
data (seqpar shares torch's tensors through DLPack; torch reads (B, H, N, d)
contiguous copies, so no layout change is timed). --sweep also times other tile configurations
of the Hopper kernel (bf16, N = 16k). Writes JSON lines to DIR/bench_sm90.jsonl
and prints a table, ratios and geometric means last.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cupy  # noqa: E402
import ml_dtypes  # noqa: E402
import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from seqpar.local import cupy_kernel, cupy_sm90  # noqa: E402
from seqpar.masks import Mask  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


def tflops(n, d, causal, ms, heads=16, batch=1):
    flops = 4.0 * batch * heads * n * n * d * (0.5 if causal else 1.0)
    return flops / (ms * 1e-3) / 1e12


def time_ms(fn, reps):
    """Median of per-call CUDA-event times (legacy default stream, shared by both)."""
    fn()
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def inputs(n, d, dtype, heads=16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    tdt = torch.bfloat16 if dtype == "bf16" else torch.float16
    ts = [torch.randn((1, n, heads, d), generator=g, device="cuda", dtype=tdt) for _ in range(3)]
    npdt = BF16 if dtype == "bf16" else np.dtype(np.float16)
    cs = [cupy.from_dlpack(t.view(torch.int16)).view(npdt) for t in ts]
    return ts, cs


def mma_call(q, k, v, scale, causal):
    """The mma.sync kernel through the choice table (SEQPAR_KERNEL=mma)."""
    os.environ["SEQPAR_KERNEL"] = "mma"
    return lambda: cupy_kernel.forward(q, k, v, scale=scale, mask=Mask.build(causal=causal))


def bench_case(dtype, d, n, causal, reps, with_mma, config=None):
    (tq, tk, tv), (q, k, v) = inputs(n, d, dtype)
    scale = 1.0 / math.sqrt(d)
    mask = Mask.build(causal=causal)
    out = cupy.empty(q.shape, q.dtype)
    lse = cupy.empty((1, 16, n), np.float64)
    row = {"dtype": dtype, "d": d, "n": n, "causal": causal}
    sm90 = lambda: cupy_sm90.forward(q, k, v, scale=scale, mask=mask, out=out, lse=lse,  # noqa: E731
                                     config=config)
    row["sm90_ms"] = time_ms(sm90, reps)
    if config is not None:
        row["config"] = list(config)
        return row
    # torch gets its own (B, H, N, d)-contiguous copies: no layout conversion is timed
    tq_, tk_, tv_ = (t.transpose(1, 2).contiguous() for t in (tq, tk, tv))
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                f = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
                    tq_, tk_, tv_, is_causal=causal, scale=scale)
                row[f"{name}_ms"] = time_ms(f, reps)
        except RuntimeError as exc:  # backend refused the shape
            row[f"{name}_error"] = str(exc).splitlines()[0][:120]
    if with_mma:
        try:
            row["mma_ms"] = time_ms(mma_call(q, k, v, scale, causal), reps)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            row["mma_error"] = str(exc).splitlines()[0][:120]
        finally:
            os.environ.pop("SEQPAR_KERNEL", None)
    for key in ("sm90", "cudnn", "flash", "mma"):
        if f"{key}_ms" in row:
            row[f"{key}_tflops"] = tflops(n, d, causal, row[f"{key}_ms"])
    return row


def geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="N = 16k only")
    ap.add_argument("--sweep", action="store_true", help="also time other tile configurations")
    ap.add_argument("--no-mma", action="store_true")
    ap.add_argument("--dims", default="64,128", help="head dims of the main rows ('' for none)")
    ap.add_argument("--sweep-dims", default="64,128", help="head dims the sweep covers")
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    a = ap.parse_args()
    log = open(Path(a.out) / "bench_sm90.jsonl", "a") if a.out else None
    ns = (16384,) if a.quick else (4096, 16384, 65536)
    rows = []
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"cupy {cupy.__version__}", flush=True)
    for dtype in ("fp16", "bf16"):
        for d in (int(x) for x in a.dims.split(",") if x):
            for n in ns:
                for causal in (False, True):
                    reps = 20 if n <= 4096 else (10 if n <= 16384 else 5)
                    row = bench_case(dtype, d, n, causal, reps, not a.no_mma)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if log:
                        log.write(json.dumps(row) + "\n")
                        log.flush()
    sweep = []
    if a.sweep:
        C = cupy_sm90.Config
        variants = {
            64: [C(128, 2, 2, False, 24, 240), C(176, 2, 2, True, 24, 240),
                 C(128, 3, 2, True, 24, 160), C(192, 2, 2, True, 24, 240)],
            96: [C(128, 2, 2, True, 24, 240), C(176, 2, 2, True, 24, 240),
                 C(128, 2, 2, False, 24, 240)],
            128: [C(128, 2, 2, False, 24, 240), C(176, 2, 2, True, 24, 240),
                  C(128, 2, 3, True, 24, 240)],
            192: [C(112, 2, 2, True, 24, 240), C(96, 2, 2, True, 24, 240),
                  C(112, 2, 2, False, 24, 240)],
            256: [C(80, 2, 2, True, 24, 240), C(64, 2, 2, True, 24, 240),
                  C(80, 2, 2, False, 24, 240)],
        }
        dims = {int(x) for x in a.sweep_dims.split(",") if x}
        for d, cfgs in ((d, c) for d, c in variants.items() if d in dims):
            for cfg in cfgs:
                for causal in (False, True):
                    try:
                        row = bench_case("bf16", d, 16384, causal, 10, False, config=cfg)
                        row["sm90_tflops"] = tflops(16384, d, causal, row["sm90_ms"])
                    except Exception as exc:  # noqa: BLE001 - a variant may not build
                        row = {"d": d, "causal": causal, "config": list(cfg),
                               "error": str(exc).splitlines()[0][:160]}
                    sweep.append(row)
                    print(json.dumps(row), flush=True)
                    if log:
                        log.write(json.dumps(row) + "\n")
                        log.flush()

    print("\n dtype   d      N causal |  sm90  cuDNN  FLASH   mma | /cuDNN /FLASH")
    for r in rows:
        f = lambda key: f"{r[key]:6.0f}" if key in r else "    --"  # noqa: E731
        rc = r["sm90_tflops"] / r["cudnn_tflops"] if "cudnn_tflops" in r else float("nan")
        rf = r["sm90_tflops"] / r["flash_tflops"] if "flash_tflops" in r else float("nan")
        print(f" {r['dtype']:5} {r['d']:3} {r['n']:6} {str(r['causal']):6} |"
              f"{f('sm90_tflops')} {f('cudnn_tflops')} {f('flash_tflops')} {f('mma_tflops')} |"
              f" {rc:6.3f} {rf:6.3f}")
    rc = [r["sm90_tflops"] / r["cudnn_tflops"] for r in rows if "cudnn_tflops" in r]
    rf = [r["sm90_tflops"] / r["flash_tflops"] for r in rows if "flash_tflops" in r]
    big = [r["sm90_tflops"] / r["cudnn_tflops"] for r in rows
           if "cudnn_tflops" in r and r["n"] >= 16384]
    print(f"geomean sm90/cuDNN {geomean(rc):.3f}  sm90/FLASH {geomean(rf):.3f}  "
          f"min sm90/cuDNN at N>=16k {min(big) if big else float('nan'):.3f}")
    for r in sweep:
        if "sm90_tflops" in r:
            print(f" sweep d={r['d']} causal={r['causal']} {r['config']}: {r['sm90_tflops']:.0f}")
        else:
            print(f" sweep d={r['d']} causal={r['causal']} {r['config']}: {r['error']}")


if __name__ == "__main__":
    main()
