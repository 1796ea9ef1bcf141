"""Ring attention over a long random sequence, checked against float64 at the end.

Run with any number of ranks, e.g.::

    python -m seqpar run -n 4 examples/ring_attention.py --seq 32768 --causal
    python -m seqpar run -n 2 examples/ring_attention.py --gpu --dtype bfloat16 \
        --seq 131072 --heads 16 --head-dim 128 --causal     # one GPU per rank (CuPy)

``seqpar run`` prints the mpiexec command it runs; by hand that is, e.g.,
``mpiexec -n 4 python -m mpi4py examples/ring_attention.py --causal`` (``python -m
mpi4py``: an exception on one rank aborts the job instead of leaving the others waiting).

Each rank makes only its own tokens' Q, K, V (the sequence is defined chunk by chunk
from seeds, as a file would be read by rank: ``seqpar.local_indices`` gives the global
positions a rank holds), runs seqpar.ring_attention, and checks a sample of its own
rows against a plain float64 softmax over all keys, streaming the keys chunk by chunk.
Prints the median and minimum time of --repeats calls (as ``seqpar bench`` does), the
throughput at the median and the worst error; exits 1 if the error is over the
tolerance. Progress, and the steps of a call that runs long, show on rank 0 through
seqpar's log (``seqpar.log_to_stderr()`` below; ``SEQPAR_LOG=off`` silences it).
"""
import argparse
import os
import sys
import time

import numpy as np
from mpi4py import MPI

import seqpar
from seqpar.progress import Progress

# relative error vs float64 (README.md, "Numerics")
TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384, help="global sequence length")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="fewer K/V heads: GQA")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=list(TOLERANCE), default="float32")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--layout", choices=["contiguous", "zigzag"], default="zigzag")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu", action="store_true",
                        help="CuPy arrays, each rank on the GPU of its node-local rank")
    parser.add_argument("--transport", default="auto", help="GPU: nccl, cuda-aware or staged")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    _warn_if_alone(comm)
    if not os.environ.get("SEQPAR_LOG"):
        seqpar.log_to_stderr("INFO")  # progress lines; the steps of calls over 5 s
    kv_heads = args.kv_heads or args.heads
    xp = np
    if args.gpu:
        import cupy as xp

        seqpar.use_local_device()
    if args.dtype == "bfloat16":
        try:
            import ml_dtypes  # NumPy has no bfloat16 of its own
        except ImportError:
            if comm.rank == 0:
                print('bfloat16 needs ml_dtypes: pip install ml_dtypes (or "seqpar[lowp]")',
                      file=sys.stderr)
            raise SystemExit(2) from None
        dtype = ml_dtypes.bfloat16
    else:
        dtype = np.dtype(args.dtype)

    # only this rank's tokens are ever made: rows of the global sequence at `positions`
    positions = seqpar.local_indices(args.seq, layout=args.layout)
    sequence = Sequence(args.heads, kv_heads, args.head_dim)
    q_local, k_local, v_local = (xp.asarray(sequence.rows(name, positions).astype(dtype)[None])
                                 for name in ("q", "k", "v"))

    times, stats = [], {}
    with Progress(args.repeats, "ring attention", comm=comm) as progress:  # rank 0 shows it
        for _ in range(args.repeats):
            comm.Barrier()
            start = time.perf_counter()
            out = seqpar.ring_attention(q_local, k_local, v_local, causal=args.causal,
                                        layout=args.layout, transport=args.transport,
                                        stats=stats)
            if args.gpu:
                xp.cuda.get_current_stream().synchronize()
            times.append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
            progress.update(note=f"{times[-1] * 1e3:.0f} ms")
    median, best = float(np.median(times)), min(times)

    # check a sample of this rank's rows against float64 over every key
    rows = np.random.default_rng(comm.rank).choice(len(positions), size=min(64, len(positions)),
                                                   replace=False)
    q_host, out_host = (x.get() if args.gpu else x for x in (q_local, out))
    ref = sequence.reference(q_host[0, rows], positions[rows], args.seq, args.causal, dtype)
    err = np.linalg.norm(out_host[0, rows].astype(np.float64) - ref) / np.linalg.norm(ref)
    worst = comm.allreduce(err, op=MPI.MAX)

    flops = 4.0 * args.seq**2 * args.heads * args.head_dim / (2 if args.causal else 1)
    tolerance = TOLERANCE[args.dtype]
    if comm.rank == 0:
        where = f"GPU, transport {stats['transport']}" if args.gpu else "CPU"
        print(f"ring attention: {comm.size} ranks ({where}), N={args.seq}, "
              f"heads={args.heads}/{kv_heads}, d={args.head_dim}, {args.dtype}, "
              f"causal={args.causal}, layout={args.layout}")
        print(f"  time {median * 1e3:.1f} ms median, {best * 1e3:.1f} ms min "
              f"(of {args.repeats}), {rate(flops / median)} in all, "
              f"{rate(flops / median / comm.size)} per rank (at the median)")
        print(f"  K/V per rank {2 * k_local.nbytes / 2**20:.1f} MiB "
              f"(global {2 * k_local.nbytes * args.seq / max(1, len(positions)) / 2**20:.1f} MiB)")
        print(f"  max relative error vs float64 on sampled rows: {worst:.2e} "
              f"({'PASS' if worst <= tolerance else 'FAIL'}, tolerance {tolerance:g})")
    raise SystemExit(0 if worst <= tolerance else 1)


