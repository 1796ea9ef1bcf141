#!/usr/bin/env bash
# The test suite at 1, 2, 3 and 4 MPI ranks (SEQPAR_TEST_RANKS overrides the list).
# Ranks may outnumber cores: mpiexec is asked to oversubscribe.
set -u
cd "$(dirname "$0")/.."
for n in ${SEQPAR_TEST_RANKS:-1 2 3 4}; do
  echo "== pytest at $n rank(s)"
  mpiexec --oversubscribe -n "$n" python -m pytest --with-mpi -q -p no:cacheprovider tests "$@"
  status=$?
  if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests at $n rank(s): the suite is missing" >&2
    exit 5
  fi
  [ "$status" -eq 0 ] || exit "$status"
done
