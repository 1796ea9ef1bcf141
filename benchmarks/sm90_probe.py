"""Probes of the Hopper kernel's layers, one probe per process.

    python benchmarks/sm90_probe.py PROBE [--out DIR]

PROBE is one of
    ss          wgmma, both operands in shared memory (128-byte swizzle, K-major),
                C = A B^T, 64 x 128 x 128
    rs, rs64    wgmma, A from registers, B = V read transposed (MN-major), N = 128 / 64
    rs-swap     rs with the LBO and SBO of the V descriptor swapped (diagnosis)
    tma         one TMA box of a strided 4-D tensor map (zero fill past the end),
                tensor map passed through CuPy as a one-element NumPy array
    tma-driver  the same launched through cuda.bindings.driver.cuLaunchKernel

Each prints one JSON line (probe, ok, error, detail) and saves its arrays under
DIR. Inputs are small integers, so every product and sum is exact in fp32: a
correct probe matches its reference exactly. An illegal instruction poisons the
CUDA context of its process, hence one probe per process (benchmarks/gpu_run_sm90.sh).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cupy  # noqa: E402
import ml_dtypes  # noqa: E402

from seqpar.local import cupy_sm90  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


def module(names):
    src = (ROOT / "benchmarks" / "sm90_probe.cu").read_text()
    src = src.replace('#include "sm90.cuh"', cupy_sm90.source("sm90.cuh"))
    return cupy.RawModule(code=src, options=("-std=c++17", "--gpu-architecture=sm_90a"),
                          name_expressions=names)


def ints(rng, shape, lo=-3, hi=4):
    return rng.integers(lo, hi, size=shape).astype(np.float32)


def report(probe, ok, error, detail, out_dir, **arrays):
    if out_dir:
        np.savez(Path(out_dir) / f"probe_{probe}.npz", **arrays)
    print(json.dumps({"probe": probe, "ok": bool(ok), "error": float(error), "detail": detail}))


def probe_ss(out_dir):
    rng = np.random.default_rng(1)
    a = ints(rng, (64, 128))
    b = ints(rng, (128, 128))
    name = "probe_wgmma_ss<true>"
    fn = module([name]).get_function(name)
    fn.max_dynamic_shared_size_bytes = 64 * 1024 + 1024
    c = cupy.full((64, 128), np.nan, dtype=np.float32)
    fn((1,), (128,), (cupy.asarray(a.astype(BF16)), cupy.asarray(b.astype(BF16)), c),
       shared_mem=64 * 1024 + 1024)
    got = c.get()
    ref = a.astype(np.float64) @ b.astype(np.float64).T
    err = float(np.nanmax(np.abs(got - ref))) if not np.isnan(got).all() else float("inf")
    detail = {"nan": int(np.isnan(got).sum()),
              "matches_transposed": bool(np.array_equal(got, ref.T)),
              "rows_ok": int((np.abs(got - ref).max(axis=1) == 0).sum())}
    report("ss", err == 0 and detail["nan"] == 0, err, detail, out_dir, a=a, b=b, c=got)


def probe_rs(out_dir, n=128, swap=False):
    rng = np.random.default_rng(2)
    p = ints(rng, (64, 64), 0, 3)
    v = ints(rng, (64, n))
    name = f"probe_wgmma_rs<{n}, true>"
    fn = module([name]).get_function(name)
    fn.max_dynamic_shared_size_bytes = 48 * 1024
    c = cupy.full((64, n), np.nan, dtype=np.float32)
    lbo, sbo = 64 * 128, 1024  # panel of 64 keys x 128 bytes; 8-key groups
    if swap:
        lbo, sbo = sbo, lbo
    fn((1,), (128,), (cupy.asarray(p.astype(BF16)), cupy.asarray(v.astype(BF16)), c,
                      np.int32(lbo), np.int32(sbo)), shared_mem=40 * 1024)
    got = c.get()
    ref = p.astype(np.float64) @ v.astype(np.float64)
    err = float(np.nanmax(np.abs(got - ref))) if not np.isnan(got).all() else float("inf")
    detail = {"nan": int(np.isnan(got).sum()), "lbo": lbo, "sbo": sbo,
              "cols_ok": int((np.abs(got - ref).max(axis=0) == 0).sum())}
    name = ("rs-swap" if swap else "rs") + ("" if n == 128 else str(n))
    report(name, err == 0 and detail["nan"] == 0, err, detail, out_dir, p=p, v=v, c=got)


def swizzled_box(src, rows):
    """Expected shared-memory image (uint16) of a 64-column x `rows` box (128-B swizzle)."""
    img = np.zeros(rows * 64, dtype=np.uint16)
    for r in range(rows):
        for c in range(64):
            img[(r * 128 + ((((c >> 3) ^ (r & 7)) << 4)) + (c & 7) * 2) // 2] = src[r, c]
    return img


def probe_tma(out_dir, driver=False):
    if driver:
        os.environ["SEQPAR_SM90_LAUNCH"] = "driver"
    rng = np.random.default_rng(3)
    full = rng.integers(0, 60000, size=(2, 100, 6, 128)).astype(np.uint16)
    dev = cupy.asarray(full).view(BF16)
    x = dev[:, :, 1:4]  # (2, 100, 3, 128): a strided view (head stride 6 * 128)
    rows, c0, c1, c2, c3 = 64, 64, 64, 2, 1  # panel 1, rows 64..127 (100.. past the end)
    tmap = cupy_sm90.tensor_map(x, rows)
    name = "probe_tma"
    fn = module([name]).get_function(name)
    nbytes = rows * 128
    fn.max_dynamic_shared_size_bytes = nbytes + 2048
    out = cupy.zeros(nbytes // 4, dtype=np.uint32)
    cupy_sm90.launch(fn, (1, 1, 1), (128, 1, 1),
                     (tmap, out, np.int32(c0), np.int32(c1), np.int32(c2), np.int32(c3),
                      np.int32(nbytes)), nbytes + 2048)
    cupy.cuda.Device().synchronize()
    got = out.get().view(np.uint16)
    src = np.zeros((rows, 64), dtype=np.uint16)
    valid = min(rows, 100 - c1)
    src[:valid] = full[c3, c1:c1 + valid, 1 + c2, c0:c0 + 64]
    want = swizzled_box(src, rows)
    bad = int((got != want).sum())
    unswizzled = bad and bool(np.array_equal(got, src.reshape(-1)))
    detail = {"bad_elements": bad, "looks_unswizzled": unswizzled,
              "zero_fill_ok": bool((got.reshape(rows, 64)[valid:] == 0).all())}
    report("tma-driver" if driver else "tma", bad == 0, bad, detail, out_dir, got=got,
           want=want)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("probe", choices=["ss", "rs", "rs64", "rs-swap", "tma", "tma-driver"])
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    a = ap.parse_args()
    {"ss": lambda: probe_ss(a.out), "rs": lambda: probe_rs(a.out),
     "rs64": lambda: probe_rs(a.out, n=64), "rs-swap": lambda: probe_rs(a.out, swap=True),
     "tma": lambda: probe_tma(a.out), "tma-driver": lambda: probe_tma(a.out, driver=True)}[
        a.probe]()


if __name__ == "__main__":
    main()
