"""Bad input: every rank raises the same error, naming the argument and the rank at fault,
and never hangs; afterwards a correct call still works. Also NaN/Inf behaviour."""
from __future__ import annotations

import re

import numpy as np
import pytest

import seqpar

from conftest import check_attention, random_array, random_qkv, raises_everywhere
from reference import reference_attention, relative_error

pytestmark = pytest.mark.mpi

S = 4  # tokens per rank (even: zigzag works)


def _local_inputs(rng, comm, dtype="float64", d=8):
    """A correct global problem and this rank's contiguous slices of it."""
    q, k, v = random_qkv(rng, dtype, b=2, sq=S * comm.size, sk=S * comm.size, hq=4, hk=2, d=d)
    return (q, k, v), tuple(seqpar.shard(x, comm) for x in (q, k, v))


def _still_works(comm, rng):
    """A correct ring call and kv-sharded call right after an error: no leaked state."""
    (q, k, v), (ql, kl, vl) = _local_inputs(rng, comm, "float32")
    for layout in ("contiguous", "zigzag"):
        qz, kz, vz = (seqpar.shard(x, comm, layout=layout) for x in (q, k, v))
        out = seqpar.ring_attention(qz, kz, vz, comm=comm, causal=True, layout=layout)
        check_attention(seqpar.gather(out, comm, layout=layout), q, k, v, causal=True)
    out = seqpar.kv_sharded_attention(q[:, :3], kl, vl, comm=comm)
    check_attention(out, q[:, :3], k, v)


def _bad(case, q, k, v):
    """(q, k, v, extra kwargs) with one problem, for the rank that is at fault."""
    if case == "heads":
        return q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), {}
    if case == "batch":
        return q, k[:1], v[:1], {}
    if case == "head_dim":
        return q, k[..., :4].copy(), v[..., :4].copy(), {}
    if case == "ndim":
        return q[0, :, 0], k, v, {}
    if case == "ndim_mixed":
        return q, k[0], v, {}
    if case == "kv_shape":
        return q, k, v[:, :2], {}
    if case == "dtype_mismatch":
        return q, k, v.astype(np.float32), {}
    if case == "int32":
        return tuple(x.astype(np.int32) for x in (q, k, v)) + ({},)
    if case == "list":
        return q, k.tolist(), v, {}
    if case == "layout":
        return q, k, v, {"layout": "diagonal"}
    if case == "causal_type":
        return q, k, v, {"causal": 1}
    if case == "scale_nan":
        return q, k, v, {"softmax_scale": float("nan")}
    raise AssertionError(case)


