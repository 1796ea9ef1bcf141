"""One rank differs: a property-based sweep of per-rank argument mismatches.

In every example ONE rank passes ONE bad or different argument (a perturbation) to a
public function; every other rank calls correctly. DESIGN.md, "Errors": bad input never
hangs a job; every rank raises the same clear error, naming the argument and the rank.
So, per example:

(a) every rank raises, the same exception type (ValueError or TypeError: no case here
    is a MemoryError, and the README allows RuntimeError on the other ranks for none of
    them) and the same message; outcomes are compared with ``comm.allgather`` AFTER the
    call, so a rank that does not raise fails the test instead of blocking the others;
(b) the message names the argument, and the rank at fault;
(c) the next correct call on the same communicator is right (float64 reference).

Two perturbations may also be accepted instead of refused, as long as the outcome is
collective and right on every rank: the same values in big-endian byte order, and an
explicit ``strategy=`` that is what "auto" chooses anyway.

The (function, perturbation) pair is a pytest parameter, so every pair is covered on
every run and a failure names it; hypothesis draws the rest: the faulty rank, the data,
the perturbation's variant and (hybrid) ulysses_size, after explicit examples (every
variant with the last rank at fault). Every rank must draw the SAME examples or the
ranks run different calls and hang: ``derandomize=True``, no example database, no
shrinking (its time limits could differ between ranks), nothing rank-dependent in a
strategy (comm.size is the same everywhere), and every verdict is reached from gathered
data, so all ranks fail or pass together.

The test functions are split by what today's code does with a case that fails: a
collective failure (a wrong error type or message, a wrong result) fails its test; a
hang (the faulty rank raised before seqpar's agreement and left, the others wait in it)
becomes an MPI_Abort of the whole job by seqpar's watchdog (its arrival limit, or
``SEQPAR_TIMEOUT``; else by the suite's per-test timeout), and an MPI error mid-call aborts it too, so those cases have
test functions of their own, last in the file (``-k`` runs them one by one).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from mpi4py import MPI

import seqpar

from conftest import TOL, check_attention
from reference import reference_attention, reference_attention_backward, relative_error

pytestmark = pytest.mark.mpi

S = 2        # tokens per rank (even: zigzag is valid locally)
H = 12       # heads of q and of k/v: a multiple of 1, 2, 3 and 4 ranks (Ulysses)
D = 8
SQ = 3       # replicated queries (kv-sharded, the cache)

# a few examples per (function, perturbation) pair: ~150 pairs, at up to 4 ranks on 2 cores
SWEEP = settings(max_examples=4, deadline=None, derandomize=True, database=None,
                 phases=[Phase.explicit, Phase.generate], print_blob=False,
                 suppress_health_check=list(HealthCheck))

SHARDED_FWD = ("ring", "ulysses", "hybrid", "auto")
SHARDED_BWD = ("ring_backward", "ulysses_backward", "hybrid_backward")
REPLICATED_FWD = ("kv_sharded", "auto_replicated", "cache_attend")
REPLICATED_BWD = ("kv_sharded_backward",)
FUNCTIONS = SHARDED_FWD + SHARDED_BWD + REPLICATED_FWD + REPLICATED_BWD
MASKED = ("ring", "ulysses", "hybrid", "auto", "ring_backward", "ulysses_backward",
          "hybrid_backward")
# the keyword arguments of each function that a perturbation may change
KEYWORDS = {name: {"softmax_scale", "transport"} | (
    {"causal", "layout", "window", "seqlens"} if name in MASKED else set()) for name in FUNCTIONS}
KEYWORDS["hybrid"] |= {"ulysses_size"}
KEYWORDS["hybrid_backward"] |= {"ulysses_size"}
KEYWORDS["auto"] |= {"strategy", "queries"}
KEYWORDS["auto_replicated"] |= {"strategy", "queries"}


# ------------------------------------------------------------------ DLPack that fails

class DLPackDeviceRaises:
    """Looks like a DLPack array (no torch needed), but even its device is unknown."""

    shape = (1, S, H, D)
    ndim = 4

    def __dlpack__(self, *args, **kwargs):
        raise BufferError("DLPackDeviceRaises cannot export")

    def __dlpack_device__(self):
        raise RuntimeError("DLPackDeviceRaises has no device")


class DLPackExportRaises:
    """A host DLPack array whose export fails (as a framework's tensor can refuse to
    export, e.g. one that needs a copy first)."""

    shape = (1, S, H, D)
    ndim = 4

    def __dlpack__(self, *args, **kwargs):
        raise BufferError("DLPackExportRaises cannot export")

    def __dlpack_device__(self):
        return (1, 0)  # kDLCPU


# ------------------------------------------------------------------ the problems

@dataclass
class Problem:
    """One correct call on this rank, and what it must return."""

    function: str
    names: tuple                       # names of the positional arrays, in order
    arrays: dict                       # name -> this rank's array
    kwargs: dict
    glob: dict                         # the global float64 problem
    cache_tokens: tuple | None = None  # (K, V) appended to a ShardedKVCache
    grads: tuple | None = None         # reference (dq, dk, dv) of this rank
    extra: dict = field(default_factory=dict)

    def copy(self) -> "Problem":
        return Problem(self.function, self.names, dict(self.arrays), dict(self.kwargs),
                       self.glob, self.cache_tokens, self.grads, dict(self.extra))


def _divisors(n):
    return [u for u in range(1, n + 1) if n % u == 0]


def _slices(total, size):
    """Contiguous, possibly uneven, per-rank slices of ``total`` tokens."""
    bounds = np.linspace(0, total, size + 1).round().astype(int)
    return [slice(int(bounds[r]), int(bounds[r + 1])) for r in range(size)]


def make_problem(function, comm, seed, ulysses_size=1) -> Problem:
    """A fresh correct problem, the same global data on every rank (from ``seed``)."""
    rng = np.random.default_rng(seed)
    size, rank = comm.size, comm.rank
    replicated = function in REPLICATED_FWD + REPLICATED_BWD
    total = SQ if replicated else S * size
    keys = 2 * size + 1 if replicated else total
    q = rng.standard_normal((1, total, H, D))
    k = rng.standard_normal((1, keys, H, D))
    v = rng.standard_normal((1, keys, H, D))
    dout = rng.standard_normal(q.shape)
    glob = {"q": q, "k": k, "v": v, "dout": dout}
    mine = _slices(total, size)[rank]
    kmine = _slices(keys, size)[rank]
    kwargs = {"comm": comm}
    if function in ("hybrid", "hybrid_backward"):
        kwargs["ulysses_size"] = ulysses_size
    if function in ("auto", "auto_replicated"):
        kwargs["strategy"] = "auto"
        kwargs["queries"] = "replicated" if function == "auto_replicated" else "sharded"
    if function in SHARDED_FWD:
        return Problem(function, ("q", "k", "v"),
                       {"q": q[:, mine], "k": k[:, mine], "v": v[:, mine]}, kwargs, glob)
    if function in ("kv_sharded", "auto_replicated"):
        return Problem(function, ("q", "k", "v"), {"q": q, "k": k[:, kmine], "v": v[:, kmine]},
                       kwargs, glob)
    if function == "cache_attend":
        return Problem(function, ("q",), {"q": q}, {}, glob, cache_tokens=(k, v))
    out, lse = reference_attention(q, k, v)
    dq, dk, dv = reference_attention_backward(dout, q, k, v)
    if function in SHARDED_BWD:
        arrays = {"dout": dout[:, mine], "q": q[:, mine], "k": k[:, mine], "v": v[:, mine],
                  "out": out[:, mine], "lse": lse[:, :, mine]}
        grads = (dq[:, mine], dk[:, mine], dv[:, mine])
    else:
        arrays = {"dout": dout, "q": q, "k": k[:, kmine], "v": v[:, kmine], "out": out,
                  "lse": lse}
        grads = (dq, dk[:, kmine], dv[:, kmine])
    return Problem(function, ("dout", "q", "k", "v", "out", "lse"), arrays, kwargs, glob,
                   grads=grads)


def call(problem: Problem, comm):
    """Run the problem's call on this rank; returns what the function returns."""
    a, kw = problem.arrays, problem.kwargs
    pos = [a[name] for name in problem.names]
    f = problem.function
    if f == "cache_attend":
        cache = problem.extra["cache"]
        return cache.attend(*pos, **kw)
    fn = {"ring": seqpar.ring_attention, "ulysses": seqpar.ulysses_attention,
          "hybrid": seqpar.hybrid_attention, "kv_sharded": seqpar.kv_sharded_attention,
          "auto": seqpar.sequence_parallel_attention,
          "auto_replicated": seqpar.sequence_parallel_attention,
          "ring_backward": seqpar.ring_attention_backward,
          "ulysses_backward": seqpar.ulysses_attention_backward,
          "hybrid_backward": seqpar.hybrid_attention_backward,
          "kv_sharded_backward": seqpar.kv_sharded_attention_backward}[f]
    return fn(*pos, **kw)


