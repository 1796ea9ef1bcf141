"""Array-module helpers: which module (NumPy or CuPy) an array belongs to, and dtypes."""
from __future__ import annotations

import sys
from types import ModuleType

import numpy as np

__all__ = ["array_module", "accumulation_dtype", "dtype_name", "is_supported_dtype", "native"]

_SUPPORTED = ("float16", "bfloat16", "float32", "float64")


def array_module(x) -> ModuleType:
    """Return ``numpy`` or ``cupy`` for an array, without importing CuPy needlessly."""
    if isinstance(x, np.ndarray):
        return np
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return cupy
    raise TypeError(f"expected a numpy.ndarray or cupy.ndarray, got {type(x).__name__}")


def dtype_name(dtype) -> str:
    """Canonical name of a dtype ('bfloat16' for ml_dtypes' bfloat16)."""
    return np.dtype(dtype).name


def is_supported_dtype(dtype) -> bool:
    return dtype_name(dtype) in _SUPPORTED


def accumulation_dtype(dtype) -> np.dtype:
    """float64 for float64 input, float32 for everything narrower."""
    return np.dtype(np.float64) if dtype_name(dtype) == "float64" else np.dtype(np.float32)


def native(x):
    """``x``, or a copy of it in this machine's byte order when its dtype is not.

    Arrays travel between ranks as raw bytes, so every rank must hold the same byte
    order: a big-endian array (``x.astype(">f4")``) is read, never written, and
    computed on as a native copy.
    """
    if x.dtype.isnative:
        return x
    return x.astype(x.dtype.newbyteorder("="))