CASES = {  # case: (error type, message after "rank N: ")
    "heads": (ValueError, r"heads of q \(4\) must be a multiple of heads of k/v \(3\)"),
    "batch": (ValueError, r"batch of q \(2\) and of k/v \(1\) differ"),
    "head_dim": (ValueError, r"head_dim of q \(8\) and of k/v \(4\) differ"),
    "ndim": (ValueError, r"q must have 4 dimensions"),
    "ndim_mixed": (ValueError, r"k has 3 dimensions but q has 4"),
    "kv_shape": (ValueError, r"k and v must have the same shape"),
    "dtype_mismatch": (TypeError, r"v has dtype float32 but q has float64"),
    "int32": (TypeError, r"q has dtype int32"),
    "list": (TypeError, r"k must be a numpy.ndarray, a cupy.ndarray or an array with "
                     r"__dlpack__ \(PyTorch, JAX, ...\), got builtins.list"),
    "layout": (ValueError, r"layout must be one of"),
    "causal_type": (TypeError, r"causal must be a bool"),
    "scale_nan": (ValueError, r"softmax_scale must be a finite number"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ring_bad_input_on_last_rank(comm, rng, case):
    """Only the last rank passes the bad argument; every rank raises, naming that rank."""
    _, (q, k, v) = _local_inputs(rng, comm)
    culprit = comm.size - 1
    kwargs = {}
    if comm.rank == culprit:
        q, k, v, kwargs = _bad(case, q, k, v)
    exc, text = CASES[case]
    message = raises_everywhere(comm, exc, rf"^rank {culprit}: {text}",
                                lambda: seqpar.ring_attention(q, k, v, comm=comm, **kwargs))
    assert f"rank {culprit}" in message
    _still_works(comm, rng)


@pytest.mark.parametrize("case", ["heads", "head_dim", "dtype_mismatch", "int32", "list",
                                  "ndim", "kv_shape", "batch"])
def test_kv_sharded_bad_input_on_last_rank(comm, rng, case):
    (q, _, _), (_, k, v) = _local_inputs(rng, comm)
    culprit = comm.size - 1
    if comm.rank == culprit:
        q, k, v, _ = _bad(case, q, k, v)
    exc, text = CASES[case]
    raises_everywhere(comm, exc, rf"^rank {culprit}: {text}",
                      lambda: seqpar.kv_sharded_attention(q, k, v, comm=comm))
    _still_works(comm, rng)


@pytest.mark.parametrize("case", ["heads", "head_dim", "dtype_mismatch", "int32", "list",
                                  "ndim", "kv_shape", "batch", "causal_type", "scale_nan"])
def test_local_attention_bad_input(rng, case):
    """seqpar.attention (no communication) raises the same local errors."""
    q, k, v = random_qkv(rng, "float64", b=2, sq=S, sk=S, hq=4, hk=2, d=8)
    q, k, v, kwargs = _bad(case, q, k, v)
    exc, text = CASES[case]
    with pytest.raises(exc, match=text):
        seqpar.attention(q, k, v, **kwargs)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("which", ["ring", "kv_sharded"])
def test_head_dim_differs_across_ranks(comm, rng, which):
    """Rank 1 alone uses head_dim 4 (consistently); the rest use 8."""
    _, (q, k, v) = _local_inputs(rng, comm)
    if comm.rank == 1:
        q, k, v = q[..., :4].copy(), k[..., :4].copy(), v[..., :4].copy()
    fn = seqpar.ring_attention if which == "ring" else seqpar.kv_sharded_attention
    raises_everywhere(comm, ValueError,
                      r"_attention: head_dim differs across ranks: rank 0 has 8, rank 1 has 4",
                      lambda: fn(q, k, v, comm=comm))
    _still_works(comm, rng)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name,kwargs,text", [
    ("causal", {"causal": True}, r"_attention: causal differs across ranks: rank 0 has False, rank 1 has True"),
    ("softmax_scale", {"softmax_scale": 0.5},
     r"_attention: softmax_scale differs across ranks: rank 0 has None, rank 1 has 0.5"),
    ("layout", {"layout": "zigzag"},
     r"_attention: layout differs across ranks: rank 0 has 'contiguous', rank 1 has 'zigzag'"),
])
def test_setting_differs_across_ranks(comm, rng, name, kwargs, text):
    _, (q, k, v) = _local_inputs(rng, comm)
    mine = kwargs if comm.rank == 1 else {}
    raises_everywhere(comm, ValueError, text,
                      lambda: seqpar.ring_attention(q, k, v, comm=comm, **mine))
    _still_works(comm, rng)


def test_ring_zigzag_odd_length(comm, rng):
    """Every rank holds 3 tokens: a global length 3P is not divisible by 2P."""
    q, k, v = random_qkv(rng, "float32", b=1, sq=3, sk=3, hq=2, hk=2, d=4)
    raises_everywhere(comm, ValueError, r"^rank 0: zigzag layout needs even local lengths",
                      lambda: seqpar.ring_attention(q, k, v, comm=comm, layout="zigzag"))
    _still_works(comm, rng)


@pytest.mark.parametrize("fn", ["ring", "kv_sharded", "shard", "gather"])
def test_comm_not_a_comm(comm, rng, fn):
    x = random_array(rng, (1, 2 * S, 2, 4), "float64")
    call = {"ring": lambda: seqpar.ring_attention(x, x, x, comm="world"),
            "kv_sharded": lambda: seqpar.kv_sharded_attention(x, x, x, comm=42),
            "shard": lambda: seqpar.shard(x, comm=object()),
            "gather": lambda: seqpar.gather(x, comm=[comm])}[fn]
    # reported through an agreement on COMM_WORLD (the default every rank has)
    raises_everywhere(comm, TypeError, r"^rank 0: comm must be an mpi4py.MPI.Comm, got ", call)
    _still_works(comm, rng)


