#!/usr/bin/env bash
# The GPU tests (marked gpu), on a machine with CUDA devices: the kernel tests on one
# rank, the strategies and transports on 1 and 2 ranks (2 ranks share one GPU where
# there is one: NCCL is then left out and the staged transport carries the ring).
set -u
cd "$(dirname "$0")/.."
mpiexec=${MPIEXEC:-mpiexec}
python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_kernel.py "$@" || exit
for n in 1 2; do
  echo "== GPU strategies and transports at $n rank(s)"
  $mpiexec --oversubscribe -n "$n" python -m pytest --with-mpi -q -p no:cacheprovider \
    -m gpu tests/test_gpu_strategies.py tests/test_gpu_transport.py "$@" || exit
done
