"""Shared fixtures and numerical checks of the CPU test suite.

Run at any number of ranks (the CI runs 1, 2, 3 and 4)::

    mpiexec -n N python -m pytest --with-mpi tests

Tests marked ``mpi`` are collective: every rank of ``MPI.COMM_WORLD`` runs them
and they skip themselves (``min_size``) where the run has too few ranks. Tests
without the mark never communicate; every rank runs them on its own.

Global data
    ``rng`` is seeded from the test's node id, so every rank builds the SAME
    global arrays; a rank then takes its slice with :func:`seqpar.shard`.

Tolerance (DESIGN.md, "Numerics")
    ``relative_error(out, ref) = ||out - ref|| / ||ref||`` against the float64
    reference of tests/reference.py computed from the inputs AFTER the cast to
    the dtype under test, must be at most ``TOL[dtype]`` AND at most twice the
    error of :func:`plain_attention`, the plain computation in that dtype.

"Plain" means what an unfused, single-rank implementation does with the dtype:

    * float64: everything in float64 (scores = q @ k^T, softmax, p @ v);
    * float32: everything in float32;
    * float16 / bfloat16: matmuls take dtype inputs and accumulate in float32,
      their outputs are rounded to the dtype: scores = round(q @ k^T) * scale;
      softmax in float32 on those scores; probabilities rounded to the dtype;
      out = round(p @ v).

For float32 and float64 both errors sit at a few ulps, where a factor of two
is noise, so the 2x bound gets a floor of a tenth of the tolerance (the same
rule as tests/test_gpu_kernel.py).
"""
from __future__ import annotations

import faulthandler
import hashlib
import os
import sys

import numpy as np
import pytest
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(__file__))
from reference import reference_attention, relative_error  # noqa: E402

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is a test dependency
    BF16 = None

TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}
# lse is float64 for float64 input and float32 otherwise (computed from the cast inputs)
LSE_TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-5, "bfloat16": 1e-5}
PLAIN_FLOOR = {"float64": TOL["float64"] / 10, "float32": TOL["float32"] / 10,
               "float16": 0.0, "bfloat16": 0.0}
DTYPES = ("float64", "float32", "float16", "bfloat16")

# A collective test that hangs (a bug) must fail the CI job, not eat its budget.
_TEST_TIMEOUT_S = float(os.environ.get("SEQPAR_TEST_TIMEOUT", "120"))


def as_dtype(name: str) -> np.dtype:
    """The NumPy dtype for a name ('bfloat16' is ml_dtypes.bfloat16)."""
    if name == "bfloat16":
        if BF16 is None:
            pytest.skip("ml_dtypes is not installed")
        return BF16
    return np.dtype(name)


def random_array(rng, shape, dtype_name, scale=1.0):
    """Standard normal data drawn in float64, then cast to the dtype under test."""
    return (scale * rng.standard_normal(shape)).astype(as_dtype(dtype_name))


def random_qkv(rng, dtype_name, *, b=2, sq=12, sk=None, hq=4, hk=2, d=16, batch_axis=True):
    """Fresh q (b, sq, hq, d), k and v (b, sk, hk, d) in the dtype (3-D without batch_axis)."""
    sk = sq if sk is None else sk
    lead = (b,) if batch_axis else ()
    return (random_array(rng, lead + (sq, hq, d), dtype_name),
            random_array(rng, lead + (sk, hk, d), dtype_name),
            random_array(rng, lead + (sk, hk, d), dtype_name))


