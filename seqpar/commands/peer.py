"""``seqpar bench --peer torch``: PyTorch's scaled_dot_product_attention on one process.

The only place in seqpar that touches PyTorch, and only when ``--peer torch`` asks: it is
imported here, on rank 0, at that point; seqpar itself never needs it.
"""
from __future__ import annotations

import importlib.util
import os
import time

import numpy as np
from mpi4py import MPI

from .. import comms

__all__ = ["peer_problem", "time_peer"]


def peer_problem(name: str, gpu: bool) -> str | None:
    """What keeps rank 0 from timing the peer ``name`` (a missing package), or None."""
    if importlib.util.find_spec("torch") is None:
        return (f"argument --peer: {name} needs PyTorch, which is not installed "
                "(pip install torch)")
    if gpu:
        import torch

        if not torch.cuda.is_available():
            return f"argument --peer: {name} with --gpu needs a PyTorch built with CUDA"
    return None


def time_peer(comm, args, n: int, threads: int) -> dict | None:
    """Time torch's SDPA over the whole N-token problem on rank 0 while the other ranks
    wait without taking its cores; the record on rank 0 (None elsewhere, or if torch
    failed: then rank 0 says why), in the form of :func:`seqpar.commands.bench` records.

    ``threads``: seqpar's threads per rank; torch gets that many for every rank of this
    node (the cores the job has here), so both use the same cores.
    """
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)  # collective: before rank 0 goes alone
    node_ranks = node.size
    node.Free()
    record = None
    if comm.rank == 0:
        try:
            record = _time_torch(args, n, max(1, min(os.cpu_count() or 1, threads * node_ranks)))
        except Exception as exc:  # noqa: BLE001 - the peer is optional: say why, go on
            print(f"torch peer at N={n} failed: {type(exc).__name__}: {exc}", flush=True)
    comms.complete(comm.Ibarrier())  # sleeps between tests: rank 0 keeps its cores
    return record


def _time_torch(args, n: int, threads: int) -> dict:
    import torch
    from torch.nn.functional import scaled_dot_product_attention

    device = "cuda" if args.gpu else "cpu"
    dtype = getattr(torch, args.dtype)
    kv_heads = args.kv_heads or args.heads
    rng = np.random.default_rng(0)
    # (batch, heads, tokens, head_dim), torch's layout; K/V repeated for grouped queries
    # (outside the timing: SDPA's enable_gqa is not in every torch version)
    q, k, v = (torch.from_numpy(rng.standard_normal((1, h, n, args.head_dim), dtype=np.float32))
               .to(device=device, dtype=dtype) for h in (args.heads, kv_heads, kv_heads))
    if kv_heads != args.heads:
        k, v = (x.repeat_interleave(args.heads // kv_heads, dim=1) for x in (k, v))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def run():
            scaled_dot_product_attention(q, k, v, is_causal=args.causal)
            if args.gpu:
                torch.cuda.synchronize()

        run()  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    from .bench import device_name, summary

    return {"strategy": "torch_sdpa", "ranks": 1, "seq": n, "heads": args.heads,
            "kv_heads": kv_heads, "head_dim": args.head_dim, "dtype": args.dtype,
            "causal": args.causal, "layout": None, "device": "gpu" if args.gpu else "cpu",
            "device_name": device_name(args.gpu), "threads": None if args.gpu else threads,
            "transport": None, "peer": f"torch {torch.__version__}",
            **summary(times, n, args), "exposed_s": 0.0}
