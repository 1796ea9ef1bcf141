"""seqpar.memory: which buffers a call allocated, the room the memory limits leave, and
the MemoryError raised before the call communicates instead of an OOM kill mid-call.

Plain unit tests (no MPI job): fake cgroup trees under tmp_path for the parsing and the
arithmetic, real pages for ``mincore``, and child processes under a real RLIMIT_AS
(always) and a real memory cgroup (``SEQPAR_TEST_CGROUP=1``, as root: it creates a
cgroup inside this process's own and removes it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import pytest

from seqpar import memory
from seqpar.strategies._prepare import prepare
from seqpar.strategies.ring import _block_buffers

MIB = 1 << 20
GIB = 1 << 30
MEMORY_PY = memory.__file__
REPO = os.path.dirname(os.path.dirname(MEMORY_PY))


@pytest.fixture
def probe(monkeypatch):
    """Install a probe of fake files as this process's: ``probe(cgroup_text,
    mountinfo_text, meminfo_path)``; the real one comes back afterwards."""
    def install(cgroup_text="", mountinfo_text="", meminfo="/nonexistent", threads=2):
        fake = memory._Probe(cgroup_text, mountinfo_text, meminfo=meminfo,
                             boot_id="test-boot", threads=threads)
        monkeypatch.setattr(memory, "_STATE", fake)
        return fake

    yield install
    memory.refresh()


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _meminfo(tmp_path, available_kib=100 * GIB // 1024, swap_kib=0):
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       {2 * available_kib} kB\nMemFree:        {available_kib} kB\n"
                    f"MemAvailable:   {available_kib} kB\nBuffers:        1 kB\n"
                    f"SwapTotal:      {swap_kib} kB\nSwapFree:       {swap_kib} kB\n")
    return str(path)


def _v2_tree(tmp_path, *, limit=GIB, current=768 * MIB):
    """A cgroup v2 mount with the limit on the job, the process two levels below."""
    root = tmp_path / "cg2"
    _write(root / "job" / "memory.max", f"{limit}\n")
    _write(root / "job" / "memory.current", f"{current}\n")
    for level in ("job/step", "job/step/task"):
        _write(root / level / "memory.max", "max\n")
        _write(root / level / "memory.current", f"{current // 2}\n")
    mountinfo = f"30 25 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    return root, "0::/job/step/task\n", mountinfo


# --- fresh_arrays: what a call allocated, never the caller's inputs ---

def test_fresh_arrays_of_a_ring_acquire_are_its_buffers_not_the_inputs(rng):
    q = rng.standard_normal((64, 4, 16)).astype(np.float32)          # 3-D: p.q is q[None]
    k = rng.standard_normal((64, 8, 16)).astype(np.float32)[:, ::2]  # not contiguous: copied
    v = rng.standard_normal((64, 4, 16)).astype(np.float32)          # contiguous: v[None] sent
    p = prepare(q, k, v, None)
    own = [np.ascontiguousarray(x) for x in (p.k, p.v)]
    buffers = _block_buffers(p, own, own[0].size, True)
    outs = (np.zeros(p.q.shape, dtype=p.accumulator), p.new_lse(p.q.shape[1]))
    resources = (p, own, buffers, outs)

    fresh = memory.fresh_arrays(resources, (q, k, v))

    kv_sets, (visiting, home) = buffers
    want = [own[0], *outs] + [b for s in kv_sets for b in s] + [b for s in visiting for b in s] \
        + list(home)
    assert sorted(map(id, fresh)) == sorted(map(id, want))
    assert own[1].base is v and not any(a is v or a is q or a is k.base for a in fresh)
    assert memory.fresh_bytes(resources, (q, k, v)) == sum(a.nbytes for a in want) > 0


def test_views_count_their_owner_once():
    owner = np.empty(1000)
    resources = (owner[:10], [owner[10:20].reshape(2, 5), {"all": owner}], owner.T[::3])
    assert [id(a) for a in memory.fresh_arrays(resources)] == [id(owner)]
    assert memory.fresh_bytes(resources) == owner.nbytes == 8000


def test_an_input_and_its_views_are_never_fresh(rng):
    big = rng.standard_normal((8, 100))
    window = big[2:6]  # the caller passes a view: its owner is the caller's too
    mine = np.zeros(50)
    resources = (window[None], np.ascontiguousarray(window), big[0], mine)
    fresh = memory.fresh_arrays(resources, inputs={"q": window})
    assert [id(a) for a in fresh] == [id(mine)]


def test_memory_numpy_did_not_allocate_is_skipped(tmp_path):
    mapped = np.memmap(tmp_path / "x.bin", dtype=np.float64, mode="w+", shape=(1000,))
    borrowed = np.frombuffer(bytearray(4096), dtype=np.uint8)

    class DeviceArray:  # what a CuPy array looks like to the walk: not a NumPy array
        nbytes = 1 << 40

    mine = np.ones(3)
    fresh = memory.fresh_arrays((mapped, mapped[::2], borrowed, DeviceArray(), np, 3.0, mine))
    assert [id(a) for a in fresh] == [id(mine)]


def test_nested_containers_dataclasses_and_cycles():
    @dataclass(frozen=True)
    class Held:
        array: object
        module: object = np

    first, second, third = np.empty(3), np.empty(5), np.empty(7)
    loop: list = [first]
    loop.append(loop)
    resources = {"a": Held(second), "b": (loop, [Held([third])])}
    assert {id(a) for a in memory.fresh_arrays(resources)} == {id(first), id(second), id(third)}
    assert memory.fresh_bytes(resources) == 8 * 15


# --- uncommitted_bytes: pages the first write will commit ---

def _fresh_mapping(size):
    """size bytes no page of which is resident yet: a new anonymous mapping (np.empty may
    reuse heap memory the process already wrote, once malloc's mmap threshold has grown)."""
    import mmap

    return np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8)


