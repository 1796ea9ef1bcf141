#!/usr/bin/env bash
# The GPU tests (marked gpu), on a machine with CUDA devices: the kernel tests on one
# rank, the strategies on 1 and 2 ranks (2 ranks share one GPU where there is one).
set -u
cd "$(dirname "$0")/.."
mpiexec=${MPIEXEC:-mpiexec}
python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_kernel.py "$@" || exit
for n in 1 2; do
  echo "== GPU strategies at $n rank(s)"
  $mpiexec --oversubscribe -n "$n" python -m pytest --with-mpi -q -p no:cacheprovider \
    -m gpu tests/test_gpu_strategies.py "$@" || exit
done
