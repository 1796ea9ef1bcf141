"""Decoding with a K/V cache split across ranks: prefill, then one token per step.

Every rank holds 1/P of the cache (seqpar.ShardedKVCache) and the same query; each
step appends the new token's keys and values and attends over the whole cache with
K/V-sharded attention (one local pass, then two small Allreduces). At the end the
last step is checked against a plain float64 softmax computed on the host from the
cache itself. Run it with any number of ranks, e.g.::

    python -m seqpar run -n 2 examples/decode.py                   # CPU, 64k tokens
    python -m seqpar run -n 2 examples/decode.py --gpu --dtype bfloat16 \\
        --capacity 1048576 --heads 32 --kv-heads 8 --head-dim 128   # one GPU per rank

With ``--graph`` (GPU only) one decode step's attention, the new token's query over
the whole cache, is also captured in a CUDA graph (seqpar.graphs) and replayed for
``--steps`` more tokens: the query is written into the captured buffer and the cache's
key lengths are updated in place by each append, so a replay attends over the grown
cache. Each replay is checked against a direct call, bytes for bytes, and tokens per
second are printed with and without the graph. At several ranks a graph can hold the
Allreduces only over NCCL (one GPU per rank); elsewhere (ranks sharing a GPU, no
NCCL) the example says so and times the direct calls only.

(``python -m seqpar run`` prints the plain ``mpiexec ... python -m mpi4py ...`` line
it runs.) Prints tokens per second and the error; exits 1 if the error is over the
dtype's tolerance or a replay differs from the direct call.
"""
import argparse
import time

import numpy as np
from mpi4py import MPI

import seqpar

TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacity", type=int, default=65536, help="cache tokens in all")
    parser.add_argument("--steps", type=int, default=32, help="tokens decoded one by one")
    parser.add_argument("--heads", type=int, default=8, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="K/V heads (GQA)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=list(TOLERANCE), default="float32")
    parser.add_argument("--gpu", action="store_true", help="CuPy arrays, one GPU per rank")
    parser.add_argument("--graph", action="store_true",
                        help="also replay each step's attention from a CUDA graph (GPU only)")
    args = parser.parse_args()
    if args.graph and not args.gpu:
        parser.error("--graph needs --gpu (CUDA graphs hold GPU work)")
    comm = MPI.COMM_WORLD
    xp = np
    if args.gpu:
        import cupy as xp

        seqpar.use_local_device()
    dtype = np.dtype(args.dtype) if args.dtype != "bfloat16" else _bfloat16()
    shape = (args.batch, args.kv_heads, args.head_dim)
    cache = seqpar.ShardedKVCache(args.capacity, args.kv_heads, args.head_dim, batch=args.batch,
                                  dtype=dtype, gpu=args.gpu)
    # the same tokens on every rank (one seed); each rank keeps its share
    rng = np.random.default_rng(7)
    chunk = 1 << 14
    prefill = args.capacity - args.steps * (2 if args.graph else 1)
    begin = time.perf_counter()
    for start in range(0, prefill, chunk):
        n = min(chunk, prefill - start)
        k, v = (xp.asarray(rng.standard_normal((shape[0], n) + shape[1:], dtype=np.float32)
                           .astype(dtype)) for _ in range(2))
        cache.append(k, v)
    _say(comm, f"prefill: {prefill} tokens on {comm.size} rank(s) in "
               f"{time.perf_counter() - begin:.1f} s")

    q_shape = (args.batch, 1, args.heads, args.head_dim)
    times = []
    for _ in range(args.steps):
        k, v = (xp.asarray(rng.standard_normal((args.batch, 1) + shape[1:], dtype=np.float32)
                           .astype(dtype)) for _ in range(2))
        q = xp.asarray(rng.standard_normal(q_shape, dtype=np.float32).astype(dtype))
        comm.Barrier()
        start = time.perf_counter()
        cache.append(k, v)
        out = cache.attend(q)
        if args.gpu:
            xp.cuda.get_current_stream().synchronize()
        times.append(time.perf_counter() - start)
    step = float(np.median(times[1:] if len(times) > 1 else times))
    kv_bytes = 2 * args.batch * args.capacity * args.kv_heads * args.head_dim * dtype.itemsize
    _say(comm, f"decode: {args.batch / step:.1f} tokens/s ({step * 1e3:.2f} ms per step, "
               f"cache {args.capacity} tokens, K/V read at "
               f"{kv_bytes / comm.size / step / 1e9:.1f} GB/s per rank)")

    replays_ok = True
    if args.graph:
        q, out, replays_ok = _graph_steps(comm, cache, rng, args, dtype, xp, step)
    error = _check(comm, cache, q, out, xp)
    ok = error <= TOLERANCE[args.dtype] and replays_ok
    _say(comm, f"{'PASS' if ok else 'FAIL'}: relative error of the last step vs float64 "
               f"{error:.2e} (tolerance {TOLERANCE[args.dtype]:g})")
    return 0 if ok else 1


def _graph_steps(comm, cache, rng, args, dtype, xp, direct_step):
    """``args.steps`` more tokens, each step's attention replayed from one CUDA graph;
    returns the last (q, out) and whether every replay equalled a direct call."""
    shape = (args.batch, 1, args.kv_heads, args.head_dim)
    q_shape = (args.batch, 1, args.heads, args.head_dim)
    stream = xp.cuda.Stream(non_blocking=True)
    transport = "nccl" if comm.size > 1 else "auto"  # a graph replays NCCL's transfers only
    with stream:
        q = xp.asarray(rng.standard_normal(q_shape, dtype=np.float32).astype(dtype))
        try:
            cache.attend(q, transport=transport)  # warm-up: plans, sets NCCL up
        except ValueError as exc:  # the same on every rank
            _say(comm, f"graph: not captured at {comm.size} ranks ({exc}); direct calls only")
            return q, cache.attend(q), True
        stream.synchronize()
        stream.begin_capture()
        try:
            out = cache.attend(q, transport=transport)
        finally:
            graph = stream.end_capture()
        times, same = [], True
        for _ in range(args.steps):
            k, v = (xp.asarray(rng.standard_normal(shape, dtype=np.float32).astype(dtype))
                    for _ in range(2))
            new_q = xp.asarray(rng.standard_normal(q_shape, dtype=np.float32).astype(dtype))
            stream.synchronize()
            comm.Barrier()
            start = time.perf_counter()
            cache.append(k, v)  # updates the key lengths the graph reads, in place
            q[...] = new_q
            graph.launch(stream)
            stream.synchronize()
            times.append(time.perf_counter() - start)
            direct = cache.attend(q, transport=transport)  # not timed: the replay's check
            same &= bool((direct.view(xp.uint8) == out.view(xp.uint8)).all())
        stream.synchronize()
    same = all(comm.allgather(same))
    step = float(np.median(times[1:] if len(times) > 1 else times))
    _say(comm, f"decode, graph replay: {args.batch / step:.1f} tokens/s ({step * 1e3:.2f} ms "
               f"per step; direct calls: {args.batch / direct_step:.1f} tokens/s); "
               f"replays {'equal' if same else 'DIFFER FROM'} the direct calls, bitwise")
    return q, out.copy(), same


def _check(comm, cache, q, out, xp) -> float:
    """Plain float64 softmax over every rank's cached tokens, merged on the host."""
    host = (lambda a: a.get()) if xp is not np else (lambda a: a)  # noqa: E731
    q64 = host(q).astype(np.float64)
    local = np.asarray(host(cache.local_lengths))
    batch, _, heads, d = q64.shape
    group = heads // cache.k.shape[2]
    scale = 1.0 / np.sqrt(d)
    pieces = []
    for b in range(batch):
        n = int(local[b])
        k = np.repeat(host(cache.k[b, :n]).astype(np.float64), group, axis=1)
        v = np.repeat(host(cache.v[b, :n]).astype(np.float64), group, axis=1)
        s = np.einsum("ihd,jhd->hij", q64[b], k) * scale           # (heads, Sq, n)
        m = s.max(axis=-1) if n else np.full(s.shape[:2], -np.inf)
        p = np.exp(s - m[..., None]) if n else s
        pieces.append((m, p.sum(axis=-1), np.einsum("hij,jhd->ihd", p, v)))
    everyone = comm.allgather(pieces)
    worst = 0.0
    for b in range(batch):
        m = np.max([part[b][0] for part in everyone], axis=0)
        weights = [np.exp(part[b][0] - m) for part in everyone]
        den = sum(w * part[b][1] for w, part in zip(weights, everyone))
        num = sum(w.T[..., None] * part[b][2] for w, part in zip(weights, everyone))
        ref = num / den.T[..., None]
        got = host(out[b]).astype(np.float64)
        worst = max(worst, float(np.linalg.norm(got - ref) / np.linalg.norm(ref)))
    return worst


def _bfloat16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def _say(comm, text: str) -> None:
    if comm.rank == 0:
        print(text, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
