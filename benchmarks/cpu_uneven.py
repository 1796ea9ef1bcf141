"""Uneven shards on the CPU: [1, N] against [N, 1] tokens per rank, where each thread's time went.

    python -m mpi4py benchmarks/cpu_uneven.py                       # under mpiexec -n 2
    mpiexec --oversubscribe -n 2 python -m mpi4py benchmarks/cpu_uneven.py --seq 16384

float32, batch 1, 8 heads, d = 64, non-causal, contiguous layout; every rank but one holds
a single token. The orders alternate in one job (--rounds of each). The call's wall time
on a shared machine measures the neighbours' load as much as seqpar, so for every thread
of the busy rank that worked during the call this splits it, from Linux's
/proc/self/task/*/schedstat, into time on a CPU, time runnable but waiting for a CPU
(other processes' load) and time asleep (blocked: the GIL, a lock, an MPI wait), and
gives the CPU time the 1-token ranks' threads took meanwhile. ``--idle next-call``: the
1-token ranks go straight on to their next ring_attention call (a model's next layer)
instead of sleeping until the busy rank is done. Prints a markdown table on rank 0.
"""
import argparse
import os
import time

import numpy as np
from mpi4py import MPI

import seqpar

HEADS, D = 8, 64


def _threads() -> dict:
    """Per thread of this process: (ns on a CPU, ns runnable waiting for one)."""
    times = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as stat:
                on_cpu, waiting, _ = (int(x) for x in stat.read().split())
        except OSError:  # the thread ended meanwhile
            continue
        times[tid] = (on_cpu, waiting)
    return times


def _quiet_barrier(comm) -> None:
    """A barrier that sleeps instead of spinning, so it takes no CPU from the busy rank."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.005)


def _one(comm, rng, lengths, idle) -> dict:
    n = lengths[comm.rank]
    q, k, v = (rng.standard_normal((1, n, HEADS, D), dtype=np.float32) for _ in range(3))
    seqpar.ring_attention(q[:, :1], k[:, :1], v[:, :1])  # warm-up: the thread pool
    _quiet_barrier(comm)
    before, start = _threads(), time.perf_counter()
    seqpar.ring_attention(q, k, v)
    wall = time.perf_counter() - start
    after_call = _threads()
    if idle == "next-call":
        seqpar.ring_attention(q[:, :1], k[:, :1], v[:, :1])
    else:
        _quiet_barrier(comm)
    after = _threads()
    busy = int(np.argmax(lengths))
    spent = [tuple((after_call[t][i] - before.get(t, (0, 0))[i]) / 1e9 for i in (0, 1))
             for t in after_call]
    idle_cpu = sum(after[t][0] - before.get(t, (0, 0))[0] for t in after) / 1e9
    working = [(cpu, wait, wall - cpu - wait) for cpu, wait in spent if cpu > 0.05 * wall]
    everyone = comm.gather((wall, working, idle_cpu))
    if comm.rank != 0:
        return {}
    return {"wall": everyone[busy][0], "threads": everyone[busy][1],
            "idle_cpu": sum(e[2] for r, e in enumerate(everyone) if r != busy)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384, help="tokens of the busy rank")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--idle", choices=("sleep", "next-call"), default="sleep")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rng = np.random.default_rng(comm.rank)
    rest = [1] * (comm.size - 1)
    orders = {"[1, N]": rest + [args.seq], "[N, 1]": [args.seq] + rest}
    rows = [(name, _one(comm, rng, lengths, args.idle))
            for _ in range(args.rounds) for name, lengths in orders.items()]
    if comm.rank == 0:
        print(f"{comm.size} ranks, N = {args.seq}, float32, {HEADS} heads, d = {D}, "
              f"non-causal, contiguous; 1-token ranks: {args.idle}\n")
        print("| order | call s | busy rank's threads: on a CPU / runnable / asleep s "
              "| 1-token ranks' CPU s |")
        print("| --- | --- | --- | --- |")
        for name, row in rows:
            threads = ", ".join(f"{c:.2f} / {w:.2f} / {s:.2f}" for c, w, s in row["threads"])
            print(f"| {name} | {row['wall']:.2f} | {threads} | {row['idle_cpu']:.2f} |")


if __name__ == "__main__":
    main()
