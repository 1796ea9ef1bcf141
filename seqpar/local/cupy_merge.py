"""The K/V-sharded merge steps on the GPU, one fused elementwise kernel each.

The same three steps and formulas as :func:`seqpar.merge.sum_weights`,
:func:`~seqpar.merge.normalise_sums` and :func:`~seqpar.merge.sums_lse` (which state
the math), fused: written with CuPy's ufuncs they would be some twelve launches of a
few microseconds of host time each, which is most of a decode step's host time. The
GPU kernels carry a plain float64 lse (``SPLIT_CARRY = False``), so ``rest`` is 0 here.
cupy is imported lazily.
"""
from __future__ import annotations

import functools

import numpy as np

from ._launch import _cupy

__all__ = ["normalise_sums", "sum_weights", "sums_lse"]

# M = -inf (no rank saw a key) is taken as 0, as where(M == -inf, 0, M) does
_FINITE_MAX = "(gmax == neg_inf ? 0.0 : gmax)"


@functools.cache
def _kernels():
    cupy = _cupy()
    weights = cupy.ElementwiseKernel(
        "float64 top, float64 gmax, float64 neg_inf", "W weight",
        f"weight = (W)exp(top - {_FINITE_MAX})", "seqpar_kv_sum_weights")
    normalise = cupy.ElementwiseKernel(
        "W den", "N num", "num = num / (den > 0 ? den : (W)1)", "seqpar_kv_normalise")
    lse = cupy.ElementwiseKernel(
        "W den, float64 gmax, float64 neg_inf", "L lse",
        f"lse = den > 0 ? (L)({_FINITE_MAX} + log((double)den)) : (L)neg_inf",
        "seqpar_kv_lse")
    return weights, normalise, lse


def sum_weights(top, rest, global_max, weights) -> None:
    """``weights`` = exp(top - M), M = ``global_max`` (-inf taken as 0); ``rest`` is 0."""
    if not (isinstance(rest, float) and rest == 0.0):
        raise ValueError("the GPU merge takes a plain lse carry (rest 0)")
    _kernels()[0](top, global_max, -np.inf, weights)


def normalise_sums(numerators, denominators) -> None:
    """``numerators`` (B, S, H, D) /= ``denominators`` (B, H, S) where positive."""
    _kernels()[1](denominators.transpose(0, 2, 1)[..., None], numerators)


def sums_lse(denominators, global_max, lse) -> None:
    """``lse`` = M + log(denominators), -inf where the denominator is 0."""
    _kernels()[2](denominators, global_max, -np.inf, lse)