def plain_attention(q, k, v, *, causal=False, softmax_scale=None,
                    q_positions=None, k_positions=None, visible=None):
    """The plain, unfused single-rank computation in q's dtype (see the module docstring).

    4-D inputs; returns out in q's dtype.
    """
    name = np.dtype(q.dtype).name
    low = name in ("float16", "bfloat16")
    work = np.dtype(np.float64) if name == "float64" else np.dtype(np.float32)
    rnd = (lambda x: x.astype(q.dtype).astype(work)) if low else (lambda x: x)  # noqa: E731
    d = q.shape[-1]
    scale = 1.0 / np.sqrt(d) if softmax_scale is None else softmax_scale
    group = q.shape[2] // k.shape[2]
    qw = q.astype(work).transpose(0, 2, 1, 3)                                # (B, H, Sq, D)
    kw = np.repeat(k.astype(work), group, axis=2).transpose(0, 2, 3, 1)      # (B, H, D, Sk)
    vw = np.repeat(v.astype(work), group, axis=2).transpose(0, 2, 1, 3)      # (B, H, Sk, D)
    s = rnd(qw @ kw) * work.type(scale)
    if causal:
        qp = np.arange(q.shape[1]) if q_positions is None else np.asarray(q_positions)
        kp = np.arange(k.shape[1]) if k_positions is None else np.asarray(k_positions)
        s = np.where(kp[None, :] > qp[:, None], -np.inf, s).astype(work)
    if visible is not None:
        s = np.where(np.asarray(visible, dtype=bool), s, -np.inf).astype(work)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0).astype(work)
    p = np.exp(s - m)
    den = p.sum(axis=-1, keepdims=True)
    p = np.where(den > 0, p / np.where(den > 0, den, 1), 0).astype(work)
    out = rnd(p) @ vw
    return out.transpose(0, 2, 1, 3).astype(q.dtype)


def plain_attention_backward(dout, q, k, v, *, softmax_scale=None, visible=None):
    """The plain, unfused single-rank backward in q's dtype: the analogue of
    :func:`plain_attention` (see the module docstring) for the gradients.

    float16 / bfloat16: every matmul takes dtype inputs, accumulates in float32 and
    rounds its output to the dtype; softmax and ``dS = P * (dP - delta)`` in float32,
    with ``delta = rowsum(dout * out)`` of the plain forward's output; P and dS are
    rounded to the dtype where they enter a matmul. float32 / float64: everything in
    that dtype. ``visible``: boolean (Sq, Sk) or (B, 1, Sq, Sk), default all.
    Returns (dq, dk, dv) in q's dtype; dk, dv summed over the heads of a GQA group.
    """
    name = np.dtype(q.dtype).name
    low = name in ("float16", "bfloat16")
    work = np.dtype(np.float64) if name == "float64" else np.dtype(np.float32)
    rnd = (lambda x: x.astype(q.dtype).astype(work)) if low else (lambda x: x)  # noqa: E731
    batch, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = work.type(1.0 / np.sqrt(d) if softmax_scale is None else softmax_scale)
    group = hq // hk
    qw, dow = (x.astype(work).transpose(0, 2, 1, 3) for x in (q, dout))      # (B, H, Sq, D)
    kw = np.repeat(k.astype(work), group, axis=2).transpose(0, 2, 1, 3)      # (B, H, Sk, D)
    vw = np.repeat(v.astype(work), group, axis=2).transpose(0, 2, 1, 3)
    s = rnd(qw @ kw.swapaxes(-1, -2)) * scale
    if visible is not None:
        s = np.where(np.asarray(visible, dtype=bool), s, -np.inf).astype(work)
    m = s.max(axis=-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0).astype(work))
    den = p.sum(axis=-1, keepdims=True)
    p = np.where(den > 0, p / np.where(den > 0, den, 1), 0).astype(work)
    out = rnd(rnd(p) @ vw)
    delta = (dow * out).sum(axis=-1, keepdims=True)
    dv = rnd(rnd(p).swapaxes(-1, -2) @ dow)
    ds = rnd(p * (rnd(dow @ vw.swapaxes(-1, -2)) - delta))
    dq = rnd(ds @ kw) * scale
    dk = rnd(ds.swapaxes(-1, -2) @ qw) * scale

    def per_kv_head(x):  # (B, Hq, Sk, D) -> (B, Sk, Hk, D), summed over the group
        return x.transpose(0, 2, 1, 3).reshape(batch, sk, hk, group, d).sum(axis=3)

    return (dq.transpose(0, 2, 1, 3).astype(q.dtype), per_kv_head(dk).astype(q.dtype),
            per_kv_head(dv).astype(q.dtype))


