"""Arrays of other libraries through DLPack: PyTorch CPU tensors in, PyTorch tensors out."""
from __future__ import annotations

import numpy as np
import pytest

import seqpar

from conftest import check_attention, random_qkv
from reference import reference_attention_backward, relative_error

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


class _Ring(torch.autograd.Function):
    """The pattern of examples/torch_autograd.py, with the tag as a parameter."""

    @staticmethod
    def forward(ctx, q, k, v, comm, tag):
        out, lse = seqpar.ring_attention(q, k, v, comm=comm, causal=True, return_lse=True,
                                         tag=tag)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = dict(comm=comm, causal=True, tag=tag)
        return out

    threads: list = []

    @staticmethod
    def backward(ctx, dout):
        import threading

        _Ring.threads.append(threading.current_thread() is threading.main_thread())
        grads = seqpar.ring_attention_backward(dout.contiguous(), *ctx.saved_tensors,
                                               **ctx.options)
        return grads + (None, None)


@pytest.mark.gpu
@pytest.mark.mpi
def test_torch_cuda_backward_thread_pairs_by_tag(comm, rng):
    """PyTorch runs the backward of CUDA tensors on a thread of its own: with a tag the
    forward (main thread) and backward (that thread) pair up and the gradients are
    right; without one, the backward raises the same error on every rank."""
    from conftest import require_gpu

    require_gpu()
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    seqpar.use_local_device(comm)
    q, k, v = random_qkv(rng, "float32", b=1, sq=64 * comm.size, hq=2, hk=2, d=64)
    mine = seqpar.local_indices(q.shape[1], comm)
    local = [torch.from_numpy(np.ascontiguousarray(x[:, mine])).cuda().requires_grad_()
             for x in (q, k, v)]
    out = _Ring.apply(*local, comm, 5)
    whole = rng.standard_normal(q.shape).astype(np.float32)  # the loss is <whole, out>
    dout = torch.from_numpy(np.ascontiguousarray(whole[:, mine])).cuda()
    out.backward(dout)
    n = q.shape[1]
    want = reference_attention_backward(whole, q, k, v,
                                        visible=np.tril(np.ones((n, n), dtype=bool)))
    errors = [relative_error(got.grad.cpu().numpy(), ref[:, mine])
              for got, ref in zip(local, want)]
    on_main = list(_Ring.threads)
    # judged on every rank together: a rank that failed alone would strand the others
    everyone = comm.allgather((max(errors), on_main))
    assert all(e <= 1e-4 for e, _ in everyone), everyone
    assert all(threads == [False] for _, threads in everyone), everyone  # torch's thread
    # untagged: the forward runs (main thread), the backward raises on every rank
    again = [x.detach().clone().requires_grad_() for x in local]
    out = _Ring.apply(*again, comm, None)
    outcome = "returned"
    try:
        out.backward(dout)
    except Exception as exc:  # noqa: BLE001 - torch re-raises the backward's error here
        outcome = f"{type(exc).__name__}: {exc}"
    outcomes = comm.allgather(outcome)
    assert all("not the main thread, without a tag" in o for o in outcomes), outcomes