@pytest.mark.parametrize("fn", ["ring", "kv_sharded", "shard", "gather"])
def test_comm_invalid_on_one_rank(comm, rng, fn):
    """One rank passes something that is no communicator, the others COMM_WORLD: the
    error reaches every rank (through an agreement on COMM_WORLD), nobody waits."""
    if comm.size < 2:
        pytest.skip("needs 2 ranks")
    x = random_array(rng, (1, 2 * S, 2, 4), "float64")
    bad = comm.size - 1
    mine = 42 if comm.rank == bad else None
    call = {"ring": lambda: seqpar.ring_attention(x, x, x, comm=mine),
            "kv_sharded": lambda: seqpar.kv_sharded_attention(x, x, x, comm=mine),
            "shard": lambda: seqpar.shard(x, comm=mine),
            "gather": lambda: seqpar.gather(x, comm=mine)}[fn]
    raises_everywhere(comm, TypeError, rf"^rank {bad}: comm must be an mpi4py.MPI.Comm, "
                      "got 42", call)
    _still_works(comm, rng)


def test_shard_zigzag_not_divisible(comm, rng):
    x = random_array(rng, (1, 2 * comm.size * 3 + 1, 2), "float32")
    raises_everywhere(comm, ValueError,
                      rf"^rank 0: x: length {x.shape[1]} along axis 1 is not divisible by "
                      rf"{2 * comm.size} \(zigzag layout over {comm.size} ranks\)",
                      lambda: seqpar.shard(x, comm, layout="zigzag"))
    _still_works(comm, rng)


def test_shard_lengths_that_do_not_add_up(comm, rng):
    x = random_array(rng, (comm.size * 2 + 1, 3), "float32")
    raises_everywhere(comm, ValueError, r"^rank 0: lengths must give a count >= 0 for each",
                      lambda: seqpar.shard(x, comm, axis=0, lengths=[1] * comm.size))


@pytest.mark.parametrize("case,exc,text", [
    ("layout", ValueError, r"layout must be one of"),
    ("axis", ValueError, r"axis 4 is out of range for x with 3 dimensions"),
    ("list", TypeError, r"x must be a numpy.ndarray or cupy.ndarray"),
])
@pytest.mark.parametrize("fn", ["shard", "gather"])
def test_shard_gather_bad_argument_on_last_rank(comm, rng, case, exc, text, fn):
    x = random_array(rng, (2, 2 * comm.size * 2, 3), "float64")
    if fn == "gather":
        x = seqpar.shard(x, comm)
    args = {"layout": "contiguous", "axis": 1}
    culprit = comm.size - 1
    if comm.rank == culprit:
        if case == "list":
            x = x.tolist()
        else:
            args[case] = {"layout": "rows", "axis": 4}[case]
    f = getattr(seqpar, fn)
    raises_everywhere(comm, exc, rf"^rank {culprit}: {text}", lambda: f(x, comm, **args))
    _still_works(comm, rng)


@pytest.mark.mpi(min_size=2)
def test_shard_shape_differs_across_ranks(comm, rng):
    x = random_array(rng, (2, 4 * comm.size, 3), "float64")
    if comm.rank == 1:
        x = x[:, :, :2]
    raises_everywhere(comm, ValueError,
                      rf"^shard: x.shape differs across ranks: rank 0 has \(2, {4 * comm.size}, 3\), "
                      rf"rank 1 has \(2, {4 * comm.size}, 2\)",
                      lambda: seqpar.shard(x, comm))


def test_gather_zigzag_odd_local_length(comm, rng):
    x = random_array(rng, (1, 3, 2), "float64")
    raises_everywhere(comm, ValueError, r"^rank 0: x: zigzag layout needs an even local length",
                      lambda: seqpar.gather(x, comm, layout="zigzag"))
    _still_works(comm, rng)


# ---------------------------------------------------------------- NaN / Inf in the inputs

