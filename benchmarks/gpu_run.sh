#!/bin/bash
# One device call: environment probe, kernel build report, tests, benchmark.
# Usage on the GPU machine, from the repo root:  bash benchmarks/gpu_run.sh [tests|bench|all] [bench args]
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
what=${1:-all}; shift
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
python3 - <<'PY' 2>&1 | tee $OUT/probe.log
import time, numpy as np, ml_dtypes, cupy
a = cupy.asarray(np.ones(4, ml_dtypes.bfloat16)); print("cupy bf16 asarray ok:", a.dtype, a.get())
from seqpar.local import cupy_kernel
for kind in ("bf16", "f16", "f32"):
    for d in (64, 128):
        t = time.perf_counter(); cupy_kernel._kernel(kind, d, 0); print(f"compile {kind} d={d}: {time.perf_counter()-t:.2f}s")
t = time.perf_counter(); cupy_kernel._kernel("bf16", 128, 0); print(f"cached lookup: {time.perf_counter()-t:.6f}s")
q = cupy.ones((1, 64, 2, 64), np.float16); cupy_kernel.forward(q, q, q, scale=0.1); cupy.cuda.Device().synchronize()
t = time.perf_counter()
for _ in range(1000): cupy_kernel.forward(q, q, q, scale=0.1)
cupy.cuda.Device().synchronize(); print(f"host time per forward() call, tiny input: {(time.perf_counter()-t)*1e3:.1f} us")
PY
if [ "$what" = tests ] || [ "$what" = all ]; then
  python3 -m pytest -q -x tests/test_gpu_kernel.py -p no:cacheprovider 2>&1 | tee $OUT/tests.log | tail -25
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 benchmarks/gpu_attention.py --json $OUT/bench.json "$@" 2>&1 | tee $OUT/bench.log
fi
