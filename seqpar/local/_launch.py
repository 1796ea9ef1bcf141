"""What the CuPy kernels share: the kernel tables and their choice, the sources,
the checks of what a kernel can read, mask arguments, device facts.

The launch modules of :mod:`seqpar.local` (``cupy_kernel``, ``cupy_backward``,
``cupy_sm90``, ``cupy_sm90_backward``) import from here, never from each other in a
circle. cupy is imported lazily, so importing this module needs no GPU.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np

from ..graphs import device_constant, keep_for_graph
from ..masks import UNBOUNDED

SUPPORTED_HEAD_DIMS = (32, 64, 96, 128, 192, 256)
# the Hopper kernels' head dims (forward: cupy_sm90.CONFIGS; backward: cupy_sm90_backward)
SM90_HEAD_DIMS = (64, 96, 128, 192, 256)
SM90_BACKWARD_HEAD_DIMS = (64, 128)

# The choice of kernel, first match wins: (name, dtypes, head dims, minimum compute
# capability, condition on the call). SEQPAR_KERNEL=<name> forces one where it applies.
KERNELS = (
    # few query rows per K/V head (query tokens x heads sharing it): split over keys
    ("decode", ("float16", "bfloat16"), SUPPORTED_HEAD_DIMS, (8, 0), "rows <= 64"),
    # Hopper: wgmma, TMA, warp-specialised (seqpar/local/cupy_sm90.py)
    ("sm90", ("float16", "bfloat16"), SM90_HEAD_DIMS, (9, 0), "sm90 can read the operands"),
    ("mma", ("float16", "bfloat16"), SUPPORTED_HEAD_DIMS, (8, 0), "any"),
    ("f32", ("float32",), SUPPORTED_HEAD_DIMS, (7, 0), "any"),
)
_DECODE_MAX_ROWS = 64

# The same for the backward (seqpar/local/cupy_backward.py).
BACKWARD_KERNELS = (
    # Hopper: one fused wgmma/TMA kernel (seqpar/local/cupy_sm90_backward.py)
    ("sm90", ("float16", "bfloat16"), SM90_BACKWARD_HEAD_DIMS, (9, 0),
     "sm90 can read the operands"),
    # FlashAttention-2's scheme on mma.sync: dK/dV and dQ passes
    ("mma", ("float16", "bfloat16"), SUPPORTED_HEAD_DIMS, (8, 0), "any"),
    ("f32", ("float32",), SUPPORTED_HEAD_DIMS, (7, 0), "any"),
)
_INCLUDE = re.compile(r'^#include "([\w.]+)"\s*$', re.MULTILINE)


def _cupy():
    try:
        import cupy
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ImportError(
            'seqpar.local.cupy_kernel needs cupy (pip install "seqpar[cuda12]" or '
            '"seqpar[cuda13]")'
        ) from exc
    return cupy


def _read(name: str) -> str:
    """A kernel source file: package data when installed, else ../../kernels/."""
    try:
        from importlib.resources import files

        return files("seqpar.kernels").joinpath(name).read_text()
    except (ImportError, FileNotFoundError, OSError, TypeError):
        return (Path(__file__).resolve().parents[2] / "kernels" / name).read_text()


@functools.lru_cache(maxsize=None)
def source(name: str) -> str:
    """``name`` with its ``#include "x.cuh"`` lines replaced by the headers, each once."""
    seen: set[str] = set()

    def expand(text: str) -> str:
        def one(match):
            header = match.group(1)
            if header in seen:
                return ""
            seen.add(header)
            return expand(_read(header))

        return _INCLUDE.sub(one, text.replace("#pragma once\n", ""))

    return expand(_read(name))


def _dtype_name(dtype) -> str:
    return getattr(dtype, "name", str(dtype))


def choose_kernel(dtype, head_dim: int, capability: tuple[int, int], rows: int = 1 << 30,
                  sm90_reads: bool = True, table=KERNELS) -> str:
    """The name of the kernel ``table`` (``KERNELS`` or ``BACKWARD_KERNELS``) picks for a
    call; ``rows`` is query tokens x query heads per K/V head, ``sm90_reads`` whether the
    Hopper kernel can read the operands in place (its tensor maps need 16-byte aligned
    strides). ``SEQPAR_KERNEL`` names a row to force; a name the table lacks is ignored."""
    forced = os.environ.get("SEQPAR_KERNEL", "").strip()
    if forced not in {row[0] for row in table}:
        forced = ""
    name = _dtype_name(dtype)
    for kernel, dtypes, dims, minimum, condition in table:
        if name in dtypes and head_dim in dims and tuple(capability) >= minimum:
            fits = {"rows <= 64": rows <= _DECODE_MAX_ROWS,
                    "sm90 can read the operands": sm90_reads and tuple(capability) == (9, 0),
                    }.get(condition, True)
            if (forced == kernel and (fits or kernel != "decode")) or (not forced and fits):
                return kernel
    if forced:
        raise ValueError(f"SEQPAR_KERNEL={forced} does not apply to dtype {name}, "
                         f"head_dim {head_dim}")
    raise ValueError(f"no GPU kernel for dtype {name} with head_dim {head_dim} on compute "
                     f"capability {capability[0]}.{capability[1]}")