def attach_cache(problem: Problem, comm) -> None:
    """A ShardedKVCache of the problem's keys (collective; every rank the same)."""
    if problem.function != "cache_attend":
        return
    k, v = problem.cache_tokens
    cache = seqpar.ShardedKVCache(k.shape[1] + 1, H, D, batch=1, dtype="float64", comm=comm)
    cache.append(k, v)
    problem.extra["cache"] = cache


# ------------------------------------------------------------------ perturbations

# perturbation -> (error message must match this, case-insensitively; the argument)
NAMES = {
    "v_dtype": r"dtype",
    "int_dtype": r"dtype",
    "list": r"\b{target}\b",
    "scale_nan": r"softmax_scale",
    "transport": r"transport",
    "float32": r"dtype",
    "causal": r"causal",
    "softmax_scale": r"softmax_scale",
    "layout": r"layout",
    "window": r"window",
    "seqlens": r"seqlens",
    "heads": r"heads",
    "ulysses_size": r"ulysses_size",
    "ulysses_size_bad": r"ulysses_size",
    "big_endian": r"byte.?order|endian",
    "dlpack_device_raises": r"\b{target}\b",
    "dlpack_export_raises": r"\b{target}\b",
    "more_queries": r"\bq\b|quer|dout|\bout\b|\blse\b",
    # a strategy this rank's arguments cannot run fails that strategy's own check first
    "strategy": r"strategy|length|heads",
    "strategy_invalid": r"strategy|ulysses_size",
    "queries": r"queries|strategy",
}
LOCAL = ("v_dtype", "int_dtype", "list", "scale_nan", "transport", "ulysses_size_bad",
         "strategy_invalid")