# The reference is computed from the inputs without the NaN/Inf: the rows compared
# never see the poisoned entry, so their exact output does not depend on it.


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("causal", [False, True])
def test_ring_nan_in_one_key(comm, rng, layout, causal):
    """NaN in key j0 (batch 0, K/V head 0) makes NaN exactly the rows that see j0:
    (batch 0, the query heads of K/V head 0, positions >= j0 when causal). Every
    other row stays finite and correct; nothing hangs."""
    s = 4 * comm.size
    q, k, v = random_qkv(rng, "float64", b=2, sq=s, sk=s, hq=4, hk=2, d=8)
    j0 = s // 2 + 1
    ref, _ = reference_attention(q, k, v, causal=causal)
    k[0, j0, 0, 3] = np.nan
    ql, kl, vl = (seqpar.shard(x, comm, layout=layout) for x in (q, k, v))
    out = seqpar.ring_attention(ql, kl, vl, comm=comm, causal=causal, layout=layout)
    out = seqpar.gather(out, comm, layout=layout)
    nan_rows = np.zeros(out.shape[:-1], dtype=bool)
    nan_rows[0, j0 if causal else 0:, 0:2] = True
    assert np.isnan(out[nan_rows]).all()
    assert np.isfinite(out[~nan_rows]).all()
    assert relative_error(out[~nan_rows], ref[~nan_rows]) <= 1e-12
    if causal:
        assert np.isfinite(out[0, :j0]).all()
    _still_works(comm, rng)


def test_kv_sharded_nan_in_one_key(comm, rng):
    """The NaN on the last rank's slice reaches the affected rows on every rank."""
    sk = 3 * comm.size
    q, k, v = random_qkv(rng, "float64", b=2, sq=5, sk=sk, hq=4, hk=2, d=8)
    ref, _ = reference_attention(q, k, v)
    k[1, sk - 2, 1, 0] = np.nan
    r = comm.rank
    out = seqpar.kv_sharded_attention(q, k[:, 3 * r:3 * r + 3], v[:, 3 * r:3 * r + 3], comm=comm)
    nan_rows = np.zeros(out.shape[:-1], dtype=bool)
    nan_rows[1, :, 2:4] = True
    assert np.isnan(out[nan_rows]).all()
    assert np.isfinite(out[~nan_rows]).all()
    assert relative_error(out[~nan_rows], ref[~nan_rows]) <= 1e-12


def test_local_nan_in_one_key(rng):
    q, k, v = random_qkv(rng, "float32", b=1, sq=9, sk=9, hq=2, hk=1, d=8)
    ref, _ = reference_attention(q, k, v, causal=True)
    k[0, 5, 0, 1] = np.nan
    out = seqpar.attention(q, k, v, causal=True)
    assert np.isnan(out[0, 5:]).all() and np.isfinite(out[0, :5]).all()
    assert relative_error(out[0, :5], ref[0, :5]) <= 1e-5


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_ring_inf_in_one_value(comm, rng, layout):
    """+inf in one value entry v[0, j0, 1, 2] stays confined to that (batch, head,
    feature): rows that see key j0 get a non-finite out[..., 2] (inf, or NaN where a
    merge weight underflows to 0); every other entry of every row stays finite and
    correct. Rows that do NOT see j0 may also get NaN in that feature: a masked key
    has weight exactly 0 and 0 * inf = NaN in the weighted sum of values (the float64
    reference does the same), so that column is left unspecified before j0."""
    s = 4 * comm.size
    q, k, v = random_qkv(rng, "float64", b=1, sq=s, sk=s, hq=2, hk=2, d=4)
    j0 = s - 3
    ref, _ = reference_attention(q, k, v, causal=True)
    v[0, j0, 1, 2] = np.inf
    ql, kl, vl = (seqpar.shard(x, comm, layout=layout) for x in (q, k, v))
    out = seqpar.gather(seqpar.ring_attention(ql, kl, vl, comm=comm, causal=True, layout=layout),
                        comm, layout=layout)
    assert not np.isfinite(out[0, j0:, 1, 2]).any()
    healthy = np.ones(out.shape, dtype=bool)
    healthy[0, :, 1, 2] = False
    assert np.isfinite(out[healthy]).all()
    assert relative_error(out[healthy], ref[healthy]) <= 1e-12
    _still_works(comm, rng)


def test_error_message_is_identical_text(comm, rng):
    """The culprit's local message travels to every rank verbatim (prefixed by its rank)."""
    _, (q, k, v) = _local_inputs(rng, comm)
    if comm.rank == comm.size - 1:
        v = v.astype(np.float32)
    msg = raises_everywhere(comm, TypeError, "dtype",
                            lambda: seqpar.ring_attention(q, k, v, comm=comm))
    assert re.fullmatch(rf"rank {comm.size - 1}: v has dtype float32 but q has float64: "
                        r"q, k and v must share one dtype", msg)