def _kind(dtype):
    name = _dtype_name(dtype)
    return {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}.get(name)


def _readable(x, name):
    """``x`` itself when the kernel can read it in place (:func:`reads_in_place`), else
    a C-contiguous copy of it (the caller's array is never written either way)."""
    return x if reads_in_place(x) else x.copy()  # a fresh allocation: aligned, contiguous


def reads_in_place(x) -> bool:
    """Whether the kernels read ``x`` where it is: the last axis contiguous, and for
    16-bit types a 16-byte aligned pointer and strides."""
    item = x.itemsize
    strides = x.strides
    ok = all(s % item == 0 for s in strides) and (x.shape[-1] <= 1 or strides[-1] == item)
    if ok and item == 2:
        ok = x.data.ptr % 16 == 0 and all(s % 16 == 0 for s in strides[:-1])
    return ok


def _tma_readable(x) -> bool:
    """Whether a TMA tensor map can describe x: 16-byte aligned pointer and strides,
    none negative, the last axis contiguous."""
    return (x.data.ptr % 16 == 0 and x.strides[-1] == x.itemsize
            and all(s % 16 == 0 and s >= 0 for n, s in zip(x.shape[:-1], x.strides[:-1])
                    if n > 1))


def _element_strides(x):
    return [s // x.itemsize for s in x.strides]


@functools.lru_cache(maxsize=64)
def _cached_doc_starts(starts: tuple, device_id: int):
    return device_constant(np.asarray(starts, dtype=np.int64), device_id)


def doc_starts(starts: tuple, device_id: int):
    """The document boundaries of a mask on the device, cached; a graph being captured
    keeps the array it reads, whatever the cache evicts later."""
    array = _cached_doc_starts(starts, device_id)
    if _cupy().cuda.get_current_stream().is_capturing():
        keep_for_graph(array)
    return array


def _mask_args(mask, q_offset, k_offset, device_id):
    """(q_off, k_off, left, right, docs pointer, ndocs) for the kernels."""
    i64 = np.int64
    if mask is None:
        return (i64(q_offset), i64(k_offset), i64(UNBOUNDED), i64(UNBOUNDED), np.uintp(0),
                np.int32(0))
    docs, ndocs = np.uintp(0), 0
    if mask.doc_starts is not None:
        docs = doc_starts(tuple(mask.doc_starts), device_id)
        ndocs = len(mask.doc_starts) - 1
    return (i64(q_offset), i64(k_offset), i64(mask.left), i64(mask.right), docs,
            np.int32(ndocs))


@functools.lru_cache(maxsize=None)
def _capability(device_id: int) -> tuple[int, int]:
    """(major, minor) of a device (CuPy spells it "90")."""
    text = str(_cupy().cuda.Device(device_id).compute_capability)
    return int(text[:-1]), int(text[-1])


class DirectLaunch:
    """One kernel launched by the driver's ``cuLaunchKernel`` from a parameter block
    built once: a call writes the arguments that change (array pointers) and launches,
    a few microseconds of host time where a CuPy launch converts every argument anew.

    ``kinds`` gives each parameter's C type in order: ``"p"`` a pointer, ``"i"`` int32,
    ``"q"`` int64, ``"f"`` float32; each occupies an 8-byte slot, which the kernel reads
    at its own size (little-endian).
    """

    def __init__(self, function, kinds: str, grid, block, shared_mem: int):
        self._function = int(getattr(function, "kernel", function).ptr)
        self.slots = np.zeros(len(kinds), dtype=np.uint64)
        self._pointers = np.array([self.slots.ctypes.data + 8 * i for i in range(len(kinds))],
                                  dtype=np.uint64)
        self._kinds = kinds
        self._shape = (*(int(g) for g in grid), *(int(b) for b in block), int(shared_mem))
        # resolved once: numpy's .ctypes and the library lookup cost microseconds a call
        self._parameters = int(self._pointers.ctypes.data)
        self._launch = _driver().cuLaunchKernel

    def set(self, index: int, value) -> None:
        """Write parameter ``index`` (a CuPy array is its data pointer; None is null)."""
        kind = self._kinds[index]
        if kind == "p":
            self.slots[index] = 0 if value is None else (
                int(value) if isinstance(value, (int, np.integer)) else value.data.ptr)
        elif kind == "i":  # the low half of the slot; the high half stays zero
            self.slots.view(np.int32)[2 * index] = value
        elif kind == "q":
            self.slots.view(np.int64)[index] = value
        else:
            self.slots.view(np.float32)[2 * index] = value

    def __call__(self, stream_ptr: int) -> None:
        status = self._launch(self._function, *self._shape, stream_ptr, self._parameters, None)
        if status:
            raise RuntimeError(f"cuLaunchKernel failed with CUresult {status}")


@functools.lru_cache(maxsize=None)
def _driver():
    """libcuda's cuLaunchKernel through ctypes (the library CuPy itself runs on)."""
    import ctypes

    library = ctypes.CDLL("libcuda.so.1")
    launch = library.cuLaunchKernel
    launch.argtypes = ([ctypes.c_void_p] + [ctypes.c_uint] * 7 +
                       [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p])
    launch.restype = ctypes.c_int
    return library
