"""seqpar run (seqpar.launch): which mpiexec, which flags, the command printed, the status,
refused rank counts and options, and the job ending with the launcher.

Most tests start no MPI: a fake mpiexec (a shell script) stands in, so every rank of a
suite run under mpiexec may run these on its own. The tests of signals start real 2-rank
jobs of a sleeping script, on rank 0 of the suite's run only.
"""
from __future__ import annotations

import glob
import io
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import warnings

import pytest

from seqpar import launch
from seqpar.launch import LaunchError, MPIExec, find_mpiexec, mpiexec_command, slots

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VERSIONS = {
    "openmpi": "mpiexec (Open MPI) 5.0.11\n\nReport bugs to https://www.open-mpi.org/",
    "openmpi4": "mpiexec (OpenRTE) 4.1.5\n\nReport bugs to http://www.open-mpi.org/community/help/",
    "mpich": "HYDRA build details:\n    Version:                                 4.2.0\n"
             "    Release Date:                            Fri Feb  9 12:29:21 CST 2024",
    "intel": "Intel(R) MPI Library for Linux* OS, Version 2021.10 Build 20230619",
    "other": "some launcher 1.0",
}
FLAVOR = {"openmpi": "openmpi", "openmpi4": "openmpi", "mpich": "mpich", "intel": "mpich",
          "other": "other"}


