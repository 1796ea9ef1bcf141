"""PyTorch's scaled_dot_product_attention beside a ``seqpar bench`` run: the peer line.

    python -m seqpar run -n 2 -m seqpar bench --seq 4096,8192 --causal --json bench.json
    python benchmarks/torch_peer.py --json bench.json --plot bench.png

Reads the settings of the ring-attention records in the ``seqpar bench`` JSON file
(heads, K/V heads, head dim, dtype, causal, device, each N), times torch's SDPA on the
whole problem in this one process with ``--threads`` threads (default: every core here,
the cores the bench's ranks shared), adds ``torch_sdpa`` records to the file (a rerun
replaces them) and, with ``--plot``, redraws the figure with the peer dashed. PyTorch
stays out of seqpar itself: this script is the only place that imports it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from types import SimpleNamespace

import numpy as np

from seqpar.commands.bench import _line, _merge, device_name, summary, write_records

__all__ = ["main", "missing_torch", "time_torch"]


def missing_torch(gpu: bool) -> str | None:
    """What keeps this script from timing torch (a missing package), or None."""
    if importlib.util.find_spec("torch") is None:
        return "torch_peer: needs PyTorch, which is not installed (pip install torch)"
    if gpu:
        import torch

        if not torch.cuda.is_available():
            return "torch_peer: GPU records need a PyTorch built with CUDA"
    return None


def time_torch(settings, n: int, threads: int, repeats: int) -> dict:
    """One ``torch_sdpa`` record, in the form of ``seqpar bench``'s records."""
    import torch
    from torch.nn.functional import scaled_dot_product_attention

    device = "cuda" if settings.gpu else "cpu"
    dtype = getattr(torch, settings.dtype)
    rng = np.random.default_rng(0)
    # (batch, heads, tokens, head_dim), torch's layout; K/V repeated for grouped queries
    # (outside the timing: SDPA's enable_gqa is not in every torch version)
    q, k, v = (torch.from_numpy(rng.standard_normal((1, h, n, settings.head_dim),
                                                    dtype=np.float32))
               .to(device=device, dtype=dtype)
               for h in (settings.heads, settings.kv_heads, settings.kv_heads))
    if settings.kv_heads != settings.heads:
        k, v = (x.repeat_interleave(settings.heads // settings.kv_heads, dim=1) for x in (k, v))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def run():
            scaled_dot_product_attention(q, k, v, is_causal=settings.causal)
            if settings.gpu:
                torch.cuda.synchronize()

        run()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return {"strategy": "torch_sdpa", "ranks": 1, "seq": n, "heads": settings.heads,
            "kv_heads": settings.kv_heads, "head_dim": settings.head_dim,
            "dtype": settings.dtype, "causal": settings.causal, "layout": None,
            "device": "gpu" if settings.gpu else "cpu",
            "device_name": device_name(settings.gpu), "threads": None if settings.gpu else threads,
            "transport": None, "peer": f"torch {torch.__version__}",
            **summary(times, n, settings), "exposed_s": 0.0}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="the file seqpar bench --json wrote")
    parser.add_argument("--plot", metavar="FILE.png", help="redraw the figure (matplotlib)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch's threads on the CPU (default: every core)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per N")
    args = parser.parse_args(argv)
    with open(args.json) as saved:
        records = json.load(saved)["records"]
    ours = [r for r in records if r["strategy"] == "ring_attention"]
    if not ours:
        print(f"torch_peer: {args.json} holds no ring_attention records", file=sys.stderr)
        return 2
    problem = missing_torch(any(r["device"] == "gpu" for r in ours))
    if problem:
        print(problem, file=sys.stderr)
        return 2
    peers, seen = [], set()
    for r in ours:
        settings = SimpleNamespace(heads=r["heads"], kv_heads=r["kv_heads"],
                                   head_dim=r["head_dim"], dtype=r["dtype"], causal=r["causal"],
                                   gpu=r["device"] == "gpu")
        key = (r["seq"], *vars(settings).values())
        if key in seen:  # one peer per problem, whatever the rank counts
            continue
        seen.add(key)
        peers.append(time_torch(settings, r["seq"], args.threads, args.repeats))
        print(_line(peers[-1]), flush=True)
    write_records(_merge(records, peers), args.json, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
