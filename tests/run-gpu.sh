#!/usr/bin/env bash
# The GPU tests (marked gpu), on a machine with CUDA devices: the kernel tests on one
# rank, the strategies and transports on 1 and 2 ranks (2 ranks share one GPU where
# there is one: NCCL is then left out and the staged transport carries the ring).
# Ranks start through `python -m seqpar run` (the flags of the mpiexec on PATH, or of
# $MPIEXEC; Python as `python -m mpi4py`, so a failing rank ends the job).
set -u
cd "$(dirname "$0")/.."
python=${PYTHON:-$(command -v python || command -v python3)}
"$python" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_kernel.py tests/test_gpu_kernel_sm90.py \
  tests/test_gpu_decode.py tests/test_gpu_backward.py "$@" || exit
for n in 1 2; do
  echo "== GPU strategies and transports at $n rank(s)"
  "$python" -m seqpar run -n "$n" -m pytest --with-mpi -q -p no:cacheprovider \
    -m gpu tests/test_gpu_strategies.py tests/test_gpu_transport.py tests/test_interop.py "$@" || exit
done
