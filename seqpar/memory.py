"""Memory limits: refuse a call whose new buffers cannot be committed, before it communicates.

NumPy's ``np.empty`` and ``np.zeros`` reserve address space only: the kernel commits
a page when it is first written. A call allocates its buffers before the agreement
(:func:`seqpar.validation.agree`) but writes them after it, mid-call, so a rank over
a memory cgroup limit (Slurm's ``--mem``) or out of RAM is killed by the kernel's OOM
killer (exit status 137) instead of raising the collective MemoryError. This module
says, in tens of microseconds and before any point-to-point message, whether the call's
fresh buffers fit in what the limits leave:

* :func:`fresh_arrays`, :func:`fresh_bytes`: the host arrays a call allocated (never
  the caller's inputs or views of them), and their bytes;
* :func:`memory_limits`: the room every visible limit leaves (:class:`Limit`);
* :func:`demand` and :func:`shortfall`: the check for one rank, or for the ranks of
  one call together (ranks on one node share its RAM and usually one job cgroup, so
  their needs add up); :meth:`Demand.to_ints` packs a rank's demand into a few
  integers for the agreement's fixed-size message;
* :func:`ensure_available`, :func:`ensure_fits`: the local check, raising MemoryError.

Limits (Linux; where none is visible nothing is checked):

``cgroup v2 memory.max``
    ``memory.max - memory.current`` of this process's cgroup (``/proc/self/cgroup``)
    and of every ancestor with a limit (Slurm limits the job's cgroup, above the
    task's); committing fresh pages draws on it.
``cgroup v1 memory.limit_in_bytes``
    ``memory.limit_in_bytes - memory.usage_in_bytes``, likewise.
``RAM``
    ``MemAvailable + SwapFree`` of ``/proc/meminfo``; committing draws on it.
``RLIMIT_AS``, ``RLIMIT_DATA``
    the soft limit minus the address space (data) in use. The kernel charges these
    when an array is *allocated*, so an array that does not fit already raised
    MemoryError in the allocation; only the margin must still fit.

Costs: the paths are found once per process (again after ``fork`` or
:func:`refresh`) and their files stay open, so a check is one ``pread`` of each
limit's two files and of ``/proc/meminfo`` and a walk over the acquired resources:
25-35 microseconds for a ring call on a loaded 2-core machine (measured:
``benchmarks/reliability.md``, "Memory limits"). Only when the quick answer is
"close" does it look harder: ``memory.stat`` (page cache the kernel would reclaim
counts as room) and ``mincore`` (pages of the fresh buffers already committed, e.g.
reused heap memory, do not count as need).

The margin (:func:`margin_bytes`) covers what the call allocates after the check
and is O(tile), and the page tables of the fresh pages; allocations that are larger
than that and happen after the agreement are not counted unless the caller passes
them as ``extra``.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import resource
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = ["Limit", "Demand", "fresh_arrays", "fresh_bytes", "uncommitted_bytes",
           "margin_bytes", "memory_limits", "demand", "shortfall", "ensure_available",
           "ensure_fits", "refresh"]

# limit kinds; the code is the low 3 bits of a Limit's key
_KINDS = {1: "RAM", 2: "cgroup v2 memory.max", 3: "cgroup v1 memory.limit_in_bytes",
          4: "RLIMIT_AS", 5: "RLIMIT_DATA"}
_CODES = {name: code for code, name in _KINDS.items()}
_RESERVED_AT_ALLOCATION = ("RLIMIT_AS", "RLIMIT_DATA")
_V1_UNLIMITED = 1 << 62  # v1 reports "no limit" as PAGE_COUNTER_MAX pages (~2**63)

# The margin (see margin_bytes). Tile temporaries measured with tracemalloc for one
# blocked kernel call, S = 8192, D = 128 (benchmarks/reliability.md): forward 9.2 MiB
# per tile job in float64 (4.6 MiB float32), backward 7 MiB; 16 MiB per thread of
# the tile pool leaves room. The fixed part covers the interpreter's, MPI's and
# BLAS's own growth and cgroup v1's per-CPU charge batches (64 pages per CPU).
_MARGIN_FIXED = 64 << 20
_MARGIN_PER_THREAD = 16 << 20
_HUGE_PAGE = 2 << 20  # a written byte commits a whole transparent huge page
_PAGE_TABLE_SHARE = 256  # 8-byte entry per 4 KiB page is 1/512; twice that

# How deep fresh_arrays looks into nested resources.
_MAX_DEPTH = 16


@dataclass(frozen=True)
class Limit:
    """One memory limit and the room it leaves this process.

    Attributes
    ----------
    kind : str
        ``"cgroup v2 memory.max"``, ``"cgroup v1 memory.limit_in_bytes"``, ``"RAM"``,
        ``"RLIMIT_AS"`` or ``"RLIMIT_DATA"``.
    headroom : int
        Bytes this limit leaves (negative when it is already exceeded).
    key : int
        Identifies the limit across processes: the same cgroup (or the same RAM) on
        the same host gives the same key, so ranks that share a limit can add their
        needs; an rlimit's key is its process's own. Positive, below 2**63.
    where : str
        Where it was read (a cgroup's directory, ``/proc/meminfo``); "" when unknown,
        e.g. for a limit unpacked by :meth:`Demand.from_ints`.
    readings : tuple of (str, int)
        The values read, in bytes, e.g. ``(("memory.max", ...), ("memory.current", ...))``.
    """

    kind: str
    headroom: int
    key: int
    where: str = ""
    readings: tuple[tuple[str, int], ...] = ()

    @property
    def counts_fresh(self) -> bool:
        """Whether committing fresh pages draws on this limit (False for rlimits, which
        the kernel charged when the arrays were allocated)."""
        return self.kind not in _RESERVED_AT_ALLOCATION

    def describe(self) -> str:
        """``the <kind> limit (<where>: <name> <value>, ...)``, for messages."""
        values = ", ".join(f"{name} {_format(value)}" for name, value in self.readings)
        detail = ": ".join(x for x in (self.where, values) if x)
        return f"the {self.kind} limit" + (f" ({detail})" if detail else "")


@dataclass(frozen=True)
class Demand:
    """What one rank's call will commit, and the limits it draws on.

    Attributes
    ----------
    need : int
        Bytes of new pages the call's fresh buffers will commit.
    margin : int
        Bytes kept free besides (:func:`margin_bytes`).
    limits : tuple of Limit
        The visible limits, as :func:`memory_limits` returns them.
    """

    need: int
    margin: int
    limits: tuple[Limit, ...] = ()

    def slack(self, limit: Limit) -> int:
        """Bytes ``limit`` leaves once this demand is met (negative: it does not fit)."""
        return limit.headroom - self.margin - (self.need if limit.counts_fresh else 0)

    def to_ints(self, slots: int = 4) -> np.ndarray:
        """This demand as ``2 + 2 * slots`` int64: need, margin, then (key, headroom) of
        the ``slots`` limits with the least slack (key 0: an empty slot), for a
        fixed-size message such as the agreement's Allgather."""
        row = np.zeros(2 + 2 * slots, dtype=np.int64)
        row[0], row[1] = self.need, self.margin
        tightest = sorted(self.limits, key=self.slack)[:slots]
        for i, limit in enumerate(tightest):
            row[2 + 2 * i], row[3 + 2 * i] = limit.key, limit.headroom
        return row

    @classmethod
    def from_ints(cls, row: Sequence[int]) -> "Demand":
        """The inverse of :meth:`to_ints` (limits without ``where`` and ``readings``)."""
        values = [int(x) for x in row]
        limits = tuple(Limit(_KINDS[key & 7], headroom, key)
                       for key, headroom in zip(values[2::2], values[3::2]) if key)
        return cls(values[0], values[1], limits)


# --- what a call allocated ---

def fresh_arrays(resources: Any, inputs: Any = ()) -> list[np.ndarray]:
    """The NumPy arrays that own the memory of ``resources``, less the caller's inputs.

    Parameters
    ----------
    resources : object
        What a call acquired: NumPy arrays nested in tuples, lists, dict values and
        dataclass instances (up to 16 levels); anything else (CuPy arrays, modules,
        numbers) is skipped.
    inputs : object
        The caller's arrays, nested the same way. Arrays sharing memory with them by
        identity or by ``.base`` (the input itself, ``q[None]``, a contiguous input
        returned by ``ascontiguousarray``) are not fresh.

    Returns
    -------
    list of numpy.ndarray
        Each memory owner once (the array at the end of a view's ``.base`` chain,
        which owns its data). Views of memory NumPy did not allocate (``np.memmap``,
        ``np.frombuffer``, pinned host buffers) are not counted: their pages are
        file-backed or committed already. CuPy arrays are device memory, allocated
        eagerly (a failure is already an OutOfMemoryError).
    """
    excluded: dict[int, np.ndarray] = {}
    _collect(inputs, excluded, set(), 0)
    owners: dict[int, np.ndarray] = {}
    _collect(resources, owners, set(), 0)
    return [a for key, a in owners.items() if key not in excluded]


def fresh_bytes(resources: Any, inputs: Any = ()) -> int:
    """Bytes of :func:`fresh_arrays` (each owner's full ``nbytes`` once)."""
    return sum(a.nbytes for a in fresh_arrays(resources, inputs))


_LEAVES = frozenset((int, float, bool, complex, str, bytes, type(None), type(np)))


def _collect(x: Any, owners: dict[int, np.ndarray], seen: set[int], depth: int) -> None:
    """Add the memory owners of the NumPy arrays nested in ``x`` to ``owners``.

    Arrays among a container's items are handled in its loop (no call per array):
    this walk runs on every call.
    """
    if isinstance(x, np.ndarray):
        _add_owner(x, owners)
        return
    if depth >= _MAX_DEPTH or id(x) in seen:
        return
    if isinstance(x, (tuple, list)):
        children = x
    elif isinstance(x, dict):
        children = x.values()
    else:
        fields = getattr(type(x), "__dataclass_fields__", None)
        if fields is None or isinstance(x, type):
            return
        children = [getattr(x, name, None) for name in fields]
    seen.add(id(x))
    for child in children:
        if isinstance(child, np.ndarray):
            base = child.base
            if base is None:
                if child.flags.owndata:
                    owners[id(child)] = child
            else:
                _add_owner(child, owners)
        elif type(child) not in _LEAVES:
            _collect(child, owners, seen, depth + 1)


def _add_owner(x: np.ndarray, owners: dict[int, np.ndarray]) -> None:
    base = x.base
    while base is not None:
        if not isinstance(base, np.ndarray):
            return  # memory NumPy did not allocate (mmap, bytes, pinned buffer)
        x, base = base, base.base
    if x.flags.owndata:
        owners[id(x)] = x


def uncommitted_bytes(arrays: Iterable[np.ndarray]) -> int:
    """Bytes of the pages of ``arrays`` not yet in memory (to be committed when written).

    Asks the kernel which pages are resident (``mincore``), so buffers reused from
    memory the process already holds, or already written, count only for what is
    still missing; about 15 microseconds for 80 MiB, 140 for 1 GiB. Where it cannot
    ask, every byte counts. A page that was only read so far maps the kernel's shared
    zero page and counts as resident although its first write commits it: seqpar's
    acquire steps write or leave their buffers, they do not read them.
    """
    total = 0
    for a in arrays:
        if a.nbytes:
            total += _missing_bytes(a)
    return total


def _missing_bytes(a: np.ndarray) -> int:
    mincore = _libc_mincore()
    if mincore is None:
        return a.nbytes
    page = _PAGE_SIZE
    address = a.__array_interface__["data"][0]
    start = address & ~(page - 1)
    length = (address + a.nbytes - start + page - 1) & ~(page - 1)
    vector = np.empty(length // page, dtype=np.uint8)
    if mincore(start, length, vector.ctypes.data) != 0:
        return a.nbytes
    missing = vector.size - int(np.count_nonzero(vector & 1))
    return min(a.nbytes, missing * page)


_PAGE_SIZE = resource.getpagesize()
_MINCORE: list = []


def _libc_mincore():
    if not _MINCORE:
        function = None
        try:
            function = ctypes.CDLL(None, use_errno=True).mincore
            function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
            function.restype = ctypes.c_int
        except (OSError, AttributeError):
            function = None
        _MINCORE.append(function)
    return _MINCORE[0]


def margin_bytes(nbytes: int, *, arrays: int = 0) -> int:
    """The room a call keeps free besides its fresh buffers.

    ``64 MiB + 16 MiB x threads + nbytes / 256 + 2 MiB x arrays``: the kernels'
    tile temporaries, allocated after the check, for every thread of the tile pool
    (``SEQPAR_NUM_THREADS``, else the cores this process may run on); the page tables
    of ``nbytes`` of new pages (1/512, doubled); a transparent huge page of rounding
    per fresh array; and 64 MiB for the interpreter's, MPI's and BLAS's own growth.
    """
    return (_MARGIN_FIXED + _MARGIN_PER_THREAD * _probe().threads
            + int(nbytes) // _PAGE_TABLE_SHARE + _HUGE_PAGE * int(arrays))


# --- the limits ---

def memory_limits(*, precise: bool = False) -> tuple[Limit, ...]:
    """The room every visible limit leaves this process now.

    Parameters
    ----------
    precise : bool
        Also count, for cgroups, the page cache the kernel would reclaim before it
        kills (``active_file + inactive_file - dirty - writeback`` of ``memory.stat``):
        slower (one larger file read), and only needed when the quick answer is close.

    Returns
    -------
    tuple of Limit
        Empty where none is visible (not Linux, no ``/proc``).
    """
    return _probe().limits(precise)


def demand(resources: Any, inputs: Any = (), *, extra: int = 0, sharers: int = 1) -> Demand:
    """What a call that acquired ``resources`` will commit, and the room it has.

    A call with nothing to commit (no fresh host arrays and no ``extra``: e.g. a CuPy
    call) reads no limit: its demand is ``Demand(0, 0)``, which always fits.

    Parameters
    ----------
    resources, inputs : object
        As for :func:`fresh_arrays`.
    extra : int
        Bytes the call will allocate and write after the check that are not among
        ``resources`` (counted in full).
    sharers : int
        How many ranks of the call may share this rank's limits (e.g. its ranks on
        this node). When ``sharers`` such demands might not fit in the quick
        measurement, the precise one is taken: resident pages of the fresh buffers
        do not count as need (:func:`uncommitted_bytes`) and reclaimable page cache
        counts as room (``memory_limits(precise=True)``).

    Returns
    -------
    Demand
    """
    return _demand(fresh_arrays(resources, inputs), int(extra), sharers)[0]


def _demand(arrays: list[np.ndarray] | None, extra: int,
            sharers: int) -> tuple[Demand, bool]:
    """The demand, and whether the quick measurement showed it fits ``sharers`` times."""
    nbytes = extra + (sum(a.nbytes for a in arrays) if arrays else 0)
    if nbytes <= 0:
        return Demand(0, 0), True  # nothing to commit (e.g. a GPU call): nothing to check
    count = len(arrays) if arrays else 0
    limits = memory_limits()
    margin = margin_bytes(nbytes, arrays=count)
    shared = max(1, int(sharers)) * (nbytes + margin)
    if all(limit.headroom >= (shared if limit.counts_fresh else margin) for limit in limits):
        return Demand(nbytes, margin, limits), True
    need = extra + (uncommitted_bytes(arrays) if arrays else 0)
    return Demand(need, margin_bytes(need, arrays=count), memory_limits(precise=True)), False


def shortfall(demands: Sequence[Demand]) -> str | None:
    """Why these demands do not fit together, or None when they do.

    ``demands[r]`` is rank r's (one demand: this rank alone). Ranks reporting a
    limit with the same key share it: their needs and margins add up against the
    least headroom any of them saw. The answer depends only on ``demands``, so every
    rank that has them all gives the same message.
    """
    groups: dict[int, list[tuple[int, Demand, Limit]]] = {}
    for rank, d in enumerate(demands):
        for limit in d.limits:
            groups.setdefault(limit.key, []).append((rank, d, limit))
    for members in groups.values():
        _, _, limit = min(members, key=lambda m: (m[2].headroom, m[0]))
        need = sum(d.need for _, d, _ in members) if limit.counts_fresh else 0
        margin = sum(d.margin for _, d, _ in members)
        if need + margin <= limit.headroom:
            continue
        room = _format(max(limit.headroom, 0))
        advice = ("; give the job more memory (e.g. Slurm's --mem) or spread the sequence "
                  "over more ranks")
        if not limit.counts_fresh:
            return (f"the call's buffers fit in {limit.describe()} (charged when they were "
                    f"allocated), but the kernels' temporaries need about {_format(margin)} "
                    f"more and it leaves {room}{advice}")
        what = (f"{_format(need + margin)} of new memory ({_format(need)} of fresh buffers "
                f"+ a margin of {_format(margin)} for the kernels' temporaries and page "
                f"tables)")
        if len(members) == 1:
            who = f"rank {members[0][0]}: " if len(demands) > 1 else ""
            return f"{who}this call needs {what} but {limit.describe()} leaves {room}{advice}"
        ranks = ", ".join(str(rank) for rank, _, _ in members)
        return (f"ranks {ranks} share {limit.describe()}, which leaves {room}: together "
                f"their calls need {what}{advice}")
    return None


def ensure_available(nbytes: int, *, arrays: Sequence[np.ndarray] | None = None,
                     sharers: int = 1) -> None:
    """Raise MemoryError unless ``nbytes`` of new pages (and the margin) fit in every
    visible limit.

    Parameters
    ----------
    nbytes : int
        Bytes the call will commit besides ``arrays``.
    arrays : sequence of numpy.ndarray, optional
        Fresh buffers to commit (:func:`fresh_arrays`), counted in full at first and,
        when that is close, by their pages not yet in memory.
    sharers : int
        As for :func:`demand`.

    Raises
    ------
    MemoryError
        Saying how many bytes the call needs, how many the tightest limit leaves and
        which limit it is (with the files and values read).
    """
    mine, fits = _demand(list(arrays) if arrays else None, int(nbytes), sharers)
    message = None if fits else shortfall([mine])
    if message is not None:
        raise MemoryError(message)


def ensure_fits(resources: Any, inputs: Any = (), *, extra: int = 0, sharers: int = 1) -> None:
    """:func:`ensure_available` for the fresh arrays of ``resources`` (not ``inputs``):
    the one call for a rank right after it acquired what a call needs.

    Raises
    ------
    MemoryError
        As :func:`ensure_available`.
    """
    ensure_available(extra, arrays=fresh_arrays(resources, inputs), sharers=sharers)


def refresh() -> None:
    """Find the limits anew (after moving this process to another cgroup, or changing
    a limit that had none); the files read so far are closed once no check uses them."""
    global _STATE
    with _LOCK:
        _STATE = None


# --- reading the limits ---

class _Cgroup:
    """One cgroup level with a limit: its two files, kept open, and its memory.stat."""

    def __init__(self, version: int, directory: str, key: int, opened: list[int]):
        self.version, self.directory, self.key = version, directory, key
        limit_name, used_name = (("memory.max", "memory.current") if version == 2 else
                                 ("memory.limit_in_bytes", "memory.usage_in_bytes"))
        self.names = (limit_name, used_name)
        self.limit_fd = os.open(os.path.join(directory, limit_name), os.O_RDONLY)
        opened.append(self.limit_fd)
        self.used_fd = os.open(os.path.join(directory, used_name), os.O_RDONLY)
        opened.append(self.used_fd)
        self.kind = _KINDS[2 if version == 2 else 3]

    def read(self, precise: bool) -> Limit | None:
        limit = _read_limit(self.limit_fd)
        if limit is None or limit >= _V1_UNLIMITED:
            return None  # lifted since it was found
        used = int(os.pread(self.used_fd, 32, 0))
        readings = ((self.names[0], limit), (self.names[1], used))
        if not precise:
            return Limit(self.kind, limit - used, self.key, self.directory, readings)
        reclaimable = self._reclaimable()
        return Limit(self.kind, limit - used + reclaimable, self.key, self.directory,
                     readings + (("reclaimable page cache", reclaimable),))

    def _reclaimable(self) -> int:
        """Clean page cache (file pages, not shmem, not dirty or under writeback)."""
        prefix = "" if self.version == 2 else "total_"
        dirty = "file_dirty" if self.version == 2 else "total_dirty"
        writeback = "file_writeback" if self.version == 2 else "total_writeback"
        try:
            with open(os.path.join(self.directory, "memory.stat")) as f:
                stat = dict(line.split()[:2] for line in f if line.strip())
            value = (int(stat.get(prefix + "active_file", 0))
                     + int(stat.get(prefix + "inactive_file", 0))
                     - int(stat.get(dirty, 0)) - int(stat.get(writeback, 0)))
        except (OSError, ValueError):
            return 0
        return max(0, value)


def _read_limit(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).strip()
    return None if text == b"max" else int(text)


class _Probe:
    """What this process reads for a check: found once, then a few ``pread``s."""

    def __init__(self, cgroup_text: str | None = None, mountinfo_text: str | None = None,
                 meminfo: str = "/proc/meminfo", statm: str = "/proc/self/statm",
                 boot_id: str | None = None, threads: int | None = None):
        self.fds: list[int] = []
        self._closer = weakref.finalize(self, _close_all, self.fds)
        self.boot_id = boot_id if boot_id is not None else _boot_id()
        self.threads = threads if threads is not None else _thread_count()
        self.meminfo_fd = self._open(meminfo)
        self.statm_path, self._statm_fd = statm, None
        self.pid = os.getpid()
        self.ram_key = self._key(1)
        self.rlimit_keys = {name: self._key(_CODES[name], self.pid) for name in
                            _RESERVED_AT_ALLOCATION}
        self.cgroups: list[_Cgroup] = []
        if cgroup_text is None:
            cgroup_text = _read_text("/proc/self/cgroup")
        if mountinfo_text is None:
            mountinfo_text = _read_text("/proc/self/mountinfo")
        for version, directory in _limited_cgroups(cgroup_text or "", mountinfo_text or ""):
            try:
                st = os.stat(directory)
                self.cgroups.append(_Cgroup(version, directory, self._key(
                    2 if version == 2 else 3, st.st_dev, st.st_ino), self.fds))
            except OSError:
                continue

    def _open(self, path: str) -> int | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        self.fds.append(fd)
        return fd

    def _key(self, code: int, *parts: object) -> int:
        digest = hashlib.blake2b(repr((self.boot_id,) + parts).encode(), digest_size=8).digest()
        return ((int.from_bytes(digest, "little") >> 4) << 3 | code) or code

    def limits(self, precise: bool) -> tuple[Limit, ...]:
        found = []
        for cgroup in self.cgroups:
            try:
                limit = cgroup.read(precise)
            except (OSError, ValueError):
                continue  # the cgroup went away: refresh() finds the current one
            if limit is not None:
                found.append(limit)
        ram = self._ram()
        if ram is not None:
            found.append(ram)
        found.extend(self._rlimits())
        return tuple(found)

    def _ram(self) -> Limit | None:
        if self.meminfo_fd is None:
            return None
        try:
            text = os.pread(self.meminfo_fd, 8192, 0)
            available = _meminfo_field(text, b"MemAvailable:")
            swap = _meminfo_field(text, b"SwapFree:")
        except (OSError, ValueError):
            return None
        return Limit("RAM", available + swap, self.ram_key, "/proc/meminfo",
                     (("MemAvailable", available), ("SwapFree", swap)))

    def _rlimits(self) -> list[Limit]:
        found = []
        for name, which, field, what in (("RLIMIT_AS", resource.RLIMIT_AS, 0, "address space"),
                                         ("RLIMIT_DATA", resource.RLIMIT_DATA, 5, "data")):
            soft = resource.getrlimit(which)[0]
            if soft == resource.RLIM_INFINITY or soft < 0:
                continue
            try:
                used = int(self._statm().split()[field]) * _PAGE_SIZE
            except (OSError, ValueError, IndexError):
                continue
            found.append(Limit(name, soft - used, self.rlimit_keys[name], "",
                               (("soft limit", soft), (what + " in use", used))))
        return found

    def _statm(self) -> bytes:
        if self._statm_fd is None:
            self._statm_fd = os.open(self.statm_path, os.O_RDONLY)
            self.fds.append(self._statm_fd)
        return os.pread(self._statm_fd, 256, 0)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def _limited_cgroups(cgroup_text: str, mountinfo_text: str) -> list[tuple[int, str]]:
    """(version, directory) of the levels of :func:`_cgroup_directories` that have a
    memory limit now."""
    found = []
    for version, directory in _cgroup_directories(cgroup_text, mountinfo_text):
        name = "memory.max" if version == 2 else "memory.limit_in_bytes"
        try:
            with open(os.path.join(directory, name)) as f:
                text = f.read().strip()
            if text != "max" and int(text) < _V1_UNLIMITED:
                found.append((version, directory))
        except (OSError, ValueError):
            continue
    return found


def _cgroup_directories(cgroup_text: str, mountinfo_text: str) -> list[tuple[int, str]]:
    """(version, directory) of this process's memory cgroup and of each ancestor up to
    the mount's root, leaf first: cgroup v2 (``0::path``), then v1 (the hierarchy with
    the memory controller), each where it is mounted (``/proc/self/mountinfo``)."""
    paths = {}
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            paths[2] = path
        elif "memory" in controllers.split(","):
            paths[1] = path
    mounts = {}
    for line in mountinfo_text.splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        root, point = _unescape(fields[3]), _unescape(fields[4])
        if tail[0] == "cgroup2":
            mounts.setdefault(2, (root, point))
        elif tail[0] == "cgroup" and "memory" in tail[2].split(","):
            mounts.setdefault(1, (root, point))
    found = []
    for version, path in sorted(paths.items(), reverse=True):
        if version not in mounts:
            continue
        root, point = mounts[version]
        if root != "/" and (path == root or path.startswith(root.rstrip("/") + "/")):
            path = path[len(root.rstrip("/")):] or "/"  # mounted below the hierarchy's root
        directory = os.path.normpath(point + "/" + path.lstrip("/"))
        while directory == point or directory.startswith(point.rstrip("/") + "/"):
            found.append((version, directory))
            if directory == point:
                break
            directory = os.path.dirname(directory)
    return found


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040 ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _meminfo_field(text: bytes, name: bytes) -> int:
    start = text.index(name) + len(name)
    return int(text[start:text.index(b"kB", start)]) * 1024


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _boot_id() -> str:
    text = _read_text("/proc/sys/kernel/random/boot_id")
    if text:
        return text.strip()
    import socket

    return socket.gethostname()


def _thread_count() -> int:
    """Threads of seqpar's tile pool (as seqpar.local.numpy_kernel counts them)."""
    # the rule of numpy_kernel.pool_threads, restated: this module also loads on its own
    text = os.environ.get("SEQPAR_NUM_THREADS", "").strip()
    try:
        return (int(text) if text.isdigit() else 0) or len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _format(n: int) -> str:
    """Bytes for a person: three significant digits (more for TiB), and the unit."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.{2 if abs(value) < 10 else 1 if abs(value) < 100 else 0}f} {unit}"
    return f"{n} bytes"


_LOCK = threading.Lock()
_STATE: _Probe | None = None


def _probe() -> _Probe:
    global _STATE
    state = _STATE
    if state is None:
        with _LOCK:
            if _STATE is None:
                _STATE = _Probe()
            state = _STATE
    return state


def _after_fork_in_child() -> None:
    """A child has its own pid (statm, rlimit keys) and may be put in another cgroup."""
    global _STATE, _LOCK
    _LOCK = threading.Lock()
    _STATE = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