def test_uncommitted_bytes_counts_pages_not_yet_written():
    size = 32 * MIB
    a = _fresh_mapping(size)
    before = memory.uncommitted_bytes([a])
    assert size - 2 * MIB <= before <= size, before
    a[:size // 2] = 1  # commits the first half (in huge pages where the kernel uses them)
    half = memory.uncommitted_bytes([a])
    assert size // 2 - 4 * MIB <= half <= size // 2 + 4096, half
    a[size // 2:] = 2
    assert memory.uncommitted_bytes([a]) == 0
    assert int(a[-1]) == 2 and int(a[0]) == 1


# --- the limits, read from cgroup files ---

def test_cgroup_v2_limit_of_an_ancestor_is_found_and_read_per_call(tmp_path, probe):
    root, cgroup_text, mountinfo = _v2_tree(tmp_path)
    probe(cgroup_text, mountinfo, _meminfo(tmp_path))
    (cgroup,) = [x for x in memory.memory_limits() if x.kind == "cgroup v2 memory.max"]
    assert cgroup.where == str(root / "job")
    assert cgroup.headroom == GIB - 768 * MIB
    assert dict(cgroup.readings) == {"memory.max": GIB, "memory.current": 768 * MIB}
    (root / "job" / "memory.current").write_text(f"{900 * MIB}\n")  # the job grew
    (cgroup,) = [x for x in memory.memory_limits() if x.kind == "cgroup v2 memory.max"]
    assert cgroup.headroom == GIB - 900 * MIB
    (root / "job" / "memory.max").write_text("max\n")  # lifted
    assert [x.kind for x in memory.memory_limits()] == ["RAM"]


def test_precise_limits_count_clean_page_cache_as_room(tmp_path, probe):
    root, cgroup_text, mountinfo = _v2_tree(tmp_path)
    _write(root / "job" / "memory.stat",
           f"anon {300 * MIB}\nfile {500 * MIB}\nactive_file {200 * MIB}\n"
           f"inactive_file {300 * MIB}\nfile_dirty {40 * MIB}\nfile_writeback {10 * MIB}\n")
    probe(cgroup_text, mountinfo, _meminfo(tmp_path))
    quick = memory.memory_limits()[0]
    precise = memory.memory_limits(precise=True)[0]
    assert quick.headroom == 256 * MIB
    assert precise.headroom == 256 * MIB + 450 * MIB
    assert "reclaimable page cache 450 MiB" in precise.describe()


def test_cgroup_v1_hierarchy(tmp_path, probe):
    root = tmp_path / "memory"
    unlimited = "9223372036854771712\n"
    for level, limit, usage in (("", unlimited, 5 * GIB), ("slurm", unlimited, 3 * GIB),
                                ("slurm/job_7", f"{2 * GIB}\n", GIB + 512 * MIB),
                                ("slurm/job_7/step_0", unlimited, GIB)):
        _write(root / level / "memory.limit_in_bytes", limit)
        _write(root / level / "memory.usage_in_bytes", f"{usage}\n")
    _write(root / "slurm/job_7/memory.stat",
           f"cache 9\ntotal_active_file {64 * MIB}\ntotal_inactive_file {64 * MIB}\n"
           "total_dirty 0\ntotal_writeback 0\n")
    mountinfo = (f"35 31 0:32 / {tmp_path / 'cpu'} rw - cgroup cgroup rw,cpu\n"
                 f"36 31 0:33 / {root} rw,relatime - cgroup cgroup rw,memory\n")
    probe("5:cpu:/slurm\n4:memory:/slurm/job_7/step_0\n0::/\n", mountinfo, _meminfo(tmp_path))
    (v1,) = [x for x in memory.memory_limits() if x.kind.startswith("cgroup")]
    assert v1.kind == "cgroup v1 memory.limit_in_bytes" and v1.where == str(root / "slurm/job_7")
    assert v1.headroom == 512 * MIB
    assert memory.memory_limits(precise=True)[0].headroom == 640 * MIB


def test_cgroup_paths_inside_a_container_and_escaped_mount_points(tmp_path):
    point = tmp_path / "sys fs"  # mountinfo writes the space as \040
    _write(point / "memory.max", f"{GIB}\n")
    escaped = str(point).replace(" ", "\\040")
    # without a cgroup namespace the container's own cgroup is the mount's root
    mountinfo = f"41 31 0:38 /docker/abc {escaped} rw - cgroup2 cgroup2 rw\n"
    assert memory._limited_cgroups("0::/docker/abc\n", mountinfo) == [(2, str(point))]
    assert memory._cgroup_directories("0::/docker/abc/sub\n", mountinfo) == [
        (2, str(point / "sub")), (2, str(point))]


def test_ram_from_meminfo(tmp_path, probe):
    probe("", "", _meminfo(tmp_path, available_kib=4 * 1024 * 1024, swap_kib=1024 * 1024))
    (ram,) = memory.memory_limits()
    assert ram.kind == "RAM" and ram.headroom == 5 * GIB and ram.counts_fresh
    assert dict(ram.readings) == {"MemAvailable": 4 * GIB, "SwapFree": GIB}


def test_no_visible_limit_means_no_check(probe):
    probe("", "", "/nonexistent")
    assert memory.memory_limits() == ()
    memory.ensure_available(1 << 50)  # nothing to compare with: nothing raised


# --- ensure_available / ensure_fits: the MemoryError ---

def test_memory_error_names_the_bytes_and_the_limit(tmp_path, probe):
    root, cgroup_text, mountinfo = _v2_tree(tmp_path)
    probe(cgroup_text, mountinfo, _meminfo(tmp_path), threads=2)
    margin = memory.margin_bytes(100 * MIB)
    assert margin == 64 * MIB + 2 * 16 * MIB + 100 * MIB // 256
    memory.ensure_available(100 * MIB)  # 100 MiB + 96.4 MiB margin < 256 MiB left
    with pytest.raises(MemoryError) as error:
        memory.ensure_available(200 * MIB)
    text = str(error.value)
    assert text.startswith("this call needs 297 MiB of new memory (200 MiB of fresh buffers + "
                           "a margin of 96.8 MiB")
    assert (f"the cgroup v2 memory.max limit ({root / 'job'}: memory.max 1.00 GiB, "
            f"memory.current 768 MiB, reclaimable page cache 0 bytes) leaves 256 MiB") in text


def test_only_fresh_arrays_count_and_resident_pages_do_not(tmp_path, probe, rng):
    root, cgroup_text, mountinfo = _v2_tree(tmp_path, current=GIB - 200 * MIB)
    probe(cgroup_text, mountinfo, _meminfo(tmp_path), threads=1)
    q = rng.standard_normal((1 << 22,))  # 32 MiB, the caller's: never counted
    fresh = np.empty(128 * MIB, dtype=np.uint8)
    with pytest.raises(MemoryError, match="128 MiB of fresh buffers"):
        memory.ensure_fits((q, fresh), (q,))
    fresh[:] = 7  # now in memory (and in memory.current): committing it needs nothing more
    memory.ensure_fits((q, fresh), (q,))
    memory.ensure_fits((q, q[::2]), (q,))  # nothing fresh: nothing to check
    assert memory.demand((q,), (q,)) == memory.Demand(0, 0)
    assert int(fresh[-1]) == 7


def test_the_real_limits_of_this_machine():
    limits = memory.memory_limits()
    if not limits:
        pytest.skip("no memory limit is visible here")
    room = min(x.headroom for x in limits if x.counts_fresh)
    memory.ensure_available(MIB)
    with pytest.raises(MemoryError, match="leaves"):
        memory.ensure_available(room + (1 << 40))


# --- shortfall: ranks that share a limit add their needs ---

def _limit(kind, headroom, key):
    return memory.Limit(kind, headroom, (key << 3) | memory._CODES[kind])


def test_ranks_sharing_a_limit_add_up():
    node = _limit("cgroup v2 memory.max", 10 * GIB, 11)
    other_node = _limit("cgroup v2 memory.max", 10 * GIB, 12)
    demands = [memory.Demand(6 * GIB, 100 * MIB, (node,)),
               memory.Demand(6 * GIB, 100 * MIB, (node,)),
               memory.Demand(6 * GIB, 100 * MIB, (other_node,))]
    for alone in demands:
        assert memory.shortfall([alone]) is None
    message = memory.shortfall(demands)
    assert message.startswith("ranks 0, 1 share the cgroup v2 memory.max limit, which leaves "
                              "10.0 GiB: together their calls need 12.2 GiB of new memory")
    # through the agreement's fixed-size message: the same answer on every rank
    rows = np.stack([d.to_ints() for d in demands])
    assert memory.shortfall([memory.Demand.from_ints(r) for r in rows]) == message
    assert memory.shortfall(demands[1:]) is None


def test_the_least_headroom_of_a_shared_limit_counts():
    seen_early = _limit("RAM", 20 * GIB, 5)
    seen_late = _limit("RAM", 9 * GIB, 5)  # the same RAM, read after others committed
    demands = [memory.Demand(4 * GIB, 0, (seen_early,)), memory.Demand(4 * GIB, 0, (seen_late,))]
    assert memory.shortfall(demands) is None
    demands.append(memory.Demand(2 * GIB, 0, (seen_early,)))
    assert "leaves 9.00 GiB: together their calls need 10.0 GiB" in memory.shortfall(demands)


def test_rlimits_count_only_the_margin():
    address_space = _limit("RLIMIT_AS", 150 * MIB, 7)
    assert not address_space.counts_fresh
    assert memory.shortfall([memory.Demand(10 * GIB, 100 * MIB, (address_space,))]) is None
    message = memory.shortfall([memory.Demand(10 * GIB, 200 * MIB, (address_space,))])
    assert "the RLIMIT_AS limit" in message and "temporaries need about 200 MiB" in message


def test_to_ints_keeps_the_tightest_limits():
    limits = tuple(_limit("cgroup v1 memory.limit_in_bytes", h * GIB, i + 1)
                   for i, h in enumerate((9, 3, 7, 5, 1)))
    row = memory.Demand(GIB, MIB, limits).to_ints(slots=3)
    assert row.shape == (8,) and row.dtype == np.int64
    back = memory.Demand.from_ints(row)
    assert (back.need, back.margin) == (GIB, MIB)
    assert [x.headroom for x in back.limits] == [GIB, 3 * GIB, 5 * GIB]
    assert all(x.kind == "cgroup v1 memory.limit_in_bytes" for x in back.limits)
    assert memory.Demand.from_ints(memory.Demand(GIB, MIB).to_ints()).limits == ()


# --- child processes under real limits ---

_LOAD = """
import importlib.util, json, os, resource, sys
spec = importlib.util.spec_from_file_location("seqpar_memory", {path!r})
memory = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = memory
spec.loader.exec_module(memory)
import numpy as np
"""


def _run_child(script, *args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_under_rlimit_as_allocation_fails_eagerly_and_the_margin_is_checked():
    # RLIMIT_AS is charged when NumPy reserves the pages, so an array that does not fit
    # raises MemoryError at np.empty already (before the agreement); what the check adds
    # is the margin: the kernels' temporaries must still fit in what the limit leaves.
    script = _LOAD.format(path=MEMORY_PY) + textwrap.dedent("""
        size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (size + 64 * 2**20, resource.RLIM_INFINITY))
        result = {}
        try:
            np.empty(256 * 2**20, dtype=np.uint8)
            result["big"] = "allocated"
        except MemoryError as e:
            result["big"] = "MemoryError: " + str(e)
        fresh = np.empty(24 * 2**20, dtype=np.uint8)  # fits, leaving < the margin
        try:
            memory.ensure_fits((fresh,))
            result["check"] = "passed"
        except MemoryError as e:
            result["check"] = "MemoryError: " + str(e)
        print(json.dumps(result))
    """)
    done = _run_child(script)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["big"].startswith("MemoryError: Unable to allocate 256. MiB")
    assert result["check"].startswith("MemoryError: the call's buffers fit in the RLIMIT_AS")
    assert "temporaries need about" in result["check"]


_CGROUP_CHILD = """
import os, sys
cgroup, mode, mib = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
import numpy as np
import seqpar
from seqpar import memory
from seqpar.strategies import ring

heads = mib * 2**20 // (1024 * 128 * 4)
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1024, heads, 128), dtype=np.float32) for _ in range(3))
plain = ring.agree

def agree(comm, function, check, agree_on, acquire=None, share=()):
    def acquired(settings):  # what validation.agree would do right after acquire
        resources = acquire(settings)
        if mode == "checked":
            memory.ensure_fits(resources, (q, k, v))
        if mode == "touched":  # commit one byte per page before the agreement
            for a in memory.fresh_arrays(resources, (q, k, v)):
                flat = a.reshape(-1).view(np.uint8)
                flat[::4096] = flat[::4096]
        return resources
    return plain(comm, function, check, agree_on, acquired, share)

ring.agree = agree
try:
    out = seqpar.ring_attention(q, k, v)
    print("finished", float(np.abs(out).sum()) > 0)
except MemoryError as e:
    print("MemoryError:", e)
"""


def _own_memory_cgroup():
    directories = memory._cgroup_directories(memory._read_text("/proc/self/cgroup") or "",
                                             memory._read_text("/proc/self/mountinfo") or "")
    for version, directory in directories:
        if version == 1 and os.path.exists(os.path.join(directory, "memory.limit_in_bytes")):
            return directory
    return None


@pytest.mark.skipif(os.environ.get("SEQPAR_TEST_CGROUP") != "1",
                    reason="creates a memory cgroup: set SEQPAR_TEST_CGROUP=1 (as root)")
def test_under_a_real_cgroup_limit_the_check_turns_the_oom_kill_into_memory_error():
    # one rank of ring_attention: inputs 3 x 48 MiB in a cgroup of 192 MiB; the call
    # allocates a 48 MiB output and 4 x 48 MiB of block buffers (lazily)
    parent = _own_memory_cgroup()
    if parent is None or os.geteuid() != 0:
        pytest.skip("needs root and a cgroup v1 memory hierarchy (cgroup v2 forbids a "
                    "child cgroup with memory.max below a cgroup that holds processes)")
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("OMPI_", "PMIX_", "PRTE_"))}  # the child is its own job
    env["PYTHONPATH"] = REPO
    cgroup = os.path.join(parent, f"seqpar-test-{os.getpid()}")
    outcomes = {}
    for limit, mode in ((192, "unchecked"), (192, "touched"), (192, "checked"),
                        (1024, "checked")):
        os.mkdir(cgroup)
        try:
            with open(os.path.join(cgroup, "memory.limit_in_bytes"), "w") as f:
                f.write(str(limit * MIB))
            done = _run_child(_CGROUP_CHILD, cgroup, mode, 48, env=env)
            outcomes[limit, mode] = (done.returncode, done.stdout.strip())
        finally:
            os.rmdir(cgroup)
    assert outcomes[192, "unchecked"][0] == -9, outcomes  # SIGKILL: the OOM killer
    assert outcomes[192, "touched"][0] == -9, outcomes  # touching only moves the kill earlier
    code, text = outcomes[192, "checked"]
    assert code == 0 and text.startswith("MemoryError: rank 0: this call needs "), outcomes
    assert "the cgroup v1 memory.limit_in_bytes limit" in text and "leaves" in text
    assert outcomes[1024, "checked"] == (0, "finished True"), outcomes


@pytest.mark.mpi
def test_a_rank_short_of_memory_raises_memory_error_everywhere(comm, monkeypatch):
    """One rank's limit (here a stand-in for a cgroup limit of 1 MiB) leaves too little
    for the buffers a ring call acquired: every rank raises MemoryError naming it,
    before any message is sent, and the next call (with the room back) is right."""
    import seqpar
    from seqpar import memory

    from conftest import check_attention, random_qkv

    rng = np.random.default_rng(7)
    q, k, v = random_qkv(rng, "float64", b=1, sq=64 * comm.size, hq=4, hk=4, d=64)
    local = [seqpar.shard(x, comm) for x in (q, k, v)]
    short = comm.size - 1
    if comm.rank == short:
        tight = memory.Limit("cgroup v2 memory.max", 1 << 20, key=(12345 << 3) | 2)
        monkeypatch.setattr(memory, "memory_limits", lambda precise=False: (tight,))
    outcome = "returned"
    try:
        seqpar.ring_attention(*local, comm=comm)
    except MemoryError as exc:
        outcome = str(exc)
    monkeypatch.undo()
    everyone = comm.allgather(outcome)
    assert all(o == everyone[0] for o in everyone), everyone
    assert everyone[0].startswith("ring_attention: ")
    assert ("rank " + str(short) + ": this call needs" in everyone[0]) == (comm.size > 1)
    assert "cgroup v2 memory.max limit" in everyone[0]
    check_attention(seqpar.gather(seqpar.ring_attention(*local, comm=comm), comm), q, k, v)