MISMATCH = ("float32", "causal", "softmax_scale", "layout", "window", "seqlens", "heads",
            "ulysses_size", "strategy", "queries")
NEEDS_TWO_RANKS = MISMATCH + ("more_queries",)
# how many variants a perturbation has (perturb's ``choice``)
VARIANTS = {"transport": 3, "window": 3, "ulysses_size": 3, "ulysses_size_bad": 3,
            "strategy": 4, "strategy_invalid": 3}
# outcomes other than an error that are fine, if collective and right
MAY_SUCCEED = ("big_endian", "strategy")


def applicable(function, perturbation) -> bool:
    """Whether ``perturbation`` makes sense for ``function`` (at 2 ranks or more)."""
    keywords = KEYWORDS[function]
    if perturbation == "float32" and function == "cache_attend":
        return False  # the cache's dtype is fixed: covered by v_dtype
    if perturbation in ("causal", "layout", "window", "seqlens", "transport", "ulysses_size",
                        "strategy", "queries"):
        return perturbation in keywords
    if perturbation in ("ulysses_size_bad",):
        return "ulysses_size" in keywords
    if perturbation in ("strategy_invalid",):
        return "strategy" in keywords
    if perturbation == "more_queries":
        return function in REPLICATED_FWD + REPLICATED_BWD
    return True


def cases(functions, perturbations):
    """pytest parameters (function, perturbation) for the applicable pairs."""
    return [pytest.param(f, p, id=f"{f}-{p}") for f in functions for p in perturbations
            if applicable(f, p)]


