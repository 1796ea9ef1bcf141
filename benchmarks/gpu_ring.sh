#!/usr/bin/env bash
# Ring attention on 2 GPUs vs 1, per transport, and vs PyTorch's context parallel,
# in one invocation on one machine (2 x H200 here). Results go to $OUT (or ./out).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-out}; mkdir -p "$out"
mpiexec=${MPIEXEC:-mpiexec}
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
seqs=${SEQS:-32768,131072,524288}
big=${BIG:-1048576}
run() { echo "== $*" >&2; "$@" | tee -a "$out/gpu_ring.jsonl"; }
run $mpiexec -n 1 python benchmarks/gpu_ring.py run --seq "$seqs"
run $mpiexec -n 2 python benchmarks/gpu_ring.py run --seq "$seqs,$big" --bandwidth nccl,staged
run $mpiexec -n 2 python benchmarks/gpu_ring.py run --seq 131072 --transport staged
run torchrun --nproc-per-node 1 benchmarks/torch_cp.py --seq 32768,131072
run torchrun --nproc-per-node 2 benchmarks/torch_cp.py --seq 32768,131072
if [ -n "${LONGEST:-}" ]; then
  run $mpiexec -n 2 python benchmarks/gpu_ring.py run --seq "$LONGEST" --heads 8 --causal 1 \
    --max-repeats 1
fi
python benchmarks/gpu_ring.py table "$out/gpu_ring.jsonl" | tee "$out/gpu_ring.md"
