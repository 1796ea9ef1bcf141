"""seqpar run (seqpar.launch): which mpiexec, which flags, the command printed, the status.

No test here starts MPI: a fake mpiexec (a shell script) stands in, so every rank of a
suite run under mpiexec may run these on its own.
"""
from __future__ import annotations

import io
import os
import shlex
import shutil
import stat
import sys
import tempfile

import pytest

from seqpar import launch
from seqpar.launch import LaunchError, MPIExec, find_mpiexec, mpiexec_command, slots

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
