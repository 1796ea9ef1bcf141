"""AttentionPlan on the CPU: planned calls equal seqpar.attention bitwise, against float64;
arrays of another description raise, naming the argument."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import check_attention, random_qkv

import seqpar


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("options", [{}, {"causal": True}, {"window": (5, 0)},
                                     {"seqlens": [7, 13, 12]}, {"causal": True, "q_offset": 4}])
def test_plan_equals_attention(rng, dtype, options):
    sq = 32 - options.get("q_offset", 0)
    q, k, v = random_qkv(rng, dtype, b=2, sq=sq, sk=32, hq=4, hk=2, d=16)
    plan = seqpar.AttentionPlan(q, k, v, return_lse=True, **options)
    for _ in range(2):  # fresh values, the same description
        q, k, v = random_qkv(rng, dtype, b=2, sq=sq, sk=32, hq=4, hk=2, d=16)
        out, lse = plan(q, k, v)
        want, want_lse = seqpar.attention(q, k, v, return_lse=True, **options)
        assert out.tobytes() == want.tobytes() and lse.tobytes() == want_lse.tobytes()
    i = np.arange(sq)[:, None] + options.get("q_offset", 0)
    j = np.arange(32)[None, :]
    visible = np.ones((sq, 32), bool)
    if options.get("causal"):
        visible &= j <= i
    if "window" in options:
        visible &= j >= i - options["window"][0]
        visible &= j <= i + options["window"][1]
    if "seqlens" in options:
        doc = np.repeat(np.arange(3), options["seqlens"])
        visible &= doc[i] == doc[j]
    check_attention(out, q, k, v, visible=visible, lse=lse)


def test_plan_layouts_and_key_lengths(rng):
    """bhsd, 3-D and host key lengths (checked per call) as attention takes them."""
    q, k, v = random_qkv(rng, "float32", b=2, sq=8, sk=24, hq=4, hk=4, d=16)
    bhsd = [np.ascontiguousarray(x.swapaxes(1, 2)) for x in (q, k, v)]
    plan = seqpar.AttentionPlan(*bhsd, qkv_format="bhsd", causal=True, q_offset=16)
    want = seqpar.attention(q, k, v, causal=True, q_offset=16)
    assert plan(*bhsd).swapaxes(1, 2).tobytes() == want.tobytes()
    plan3 = seqpar.AttentionPlan(q[0], k[0], v[0])
    assert plan3(q[0], k[0], v[0]).tobytes() == seqpar.attention(q[0], k[0], v[0]).tobytes()
    lengths = np.array([5, 24])
    plan_kl = seqpar.AttentionPlan(q, k, v, key_lengths=lengths)
    got = plan_kl(q, k, v, key_lengths=np.array([3, 20]))
    assert got.tobytes() == seqpar.attention(q, k, v, key_lengths=np.array([3, 20])).tobytes()
    check_attention(got[:1], q[:1], k[:1, :3], v[:1, :3])
    with pytest.raises(ValueError, match="key_lengths must lie in"):
        plan_kl(q, k, v, key_lengths=np.array([3, 25]))


def test_plan_rejects_other_arrays(rng):
    q, k, v = random_qkv(rng, "float32", b=1, sq=8, sk=8, hq=2, hk=2, d=16)
    plan = seqpar.AttentionPlan(q, k, v)
    with pytest.raises(ValueError, match="k: this plan was built for a numpy array of shape"):
        plan(q, k[:, :4], v)
    with pytest.raises(ValueError, match="q: this plan was built for"):
        plan(np.asfortranarray(q), k, v)
    with pytest.raises(ValueError, match="v: this plan was built for"):
        plan(q, k, v.astype(np.float64))
    with pytest.raises(ValueError, match="key_lengths: this plan was built for none"):
        plan(q, k, v, key_lengths=np.array([3]))
    with pytest.raises(ValueError, match="heads of q"):
        seqpar.AttentionPlan(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))


def test_plan_reads_other_byte_order_as_attention_does(rng):
    q, k, v = random_qkv(rng, "float64", b=1, sq=8, sk=8, hq=2, hk=2, d=16)
    swapped = [x.astype(">f8") for x in (q, k, v)]
    plan = seqpar.AttentionPlan(*swapped)
    assert plan(*swapped).tobytes() == seqpar.attention(q, k, v).tobytes()
    for x, y in zip(swapped, (q, k, v)):
        assert np.array_equal(x, y)  # never written