def perturb(problem: Problem, name: str, size: int, choice: int) -> Problem:
    """The faulty rank's version of ``problem`` with perturbation ``name``.

    ``choice`` picks among variants (the same draw on every rank)."""
    p = problem.copy()
    a, kw = p.arrays, p.kwargs
    target = "q" if p.function == "cache_attend" else "k"
    if name == "v_dtype":
        last = "q" if p.function == "cache_attend" else "v"
        a[last] = a[last].astype(np.float32)
    elif name == "int_dtype":
        for n in ("q", "k", "v"):
            if n in a:
                a[n] = a[n].astype(np.int32)
    elif name == "list":
        a[target] = a[target].tolist()
    elif name == "scale_nan":
        kw["softmax_scale"] = float("nan")
    elif name == "transport":
        kw["transport"] = ("carrier-pigeon", "nccl", "staged")[choice % 3]
    elif name == "float32":
        for n in p.names:
            a[n] = a[n].astype(np.float32)
    elif name == "causal":
        kw["causal"] = True
    elif name == "softmax_scale":
        kw["softmax_scale"] = 0.5
    elif name == "layout":
        kw["layout"] = "zigzag"
    elif name == "window":
        kw["window"] = ((1, None), (0, 1), (None, 0))[choice % 3]
    elif name == "seqlens":
        kw["seqlens"] = [1, S * size - 1]
    elif name == "heads":
        if p.function == "cache_attend":
            a["q"] = np.concatenate([a["q"], a["q"]], axis=2)  # 2H heads: valid GQA locally
        else:
            a["k"], a["v"] = a["k"][:, :, :H // 2], a["v"][:, :, :H // 2]
    elif name == "ulysses_size":
        others = [u for u in _divisors(size) if u != kw["ulysses_size"]]
        kw["ulysses_size"] = others[choice % len(others)]
    elif name == "ulysses_size_bad":
        kw["ulysses_size"] = (size + 1, 0, "2")[choice % 3]
    elif name == "big_endian":
        for n in p.names:
            a[n] = a[n].astype(a[n].dtype.newbyteorder(">"))
    elif name == "dlpack_device_raises":
        a[target] = DLPackDeviceRaises()
    elif name == "dlpack_export_raises":
        a[target] = DLPackExportRaises()
    elif name == "more_queries":
        for n in ("dout", "q", "out"):
            if n in a:
                a[n] = np.concatenate([a[n], a[n][:, :1]], axis=1)
        if "lse" in a:
            a["lse"] = np.concatenate([a["lse"], a["lse"][:, :, :1]], axis=2)
    elif name == "strategy":
        kw["strategy"] = ("ring", "ulysses", "kv_sharded", "hybrid")[choice % 4]
        if kw["strategy"] == "hybrid":
            kw["ulysses_size"] = size
    elif name == "strategy_invalid":
        kw["strategy"] = ("hybrid", "bogus", None)[choice % 3]  # hybrid without ulysses_size
    elif name == "queries":
        kw["queries"] = "sharded" if kw["queries"] == "replicated" else "replicated"
    else:
        raise AssertionError(name)
    return p


# ------------------------------------------------------------------ checks

def run_everywhere(comm, fn):
    """Run ``fn`` on every rank; returns (its result or None, every rank's outcome).

    An outcome is ("returned", "", "") or ("raised", type name, message); the outcomes
    are gathered after the call, so every rank reaches the same verdict."""
    try:
        result, mine = fn(), ("returned", "", "")
    except Exception as exc:  # noqa: BLE001 - compared across ranks below
        result, mine = None, ("raised", type(exc).__name__, str(exc))
    return result, comm.allgather(mine)


def _native(x):
    x = np.asarray(x)
    return x.astype(x.dtype.newbyteorder("=")) if x.dtype.byteorder not in ("=", "|") else x


def result_problems(comm, problem: Problem, result) -> list[str]:
    """What is wrong with ``result`` on any rank (the same list on every rank).

    Collective (an allgather of this rank's outputs or problems); the reference is
    the float64 computation of the global problem."""
    f, g = problem.function, problem.glob
    mine: list[str] = []
    if f in SHARDED_FWD:
        try:
            out = _native(result)
        except Exception as exc:  # noqa: BLE001
            out, mine = None, [f"result is not an array: {exc!r}"]
        parts = comm.allgather(out)
        if any(part is None for part in parts):
            return [f"rank {r}: no output" for r, part in enumerate(parts) if part is None]
        try:
            full = np.concatenate(parts, axis=1)
            check_attention(full.astype(np.float64), g["q"], g["k"], g["v"])
        except Exception as exc:  # noqa: BLE001
            mine.append(f"the gathered output: {type(exc).__name__}: {exc}")
        everyone = comm.allgather(mine)  # the same verdict on every rank (same data)
        return sorted({m for theirs in everyone for m in theirs})
    try:
        if f in REPLICATED_FWD:
            out = _native(result)
            check_attention(out.astype(np.float64), g["q"], g["k"], g["v"])
        else:
            for label, got, want in zip(("dq", "dk", "dv"), result, problem.grads):
                got = _native(got)
                assert got.shape == want.shape, f"{label} shape {got.shape} != {want.shape}"
                err = relative_error(got.astype(np.float64), want)
                assert err <= TOL["float64"], f"{label} relative error {err:.3g}"
    except Exception as exc:  # noqa: BLE001
        mine.append(f"{type(exc).__name__}: {exc}")
    return [f"rank {r}: {m}" for r, theirs in enumerate(comm.allgather(mine)) for m in theirs]


def error_problems(everyone, faulty: int, names: str) -> list[str]:
    """What keeps the outcomes from being 'the same clear error on every rank'."""
    problems = []
    for r, (what, kind, text) in enumerate(everyone):
        if what != "raised":
            problems.append(f"rank {r} did not raise")
        elif kind not in ("ValueError", "TypeError"):
            problems.append(f"rank {r} raised {kind}, not ValueError or TypeError")
    raised = [o for o in everyone if o[0] == "raised"]
    if len({o[1] for o in raised}) > 1:
        problems.append("the exception type differs across ranks")
    if len({o[2] for o in raised}) > 1:
        problems.append("the message differs across ranks")
    for r, (what, kind, text) in enumerate(everyone):
        if what == "raised" and not re.search(names, text, re.IGNORECASE):
            problems.append(f"rank {r}: the message does not name the argument ({names})")
        if what == "raised" and f"rank {faulty}" not in text:
            problems.append(f"rank {r}: the message does not name rank {faulty}")
    return problems


def _report(title, everyone, problems):
    lines = [title] + [f"  - {p}" for p in problems] + ["  outcomes:"]
    lines += [f"    rank {r}: {what} {kind}: {text}" for r, (what, kind, text) in enumerate(everyone)]
    return "\n".join(lines)


def one_rank_differs(comm, function, perturbation, faulty, seed, choice, ulysses_size=1):
    """The property, for one example (collective: every rank passes or fails together)."""
    correct = make_problem(function, comm, seed, ulysses_size)
    attach_cache(correct, comm)
    mine = perturb(correct, perturbation, comm.size, choice) if comm.rank == faulty else correct
    title = (f"{function}: rank {faulty} of {comm.size} has {perturbation!r} "
             f"(variant {choice})")
    result, everyone = run_everywhere(comm, lambda: call(mine, comm))
    if all(o[0] == "returned" for o in everyone) and perturbation in MAY_SUCCEED:
        problems = result_problems(comm, correct, result)  # accepted: must be right
        assert not problems, _report(title + ": accepted, but wrong", everyone, problems)
    else:
        target = "q" if function == "cache_attend" else "k"  # the array perturb() replaces
        problems = error_problems(everyone, faulty, NAMES[perturbation].format(target=target))
        assert not problems, _report(title, everyone, problems)
    # (c) the next correct call on the same communicator is right
    check_next_call(comm, make_problem(function, comm, seed + 1, ulysses_size), title)



def check_next_call(comm, problem, title) -> None:
    """(c): a correct call on the same communicator, right on every rank."""
    attach_cache(problem, comm)
    result, everyone = run_everywhere(comm, lambda: call(problem, comm))
    problems = [f"rank {r} raised {o[1]}: {o[2]}" for r, o in enumerate(everyone)
                if o[0] != "returned"]
    if not problems:
        problems = result_problems(comm, problem, result)
    assert not problems, _report(title + ": the next correct call", everyone, problems)

def sweep(comm, function, perturbation):
    """Run the property on examples drawn by hypothesis (the faulty rank, the data, the
    perturbation's variant, for hybrid ulysses_size), after explicit ones: each variant
    with the last rank at fault. Nothing drawn depends on the rank."""
    if perturbation in NEEDS_TWO_RANKS and comm.size < 2:
        pytest.skip(f"{perturbation!r} differs across ranks: needs 2 ranks or more")
    sizes = _divisors(comm.size) if function in ("hybrid", "hybrid_backward") else [1]
    variants = VARIANTS.get(perturbation, 1)

    def body(faulty, seed, choice, ulysses_size):
        one_rank_differs(comm, function, perturbation, faulty, seed, choice, ulysses_size)

    run = given(faulty=st.integers(0, comm.size - 1), seed=st.integers(0, 2 ** 31 - 1),
                choice=st.integers(0, variants - 1), ulysses_size=st.sampled_from(sizes))(body)
    for choice in reversed(range(variants)):
        run = example(faulty=comm.size - 1, seed=choice, choice=choice,
                      ulysses_size=sizes[-1])(run)
    SWEEP(run)()


# ------------------------------------------------------------------ the tests
# Ordered by what today's code does with their failures: collective failures first,
# then the cases that hang (and so abort the job through the watchdog) or abort.

EXPLICIT = tuple(f for f in FUNCTIONS if f not in ("auto", "auto_replicated"))
AUTO = ("auto", "auto_replicated")
SAFE_LOCAL = tuple(p for p in LOCAL if p not in ("list", "strategy_invalid"))


@pytest.mark.parametrize("function,perturbation", cases(EXPLICIT, LOCAL + MISMATCH))
def test_one_rank_passes_a_bad_or_different_argument(comm, function, perturbation):
    """Every function that names its strategy: a local mistake on one rank (dtype, int
    arrays, a list, a NaN scale, a transport, ulysses_size) or a setting that differs on
    one rank (float32 arrays, causal, softmax_scale, layout, window, seqlens, heads,
    ulysses_size)."""
    sweep(comm, function, perturbation)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # misread bytes overflow
@pytest.mark.parametrize("function", FUNCTIONS)
def test_one_rank_passes_big_endian_arrays(comm, function):
    """One rank's arrays are big-endian with the same values: converted (and right on
    every rank) or refused on every rank, saying why."""
    sweep(comm, function, "big_endian")


@pytest.mark.parametrize("function,perturbation", cases(AUTO, SAFE_LOCAL + MISMATCH))
def test_sequence_parallel_attention_one_rank_differs(comm, function, perturbation):
    """sequence_parallel_attention (strategy="auto"): a bad argument, or one that makes
    this rank's own choice of strategy differ (heads, window, strategy=, queries=), is
    refused on every rank naming it; an explicit strategy equal to auto's choice may
    also just work."""
    sweep(comm, function, perturbation)


BAD_COMMS = [42, "world", object(), MPI.COMM_NULL]


@pytest.mark.parametrize("function", tuple(f for f in FUNCTIONS if f != "cache_attend")
                         + ("ShardedKVCache",))
@pytest.mark.parametrize("bad", range(len(BAD_COMMS)),
                         ids=["int", "str", "object", "COMM_NULL"])
def test_invalid_comm_on_every_rank(comm, function, bad):
    """``comm`` that is not an intracommunicator, passed on EVERY rank: each rank raises
    TypeError naming comm by itself (there is no communicator to agree over, so this
    case is not in the one-rank sweep), and the next correct call works."""
    bad_comm = BAD_COMMS[bad]
    if function == "ShardedKVCache":
        def attempt():
            return seqpar.ShardedKVCache(8, H, D, comm=bad_comm)
        correct = make_problem("cache_attend", comm, 7)
    else:
        correct = make_problem(function, comm, 7, ulysses_size=comm.size)
        wrong = correct.copy()
        wrong.kwargs["comm"] = bad_comm

        def attempt():
            return call(wrong, comm)
    _, everyone = run_everywhere(comm, attempt)
    problems = []
    for r, (what, kind, text) in enumerate(everyone):
        if what != "raised" or kind != "TypeError" or not re.search(r"\bcomm\b", text):
            problems.append(f"rank {r}: expected a TypeError naming comm")
    assert not problems, _report(f"{function}(comm={bad_comm!r})", everyone, problems)
    check_next_call(comm, correct, function)


# ---- today these hang (the watchdog then aborts the job) or abort it

@pytest.mark.parametrize("function,perturbation", cases(AUTO, ("list", "strategy_invalid")))
def test_sequence_parallel_attention_one_rank_passes_garbage(comm, function, perturbation):
    """sequence_parallel_attention: a list for k, or strategy="hybrid" without
    ulysses_size, "bogus" or None, on one rank."""
    sweep(comm, function, perturbation)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("function", REPLICATED_FWD + REPLICATED_BWD)
def test_one_rank_has_more_queries_kv_sharded(comm, function):
    """K/V-sharded attention (and its backward, the auto form and the cache): every
    rank must hold the same queries; one rank with one more is refused everywhere."""
    sweep(comm, function, "more_queries")


@pytest.mark.parametrize("function,perturbation",
                         cases(FUNCTIONS, ("dlpack_export_raises", "dlpack_device_raises")))
def test_one_rank_passes_a_failing_dlpack_object(comm, function, perturbation):
    """A DLPack-like object (no torch needed) whose export, or even its device query,
    raises, on one rank."""
    sweep(comm, function, perturbation)