def check_attention(out, q, k, v, *, causal=False, softmax_scale=None, lse=None,
                    q_positions=None, k_positions=None, visible=None):
    """Assert out (and lse) against the float64 reference of the (cast) inputs.

    All arrays are global or local 4-D (or 3-D, promoted here) host arrays; out has
    q's dtype. Returns (err, plain_err).
    """
    if q.ndim == 3:
        q, k, v, out = q[None], k[None], v[None], out[None]
        lse = None if lse is None else lse[None]
    name = np.dtype(q.dtype).name
    assert out.dtype == q.dtype, (out.dtype, q.dtype)
    assert out.shape == q.shape, (out.shape, q.shape)
    ref, ref_lse = reference_attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                       q_positions=q_positions, k_positions=k_positions,
                                       visible=visible)
    out64 = out.astype(np.float64)
    assert not np.isnan(out64).any(), "NaN in out"
    err = relative_error(out64, ref)
    plain = relative_error(
        plain_attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                        q_positions=q_positions, k_positions=k_positions,
                        visible=visible).astype(np.float64), ref)
    assert err <= TOL[name], f"{name}: relative error {err:.3g} > {TOL[name]}"
    assert err <= max(2 * plain, PLAIN_FLOOR[name]), \
        f"{name}: relative error {err:.3g} > 2 x plain {plain:.3g}"
    # rows with no visible key: exactly 0
    dead = ~np.isfinite(ref_lse).transpose(0, 2, 1)
    assert np.all(out64[dead] == 0)
    if lse is not None:
        check_lse(lse, ref_lse, name)
    return err, plain


def check_rounded_once(out, q, k, v, **reference_kwargs):
    """fp16/bf16: out is the exact result rounded ONCE to the dtype.

    Accumulating in float32 and rounding only at the end leaves every element within
    half an ulp of the dtype of the float64 reference, plus float32 noise (a few
    float32 epsilons of the largest |v|, which matters only for outputs near 0).
    Rounding partial results to the dtype between merges (ring hops) breaks this.
    """
    if q.ndim == 3:
        q, k, v, out = q[None], k[None], v[None], out[None]
    ref, _ = reference_attention(q, k, v, **reference_kwargs)
    half_ulp = 0.5 * np.spacing(np.abs(ref).astype(out.dtype)).astype(np.float64)
    noise = 16 * np.finfo(np.float32).eps * np.abs(v.astype(np.float64)).max()
    excess = np.abs(out.astype(np.float64) - ref) - half_ulp
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess[worst] <= noise, (
        f"out{worst} = {float(out[worst])!r} is {excess[worst]:.3g} beyond half an ulp of "
        f"the reference {ref[worst]!r}: rounded to {out.dtype} more than once?")


def check_lse(lse, ref_lse, dtype_name):
    """lse: float32 (float64 for float64 input), -inf exactly where ref is, close elsewhere."""
    want = np.float64 if dtype_name == "float64" else np.float32
    assert lse.dtype == want, (lse.dtype, want)
    assert lse.shape == ref_lse.shape, (lse.shape, ref_lse.shape)
    lse64 = lse.astype(np.float64)
    assert not np.isnan(lse64).any(), "NaN in lse"
    fin = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse64), fin)
    assert np.all(lse64[~fin] == -np.inf)
    assert fin.any(), "every row dead: the lse check would prove nothing"
    # relative to |lse|, but never to less than 1: an error e in lse scales the row's
    # probabilities by exp(e) ~ 1 + e, so e is their relative error whatever lse is
    # (an lse near 0, e.g. one key's score, would otherwise turn rounding into failure)
    diff = np.linalg.norm(lse64[fin] - ref_lse[fin])
    lerr = diff / max(np.linalg.norm(ref_lse[fin]), np.sqrt(fin.sum()))
    assert lerr <= LSE_TOL[dtype_name], f"lse relative error {lerr:.3g}"


def same_on_every_rank(comm, value) -> bool:
    """True on every rank when ``value`` (an array, compared by bytes, or a picklable
    object) is identical on every rank."""
    if isinstance(value, np.ndarray):
        value = (value.shape, value.dtype.str, np.ascontiguousarray(value).view(np.uint8).tobytes())
    everyone = comm.allgather(value)
    return all(x == everyone[0] for x in everyone)


