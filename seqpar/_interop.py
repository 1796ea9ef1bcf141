"""Arrays of other libraries (PyTorch, JAX, ...) in and out through DLPack, without a copy.

seqpar computes on NumPy (CPU) and CuPy (GPU) arrays. An argument that is neither
but has ``__dlpack__`` is viewed as one of them (host memory as NumPy, CUDA memory
as CuPy: zero copy), and results come back as the caller's kind through the
``from_dlpack`` of the library the first such argument came from. seqpar imports
none of those libraries: it only looks them up in ``sys.modules``.

A conversion that fails does not raise on its own rank: the argument becomes an
:class:`Unconvertible` that the function's argument check raises, inside the
collective agreement, so every rank raises the same error.
"""
from __future__ import annotations

import functools
import inspect
import sys

import numpy as np

from .graphs import graph_memory

__all__ = ["accepts_dlpack", "Unconvertible", "raise_unconvertible"]

_CPU, _CUDA, _CUDA_HOST, _CUDA_MANAGED = 1, 2, 3, 13  # DLPack device types


def accepts_dlpack(*names: str):
    """Decorate a public function: its arguments ``names`` may be any DLPack arrays.

    Returned arrays (one, or a tuple of them) go back as the kind of the first
    of ``names`` (q, dout, x); NumPy and CuPy arguments pass through untouched. A GPU
    call made while a CUDA graph captures allocates from memory kept for the graph
    (:mod:`seqpar.graphs`).
    """
    def decorate(function):
        signature = inspect.signature(function)
        position = list(signature.parameters).index(names[0])

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if not any(map(_foreign, args)) and not any(map(_foreign, kwargs.values())):
                lead = args[position] if len(args) > position else kwargs.get(names[0])
                if type(lead).__module__.startswith("cupy"):
                    with graph_memory(lead):  # a CUDA graph may be capturing
                        return function(*args, **kwargs)
                return function(*args, **kwargs)  # the common case, without binding
            bound = signature.bind(*args, **kwargs)
            origin = None
            for name in names:
                value = bound.arguments.get(name)
                if value is None or not _foreign(value):
                    continue
                try:
                    bound.arguments[name] = _as_native(value, name)
                except Exception as exc:  # noqa: BLE001 - raised by the collective check
                    bound.arguments[name] = Unconvertible(name, value, exc)
                    continue
                if name == names[0]:  # the result takes the kind of the main array
                    origin = type(value)
            first = bound.arguments.get(names[0])
            with graph_memory(first):
                result = function(*bound.args, **bound.kwargs)
            return result if origin is None else _back(result, origin)

        return wrapper

    return decorate


class Unconvertible:
    """An argument whose DLPack conversion failed: the error waits for the check."""

    def __init__(self, name: str, value, error: Exception):
        self.name, self.value, self.error = name, value, error
        if not isinstance(error, TypeError):
            self.error = TypeError(f"{name}: a {type(value).__module__}."
                                   f"{type(value).__name__} could not be viewed through "
                                   f"DLPack ({type(error).__name__}: {error})")

    def __repr__(self) -> str:
        return f"<{self.name}: {self.error}>"


def raise_unconvertible(*values) -> None:
    """Raise the conversion error of the first :class:`Unconvertible` among ``values``."""
    for value in values:
        if isinstance(value, Unconvertible):
            raise value.error


def _foreign(x) -> bool:
    if isinstance(x, np.ndarray):
        return False
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(x, cupy.ndarray):
        return False
    return hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__")


def _as_native(x, name: str):
    """A NumPy (host memory) or CuPy (CUDA memory) view of a DLPack array."""
    if getattr(x, "requires_grad", False) and hasattr(x, "detach"):
        x = x.detach()  # seqpar computes values; gradients come from its backward functions
    device_type = int(x.__dlpack_device__()[0])
    try:
        if device_type in (_CPU, _CUDA_HOST):
            return np.from_dlpack(x)
        if device_type in (_CUDA, _CUDA_MANAGED):
            import cupy

            return cupy.from_dlpack(x)
    except (TypeError, BufferError, RuntimeError, ValueError) as exc:
        raise TypeError(f"{name}: a {type(x).__module__}.{type(x).__name__} could not be "
                        f"viewed through DLPack ({exc}); bfloat16 host tensors are refused "
                        "by NumPy's DLPack import: pass float32 or float16 on the CPU")
    raise TypeError(f"{name}: arrays on DLPack device type {device_type} are not supported "
                    "(host memory runs on NumPy, CUDA memory on CuPy)")


def _back(result, origin):
    """The result as the kind of array the caller passed."""
    convert = _from_dlpack_of(origin)
    if convert is None:
        return result
    if isinstance(result, tuple):
        return tuple(convert(r) if hasattr(r, "__dlpack__") else r for r in result)
    return convert(result) if hasattr(result, "__dlpack__") else result


def _from_dlpack_of(kind):
    """``from_dlpack`` of the library that defines arrays of ``kind``, if loaded."""
    top = kind.__module__.split(".")[0]
    if top in ("jax", "jaxlib"):
        jax = sys.modules.get("jax")
        return None if jax is None else jax.numpy.from_dlpack
    module = sys.modules.get(top)
    return getattr(module, "from_dlpack", None)