def rate(flops_per_s):
    """TFLOP/s from 1e12 up, else GFLOP/s."""
    if flops_per_s >= 1e12:
        return f"{flops_per_s / 1e12:.2f} TFLOP/s"
    return f"{flops_per_s / 1e9:.1f} GFLOP/s"


def _warn_if_alone(comm):
    """srun with the wrong --mpi= starts every task as a job of one rank: say so."""
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "0") or 0)
    if "SLURM_PROCID" in os.environ and tasks > comm.size and comm.rank == 0:
        print(f"warning: srun started {tasks} tasks but MPI sees {comm.size} rank(s): srun's "
              "--mpi= must match the MPI (pmix for Open MPI, pmi2 for MPICH)", file=sys.stderr)


class Sequence:
    """A random global sequence defined chunk by chunk, so any rank can make any rows."""

    chunk = 4096

    def __init__(self, heads, kv_heads, head_dim, seed=2026):
        self.heads = {"q": heads, "k": kv_heads, "v": kv_heads}
        self.head_dim, self.seed = head_dim, seed

    def chunk_of(self, name, c):
        rng = np.random.default_rng([self.seed, "qkv".index(name), c])
        return rng.standard_normal((self.chunk, self.heads[name], self.head_dim),
                                   dtype=np.float32)

    def rows(self, name, positions):
        """Rows at these global positions, (len, heads, head_dim) float32."""
        out = np.empty((len(positions), self.heads[name], self.head_dim), np.float32)
        chunks = positions // self.chunk
        for c in np.unique(chunks):
            take = chunks == c
            out[take] = self.chunk_of(name, c)[positions[take] - c * self.chunk]
        return out

    def reference(self, q_rows, q_positions, n, causal, dtype):
        """Plain float64 softmax attention of some query rows over all n keys, the keys
        streamed chunk by chunk (rounded to ``dtype`` as the inputs were)."""
        q = q_rows.astype(np.float64)
        group = self.heads["q"] // self.heads["k"]
        m = np.full((q.shape[1], q.shape[0]), -np.inf)
        s = np.zeros_like(m)
        o = np.zeros(q.shape)
        for c in range(-(-n // self.chunk)):
            keys = np.arange(c * self.chunk, min(n, (c + 1) * self.chunk))
            k, v = (np.repeat(self.chunk_of(name, c)[:len(keys)].astype(dtype).astype(
                np.float64), group, axis=1) for name in ("k", "v"))
            scores = np.einsum("ihd,jhd->hij", q, k) / np.sqrt(q.shape[-1])
            if causal:
                scores[:, keys[None, :] > q_positions[:, None]] = -np.inf
            new = np.maximum(m, scores.max(axis=-1))
            safe = np.where(np.isfinite(new), new, 0)
            p = np.exp(scores - safe[..., None])
            scale = np.exp(m - safe)
            s = s * scale + p.sum(axis=-1)
            o = o * scale.T[..., None] + np.einsum("hij,jhd->ihd", p, v)
            m = new
        return o / s.T[..., None]


if __name__ == "__main__":
    main()
