"""Arrays of other libraries through DLPack: PyTorch CPU tensors in, PyTorch tensors out."""
from __future__ import annotations

import numpy as np
import pytest

import seqpar

from conftest import check_attention, random_qkv

torch = pytest.importorskip("torch")


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_attention_takes_and_returns_torch(rng, dtype):
    q, k, v = random_qkv(rng, dtype, b=2, sq=9, sk=13, hq=4, hk=2, d=8)
    out, lse = seqpar.attention(_t(q), _t(k), _t(v), causal=True, return_lse=True)
    assert isinstance(out, torch.Tensor) and isinstance(lse, torch.Tensor)
    assert out.dtype == _t(q).dtype and tuple(out.shape) == q.shape
    check_attention(out.numpy(), q, k, v, causal=True, lse=lse.numpy())


def test_transposed_views_and_no_copy_of_inputs(rng):
    """PyTorch's (B, H, S, D) layout through .transpose(1, 2): read in place, not written."""
    q, k, v = random_qkv(rng, "float32", b=2, sq=11, hq=4, hk=4, d=8)
    as_bhsd = [_t(x.transpose(0, 2, 1, 3)) for x in (q, k, v)]
    views = [x.transpose(1, 2) for x in as_bhsd]  # (B, S, H, D), not contiguous
    before = [x.clone() for x in as_bhsd]
    out = seqpar.attention(*views)
    check_attention(out.numpy(), q, k, v)
    assert all(torch.equal(a, b) for a, b in zip(as_bhsd, before))


def test_requires_grad_and_backward(rng):
    q, k, v = random_qkv(rng, "float64", b=1, sq=6, hq=2, hk=1, d=4)
    tq, tk, tv = (_t(x).requires_grad_() for x in (q, k, v))
    out, lse = seqpar.attention(tq, tk, tv, causal=True, return_lse=True)
    dout = torch.randn_like(out)
    dq, dk, dv = seqpar.attention_backward(dout, tq, tk, tv, out, lse, causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(
        tq.transpose(1, 2), tk.transpose(1, 2).repeat_interleave(2, 1),
        tv.transpose(1, 2).repeat_interleave(2, 1), is_causal=True).transpose(1, 2)
    ref.backward(dout)
    for got, want in ((dq, tq.grad), (dk, tk.grad), (dv, tv.grad)):
        assert isinstance(got, torch.Tensor)
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.mpi
def test_ring_with_torch_tensors(comm, rng):
    q, k, v = random_qkv(rng, "float32", b=1, sq=8 * comm.size, hq=2, hk=2, d=8)
    parts = [seqpar.shard(_t(x), comm) for x in (q, k, v)]
    assert all(isinstance(p, torch.Tensor) for p in parts)
    out = seqpar.ring_attention(*parts, comm=comm, causal=True)
    assert isinstance(out, torch.Tensor)
    check_attention(seqpar.gather(out, comm).numpy(), q, k, v, causal=True)


def test_a_plain_list_is_refused_clearly(rng):
    q, k, v = random_qkv(rng, "float32", b=1, sq=4, hq=2, hk=2, d=4)
    with pytest.raises(TypeError, match="__dlpack__"):
        seqpar.attention(q.tolist(), k, v)
