"""The peer for benchmarks/gpu_ring.sh: PyTorch's context-parallel ring attention.

    torchrun --nproc-per-node 2 benchmarks/torch_cp.py --seq 32768,131072 --causal 0,1

One rank runs plain ``scaled_dot_product_attention``; several ranks run it inside
``torch.distributed.tensor.experimental.context_parallel`` (K/V rotated around the
ring; load balancing on for causal runs, off otherwise, which non-causal needs).
``--backend`` cudnn (default) or flash, bf16, batch 1; ``--backward`` times forward
plus backward. Prints one JSON line per configuration on rank 0. Used only in
benchmarks: seqpar never imports torch.
"""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", default="32768,131072")
    parser.add_argument("--causal", default="0,1")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--rotate", default="alltoall", help="K/V rotation: alltoall or allgather")
    parser.add_argument("--backend", default="cudnn", choices=["cudnn", "flash"])
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    mesh = None
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
        from torch.distributed.tensor.experimental._attention import set_rotate_method

        dist.init_process_group("nccl")
        mesh = init_device_mesh("cuda", (world,))
        set_rotate_method(args.rotate)

    for n in map(int, args.seq.split(",")):
        for causal in map(int, args.causal.split(",")):
            gen = torch.Generator(device="cuda").manual_seed(n)  # same global data everywhere
            q, k, v = (torch.randn(1, args.heads, n, args.head_dim, device="cuda",
                                   dtype=torch.bfloat16, generator=gen,
                                   requires_grad=args.backward) for _ in range(3))
            backend = {"cudnn": SDPBackend.CUDNN_ATTENTION,
                       "flash": SDPBackend.FLASH_ATTENTION}[args.backend]
            if mesh is not None:
                from torch.distributed.tensor.experimental._attention import _cp_options

                _cp_options.enable_load_balance = bool(causal)

            def attend():
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=bool(causal))
                    if args.backward:
                        out.backward(torch.ones_like(out))
                    return out

            def timed(repeats):
                times = []
                for _ in range(repeats):
                    if world > 1:
                        dist.barrier()
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    attend()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                return sorted(times)[len(times) // 2]

            try:
                if mesh is None:
                    first = timed(1)
                    best = timed(max(1, min(5, int(2.0 / first))))
                else:
                    with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
                        first = timed(1)
                        best = timed(max(1, min(5, int(2.0 / first))))
                    best_all = torch.tensor(best, device="cuda")
                    dist.all_reduce(best_all, op=dist.ReduceOp.MAX)
                    best = float(best_all)
            except Exception as exc:  # noqa: BLE001 - a peer that cannot run is reported
                if rank == 0:
                    print(json.dumps({"impl": "torch-cp", "ranks": world, "N": n,
                                      "causal": bool(causal), "backward": args.backward,
                                      "error": str(exc).splitlines()[0][:200]}), flush=True)
                continue
            flops = (3.5 if args.backward else 1.0) * 4.0 * n * n * args.heads * args.head_dim \
                / (2 if causal else 1)
            if rank == 0:
                print(json.dumps({"impl": "torch-cp" if world > 1 else "torch-sdpa",
                                  "backend": args.backend, "backward": args.backward,
                                  "ranks": world, "N": n, "causal": bool(causal),
                                  "ms": best * 1e3, "tflops_per_gpu": flops / best / world / 1e12,
                                  "torch": torch.__version__}), flush=True)
            q = k = v = None
            torch.cuda.empty_cache()
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
