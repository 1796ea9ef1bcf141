"""Attention backward on one GPU: seqpar vs PyTorch SDPA (FLASH, cuDNN), same inputs.

    PYTHONPATH=. python3 benchmarks/gpu_backward.py [--json FILE] [--ns 4096,16384,65536]
        [--extra] [--layer]

Batch 1, 16 heads. seqpar: backward_delta + the backward kernel the table picks (what
seqpar.attention_backward runs), given the forward's out and lse, deterministic
(the default) and with deterministic=False ("any order"); torch: the backward of
scaled_dot_product_attention under each backend, timed around the backward alone.
CUDA events, calls back to back, median of 5 trials. TFLOP/s counted as 2.5 x the
forward's 4*B*H*N*N*d (halved when causal). --extra adds d=256 causal at 16k and GQA
32/8 heads at d=128; --layer times forward + backward of one attention layer (bf16,
32/8 heads, d=128, causal, N 16k and 64k) against SDPA cuDNN forward + backward.
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


ONCE = False  # --once: each function runs once, untimed (for a profiler such as ncu)


def timed(fn, repeats):
    fn()
    torch.cuda.synchronize()
    if ONCE:
        return float("nan")
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
    parser.add_argument("--extra", action="store_true")
    parser.add_argument("--layer", action="store_true")
    parser.add_argument("--once", action="store_true",
                        help="run each function once, untimed (under a profiler)")
    args = parser.parse_args()
    global ONCE
    ONCE = args.once
    cases = [(dt, d, n, causal, args.heads, args.heads)
             for dt in args.dtypes.split(",") for d in map(int, args.dims.split(","))
             for n in map(int, args.ns.split(",")) for causal in (False, True)]
    if args.extra:
        cases += [("bf16", 256, 16384, True, 16, 16), ("bf16", 128, 16384, False, 32, 8),
                  ("bf16", 128, 16384, True, 32, 8)]
    rows = []
    for dt, d, n, causal, hq, hk in cases:
        tdt = torch.bfloat16 if dt == "bf16" else torch.float16
        npdt = np.dtype(ml_dtypes.bfloat16) if dt == "bf16" else np.dtype(np.float16)
        g = torch.Generator(device="cuda").manual_seed(n + d)
        tq, tg = (torch.randn((1, n, hq, d), device="cuda", dtype=tdt, generator=g)
                  for _ in range(2))
        tk, tv = (torch.randn((1, n, hk, d), device="cuda", dtype=tdt, generator=g)
                  for _ in range(2))
        q, k, v, dout = (cupy.from_dlpack(t.view(torch.int16)).view(npdt)
                         for t in (tq, tk, tv, tg))
        mask = Mask.build(causal)
        scale = d ** -0.5
        out, lse = cupy_kernel.forward(q, k, v, scale=scale, mask=mask)
        repeats = max(1, (16384 // n) ** 2 * 2)

        def ours(deterministic=True):
            delta = cupy_kernel.backward_delta(dout, out)
            return cupy_kernel.backward(dout, q, k, v, lse, delta, scale=scale,
                                        mask=mask, deterministic=deterministic)

        flops = 2.5 * 4.0 * n * n * d * hq / (2 if causal else 1)
        row = {"dtype": dt, "d": d, "N": n, "causal": causal, "heads": f"{hq}/{hk}",
               "seqpar": flops / timed(ours, repeats) / 1e12,
               "any_order": flops / timed(lambda: ours(False), repeats) / 1e12}
        for label, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                               ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    xs = [x.transpose(1, 2).detach().requires_grad_()
                          for x in (tq, tk, tv)]
                    o = torch.nn.functional.scaled_dot_product_attention(
                        *xs, is_causal=causal, enable_gqa=hq != hk)
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
    layer = layer_rows() if args.layer else []
    name = torch.cuda.get_device_name()
    print(f"\n{name}: backward TFLOP/s (2.5x forward FLOPs), batch 1")
    print("| dtype | d | N | causal | heads | seqpar | any order | FLASH | cuDNN | /FLASH | /cuDNN |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    r_flash, r_cudnn = [], []
    for r in rows:
        fl, cu = r.get("flash"), r.get("cudnn")
        if fl:
            r_flash.append(r["seqpar"] / fl)
        if cu and (r["d"], r["heads"]) in ((64, "16/16"), (128, "16/16")):
            r_cudnn.append(r["seqpar"] / cu)
        print(f"| {r['dtype']} | {r['d']} | {r['N']} | {r['causal']} | {r['heads']} | "
              f"{r['seqpar']:.0f} | {r['any_order']:.0f} | "
              f"{fl and f'{fl:.0f}' or '-'} | {cu and f'{cu:.0f}' or '-'} | "
              f"{fl and f'{r['seqpar'] / fl:.2f}' or '-'} | "
              f"{cu and f'{r['seqpar'] / cu:.2f}' or '-'} |")

    def geo(x):
        return math.exp(sum(map(math.log, x)) / len(x)) if x else float("nan")

    print(f"geometric mean: {geo(r_flash):.2f}x FLASH, {geo(r_cudnn):.2f}x cuDNN "
          "(cuDNN: the d 64/128, 16-head grid)")
    if layer:
        print("\none layer, forward + backward (bf16, 32/8 heads, d=128, causal), ms")
        print("| N | seqpar | torch SDPA cuDNN | ratio (torch / seqpar) |")
        print("| --- | --- | --- | --- |")
        for r in layer:
            print(f"| {r['N']} | {r['seqpar_ms']:.2f} | {r['cudnn_ms']:.2f} | "
                  f"{r['cudnn_ms'] / r['seqpar_ms']:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"backward": rows, "layer": layer}, fh, indent=1)


def layer_rows():
    """Forward + backward of one GQA layer, seqpar's local functions vs SDPA cuDNN."""
    import seqpar

    out_rows = []
    for n in (16384, 65536):
        g = torch.Generator(device="cuda").manual_seed(n)
        tq, tg = (torch.randn((1, n, 32, 128), device="cuda", dtype=torch.bfloat16,
                              generator=g) for _ in range(2))
        tk, tv = (torch.randn((1, n, 8, 128), device="cuda", dtype=torch.bfloat16,
                              generator=g) for _ in range(2))
        npdt = np.dtype(ml_dtypes.bfloat16)
        q, k, v, dout = (cupy.from_dlpack(t.view(torch.int16)).view(npdt)
                         for t in (tq, tk, tv, tg))

        def ours():
            out, lse = seqpar.attention(q, k, v, causal=True, return_lse=True)
            return seqpar.attention_backward(dout, q, k, v, out, lse, causal=True)

        def theirs():
            xs = [x.transpose(1, 2).detach().requires_grad_() for x in (tq, tk, tv)]
            o = torch.nn.functional.scaled_dot_product_attention(*xs, is_causal=True,
                                                                 enable_gqa=True)
            return torch.autograd.grad(o, xs, tg.transpose(1, 2))

        repeats = 4 if n == 16384 else 1
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn = timed(theirs, repeats)
        row = {"N": n, "seqpar_ms": timed(ours, repeats) * 1e3, "cudnn_ms": cudnn * 1e3}
        out_rows.append(row)
        print(json.dumps(row), flush=True)
    return out_rows


if __name__ == "__main__":
    main()
