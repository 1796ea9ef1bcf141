"""Attention backward on one GPU: seqpar vs PyTorch SDPA (FLASH, cuDNN), same inputs.

    PYTHONPATH=. python3 benchmarks/gpu_backward.py [--json FILE] [--ns 4096,16384,65536]

Batch 1, 16 heads. seqpar: backward_delta + the dK/dV and dQ kernels (what
seqpar.attention_backward runs), given the forward's out and lse; torch: the
backward of scaled_dot_product_attention (out.backward(dout)) under each backend,
timed around the backward alone. CUDA events, calls back to back, median of 5
trials. TFLOP/s counted as 2.5 x the forward's 4*B*H*N*N*d (halved when causal).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics

import cupy
import ml_dtypes
import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from seqpar.local import cupy_kernel
from seqpar.masks import Mask


def timed(fn, repeats):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3 / repeats)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", default="4096,16384,65536")
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for dt in args.dtypes.split(","):
        tdt = torch.bfloat16 if dt == "bf16" else torch.float16
        npdt = np.dtype(ml_dtypes.bfloat16) if dt == "bf16" else np.dtype(np.float16)
        for d in map(int, args.dims.split(",")):
            for n in map(int, args.ns.split(",")):
                for causal in (False, True):
                    g = torch.Generator(device="cuda").manual_seed(n + d)
                    tq, tk, tv, tg = (torch.randn((1, n, args.heads, d), device="cuda",
                                                  dtype=tdt, generator=g) for _ in range(4))
                    q, k, v, dout = (cupy.from_dlpack(t.view(torch.int16)).view(npdt)
                                     for t in (tq, tk, tv, tg))
                    mask = Mask.build(causal)
                    scale = d ** -0.5
                    out, lse = cupy_kernel.forward(q, k, v, scale=scale, mask=mask)
                    repeats = max(1, (16384 // n) ** 2 * 2)

                    def ours():
                        delta = cupy_kernel.backward_delta(dout, out)
                        return cupy_kernel.backward(dout, q, k, v, lse, delta, scale=scale,
                                                    mask=mask)

                    flops = 2.5 * 4.0 * n * n * d * args.heads / (2 if causal else 1)
                    row = {"dtype": dt, "d": d, "N": n, "causal": causal,
                           "seqpar": flops / timed(ours, repeats) / 1e12}
                    for label, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                                           ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                        try:
                            with sdpa_kernel(backend):
                                xs = [x.transpose(1, 2).detach().requires_grad_()
                                      for x in (tq, tk, tv)]
                                o = torch.nn.functional.scaled_dot_product_attention(
                                    *xs, is_causal=causal)
                                grad = tg.transpose(1, 2)
                                row[label] = flops / timed(
                                    lambda: torch.autograd.grad(o, xs, grad, retain_graph=True),
                                    repeats) / 1e12
                                ref = torch.autograd.grad(o, xs, grad, retain_graph=True)
                            mine = ours()
                            row[f"{label}_dq_diff"] = float(
                                cupy.linalg.norm(mine[0] - cupy.from_dlpack(
                                    ref[0].transpose(1, 2).float().contiguous()))
                                / cupy.linalg.norm(mine[0]))
                        except RuntimeError as exc:
                            row[label] = None
                            row[f"{label}_error"] = str(exc).splitlines()[0][:100]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    name = torch.cuda.get_device_name()
    print(f"\n{name}: backward TFLOP/s (2.5x forward FLOPs), batch 1, {args.heads} heads")
    print("| dtype | d | N | causal | seqpar | FLASH | cuDNN | /FLASH | /cuDNN |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    r_flash, r_cudnn = [], []
    for r in rows:
        fl, cu = r.get("flash"), r.get("cudnn")
        if fl:
            r_flash.append(r["seqpar"] / fl)
        if cu:
            r_cudnn.append(r["seqpar"] / cu)
        print(f"| {r['dtype']} | {r['d']} | {r['N']} | {r['causal']} | {r['seqpar']:.0f} | "
              f"{fl and f'{fl:.0f}' or '-'} | {cu and f'{cu:.0f}' or '-'} | "
              f"{fl and f'{r['seqpar'] / fl:.2f}' or '-'} | "
              f"{cu and f'{r['seqpar'] / cu:.2f}' or '-'} |")

    def geo(x):
        return math.exp(sum(map(math.log, x)) / len(x)) if x else float("nan")

    print(f"geometric mean: {geo(r_flash):.2f}x FLASH, {geo(r_cudnn):.2f}x cuDNN")


if __name__ == "__main__":
    main()
