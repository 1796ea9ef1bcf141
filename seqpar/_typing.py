"""Type aliases of the public signatures."""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

from ._mpi import MPI

__all__ = ["Array", "Comm", "Window", "Seqlens", "Output", "Gradients"]

# Any, not a union of array types: inputs are NumPy or CuPy arrays or anything with
# __dlpack__ (PyTorch, JAX, ...), and seqpar imports neither CuPy nor a framework to name them.
Array = Any
Comm = MPI.Comm
# (left, right): keys i - left .. i + right are visible to query i; None is unbounded
Window = Optional[Tuple[Optional[int], Optional[int]]]
Seqlens = Optional[Sequence[int]]
# out, or (out, lse) with return_lse=True
Output = Union[Array, Tuple[Array, Array]]
Gradients = Tuple[Array, Array, Array]