@pytest.fixture
def folder():
    path = tempfile.mkdtemp(prefix="seqpar-launch-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def fake_mpiexec(folder: str, version: str, status: int = 0) -> str:
    """A script that prints ``version`` for --version, else records its arguments; exits.

    Shell builtins only: tests run it with PATH holding nothing else.
    """
    path = os.path.join(folder, "mpiexec")
    with open(path, "w") as script:
        script.write("#!/bin/sh\n"
                     f"if [ \"$1\" = --version ]; then printf '%s\\n' {shlex.quote(version)}; "
                     "exit 0; fi\n"
                     f"echo \"ran: $*\" > {shlex.quote(folder)}/ran\nexit {status}\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return path


@pytest.mark.parametrize("name", sorted(VERSIONS))
def test_flavor_from_version(folder, name):
    found = find_mpiexec(fake_mpiexec(folder, VERSIONS[name]))
    assert found.flavor == FLAVOR[name]
    assert found.version == ("MPICH Hydra 4.2.0" if name == "mpich"
                             else VERSIONS[name].splitlines()[0])


def test_path_then_beside_python(folder, monkeypatch):
    fake_mpiexec(folder, VERSIONS["mpich"])
    monkeypatch.delenv("MPIEXEC", raising=False)
    monkeypatch.setenv("PATH", folder)
    assert find_mpiexec() == MPIExec("mpiexec", "mpich", "MPICH Hydra 4.2.0")
    # not on PATH: the one installed beside this Python (a venv not activated)
    monkeypatch.setenv("PATH", os.path.join(folder, "nothing-here"))
    monkeypatch.setattr(sys, "executable", os.path.join(folder, "python"))
    assert find_mpiexec().path == os.path.join(folder, "mpiexec")


def test_no_mpiexec_says_how_to_get_one(folder, monkeypatch):
    monkeypatch.delenv("MPIEXEC", raising=False)
    monkeypatch.setenv("PATH", folder)
    monkeypatch.setattr(launch, "_beside_python", lambda name: None)
    with pytest.raises(LaunchError, match=r'pip install "seqpar\[mpi\]".*pip install mpich'
                                          r".*cluster's MPI module") as info:
        find_mpiexec()
    assert info.value.status == 127 and "\n" not in str(info.value)
    with pytest.raises(LaunchError, match="not found"):
        find_mpiexec(os.path.join(folder, "no-such-mpiexec"))


def test_explicit_launcher_keeps_its_options(folder, monkeypatch):
    path = fake_mpiexec(folder, VERSIONS["other"])
    monkeypatch.setenv("MPIEXEC", f"{path} --mpi=pmi2")
    found = find_mpiexec()
    assert found.options == ("--mpi=pmi2",)
    command = mpiexec_command(found, 2, ["x.py"], python="py", as_root=True, slots_here=1)
    assert command == [path, "--mpi=pmi2", "-n", "2", "py", "-m", "mpi4py", "x.py"]


@pytest.mark.parametrize("as_root", [False, True])
@pytest.mark.parametrize("nprocs", [1, 2, 3])
def test_openmpi_flags_only_where_needed(as_root, nprocs):
    mpiexec = MPIExec("mpiexec", "openmpi", "mpiexec (Open MPI) 5.0.11")
    command = mpiexec_command(mpiexec, nprocs, ["-m", "pytest", "-q"], python="/venv/python",
                              as_root=as_root, slots_here=2)
    flags = ["--allow-run-as-root"] * as_root + ["--oversubscribe"] * (nprocs > 2)
    assert command == ["mpiexec", *flags, "-n", str(nprocs), "/venv/python", "-m", "mpi4py",
                       "-m", "pytest", "-q"]


@pytest.mark.parametrize("flavor", ["mpich", "other"])
def test_mpich_needs_no_flags(flavor):
    command = mpiexec_command(MPIExec("mpiexec", flavor, "v"), 8, ["x.py", "--causal"],
                              as_root=True, slots_here=2, mpiexec_args=["-hosts", "a,b"])
    assert command == ["mpiexec", "-hosts", "a,b", "-n", "8", sys.executable, "-m", "mpi4py",
                       "x.py", "--causal"]


@pytest.mark.parametrize("flavor", ["openmpi", "mpich"])
@pytest.mark.parametrize("cpus, nprocs, threads", [(2, 1, 2), (2, 2, 1), (2, 4, 1),
                                                   (16, 3, 5), (16, 4, 4), (1, 1, 1)])
def test_ranks_share_the_cores(flavor, cpus, nprocs, threads):
    options, variables, chosen = launch.rank_threads(MPIExec("mpiexec", flavor, "v"), nprocs,
                                                     cpus=cpus, environ={})
    assert chosen == threads and chosen * nprocs <= max(cpus, nprocs)
    assert variables == {"SEQPAR_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    # Open MPI would bind each rank to one core; MPICH binds nothing by default
    assert options == (["--bind-to", "none"] if flavor == "openmpi" else [])


def test_the_users_threads_and_binding_are_kept():
    openmpi = MPIExec("mpiexec", "openmpi", "v")
    options, variables, threads = launch.rank_threads(
        openmpi, 2, cpus=8, environ={"SEQPAR_NUM_THREADS": "3", "OMP_NUM_THREADS": "1"},
        mpiexec_args=["--map-by", "slot:PE=4", "--bind-to", "core"])
    assert (options, variables, threads) == ([], {}, 3)
    options, variables, _ = launch.rank_threads(openmpi, 2, cpus=8,
                                                environ={"OMP_NUM_THREADS": "2"})
    assert variables == {"SEQPAR_NUM_THREADS": "2"}


@pytest.mark.parametrize("launcher, args", [(MPIExec("srun", "other", "slurm 23"), []),
                                            (MPIExec("mpiexec", "mpich", "v"), ["-f", "hosts"])])
def test_ranks_elsewhere_are_left_to_run_time(launcher, args):
    assert launch.rank_threads(launcher, 4, cpus=2, environ={}, mpiexec_args=args) == ([], {}, 0)


def test_at_least_one_rank():
    with pytest.raises(LaunchError, match="at least 1"):
        mpiexec_command(MPIExec("mpiexec", "mpich", "v"), 0, ["x.py"])


def test_slots_inside_and_outside_slurm():
    assert slots({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "6"}) == 6
    assert 1 <= slots({}) <= (os.cpu_count() or 1)


def test_launch_prints_the_command_and_returns_its_status(folder, monkeypatch):
    monkeypatch.setenv("MPIEXEC", fake_mpiexec(folder, VERSIONS["mpich"], status=3))
    script = os.path.join(folder, "job.py")
    open(script, "w").close()
    printed = io.StringIO()
    assert launch.launch([script, "--seq", "64"], 2, stream=printed) == 3
    line = printed.getvalue()
    assert line.startswith("+ ") and line.endswith(f"-n 2 {sys.executable} -m mpi4py "
                                                   f"{script} --seq 64\n")
    with open(os.path.join(folder, "ran")) as ran:
        assert ran.read().strip() == f"ran: -n 2 {sys.executable} -m mpi4py {script} --seq 64"


def test_command_line_splits_options_from_the_program(folder, monkeypatch, capsys):
    monkeypatch.setenv("MPIEXEC", fake_mpiexec(folder, VERSIONS["mpich"]))
    assert launch.main(["-n", "3", "--dry-run", "-m", "seqpar", "check", "-n", "9"]) == 0
    assert capsys.readouterr().err.endswith(
        f"-n 3 {sys.executable} -m mpi4py -m seqpar check -n 9\n")
    assert launch.main(["-n4", "--dry-run", "--", "-c", "print(1)"]) == 0
    assert capsys.readouterr().err.endswith("-n 4 " + sys.executable + " -m mpi4py -c 'print(1)'\n")
    assert not os.path.exists(os.path.join(folder, "ran"))  # --dry-run ran nothing


@pytest.mark.parametrize("program, message", [
    ([], "nothing to run"), (["-m"], "-m needs an argument"),
    (["--bogus", "x.py"], "unknown option"), (["missing.py"], "missing.py: no such file")])
def test_bad_programs_are_one_line_errors(folder, monkeypatch, capsys, program, message):
    monkeypatch.setenv("MPIEXEC", fake_mpiexec(folder, VERSIONS["mpich"]))
    monkeypatch.chdir(folder)
    assert launch.main(["-n", "2", *program]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seqpar run: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("version, library, refused", [
    ("openmpi", "MPICH Version:      5.0.2", True),
    ("mpich", "Open MPI v5.0.11, package: Open MPI", True),
    ("openmpi", "Open MPI v5.0.11, package: Open MPI", False),
    ("intel", "MPICH Version:      4.1", False),
    ("other", "MPICH Version:      5.0.2", False)])
def test_mpiexec_of_another_mpi_than_mpi4py_is_refused(folder, monkeypatch, version, library,
                                                       refused):
    monkeypatch.setenv("MPIEXEC", fake_mpiexec(folder, VERSIONS[version]))
    script = os.path.join(folder, "job.py")
    open(script, "w").close()
    if refused:
        with pytest.raises(LaunchError, match="each rank would run alone"):
            launch.launch([script], 2, dry_run=True, stream=io.StringIO(), library=library)
    else:
        assert launch.launch([script], 2, dry_run=True, stream=io.StringIO(),
                             library=library) == 0


# -- refused rank counts and options ----------------------------------------------------

def test_far_more_ranks_than_cpus_is_refused(folder, monkeypatch, capsys):
    monkeypatch.setenv("MPIEXEC", fake_mpiexec(folder, VERSIONS["openmpi"]))
    monkeypatch.setattr(launch, "usable_cpus", lambda: 2)
    monkeypatch.setattr(launch, "slots", lambda: 2)
    script = os.path.join(folder, "job.py")
    open(script, "w").close()
    limit = launch.MAX_RANKS_PER_CPU * 2
    assert launch.main(["-n", str(limit + 1), script]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"seqpar run: -n {limit + 1} is more than")
    assert "2 CPUs" in err and "--oversubscribe-ok" in err
    assert not os.path.exists(os.path.join(folder, "ran"))
    # moderate oversubscription (the test suite: 4 ranks on 2 cores) needs no flag
    assert launch.main(["-n", str(limit), script]) == 0
    assert capsys.readouterr().err.startswith("+ ")
    with open(os.path.join(folder, "ran")) as ran:
        line = ran.read()
        assert "--oversubscribe " in line and f" -n {limit} " in line
    # the override, and ranks placed on other hosts, start whatever was asked for
    for flags in (["--oversubscribe-ok"], ["--mpiexec-args", "--hostfile hosts.txt"],
                  ["--mpiexec-args=-H a:64,b:64"]):
        assert launch.main(["-n", "999", "--dry-run", *flags, script]) == 0
        assert capsys.readouterr().err.startswith("+ ")


@pytest.mark.parametrize("argv, message", [
    (["-n", "0"], "argument -n/-np/--np: must be at least 1, got 0"),
    (["-n", "-3"], "argument -n/-np/--np: must be at least 1, got -3"),
    (["-n", "two"], "argument -n/-np/--np: must be a whole number, got 'two'"),
    (["-n", "2", "--mpiexec-args", "'x"], "argument --mpiexec-args: \"'x\": no closing quotation"),
    (["-n", "2", "--mpiexec", "mpiexec 'x"], "argument --mpiexec: \"mpiexec 'x\": no closing"),
    (["-n", "2", "--mpiexec", " "], "argument --mpiexec: is blank")])
def test_bad_options_are_usage_errors(folder, monkeypatch, capsys, argv, message):
    monkeypatch.setenv("MPIEXEC", fake_mpiexec(folder, VERSIONS["mpich"]))
    script = os.path.join(folder, "job.py")
    open(script, "w").close()
    with pytest.raises(SystemExit) as done:
        launch.main([*argv, script])
    assert done.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"python -m seqpar run: error: {message}")
    assert "Traceback" not in err and not os.path.exists(os.path.join(folder, "ran"))


def test_mpiexec_variable_with_unpaired_quotes(monkeypatch):
    monkeypatch.setenv("MPIEXEC", "srun --mpi='pmix")
    with pytest.raises(LaunchError, match="MPIEXEC \"srun --mpi='pmix\": no closing quotation"):
        find_mpiexec()


# -- the job ends with the launcher ----------------------------------------------------

# Each rank writes its pid (and a stubborn rank that of its daemon), then sleeps. A stubborn
# rank ignores SIGTERM and SIGINT and starts a daemon in a session of its own, which mpiexec
# does not know of and which ignores them too.
RANK_SCRIPT = """\
import os, signal, subprocess, sys, time
folder, stubborn = sys.argv[1], sys.argv[2] == "stubborn"
pids = [os.getpid()]
if stubborn:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    pids.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                 start_new_session=True).pid)
path = os.path.join(folder, str(os.getpid()))
with open(path + ".tmp", "w") as out:
    out.write(" ".join(map(str, pids)))
os.replace(path + ".tmp", path + ".pids")
time.sleep(600)
"""
STARTUP_S = 120  # two Python ranks on a busy machine
GONE_S = launch.GRACE_S + 8  # "promptly", with room for a loaded machine


def _on_rank_0_only():
    """The signal tests start MPI jobs: once per suite run, not once per rank."""
    from mpi4py import MPI

    if MPI.COMM_WORLD.rank != 0:
        pytest.skip("starts MPI jobs: rank 0 runs it")


def _job_environment() -> dict:
    """This environment less the MPI job's own variables (a suite run under mpiexec), so
    the job started here is a job of its own."""
    mpi_vars = re.compile(r"^(OMPI_|PMIX_|PMI_|PRTE_|HYDRA_|HYDI_|HYD_|MPIR_|MPI_LOCAL)")
    env = {key: value for key, value in os.environ.items() if not mpi_vars.match(key)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    return env


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat_file:  # a zombie has ended: state Z
            return stat_file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class _Job:
    """``python -m seqpar run -n 2 RANK_SCRIPT`` started as a subprocess; the pids it wrote."""

    def __init__(self, folder: str, stubborn: bool):
        script = os.path.join(folder, "ranks.py")
        with open(script, "w") as out:
            out.write(RANK_SCRIPT)
        self.folder = folder
        self.pids: list[int] = []
        self.said = ""  # the launcher's stderr, once it has ended
        command = [sys.executable, "-m", "seqpar", "run", "-n", "2", script, folder,
                   "stubborn" if stubborn else "plain"]
        # these tests are about ending a job; a launch that failed before its ranks ran
        # (once in a CI run: mpiexec on an oversubscribed machine) is started once more,
        # with a warning that carries what the launcher said
        for attempt in range(2):
            if self._start(command):
                return
            if attempt == 0 and self.launcher.returncode not in (None, -signal.SIGKILL):
                warnings.warn(f"seqpar run ended (status {self.launcher.returncode}) before "
                              f"its ranks started; starting it again. It said: {self.said}")
                continue
            break
        pytest.fail(f"the job did not start (launcher status {self.launcher.returncode}): "
                    f"{self.said}")

    def _start(self, command: list[str]) -> bool:
        """Start the launcher; True once both ranks wrote their pids, else (the launcher
        ended, or STARTUP_S passed) False with everything it started killed."""
        for name in glob.glob(os.path.join(self.folder, "*.pids")):
            os.remove(name)
        self.launcher = subprocess.Popen(
            command, cwd=REPO, env=_job_environment(), stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
            # a Python started by pytest has SIGINT as Python's handler, which exec
            # resets; a pytest started in the background by a shell may ignore it
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline and self.launcher.poll() is None:
            files = glob.glob(os.path.join(self.folder, "*.pids"))
            if len(files) == 2:
                for name in files:
                    with open(name) as pids:
                        self.pids += [int(pid) for pid in pids.read().split()]
                return True
            time.sleep(0.05)
        for name in glob.glob(os.path.join(self.folder, "*.pids")):  # a rank that did start
            with open(name) as pids:
                self.pids += [int(pid) for pid in pids.read().split()]
        self.close()
        return False

    def wait_gone(self, timeout: float) -> list[int]:
        """The job's processes still alive after waiting up to ``timeout`` s for them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            alive = [pid for pid in self.pids if _alive(pid)]
            if not alive and self.launcher.poll() is not None:
                return []
            time.sleep(0.05)
        return [pid for pid in self.pids if _alive(pid)] + (
            [self.launcher.pid] if self.launcher.poll() is None else [])

    def stderr(self) -> str:
        self.launcher.wait(timeout=30)
        return self.launcher.stderr.read()

    def close(self) -> None:
        """Whatever a failed test left running: killed."""
        for pid in [*self.pids, self.launcher.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        self.launcher.wait()
        if not self.launcher.stderr.closed:
            self.said = self.launcher.stderr.read()
            self.launcher.stderr.close()


@pytest.fixture
def job(folder):
    _on_rank_0_only()
    jobs = []

    def start(stubborn: bool = False) -> _Job:
        jobs.append(_Job(folder, stubborn))
        return jobs[-1]

    yield start
    for started in jobs:
        started.close()


@pytest.mark.parametrize("signum, stubborn", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["SIGTERM", "SIGINT-stubborn"])
def test_a_signal_to_the_launcher_ends_the_whole_job(job, signum, stubborn):
    started = job(stubborn)
    started.launcher.send_signal(signum)
    assert started.wait_gone(GONE_S) == []
    assert started.launcher.returncode == 128 + signum
    err = started.stderr()
    if stubborn:  # the ranks and their daemons ignored it: killed after the grace period
        assert f"seqpar run: {signal.Signals(signum).name}, not ended {launch.GRACE_S:g} s " \
               "later: killed " in err


def test_a_second_signal_kills_at_once(job):
    started = job(stubborn=True)
    started.launcher.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    started.launcher.send_signal(signal.SIGTERM)
    assert started.wait_gone(GONE_S) == []
    assert started.launcher.returncode == 128 + signal.SIGTERM
    assert "seqpar run: a second signal: killed " in started.stderr()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("stubborn", [False, True], ids=["plain", "stubborn"])
def test_a_killed_launcher_leaves_nothing_running(job, stubborn):
    started = job(stubborn)
    started.launcher.send_signal(signal.SIGKILL)
    assert started.wait_gone(GONE_S) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_mpiexec_gets_sigterm_when_the_launcher_dies():
    # a parent that starts `sleep` as launch() starts mpiexec, then is killed outright
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys\n"
         "sys.path.insert(0, 'seqpar')  # launch.py alone: no NumPy to import\n"
         "from launch import _ends_with_this_thread\n"
         "child = subprocess.Popen(['sleep', '600'], preexec_fn=_ends_with_this_thread())\n"
         "print(child.pid, flush=True)\nchild.wait()"],
        cwd=REPO, env=_job_environment(), stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + GONE_S
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(child)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
        parent.stdout.close()
