"""CPU benchmark of the attention backward: seqpar's NumPy kernel vs PyTorch SDPA.

One rank, float32, batch 1, 8 heads, d in {64, 128}, N in {4096, 8192}, causal and
not. On the same inputs in the same run:

* seqpar backward = ``backward_delta`` + ``numpy_kernel.backward`` (given the
  forward's out and lse), vs ``torch.autograd.grad`` through
  ``scaled_dot_product_attention`` (the graph kept, so only its backward is timed);
* the forwards of both, for context;
* at N=4096, each gradient's relative error ||g - ref|| / ||ref|| against PyTorch's
  float64 SDPA gradients, for seqpar and for PyTorch in float32.

FLOPs: forward 4*B*H*N*N*d, backward 2.5x that (five N x N x d matmuls against two),
both halved when causal. Times are medians of 3 runs after one warm-up.

    python -m venv /tmp/bench && . /tmp/bench/bin/activate
    pip install torch==2.13.0 -e . && python benchmarks/cpu_backward.py > benchmarks/cpu_backward.md
"""
import datetime
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

import seqpar
from seqpar.local import numpy_kernel
from seqpar.masks import Mask

HEADS = 8
SIZES = (4096, 8192)
HEAD_DIMS = (64, 128)
ERROR_AT = 4096


def median_time(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def relative_error(x, ref):
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


class Seqpar:
    """seqpar's NumPy kernels on (B, N, H, d) arrays."""

    def __init__(self, q, k, v, dout, causal):
        self.q, self.k, self.v, self.dout = q, k, v, dout
        self.mask = Mask.build(causal=causal)
        self.scale = 1.0 / np.sqrt(q.shape[-1])
        self.out, self.lse = self.forward()

    def forward(self):
        return numpy_kernel.forward(self.q, self.k, self.v, scale=self.scale, mask=self.mask)

    def backward(self):
        delta = numpy_kernel.backward_delta(self.dout, self.out)
        return numpy_kernel.backward(self.dout, self.q, self.k, self.v, self.lse, delta,
                                     scale=self.scale, mask=self.mask)


class Torch:
    """PyTorch SDPA on the same memory, viewed as (B, H, N, d)."""

    def __init__(self, q, k, v, dout, causal, dtype=torch.float32):
        self.inputs = [torch.from_numpy(x).to(dtype).transpose(1, 2).requires_grad_()
                       for x in (q, k, v)]
        self.dout = torch.from_numpy(dout).to(dtype).transpose(1, 2)
        self.causal = causal
        self.out = self.forward()

    def forward(self):
        return torch.nn.functional.scaled_dot_product_attention(*self.inputs,
                                                                is_causal=self.causal)

    def backward(self):
        grads = torch.autograd.grad(self.out, self.inputs, self.dout, retain_graph=True)
        return [g.detach().transpose(1, 2).numpy() for g in grads]


def run_case(n, d, causal):
    rng = np.random.default_rng(n + d)
    q, k, v, dout = (rng.standard_normal((1, n, HEADS, d), dtype=np.float32) for _ in range(4))
    ours, theirs = Seqpar(q, k, v, dout, causal), Torch(q, k, v, dout, causal)
    row = dict(n=n, d=d, causal=causal,
               ours_bwd=median_time(ours.backward), torch_bwd=median_time(theirs.backward),
               ours_fwd=median_time(ours.forward), torch_fwd=median_time(
                   lambda: torch.nn.functional.scaled_dot_product_attention(
                       *[x.detach() for x in theirs.inputs], is_causal=causal)))
    if n == ERROR_AT:
        ref = Torch(q, k, v, dout, causal, torch.float64).backward()
        row["ours_err"] = [relative_error(g, r) for g, r in zip(ours.backward(), ref)]
        row["torch_err"] = [relative_error(g, r) for g, r in zip(theirs.backward(), ref)]
    print(f"N={n} d={d} causal={causal}: backward seqpar {row['ours_bwd']:.3f}s "
          f"torch {row['torch_bwd']:.3f}s", file=sys.stderr, flush=True)
    return row


def gflops(row, seconds, backward):
    flops = 4.0 * row["n"] ** 2 * row["d"] * HEADS * (2.5 if backward else 1.0)
    return flops / (2 if row["causal"] else 1) / seconds / 1e9


def report(rows):
    print(f"### One rank, float32, batch 1, {HEADS} heads (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)\n")
    print("Backward (seqpar: backward_delta + kernel; FLOPs 2.5x the forward's):\n")
    print("| N | d | causal | seqpar GFLOP/s | torch GFLOP/s | ratio | seqpar s | torch s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['n']} | {r['d']} | {r['causal']} | {gflops(r, r['ours_bwd'], True):.1f} | "
              f"{gflops(r, r['torch_bwd'], True):.1f} | {r['torch_bwd'] / r['ours_bwd']:.2f} | "
              f"{r['ours_bwd']:.3f} | {r['torch_bwd']:.3f} |")
    geo = float(np.exp(np.mean([np.log(r["torch_bwd"] / r["ours_bwd"]) for r in rows])))
    print(f"\nGeometric mean ratio seqpar / torch (backward): **{geo:.2f}**\n")
    print("Forward, for context:\n")
    print("| N | d | causal | seqpar GFLOP/s | torch GFLOP/s | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['n']} | {r['d']} | {r['causal']} | {gflops(r, r['ours_fwd'], False):.1f} | "
              f"{gflops(r, r['torch_fwd'], False):.1f} | {r['torch_fwd'] / r['ours_fwd']:.2f} |")
    print(f"\nRelative error of each gradient vs PyTorch float64, N={ERROR_AT}:\n")
    print("| d | causal | seqpar dq | dk | dv | torch fp32 dq | dk | dv |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "ours_err" in r:
            errs = " | ".join(f"{e:.1e}" for e in r["ours_err"] + r["torch_err"])
            print(f"| {r['d']} | {r['causal']} | {errs} |")


if __name__ == "__main__":
    print(f"## CPU attention backward, {datetime.date.today()}\n")
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"numpy {np.__version__}; seqpar {seqpar.__version__}")
    print(f"Command: `python {' '.join(sys.argv)}`\n")
    report([run_case(n, d, causal) for n in SIZES for d in HEAD_DIMS
            for causal in (False, True)])
