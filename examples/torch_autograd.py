"""Ring attention as a PyTorch autograd function, through DLPack (no copies).

seqpar imports no framework: this example wraps seqpar.ring_attention and
seqpar.ring_attention_backward in a ``torch.autograd.Function`` in a few lines.
Tensors go in and come out as PyTorch tensors (CPU tensors run on NumPy, CUDA
tensors on CuPy, zero copy both ways). Run::

    python -m seqpar run -n 2 examples/torch_autograd.py

Each rank holds its slice of a sequence; the gradients of a loss over the whole
sequence are checked on rank 0 against PyTorch's own attention on the gathered
tensors.
"""
import torch
from mpi4py import MPI

import seqpar


class RingAttention(torch.autograd.Function):
    """out = attention over the sequence split across ``comm``'s ranks, by global position.

    PyTorch runs the backward of CUDA tensors on a thread of its own: the calls carry a
    tag, so the forward (main thread) and the backward (that thread), one after the
    other, pair up by it on every rank (README, "Calls from several threads").
    """

    @staticmethod
    def forward(ctx, q, k, v, comm, causal, layout):
        out, lse = seqpar.ring_attention(q, k, v, comm=comm, causal=causal, layout=layout,
                                         return_lse=True, tag=0)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = dict(comm=comm, causal=causal, layout=layout, tag=0)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = seqpar.ring_attention_backward(dout.contiguous(), q, k, v, out, lse,
                                                    **ctx.options)
        return dq, dk, dv, None, None, None


def main() -> int:
    comm = MPI.COMM_WORLD
    torch.manual_seed(0)  # the same global tensors on every rank
    n, heads, d = 64 * comm.size, 4, 32
    q, k, v = (torch.randn(1, n, heads, d, dtype=torch.float64) for _ in range(3))
    weight = torch.randn(1, n, heads, d, dtype=torch.float64)
    layout = "zigzag"
    mine = torch.from_numpy(seqpar.local_indices(n, layout=layout))
    local = [x[:, mine].clone().requires_grad_() for x in (q, k, v)]
    out = RingAttention.apply(*local, comm, True, layout)
    (out * weight[:, mine]).sum().backward()  # this rank's part of the loss

    # reference on every rank: PyTorch's attention on the whole sequence
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in full), is_causal=True).transpose(1, 2)
    (ref * weight).sum().backward()
    worst = 0.0
    for name, mine_grad, ref_grad in zip("qkv", (x.grad for x in local),
                                         (x.grad[:, mine] for x in full)):
        err = float((mine_grad - ref_grad).norm() / ref_grad.norm())
        worst = max(worst, comm.allreduce(err, op=MPI.MAX))
    if comm.rank == 0:
        print(f"{comm.size} rank(s): gradients of q, k, v vs torch SDPA: worst relative "
              f"error {worst:.2e}")
    return 0 if worst <= 1e-10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
