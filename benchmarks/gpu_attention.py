"""Forward attention throughput: seqpar's CuPy kernel vs PyTorch SDPA (FA2, cuDNN).

Runs on a GPU machine with cupy, ml_dtypes and torch (torch is used here only,
never inside seqpar). Same inputs for all three: torch sees the CuPy arrays
through DLPack. Batch 1, 16 heads; TFLOP/s = 4*N*N*d*H / time, halved when causal.
Time: CUDA events around a run of back-to-back calls (divided by their number),
warm-up first, median of 5 such trials.

    PYTHONPATH=. python3 benchmarks/gpu_attention.py [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import cupy
import ml_dtypes
import numpy as np

from seqpar.local import cupy_kernel
from seqpar.masks import Mask


def _time(fn, inner, trials=5, warmup=2):
    """Median over trials of (events around `inner` back-to-back calls) / inner.

    Back-to-back launches keep the GPU busy while Python prepares the next
    call, so the host overhead of each wrapper (seqpar's or torch's) stays out
    of the number unless it exceeds the kernel's own time.
    """
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(trials):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        ts.append(cupy.cuda.get_elapsed_time(a, b) * 1e-3 / inner)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--ns", default="4096,16384,65536")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--reps", type=int, default=0,
                    help="back-to-back calls per timed trial (0: by size)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    torch = None
    if not args.no_torch:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
        import torch.nn.functional as F

    dev = cupy.cuda.Device()
    name = cupy.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
    print(f"device: {name}, cc {dev.compute_capability}", flush=True)
    rows = []
    for dt in args.dtypes.split(","):
        npdt = np.float16 if dt == "fp16" else ml_dtypes.bfloat16
        for d in map(int, args.dims.split(",")):
            for n in map(int, args.ns.split(",")):
                h = args.heads
                rs = cupy.random.RandomState(n + d)
                q, k, v = (rs.standard_normal((1, n, h, d), dtype=np.float32).astype(npdt)
                           for _ in range(3))
                out = cupy.empty_like(q)
                reps = args.reps or max(1, (16384 // n) ** 2 * 4)  # calls per timed trial
                for causal in map(int, args.causal.split(",")):
                    flops = 4.0 * n * n * d * h / (2 if causal else 1)
                    scale = 1.0 / math.sqrt(d)
                    mask = Mask(causal=True) if causal else None
                    t_sp = _time(lambda: cupy_kernel.forward(q, k, v, scale=scale, mask=mask,
                                                             out=out), reps)
                    row = {"dtype": dt, "d": d, "N": n, "causal": causal,
                           "seqpar": flops / t_sp / 1e12}
                    if torch is not None:
                        # (B, S, H, D) -> torch's (B, H, S, D) as a view, same memory
                        tq, tk, tv = (torch.from_dlpack(x).transpose(1, 2) for x in (q, k, v))
                        for label, be in (("fa2", SDPBackend.FLASH_ATTENTION),
                                          ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                            try:
                                with sdpa_kernel(be):
                                    def f():
                                        return F.scaled_dot_product_attention(
                                            tq, tk, tv, is_causal=bool(causal), scale=scale)
                                    ref = f()
                                    t = _time(f, reps)
                                row[label] = flops / t / 1e12
                                if label == "fa2":  # sanity: same function computed
                                    a = torch.from_dlpack(out).float()
                                    bb = ref.transpose(1, 2).float()
                                    row["diff"] = float((a - bb).norm() / bb.norm())
                            except Exception as exc:  # backend refused this shape
                                row[label] = float("nan")
                                print(f"  {label} failed: {type(exc).__name__}: {exc}"[:200])
                            torch.cuda.synchronize()
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                del q, k, v, out
                cupy.get_default_memory_pool().free_all_blocks()

    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": name, "rows": rows}, fh, indent=1)

    print(f"\n{name}: forward TFLOP/s, batch 1, {args.heads} heads")
    print("dtype  d    N      causal seqpar   FA2  cuDNN  /FA2  /cuDNN  reldiff")
    r_fa2, r_cud, r_cud128 = [], [], []
    for r in rows:
        fa2, cud = r.get("fa2", float("nan")), r.get("cudnn", float("nan"))
        a, c = r["seqpar"] / fa2, r["seqpar"] / cud
        if math.isfinite(a):
            r_fa2.append(a)
        if math.isfinite(c):
            r_cud.append(c)
            if r["d"] == 128:
                r_cud128.append(c)
        print(f"{r['dtype']:5s} {r['d']:3d} {r['N']:6d} {r['causal']:5d} {r['seqpar']:7.1f} "
              f"{fa2:6.1f} {cud:6.1f} {a:5.2f} {c:6.2f}  {r.get('diff', float('nan')):.1e}")
    gm = lambda xs: math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")  # noqa
    print(f"geomean seqpar/FA2 = {gm(r_fa2):.3f}   seqpar/cuDNN = {gm(r_cud):.3f}   "
          f"seqpar/cuDNN (d=128) = {gm(r_cud128):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
