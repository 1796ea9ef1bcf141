"""Expected ring-attention scaling on 4 and 8 GPUs, from what 1 and 2 H200s measured.

No GPU needed: the model reads the per-GPU rates of `results/gpu_scaling_2xh200.jsonl`
and prints markdown tables (see gpu_scaling_model.md for the reasoning)::

    python benchmarks/scaling_model.py

A ring over P ranks runs P steps; step s computes one (N/P x N/P) block while the next
K/V block travels to the neighbour. So a call takes P * max(compute, transfer) plus the
per-step costs, which the 2-GPU measurement already contains: its per-GPU rate is the
rate of a whole step, kernel calls, merge and launch costs included.
"""
import json
import math
from pathlib import Path

RESULTS = Path(__file__).with_name("results") / "gpu_scaling_2xh200.jsonl"
NEIGHBOUR_GBPS = 258.0  # NCCL send/recv between two H200s at 64 MiB (GPU-MACHINE.md)
HEADS, HEAD_DIM, BYTES = 16, 128, 2  # bf16, the configuration measured


def measured():
    """{(ranks, N, causal): TFLOP/s per GPU} of the ring forward."""
    rates = {}
    for line in RESULTS.read_text().splitlines():
        row = json.loads(line)
        if row.get("what") == "ring forward":
            rates[row["ranks"], row["N"], row["causal"]] = row["tflops_per_gpu"]
    return rates


def step_rate(rates, block, causal):
    """TFLOP/s per GPU of one ring step on a block of `block` tokens a rank, from the
    2-GPU runs (blocks of 16k and 64k), log-interpolated and flat beyond."""
    points = sorted((n // 2, r) for (p, n, c), r in rates.items() if p == 2 and c == causal)
    (b0, r0), (b1, r1) = points[0], points[-1]
    if block <= b0:
        return r0 * block / b0  # fixed costs dominate smaller blocks: rate falls with them
    if block >= b1:
        return r1
    t = math.log(block / b0) / math.log(b1 / b0)
    return r0 + t * (r1 - r0)


def one_gpu_rate(rates, causal):
    """TFLOP/s of one GPU at the longest sequence measured (rates are flat beyond it)."""
    return max((n, r) for (p, n, c), r in rates.items() if p == 1 and c == causal)[1]


def predict(rates, n, ranks, causal, heads=HEADS):
    flops = 4.0 * n * n * heads * HEAD_DIM / (2 if causal else 1)
    block = n // ranks
    if ranks == 1:
        return flops / (one_gpu_rate(rates, causal) * 1e12), 0.0, 0.0
    compute_step = flops / ranks / ranks / (step_rate(rates, block, causal) * 1e12)
    transfer = 2 * block * heads * HEAD_DIM * BYTES / (NEIGHBOUR_GBPS * 1e9)
    exposed = max(0.0, transfer - compute_step)
    return ranks * (compute_step + exposed), transfer, exposed


def main():
    rates = measured()
    print("| causal | N | P | block tokens | predicted s | speedup vs 1 GPU | TF/s per GPU "
          "| transfer per step ms | exposed per step ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for causal in (False, True):
        for n in (131072, 1 << 20, 1 << 22):
            base, _, _ = predict(rates, n, 1, causal)
            for ranks in (1, 2, 4, 8):
                t, transfer, exposed = predict(rates, n, ranks, causal)
                flops = 4.0 * n * n * HEADS * HEAD_DIM / (2 if causal else 1)
                print(f"| {'yes' if causal else 'no'} | {n:,} | {ranks} | {n // ranks:,} | "
                      f"{t:.3f} | {base / t:.2f}x | {flops / t / ranks / 1e12:.0f} | "
                      f"{transfer * 1e3:.1f} | {exposed * 1e3:.1f} |")
    print()
    print("Weak scaling (N/P = 131,072 tokens a rank): the time per ring step stays at the "
          "one-block time, a call takes P steps.")
    print()
    print("| causal | P | N | predicted s | per step ms | step efficiency vs P = 2 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for causal in (False, True):
        per_step = {}
        for ranks in (2, 4, 8):
            n = 131072 * ranks
            t, _, _ = predict(rates, n, ranks, causal)
            per_step[ranks] = t / ranks
            print(f"| {'yes' if causal else 'no'} | {ranks} | {n:,} | {t:.3f} | "
                  f"{per_step[ranks] * 1e3:.1f} | {per_step[2] / per_step[ranks]:.2f} |")
    print()
    n, ranks, heads = 1 << 24, 8, 8
    for causal in (False, True):
        t, transfer, exposed = predict(rates, n, ranks, causal, heads=heads)
        print(f"16M tokens, 8 heads, d = 128, bf16, 8 GPUs, causal={causal}: "
              f"{t:.0f} s predicted, {transfer * 1e3:.0f} ms transfer per step (hidden)")


if __name__ == "__main__":
    main()
