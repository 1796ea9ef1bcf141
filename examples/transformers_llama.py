"""A transformers Llama trained with its sequence split across ranks by seqpar's ring attention.

transformers lets a model call any attention function registered in
``transformers.AttentionInterface``; it hands that function PyTorch's (B, H, S, D)
tensors, which seqpar reads as they are with ``qkv_format="bhsd"`` (views through
DLPack, no copies). Each rank runs the model on its own slice of every sequence, with
the slice's *global* positions as ``position_ids`` (so rotary embeddings are those of
the whole sequence), and the ring attends each query to every earlier token of the
whole sequence (causal by global position; zigzag layout, which balances causal work).
The loss is the sum of the ranks' token losses, so the gradient of every parameter is
the sum of the ranks' gradients: one Allreduce per step, then every rank takes the same
optimizer step.

Everything is checked against the one-process model (the same random weights: same
seed, nothing downloaded) on the full sequences with torch's own SDPA attention: loss
and gradients of every parameter, at every step, to float32 tolerance. Run::

    python -m seqpar run -n 2 examples/transformers_llama.py

(any number of ranks that divides 2 x 48 tokens into 2P equal chunks: 1, 2, 3, 4, 6, ...;
needs ``pip install torch transformers``). Exits 1 when a check fails.
"""
import torch
from mpi4py import MPI
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

import seqpar

LAYOUT = "zigzag"
STEPS = 3
TOKENS, BATCH = 96, 2
# float32 against float32 summed in another order (ranks, blocks, merges): DESIGN.md's
# float32 tolerance, ||got - want|| / ||want||, for the loss and each parameter's gradient
LOSS_TOL = GRAD_TOL = 1e-5


class RingAttention(torch.autograd.Function):
    """seqpar.ring_attention on (B, H, S, D) tensors, with seqpar's backward.

    The calls carry a tag so the forward and the backward pair up across ranks even
    where PyTorch runs the backward on a thread of its own (CUDA tensors; README,
    "Calls from several threads").
    """

    @staticmethod
    def forward(ctx, q, k, v, comm, scale):
        options = {"comm": comm, "causal": True, "layout": LAYOUT, "softmax_scale": scale,
                   "qkv_format": "bhsd", "tag": 0}
        out, lse = seqpar.ring_attention(q, k, v, return_lse=True, **options)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = options
        return out  # (B, H, S, D), like q

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = seqpar.ring_attention_backward(dout, q, k, v, out, lse, **ctx.options)
        return dq, dk, dv, None, None


def seqpar_ring_attention(module, query, key, value, attention_mask, scaling=None,
                          dropout=0.0, **kwargs):
    """The signature transformers calls an attention function with: query (B, Hq, S, D),
    key and value (B, Hk, S, D) (grouped-query heads not repeated: seqpar takes Hk < Hq
    as they are); returns (attention output as (B, S, Hq, D), no attention weights)."""
    if dropout:
        raise ValueError("this example's attention has no dropout")
    out = RingAttention.apply(query, key, value, MPI.COMM_WORLD, scaling)
    return out.transpose(1, 2), None  # a view: seqpar's output is (B, S, H, D) in memory


AttentionInterface.register("seqpar_ring", seqpar_ring_attention)


def build_model(attn_implementation: str) -> LlamaForCausalLM:
    """A small Llama with random weights, the same on every rank and for both models."""
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=TOKENS, attention_dropout=0.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    model.set_attn_implementation(attn_implementation)
    return model


def token_loss_sum(model, tokens, targets, positions=None):
    """Sum of the cross-entropy of every token that has a target (-100: none)."""
    logits = model(input_ids=tokens, position_ids=positions).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             targets.reshape(-1), ignore_index=-100,
                                             reduction="sum")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def main() -> int:
    comm = MPI.COMM_WORLD
    if TOKENS % (2 * comm.size):
        raise SystemExit(f"{TOKENS} tokens do not split into {2 * comm.size} equal chunks")
    generator = torch.Generator().manual_seed(1)  # the same batch on every rank
    tokens = torch.randint(0, 128, (BATCH, TOKENS), generator=generator)
    targets = torch.cat([tokens[:, 1:], torch.full((BATCH, 1), -100)], dim=1)
    count = int((targets != -100).sum())  # the loss is the mean over the whole batch

    mine = torch.from_numpy(seqpar.local_indices(TOKENS, comm, layout=LAYOUT))
    model, reference = build_model("seqpar_ring"), build_model("sdpa")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    worst_loss = worst_grad = 0.0
    for step in range(STEPS):
        optimizer.zero_grad()
        mine_loss = token_loss_sum(model, tokens[:, mine], targets[:, mine],
                                   positions=mine[None].expand(BATCH, -1)) / count
        mine_loss.backward()
        loss = comm.allreduce(float(mine_loss.detach()), op=MPI.SUM)
        for p in model.parameters():  # the sum of the ranks' parts, on every rank
            comm.Allreduce(MPI.IN_PLACE, p.grad.numpy(), op=MPI.SUM)

        reference_optimizer.zero_grad()
        reference_loss = token_loss_sum(reference, tokens, targets) / count
        reference_loss.backward()
        want = float(reference_loss.detach())
        loss_err = abs(loss - want) / abs(want)
        grad_errs = {name: relative_error(p.grad, q.grad) for (name, p), q in
                     zip(model.named_parameters(), reference.parameters())}
        name, grad_err = max(grad_errs.items(), key=lambda item: item[1])
        worst_loss, worst_grad = max(worst_loss, loss_err), max(worst_grad, grad_err)
        if comm.rank == 0:
            print(f"step {step}: loss {loss:.6f} (one process: {want:.6f}, relative "
                  f"error {loss_err:.1e}); gradients of {len(grad_errs)} parameters: worst "
                  f"relative error {grad_err:.1e} ({name})", flush=True)
        optimizer.step()
        reference_optimizer.step()
    ok = worst_loss <= LOSS_TOL and worst_grad <= GRAD_TOL
    if comm.rank == 0:
        print(f"{comm.size} rank(s), {LAYOUT} layout: {'OK' if ok else 'MISMATCH'} (loss "
              f"{worst_loss:.1e} <= {LOSS_TOL:g}, gradients {worst_grad:.1e} <= {GRAD_TOL:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
