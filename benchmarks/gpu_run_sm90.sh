#!/usr/bin/env bash
# One device call for the Hopper forward kernel, layer by layer, each step in its
# own process with a time limit (an illegal instruction poisons the CUDA context of
# its process; a deadlocked kernel is ended by the limit):
#   1. environment (GPU, clocks, versions)
#   2. resource report and SASS of the kernel (nvcc + cuobjdump): HGMMA count
#   3. probes: wgmma SS, wgmma RS (N = 128 and 64), TMA (CuPy launch and
#      cuda.bindings launch); rs-swap only if rs fails (descriptor diagnosis)
#   4. tests/test_gpu_kernel_sm90.py (verbose, 90 s per test)
#   5. benchmark vs cuDNN / FLASH (+ the tile-configuration sweep)
# Logs under $OUT (probes.log, build.log, tests.log, bench.log, bench_sm90.jsonl;
# probe arrays only when a probe fails); a short table last.
#
#   OUT=/tmp/out bash benchmarks/gpu_run_sm90.sh [quick]
set -u
OUT=${OUT:-/tmp/sm90_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
QUICK=${1:-}
declare -a SUMMARY

step() {  # step NAME LIMIT_S LOGFILE CMD...
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$SECONDS
  echo "=== $name" >> "$OUT/$log"
  timeout -k 10 "$limit" "$@" >> "$OUT/$log" 2>&1
  local rc=$?
  SUMMARY+=("$(printf '%-12s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
  return $rc
}

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv
  python3 -c "import cupy, numpy, torch, cuda.bindings as cb; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'torch', torch.__version__, 'cuda.bindings', cb.__version__)"
  nvcc --version | tail -1
} > "$OUT/probes.log" 2>&1

# 2. SASS (offline build of the shipped instantiations)
step sass 120 build.log bash -c '
  nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a -cubin -Xptxas -v \
    -DSEQPAR_SM90_INSTANTIATE -Ikernels -o /tmp/fwd90.cubin kernels/flash_forward_sm90.cu &&
  cuobjdump -sass /tmp/fwd90.cubin > /tmp/fwd90.sass &&
  echo "HGMMA per kernel:" && awk "/Function :/{f=\$3} /HGMMA/{c[f]++} END{for (k in c) print c[k], k}" /tmp/fwd90.sass &&
  grep -o "HGMMA[^ ]*" /tmp/fwd90.sass | sort | uniq -c &&
  echo "local-memory ops: $(grep -c "LDL\|STL" /tmp/fwd90.sass)"'

# 3. probes
for p in ss rs rs64 tma tma-driver; do
  step "probe-$p" 60 probes.log python3 benchmarks/sm90_probe.py "$p" --out "$OUT"
done
# which reading of the transposed V descriptor the hardware has, should `rs` fail
# (the kernel assumes the one `rs` checks)
if ! grep -q '"probe": "rs", "ok": true' "$OUT/probes.log"; then
  step probe-rs-swap 60 probes.log python3 benchmarks/sm90_probe.py rs-swap --out "$OUT"
fi
# launch through cuda.bindings when CuPy cannot pass the tensor maps
if ! grep -q '"probe": "tma", "ok": true' "$OUT/probes.log" &&
   grep -q '"probe": "tma-driver", "ok": true' "$OUT/probes.log"; then
  export SEQPAR_SM90_LAUNCH=driver
  echo "tma failed, tma-driver passed: SEQPAR_SM90_LAUNCH=driver for the tests and the benchmark" >> "$OUT/probes.log"
fi
# keep the arrays of failed probes only
for f in "$OUT"/probe_*.npz; do
  [ -e "$f" ] || continue
  p=$(basename "$f" .npz); p=${p#probe_}
  grep -q "\"probe\": \"$p\", \"ok\": true" "$OUT/probes.log" && rm -f "$f"
done
# at most 8 files come back: 5 logs and 3 probe arrays
ls "$OUT"/probe_*.npz 2>/dev/null | tail -n +4 | xargs -r rm -f

# 4. tests
TIMEOUT_ARGS=()
python3 -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARGS=(--timeout=90 --timeout-method=thread)
step tests 300 tests.log python3 -m pytest -v -p no:cacheprovider "${TIMEOUT_ARGS[@]}" \
  --maxfail=20 tests/test_gpu_kernel_sm90.py

# 5. benchmark (not after a hang: a deadlocked kernel would only burn the time limit)
if grep -q "Timeout" "$OUT/tests.log"; then
  SUMMARY+=("bench        skipped: a test timed out (deadlock?)")
elif [ "$QUICK" = quick ]; then
  step bench 240 bench.log python3 benchmarks/gpu_attention_sm90.py --quick --out "$OUT"
else
  step bench 330 bench.log python3 benchmarks/gpu_attention_sm90.py --sweep --out "$OUT"
fi

echo
echo "==================== summary ===================="
grep -h "^NVIDIA\|^name\|cupy " "$OUT/probes.log" | head -3
grep -h "HGMMA per kernel" -A3 "$OUT/build.log" | head -4
grep -h "registers\|spill" "$OUT/build.log" | sort | uniq -c | head -6
grep -h '^{"probe"\|LAUNCH=' "$OUT/probes.log"
printf '%s\n' "${SUMMARY[@]}"
grep -hE "passed|failed|error" "$OUT/tests.log" | tail -3
grep -hE "^FAILED|Timeout" "$OUT/tests.log" | head -12
sed -n '/ dtype   d      N causal/,$p' "$OUT/bench.log"
