"""Tile-config sweep of the fp16/bf16 kernel (seqpar only, no torch); for the notes.

    PYTHONPATH=. python3 benchmarks/gpu_sweep.py "128:8,64,2,1;4,64,2,2" "64:8,64,2,1"
Each variant's output is compared with the first variant's (relative difference).
"""
import math
import sys
import time

import cupy
import ml_dtypes
import numpy as np

sys.path.insert(0, "benchmarks")
from gpu_attention import _time  # noqa: E402

from seqpar.local import cupy_kernel  # noqa: E402

n, h = 16384, 16
for spec in sys.argv[1:]:
    d, cfgs = spec.split(":")
    d = int(d)
    rs = cupy.random.RandomState(d)
    q, k, v = (rs.standard_normal((1, n, h, d), dtype=np.float32).astype(ml_dtypes.bfloat16)
               for _ in range(3))
    base = {}
    for cfg in cfgs.split(";"):
        cfg = tuple(int(x) for x in cfg.split(","))
        cupy_kernel._MMA_CONFIG[d] = cfg
        t0 = time.perf_counter()
        try:
            cupy_kernel._kernel("bf16", d, 0, cfg)
        except Exception as exc:
            print(f"d={d} cfg={cfg} compile failed: {exc}"[:300], flush=True)
            continue
        tc = time.perf_counter() - t0
        res = []
        for causal in (0, 1):
            out = cupy.empty_like(q)
            t = _time(lambda: cupy_kernel.forward(q, k, v, scale=1 / math.sqrt(d), causal=bool(causal), out=out), 10)
            o = out.astype(np.float32)
            if causal not in base:
                base[causal] = o
            diff = float(cupy.linalg.norm(o - base[causal]) / cupy.linalg.norm(base[causal]))
            fl = 4.0 * n * n * d * h / (2 if causal else 1)
            res.append(f"causal={causal}: {fl / t / 1e12:6.1f} TF/s (diff {diff:.1e})")
        print(f"d={d} cfg={cfg} compile {tc:.1f}s  " + "  ".join(res), flush=True)
