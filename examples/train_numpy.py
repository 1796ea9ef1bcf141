"""Train a small attention model on a long-range task with NumPy and MPI alone.

The sequence is split across the ranks; each rank runs ring attention forward and
backward on its slice (seqpar.ring_attention / ring_attention_backward), NumPy
does the rest of the model, and one Allreduce per weight adds the gradients.
The task: match a teacher attention layer whose queries look for keys far back
in the sequence (its positional features pick out tokens about LAG positions
earlier, LAG larger than a rank's share), so the answer at most positions sits on
another rank. Run::

    python -m seqpar run -n 2 examples/train_numpy.py

Prints the loss as it falls; exits 1 if it did not fall below a tenth of where it
started.
"""
import argparse
import sys

import numpy as np
from mpi4py import MPI

import seqpar


def features(positions, tokens, lag, width=16):
    """Token one-hots, then sinusoids of the position and of the position - LAG: a
    query built from the second set meets a key built from the first LAG tokens back."""
    freqs = 2 * np.pi / np.geomspace(8, 4 * lag, width // 2)

    def waves(p):
        return np.concatenate([np.sin(p[:, None] * freqs), np.cos(p[:, None] * freqs)], axis=1)

    return np.concatenate([tokens, waves(positions), waves(positions - lag)], axis=1)


def attention_layer(x, weights, comm, heads, d):
    """q, k, v projections, ring attention, output projection; returns what backward needs."""
    rows = x.shape[0]
    q, k, v = ((x @ weights[w]).reshape(rows, -1, heads, d) for w in ("wq", "wk", "wv"))
    out, lse = seqpar.ring_attention(q, k, v, comm=comm, causal=True, return_lse=True)
    return out.reshape(rows, -1, heads * d) @ weights["wo"], (q, k, v, out, lse)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=2048, help="global sequence length")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    n, vocab, rows, heads, d = args.seq, 8, 2, 2, 16
    lag = n // 2 + 17
    mine = seqpar.local_indices(n, comm)                 # this rank's positions
    width = vocab + 32

    def layer(seed, sharp):
        init = np.random.default_rng(seed)  # the same on every rank
        w = {name: init.standard_normal((width, heads * d)) / np.sqrt(width)
             for name in ("wq", "wk", "wv")}
        w["wo"] = init.standard_normal((heads * d, 4)) / np.sqrt(heads * d)
        if sharp:  # the teacher: queries from positions - LAG meet keys from positions
            w["wq"][:] = 0
            w["wk"][:] = 0
            for h in range(heads):
                w["wq"][vocab + 16:, h * d:h * d + 16] = 4 * np.eye(16)
                w["wk"][vocab:vocab + 16, h * d:h * d + 16] = 4 * np.eye(16)
        return w

    teacher, student = layer(0, True), layer(1, False)
    moments = {name: (np.zeros_like(w), np.zeros_like(w)) for name, w in student.items()}
    data = np.random.default_rng(2)                      # the same batches on every rank
    first = loss = None
    for step in range(1, args.steps + 1):
        tokens = np.eye(vocab)[data.integers(vocab, size=(rows, n))][:, mine]
        x = np.stack([features(mine.astype(float), t, lag) for t in tokens])
        target, _ = attention_layer(x, teacher, comm, heads, d)
        y, (q, k, v, out, lse) = attention_layer(x, student, comm, heads, d)
        error = y - target
        count = comm.allreduce(error.size)
        loss = comm.allreduce(float((error ** 2).sum())) / count
        first = loss if first is None else first
        dy = 2 * error / count                               # backward of the NumPy parts
        grads = {"wo": np.einsum("bsi,bso->io", out.reshape(rows, -1, heads * d), dy)}
        dout = (dy @ student["wo"].T).reshape(out.shape)
        dq, dk, dv = seqpar.ring_attention_backward(dout, q, k, v, out, lse, comm=comm,
                                                    causal=True)  # attention's, by seqpar
        for name, g in (("wq", dq), ("wk", dk), ("wv", dv)):
            grads[name] = np.einsum("bsf,bso->fo", x, g.reshape(rows, -1, heads * d))
        for name, g in grads.items():
            comm.Allreduce(MPI.IN_PLACE, g, op=MPI.SUM)
            m, s = moments[name]                             # Adam
            m[...] = 0.9 * m + 0.1 * g
            s[...] = 0.999 * s + 0.001 * g * g
            student[name] -= args.lr * (m / (1 - 0.9 ** step)) / (
                np.sqrt(s / (1 - 0.999 ** step)) + 1e-8)
        if comm.rank == 0 and (step == 1 or step % 25 == 0):
            print(f"step {step:4d}: loss {loss:.5f}", flush=True)
    ok = loss < first / 10
    if comm.rank == 0:
        print(f"{'PASS' if ok else 'FAIL'}: loss {first:.5f} -> {loss:.5f} on {comm.size} "
              f"rank(s), {n} tokens, the teacher looks {lag} tokens back", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
