"""Faults and their cost on the CPU: how fast each one ends or raises, measured.

    python benchmarks/cpu_faults.py            # starts its own jobs with python -m seqpar run

Each row is one job of its own (4 ranks unless said), timed from launch to exit:
a rank that never makes its second call (SEQPAR_TIMEOUT=2), ranks passing different
communicators (the default arrival watch, shortened), one rank's argument error left
uncaught (how many lines the job prints), Ctrl-C on one rank right
after the agreement, a 1-rank call whose block computes longer than SEQPAR_TIMEOUT=1;
then the float64 error of ring and K/V-sharded attention at 3 ranks against one rank for
scores sharing a large offset, and the host time of tiny calls at 1 and 2 ranks.
Prints a markdown table.
"""
import os
import subprocess
import sys
import tempfile
import textwrap
import time

JOBS = {
    "rank 3 of 4 never makes its 2nd call, SEQPAR_TIMEOUT=2": (4, {"SEQPAR_TIMEOUT": "2"}, """
        x = np.random.default_rng(0).standard_normal((1, 64, 4, 32))
        seqpar.ring_attention(x, x, x)
        if comm.rank == 3:
            time.sleep(120)
        seqpar.ring_attention(x, x, x)
        """),
    "rank 0 passes COMM_WORLD, the others a Split of it; default watch at 3 s": (4, {}, """
        seqpar.comms.ARRIVAL_TIMEOUT_S = 3.0  # 600 s unless shortened
        x = np.random.default_rng(0).standard_normal((1, 64, 4, 32))
        other = comm.Split(0, comm.rank)
        seqpar.ring_attention(x, x, x, comm=comm if comm.rank == 0 else other)
        """),
    "rank 1 of 4 passes k with 4 heads, v with 8, uncaught": (4, {}, """
        x = np.random.default_rng(0).standard_normal((1, 64, 8, 32))
        seqpar.ring_attention(x, x[:, :, :4] if comm.rank == 1 else x, x)
        """),
    "Ctrl-C on rank 1 right after the agreement": (4, {}, """
        from seqpar import comms
        x = np.random.default_rng(0).standard_normal((1, 64, 4, 32))
        seqpar.ring_attention(x, x, x)
        progress = comms.progress
        def interrupted(step, *a, **k):
            if comm.rank == 1 and step == "agreed with every rank":
                raise KeyboardInterrupt
            progress(step, *a, **k)
        comms.progress = interrupted
        try:
            seqpar.ring_attention(x, x, x)
        except KeyboardInterrupt:
            time.sleep(120)
        """),
    "1 rank, a block computing longer than SEQPAR_TIMEOUT=1": (1, {"SEQPAR_TIMEOUT": "1"}, """
        x = np.random.default_rng(0).standard_normal((1, 16384, 8, 64)).astype(np.float32)
        t = time.perf_counter()
        seqpar.ring_attention(x, x, x)
        print(f"call {time.perf_counter() - t:.1f} s", flush=True)
        """),
    "float64 error at score offsets, 3 ranks": (3, {}, """
        rng = np.random.default_rng(0)
        for c in (1e4, 1e6, 1e10):
            q, k = (rng.integers(-2, 3, (1, 48, 2, 8)) / 4 for _ in range(2))
            v = rng.standard_normal((1, 48, 2, 8))
            q[..., 0], k[..., 0] = c, 1.0  # scores c + O(1), exact in float64
            one = seqpar.attention(q, k, v, softmax_scale=1.0)
            parts = [seqpar.shard(a, comm) for a in (q, k, v)]
            ring = seqpar.gather(seqpar.ring_attention(*parts, softmax_scale=1.0), comm)
            kv = seqpar.kv_sharded_attention(q, parts[1], parts[2], softmax_scale=1.0)
            ref = reference(q, k, v)
            err = lambda a: np.linalg.norm(a - ref) / np.linalg.norm(ref)
            if comm.rank == 0:
                print(f"offset {c:g}: one rank {err(one):.1e}, ring {err(ring):.1e}, "
                      f"kv_sharded {err(kv):.1e}", flush=True)
        """),
    "tiny calls back to back, 2 ranks": (2, {}, """
        x = np.random.default_rng(0).standard_normal((1, 4, 2, 8))
        for name, f in (("ring", lambda: seqpar.ring_attention(x, x, x)),
                        ("kv_sharded", lambda: seqpar.kv_sharded_attention(x, x, x))):
            for _ in range(50):
                f()
            t = []
            for _ in range(300):
                t0 = time.perf_counter(); f(); t.append(time.perf_counter() - t0)
            if comm.rank == 0:
                print(f"{name} median {np.median(t) * 1e6:.0f} us", flush=True)
        """),
}

PRELUDE = """
import time
import numpy as np
from mpi4py import MPI
import seqpar
comm = MPI.COMM_WORLD

def reference(q, k, v):  # float64 attention, scale 1
    s = np.einsum("bqhd,bkhd->bhqk", q, k)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)
"""


def main() -> int:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, (ranks, env, body) in JOBS.items():
            script = os.path.join(folder, "job.py")
            with open(script, "w") as out:
                out.write(PRELUDE + textwrap.dedent(body))
            environ = dict(os.environ, PYTHONPATH=repo, **env)
            start = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "seqpar", "run", "-n", str(ranks),
                                   script], env=environ, capture_output=True, text=True,
                                  timeout=300)
            seconds = time.monotonic() - start
            said = [line for line in (done.stdout + done.stderr).splitlines()
                    if line.startswith("seqpar: rank") or not line.startswith(
                        ("+ ", "-", " ", "MPI_ABORT", "NOTE", "You may", "exactly", "prterun",
                         "\"abort\"", "terminated", "[", "with errorcode", "Proc:",
                         "Errorcode"))]
            lines = len((done.stdout + done.stderr).splitlines()) - 1  # less the launch line
            rows.append((name, done.returncode, seconds, lines,
                         "; ".join(s for s in said if s)))
    print("| job | exit status | s from launch | lines printed | what it said |")
    print("| --- | --- | --- | --- | --- |")
    for name, status, seconds, lines, said in rows:
        print(f"| {name} | {status} | {seconds:.1f} | {lines} | {said[:400]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