def raises_everywhere(comm, exc_type, match, call, same_message=True):
    """Run ``call`` on every rank of ``comm`` expecting ``exc_type`` matching ``match``.

    Ranks only compare outcomes after the call, so a rank that does not raise
    fails the test instead of leaving the others blocked. Returns the message,
    asserted identical on every rank (unless ``same_message`` is False: then only
    the exception type).
    """
    try:
        with pytest.raises(exc_type, match=match) as info:
            call()
        outcome = ("raised", type(info.value).__name__, str(info.value))
    except (Exception, pytest.fail.Exception) as exc:  # noqa: BLE001 - reported below
        outcome = ("failed", type(exc).__name__, str(exc))
    everyone = comm.allgather(outcome)
    for rank, theirs in enumerate(everyone):
        assert theirs[0] == "raised", f"rank {rank}: {theirs[2]}"
    if same_message:
        assert all(x == everyone[0] for x in everyone), everyone
    else:
        assert all(x[1] == everyone[0][1] for x in everyone), everyone
    return everyone[0][2]


def require_gpu():
    """Import CuPy for a GPU test module, or skip the whole module (the CPU CI).

    Returns (cupy, number of visible CUDA devices).
    """
    cupy = pytest.importorskip("cupy")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:  # no driver
        count = 0
    if count == 0:
        pytest.skip("no CUDA device", allow_module_level=True)
    return cupy, count


# The CPU kernels (seqpar.local.numpy_kernel.compiled): the local tests run under each
# of them, numba's only where it imports; other modules run under the default choice.
try:
    import numba  # noqa: F401

    CPU_KERNELS = ("numpy", "numba")
except ImportError:  # pragma: no cover - numba is optional
    CPU_KERNELS = ("numpy",)
_BOTH_CPU_KERNELS = {"test_local", "test_masks", "test_backward_local", "test_cpu_kernels"}


def pytest_generate_tests(metafunc):
    if metafunc.module.__name__ in _BOTH_CPU_KERNELS:
        metafunc.parametrize("cpu_kernel", CPU_KERNELS, indirect=True)


@pytest.fixture(autouse=True)
def cpu_kernel(request, monkeypatch):
    """The CPU kernel this test runs under (SEQPAR_CPU_KERNEL), None for the default."""
    name = getattr(request, "param", None)
    if name is not None:
        monkeypatch.setenv("SEQPAR_CPU_KERNEL", name)
    return name


@pytest.fixture
def rng(request):
    """A generator seeded from the test's node id: fresh per test, equal on every rank."""
    seed = hashlib.blake2b(request.node.nodeid.encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(seed, "little"))


@pytest.fixture
def comm():
    return MPI.COMM_WORLD


@pytest.fixture(autouse=True)
def _hang_guard():
    """Abort this rank (and with it the mpiexec job) if one test runs far too long."""
    faulthandler.dump_traceback_later(_TEST_TIMEOUT_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


# --- One report per run: rank 0 prints pytest's output; other ranks print only failures ---

class _FailuresOnly:
    """The terminal reporter of ranks other than 0: silent, except for what failed.

    Every rank still runs every test and its exit status still fails the job; only the
    N-fold copies of progress dots and summaries go. SEQPAR_TEST_VERBOSE_RANKS=1 brings
    them back.
    """

    def __init__(self, rank: int):
        self.rank, self.failed = rank, 0

    def _report(self, what: str, report) -> None:
        self.failed += 1
        text = report.longreprtext.rstrip()
        sys.stderr.write(f"\n[rank {self.rank}] {what} {report.nodeid}\n{text}\n")
        sys.stderr.flush()

    def pytest_collectreport(self, report):
        if report.failed:
            self._report("ERROR collecting", report)

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self._report("FAILED" if report.when == "call" else f"ERROR at {report.when}",
                         report)

    def pytest_sessionfinish(self, session, exitstatus):
        if self.failed:
            sys.stderr.write(f"[rank {self.rank}] {self.failed} failed\n")
            sys.stderr.flush()


@pytest.hookimpl(trylast=True)  # after the terminal plugin has registered its reporter
def pytest_configure(config):
    rank = MPI.COMM_WORLD.rank
    if rank == 0 or os.environ.get("SEQPAR_TEST_VERBOSE_RANKS", "") not in ("", "0"):
        return
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if reporter is not None:
        config.pluginmanager.unregister(reporter)
        config.pluginmanager.register(_FailuresOnly(rank), "seqpar-failures-only")
