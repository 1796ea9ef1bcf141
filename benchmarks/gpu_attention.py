"""Forward attention throughput: seqpar's CuPy kernel vs PyTorch SDPA (FA2, cuDNN).

Runs on a GPU machine with cupy, ml_dtypes and torch (torch is used here only,
never inside seqpar). Same inputs for all three: torch sees the CuPy arrays
through DLPack. TFLOP/s = 4*N*N*d*Hq*batch / time, halved when causal (Hq: query
heads). Time: CUDA events around a run of back-to-back calls (divided by their
number), warm-up first, median of 5 such trials; the calls per trial scale with
the work (about 20 ms a trial, estimated at 400 TFLOP/s) unless --reps is given.

    PYTHONPATH=. python3 benchmarks/gpu_attention.py [--json out.json]
    PYTHONPATH=. python3 benchmarks/gpu_attention.py --grid [--docs 1048576] [--json out.json]
    PYTHONPATH=. python3 benchmarks/gpu_attention.py --shapes 64:16,128:32/8 --ns 4096,16384
        --long 131072 --batches 1,8 --causal 0,1 [--plan]      (one command line)

Shapes are d:hq or d:hq/hk (GQA: k and v have hk heads; torch gets enable_gqa=True,
or, where a backend refuses that, k/v repeated to hq heads, noted as "torch_gqa").
Batches > 1 run only at the N of --batch-ns (4096). --long adds N for d = 128 with
16/16 heads. --grid sets the issue's grid (bf16,fp16; 64:16, 96:8/2, 128:16, 128:32/8,
192:8, 256:8; N 4096,16384,65536 and 131072 for 128:16; batches 1,8; causal 0,1);
options given with it override its parts. --docs N: packed causal documents of random
lengths (1k..64k tokens, fixed seed) at N tokens, batch 1, d 128, 16 heads, bf16,
seqpar only, 10 separately timed calls after 5 s of warm-up calls. --plan prints the rows and an estimated run
time and exits. The summary at the end is a Markdown table (benchmarks/gpu_attention.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import cupy
import ml_dtypes
import numpy as np

from seqpar.local import cupy_kernel
from seqpar.masks import Mask

GRID = {"dtypes": "bf16,fp16", "shapes": "64:16,96:8/2,128:16,128:32/8,192:8,256:8",
        "ns": "4096,16384,65536", "long": "131072", "batches": "1,8", "causal": "0,1"}
RATE_EST = 400e12      # FLOP/s assumed when choosing the calls per trial
TRIAL_S = 0.02         # aimed-at seconds per timed trial
MAX_REPS = 1000        # tiny shapes are launch-bound (~10-20 us a call): no millions of calls
TRIALS, WARMUP = 5, 2  # as in _time
NAN = float("nan")
DOCS_WARMUP_S = 5.0    # the documents run's warm-up before its 10 timed calls


def _time(fn, inner, trials=5, warmup=2):
    """Median over trials of (events around `inner` back-to-back calls) / inner.

    Back-to-back launches keep the GPU busy while Python prepares the next
    call, so the host overhead of each wrapper (seqpar's or torch's) stays out
    of the number unless it exceeds the kernel's own time.
    """
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(trials):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        ts.append(cupy.cuda.get_elapsed_time(a, b) * 1e-3 / inner)
    return statistics.median(ts)


def _by_group(groups, measure):
    """{group: measure()} with the Hopper kernel's causal order forced to each group size
    in turn (the kept launches forgotten, as they hold the order), then its own rule."""
    from seqpar.local import cupy_sm90

    rule, found = cupy_sm90.heavy_group, {}
    try:
        for g in groups:
            cupy_sm90.heavy_group = lambda *_, g=g: g
            cupy_kernel._PREPARED.clear()
            found[g] = measure()
    finally:
        cupy_sm90.heavy_group = rule
        cupy_kernel._PREPARED.clear()
    return found


def _time_each(fn, calls=10, warmup=2, warmup_s=0.0):
    """Seconds of each of `calls` calls, each alone between CUDA events (synchronised),
    after `warmup` calls and at least `warmup_s` seconds of them."""
    start = time.perf_counter()
    done = 0
    while done < warmup or time.perf_counter() - start < warmup_s:
        fn()
        cupy.cuda.Device().synchronize()
        done += 1
    ts = []
    for _ in range(calls):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(cupy.cuda.get_elapsed_time(a, b) * 1e-3)
    return ts


# -- arguments and the plan ---------------------------------------------------------------
def _ints(text):
    """"4096,16384" -> [4096, 16384]; "" or "none" -> []."""
    text = (text or "").strip()
    return [] if text.lower() in ("", "none") else [int(x) for x in text.split(",")]


def _shapes(text):
    """"64:16,96:8/2" -> [(64, 16, 16), (96, 8, 2)]: (head dim, q heads, k/v heads)."""
    out = []
    for item in text.split(","):
        d, heads = item.split(":")
        hq, _, hk = heads.partition("/")
        hq, hk = int(hq), int(hk or hq)
        if hk <= 0 or hq % hk:
            raise ValueError(f"shape {item!r}: q heads must be a multiple of k/v heads")
        out.append((int(d), hq, hk))
    return out


def _parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--dims", default="64,128", help="head dims (ignored with --shapes)")
    ap.add_argument("--heads", type=int, default=16, help="heads, q and k/v (ignored with "
                    "--shapes)")
    ap.add_argument("--shapes", default=None, help="d:hq or d:hq/hk, comma-separated, e.g. "
                    "64:16,96:8/2,128:32/8 (default: --dims with --heads heads)")
    ap.add_argument("--ns", default="4096,16384,65536", help="sequence lengths ('' for none)")
    ap.add_argument("--long", default="", help="extra sequence lengths for d=128 with 16/16 "
                    "heads only, e.g. 131072")
    ap.add_argument("--batches", default="1", help="batch sizes; a batch > 1 runs only at "
                    "the N of --batch-ns")
    ap.add_argument("--batch-ns", default="4096", help="the N at which batches > 1 run")
    ap.add_argument("--causal", default="0,1")
    ap.add_argument("--grid", action="store_true", help="the issue's grid: " + "; ".join(
        f"--{k} {v}" for k, v in GRID.items()) + " (explicit options override it)")
    ap.add_argument("--docs", type=int, default=0, help="also time packed causal documents "
                    "at this many tokens (d 128, 16 heads, bf16, seqpar only)")
    ap.add_argument("--reps", type=int, default=0,
                    help="back-to-back calls per timed trial (0: ~20 ms of work a trial)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--plan", action="store_true", help="print the rows and the estimated "
                    "time, run nothing")
    ap.add_argument("--heavy-groups", default="", help="also time causal rows and --docs "
                    "with the Hopper kernel's longest-first order forced to take this many "
                    "query blocks of a head at a time, e.g. 1,4,8,16 (cupy_sm90.heavy_group "
                    "chooses for the main figures)")
    ap.add_argument("--json", default=None)
    return ap


def _parse(argv=None):
    """Arguments; --grid changes the defaults, so options given with it still apply."""
    ap = _parser()
    pre, _ = ap.parse_known_args(argv)
    if pre.grid:
        ap.set_defaults(**GRID)
    args = ap.parse_args(argv)
    try:
        args.shape_list = (_shapes(args.shapes) if args.shapes else
                           [(d, args.heads, args.heads) for d in _ints(args.dims)])
        for name in ("ns", "long", "batches", "batch_ns", "causal", "heavy_groups"):
            setattr(args, name + "_list", _ints(getattr(args, name)))
    except ValueError as exc:
        ap.error(str(exc))
    args.dtype_list = [x for x in args.dtypes.split(",") if x]
    for dt in args.dtype_list:
        if dt not in ("bf16", "fp16"):
            ap.error(f"--dtypes: {dt!r} is neither bf16 nor fp16")
    return args


def _cases(args):
    """(dtype, d, hq, hk, batch, N) of every input set, in run order; each runs all causal."""
    cases = []
    for dt in args.dtype_list:
        for d, hq, hk in args.shape_list:
            ns = list(args.ns_list)
            if (d, hq, hk) == (128, 16, 16):
                ns += [n for n in args.long_list if n not in ns]
            for n in ns:
                for b in args.batches_list:
                    if b == 1 or n in args.batch_ns_list:
                        cases.append((dt, d, hq, hk, b, n))
    return cases


def _flops(d, hq, batch, n, causal):
    return 4.0 * n * n * d * hq * batch / (2 if causal else 1)


def _reps(flops, fixed=0):
    """Calls per timed trial: `fixed`, or enough for ~TRIAL_S at RATE_EST (<= MAX_REPS)."""
    return fixed or min(MAX_REPS, max(1, math.ceil(TRIAL_S / (flops / RATE_EST))))


def _estimate_s(cases, causals, backends=3, fixed=0):
    """Rough seconds for the grid: every backend makes WARMUP + TRIALS*reps (+1) calls
    at RATE_EST (kernel compilation and input generation not counted)."""
    total = 0.0
    for _, d, hq, _, b, n in cases:
        for c in causals:
            f = _flops(d, hq, b, n, c)
            total += backends * (WARMUP + 1 + TRIALS * _reps(f, fixed)) * f / RATE_EST
    return total


def _doc_lengths(n, lo=1024, hi=65536, seed=0):
    """Random document lengths, uniform in [lo, hi], the last one cut so they sum to n."""
    rng = np.random.default_rng(seed)
    lengths, total = [], 0
    while total < n:
        length = min(int(rng.integers(lo, hi, endpoint=True)), n - total)
        lengths.append(length)
        total += length
    return lengths


# -- running ------------------------------------------------------------------------------
def _kernel_name(d):
    """Which seqpar kernel runs a long forward at head dim d on this device."""
    if os.environ.get("SEQPAR_KERNEL", "").strip() == "mma":
        return "mma"
    if cupy.cuda.Device().compute_capability != "90":
        return "mma"
    from seqpar.local import cupy_sm90  # only where it can run

    return "sm90" if d in cupy_sm90.SUPPORTED_HEAD_DIMS else "mma"


def _inputs(dt, d, hq, hk, b, n):
    npdt = np.float16 if dt == "fp16" else ml_dtypes.bfloat16
    rs = cupy.random.RandomState(n + d + 1000 * b + 10 * hq + hk)
    q = rs.standard_normal((b, n, hq, d), dtype=np.float32).astype(npdt)
    k, v = (rs.standard_normal((b, n, hk, d), dtype=np.float32).astype(npdt)
            for _ in range(2))
    return q, k, v


def _torch_time(torch, F, be, tq, tk, tv, causal, scale, reps, repeated):
    """(seconds, output, gqa) of one SDPA backend; enable_gqa first, else repeated k/v."""
    from torch.nn.attention import sdpa_kernel

    hq, hk = tq.shape[1], tk.shape[1]
    tries = [("native", tk, tv, {"enable_gqa": True} if hq != hk else {})]
    if hq != hk:
        tries.append(("repeated", None, None, {}))
    errors = []
    for gqa, k, v, kw in tries:
        try:
            if gqa == "repeated":
                if not repeated:  # once per input set, outside the timing
                    repeated.extend([x.repeat_interleave(hq // hk, dim=1) for x in (tk, tv)])
                k, v = repeated
            with sdpa_kernel(be):
                def f(k=k, v=v, kw=kw):
                    return F.scaled_dot_product_attention(tq, k, v, is_causal=bool(causal),
                                                          scale=scale, **kw)
                ref = f()
                return _time(f, reps), ref, gqa
        except Exception as exc:  # backend refused this shape
            errors.append(f"{gqa}: {type(exc).__name__}: {exc}"[:200])
        finally:
            torch.cuda.synchronize()
    raise RuntimeError(" | ".join(errors))


def _rel_diff(torch, out, ref):
    a = torch.from_dlpack(out).float()
    bb = ref.transpose(1, 2).float()
    return float((a - bb).norm() / bb.norm())


def _run_case(case, causals, torch, fixed_reps, groups=()):
    """The rows (one per causal) of one input set; its arrays die on return."""
    dt, d, hq, hk, b, n = case
    q, k, v = _inputs(*case)
    out = cupy.empty_like(q)
    scale = 1.0 / math.sqrt(d)
    kernel = _kernel_name(d)
    if torch is not None:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend

        # (B, S, H, D) -> torch's (B, H, S, D) as a view, same memory
        tq, tk, tv = (torch.from_dlpack(x).transpose(1, 2) for x in (q, k, v))
        repeated = []
    rows = []
    for causal in causals:
        flops = _flops(d, hq, b, n, causal)
        reps = _reps(flops, fixed_reps)
        mask = Mask(causal=True) if causal else None
        row = {"dtype": dt, "d": d, "hq": hq, "hk": hk, "batch": b, "N": n,
               "causal": causal, "kernel": kernel, "reps": reps,
               "seqpar": NAN, "cudnn": NAN, "fa2": NAN, "diff": NAN}
        try:
            t_sp = _time(lambda mask=mask: cupy_kernel.forward(q, k, v, scale=scale, mask=mask,
                                                               out=out), reps)
            row["seqpar"] = flops / t_sp / 1e12
            if causal and groups:
                row["seqpar_by_group"] = _by_group(groups, lambda mask=mask: flops / _time(
                    lambda: cupy_kernel.forward(q, k, v, scale=scale, mask=mask, out=out),
                    reps) / 1e12)
        except Exception as exc:  # seqpar refused or failed this shape: record, go on
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"  seqpar failed: {row['error']}", flush=True)
        if torch is not None:
            for label, be in (("fa2", SDPBackend.FLASH_ATTENTION),
                              ("cudnn", SDPBackend.CUDNN_ATTENTION)):
                try:
                    t, ref, gqa = _torch_time(torch, F, be, tq, tk, tv, causal, scale, reps,
                                              repeated)
                except Exception as exc:
                    print(f"  {label} failed: {exc}"[:400], flush=True)
                    continue
                row[label] = flops / t / 1e12
                if hq != hk:  # "repeated" if any backend needed k/v repeated
                    row.setdefault("torch_gqa_by", {})[label] = gqa
                    row["torch_gqa"] = "repeated" if "repeated" in row["torch_gqa_by"].values() \
                        else "native"
                if "error" not in row and "diff_vs" not in row:  # same function computed
                    row["diff"], row["diff_vs"] = _rel_diff(torch, out, ref), label
                del ref
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _free(torch):
    cupy.get_default_memory_pool().free_all_blocks()
    if torch is not None:
        torch.cuda.empty_cache()


def _run_docs(n, d=128, h=16, seed=0, groups=()):
    """Packed causal documents at n tokens: 10 separately timed seqpar calls."""
    lengths = _doc_lengths(n, seed=seed)
    pairs = sum(x * (x + 1) // 2 for x in lengths)
    res = {"N": n, "documents": len(lengths), "lengths": lengths, "seed": seed,
           "dtype": "bf16", "d": d, "hq": h, "hk": h, "batch": 1, "causal": 1,
           "kernel": _kernel_name(d), "pairs": pairs, "torch": "skipped"}
    try:
        q, k, v = _inputs("bf16", d, h, h, 1, n)
        out = cupy.empty_like(q)
        mask = Mask.build(causal=True, seqlens=lengths)
        # calls of 0.4 s right after the grid: the first seconds ran 10 % apart from
        # call to call, later ones within 1-2 % (benchmarks/gpu_attention.md)
        ts = _time_each(lambda: cupy_kernel.forward(q, k, v, scale=1.0 / math.sqrt(d),
                                                    mask=mask, out=out), warmup_s=DOCS_WARMUP_S)
        med = statistics.median(ts)
        res.update(ms=[t * 1e3 for t in ts], min_ms=min(ts) * 1e3, median_ms=med * 1e3,
                   max_ms=max(ts) * 1e3, spread_pct=(max(ts) - min(ts)) / med * 100,
                   tflops=4.0 * pairs * d * h / med / 1e12)
        if groups:
            res["ms_by_group"] = _by_group(groups, lambda: [t * 1e3 for t in _time_each(
                lambda: cupy_kernel.forward(q, k, v, scale=1.0 / math.sqrt(d), mask=mask,
                                            out=out))])
    except Exception as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"[:300]
    print(json.dumps({k: v for k, v in res.items() if k != "lengths"}), flush=True)
    return res


# -- report -------------------------------------------------------------------------------
def _ratio(a, b):
    return a / b if b and math.isfinite(a) and math.isfinite(b) else NAN


def _gm(xs):
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else NAN


def _row_label(r):
    return (f"{r['dtype']} d={r['d']} {r['hq']}/{r['hk']} b={r['batch']} N={r['N']} "
            f"{'causal' if r['causal'] else 'full'}")


def _docs_line(docs):
    if docs is None:
        return None
    head = (f"docs: N={docs['N']}, {docs['documents']} causal documents (lengths 1024..65536, "
            f"seed {docs['seed']}), bf16, d={docs['d']}, {docs['hq']}/{docs['hk']} heads, "
            f"batch 1, kernel {docs['kernel']}: ")
    if "error" in docs:
        return head + f"seqpar failed: {docs['error']}"
    return head + (f"min/median/max {docs['min_ms']:.1f}/{docs['median_ms']:.1f}/"
                   f"{docs['max_ms']:.1f} ms over 10 calls, spread {docs['spread_pct']:.1f}%, "
                   f"{docs['tflops']:.0f} TFLOP/s on the visible pairs (median; "
                   f"{docs['pairs']:.3e} pairs); torch not run (no packed-documents SDPA here)")


def _report(name, rows, docs=None):
    """The Markdown summary table, geometric means, the lowest /cuDNN row, the docs line."""
    lines = [f"**{name}**: forward TFLOP/s (seqpar vs torch SDPA cuDNN and FLASH)", "",
             ("| dtype | d | heads | batch | N | causal | kernel | seqpar | cuDNN | FLASH "
              "| /cuDNN | /FLASH |"),
             "|---|--:|--:|--:|--:|---|---|--:|--:|--:|--:|--:|"]
    both, worst = [], None
    for r in rows:
        c, f = _ratio(r["seqpar"], r["cudnn"]), _ratio(r["seqpar"], r["fa2"])
        if math.isfinite(c) and math.isfinite(f):
            both.append((c, f))
        if math.isfinite(c) and (worst is None or c < worst[0]):
            worst = (c, r)
        sp = "error" if "error" in r else f"{r['seqpar']:.0f}"
        heads = f"{r['hq']}/{r['hk']}" + ("*" if r.get("torch_gqa") == "repeated" else "")
        lines.append(f"| {r['dtype']} | {r['d']} | {heads} | {r['batch']} | {r['N']} | "
                     f"{bool(r['causal'])} | {r['kernel']} | {sp} | {r['cudnn']:.0f} | "
                     f"{r['fa2']:.0f} | {c:.3f} | {f:.3f} |")
    lines.append("")
    lines.append(f"geomean seqpar/cuDNN = {_gm([c for c, _ in both]):.3f}, seqpar/FLASH = "
                 f"{_gm([f for _, f in both]):.3f} (over the {len(both)} rows with both)")
    if worst is not None:
        lines.append(f"min seqpar/cuDNN = {worst[0]:.3f} at {_row_label(worst[1])}")
    if any(r.get("torch_gqa") == "repeated" for r in rows):
        lines.append("`*`: a torch backend refused enable_gqa there; it got k/v repeated to the "
                     "q heads (repeat outside the timing; see torch_gqa_by in the JSON)")
    for r in rows:
        if "error" in r:
            lines.append(f"seqpar error at {_row_label(r)}: {r['error']}")
    diffs = [r["diff"] for r in rows if math.isfinite(r["diff"])]
    if diffs:
        lines.append(f"max relative difference seqpar vs torch = {max(diffs):.1e}")
    if docs is not None:
        lines.append(_docs_line(docs))
    lines += _group_lines(rows, docs)
    return "\n".join(lines)


def _group_lines(rows, docs):
    """The --heavy-groups comparison: TFLOP/s per group size, docs spread per group."""
    timed = [r for r in rows if r.get("seqpar_by_group")]
    if not timed and not (docs and docs.get("ms_by_group")):
        return []
    groups = list((timed[0]["seqpar_by_group"] if timed else docs["ms_by_group"]))
    lines = ["", "causal order by group size (TFLOP/s; /cuDNN in brackets):", "",
             "| row | " + " | ".join(f"group {g}" for g in groups) + " |",
             "|---|" + "--:|" * len(groups)]
    for r in timed:
        cells = [f"{r['seqpar_by_group'][g]:.0f} ({_ratio(r['seqpar_by_group'][g], r['cudnn']):.2f})"
                 for g in groups]
        lines.append(f"| {_row_label(r)} | " + " | ".join(cells) + " |")
    if timed:
        lines.append("| geomean /cuDNN | " + " | ".join(
            f"{_gm([_ratio(r['seqpar_by_group'][g], r['cudnn']) for r in timed if r['cudnn'] == r['cudnn']]):.3f}"
            for g in groups) + " |")
    if docs and docs.get("ms_by_group"):
        for g, ms in docs["ms_by_group"].items():
            med = statistics.median(ms)
            lines.append(f"docs group {g}: min/median/max {min(ms):.1f}/{med:.1f}/{max(ms):.1f} "
                         f"ms, spread {(max(ms) - min(ms)) / med * 100:.1f}%")
    return lines


def main(argv=None):
    args = _parse(argv)
    cases = _cases(args)
    est = _estimate_s(cases, args.causal_list, 1 if args.no_torch else 3, args.reps)
    print(f"{len(cases) * len(args.causal_list)} rows ({len(cases)} input sets), "
          f"estimated {est / 60:.1f} min of timed calls at {RATE_EST / 1e12:.0f} TFLOP/s "
          "(plus kernel compilation)", flush=True)
    if args.plan:
        for case in cases:
            for c in args.causal_list:
                f = _flops(case[1], case[2], case[4], case[5], c)
                print(f"  {case} causal={c}: {f / 1e12:.2f} TFLOP, reps {_reps(f, args.reps)}")
        return 0

    torch = None
    if not args.no_torch:
        import torch

    dev = cupy.cuda.Device()
    name = cupy.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
    print(f"device: {name}, cc {dev.compute_capability}", flush=True)
    rows = []
    for case in cases:
        rows += _run_case(case, args.causal_list, torch, args.reps, args.heavy_groups_list)
        _free(torch)
    docs = None
    if args.docs:
        docs = _run_docs(args.docs, groups=args.heavy_groups_list)
        _free(torch)

    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": name, "cc": dev.compute_capability, "argv": sys.argv[1:],
                       "rows": rows, "docs": docs}, fh, indent=1)
    print()
    print(_report(name, rows, docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
