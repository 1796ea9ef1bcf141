#!/usr/bin/env bash
# The test suite at 1, 2, 3 and 4 MPI ranks (SEQPAR_TEST_RANKS overrides the list).
#
# `python -m seqpar run` starts each run with the mpiexec on PATH and adds what that MPI
# needs here (Open MPI: --allow-run-as-root as root, --oversubscribe beyond the cores;
# MPICH: nothing), printing the command it runs. Ranks run `python -m mpi4py -m pytest`,
# so a rank that dies aborts the job instead of leaving the others waiting.
# Rank 0 prints pytest's report; the other ranks print only their failures
# (SEQPAR_TEST_VERBOSE_RANKS=1: every rank's full report). PYTHON picks the interpreter.
set -u
cd "$(dirname "$0")/.."
python=${PYTHON:-$(command -v python || command -v python3)}
color=no
[ -t 1 ] && color=yes   # mpiexec hands ranks a terminal-like stdout: colour only for a person
for n in ${SEQPAR_TEST_RANKS:-1 2 3 4}; do
  echo "== pytest at $n rank(s)"
  "$python" -m seqpar run -n "$n" -m pytest --with-mpi -q -p no:cacheprovider \
    --color="$color" tests "$@"
  status=$?
  if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests at $n rank(s): the suite is missing" >&2
    exit 5
  fi
  [ "$status" -eq 0 ] || exit "$status"
done
