"""Scalar building blocks for the numba kernels: an exp that vectorises, a max that does.

numba's ``math.exp`` is a call into libm, one element at a time, unless Intel's SVML is
installed; NumPy's own float32 exp is vectorised, but only as a separate pass over the
score tile. These exponentials are branch-free (range reduction, a polynomial, the power
of two built from its bits), so LLVM turns a loop over them into vector code on every
CPU that numba targets. ``fmax`` is LLVM's ``maxnum``, which LLVM vectorises as a
reduction; Python's ``max`` in numba handles NaN with branches and stays scalar.

Both exps take ``x <= 0`` (scores minus a row maximum) and return exactly 0 below the
smallest normal result (and for ``-inf``), so a fully masked or hidden entry is 0.
Importing this module needs numba.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

__all__ = ["FASTMATH", "exp32", "exp64", "exp_nonpositive", "fmax", "not_finite"]

# LLVM may reassociate sums (vector partial sums: still the same bytes run to run, as
# the compiled code and the loop bounds fix the order) but must keep infinities: -inf is
# the running max of a row that has seen no key. NaN is assumed absent (without that,
# LLVM leaves the max and exp loops scalar, 7x slower): callers send tiles with NaN in
# their inputs to the NumPy passes instead (numpy_kernel.py).
FASTMATH = {"nnan", "nsz", "reassoc", "contract", "arcp"}
# The exps themselves may not reassociate: x - n*C1 - n*C2 would fold into x - n*ln2
# and lose the low bits of the range reduction (measured: 20 ulp at x = -118).
_EXACT = {"nnan", "nsz", "contract"}


@intrinsic
def _float32_from_bits(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _float64_from_bits(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


@intrinsic
def prefer_wide_vectors(typingctx):
    """Ask LLVM for the widest vectors in the calling kernel (512-bit with AVX-512),
    which its tuning for many x86 CPUs otherwise caps at 256 bits."""
    def codegen(context, builder, signature, args):
        # a string attribute: llvmlite's FunctionAttributes knows only the keyword ones
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def fmax(typingctx, a, b):
    """max(a, b) as LLVM's maxnum (a vectorisable reduction); a and b of one float type."""
    signature = a(a, a)

    def codegen(context, builder, sig, args):
        kind = args[0].type
        name = "llvm.maxnum.f32" if kind == ir.FloatType() else "llvm.maxnum.f64"
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(kind, [kind, kind]), name)
        return builder.call(function, args, fastmath=("nnan", "nsz"))

    return signature, codegen


@njit(fastmath={"reassoc"})
def not_finite(x):
    """Whether 1-D x holds a NaN or an inf, as one vectorised sum (x * 0 is NaN only
    there); compiled without nnan, so the test survives inlining into the kernels."""
    probe = x[0] * 0 if x.shape[0] else 0.0
    for j in range(x.shape[0]):
        probe += x[j] * 0
    return np.isnan(probe)


@njit(fastmath=_EXACT)
def exp32(x):
    """exp(x) for float32 x <= 0 (Cephes' expf: |error| about 1 ulp); 0 below -87."""
    xc = max(x, np.float32(-87.0))  # exp(-87) is still a normal float32: 2^n is exact
    n = np.floor(xc * np.float32(1.44269504088896341) + np.float32(0.5))
    # r = x - n ln2 with ln2 in two parts, so r keeps its low bits: |r| <= ln2 / 2
    r = xc - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = p * r * r + r + np.float32(1.0)
    y = y * _float32_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))
    return np.float32(0.0) if x < np.float32(-87.0) else y


@njit(fastmath=_EXACT)
def exp64(x):
    """exp(x) for float64 x <= 0 (Taylor to degree 12 on |r| <= ln2/2: relative error
    below 2e-16 before rounding); 0 below -708."""
    xc = max(x, -708.0)  # exp(-708) is still a normal float64
    n = np.floor(xc * 1.4426950408889634 + 0.5)
    r = xc - n * 6.93145751953125e-1 - n * 1.42860682030941723212e-6
    p = 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    y = p * r * r + r + 1.0
    y = y * _float64_from_bits((np.int64(n) + np.int64(1023)) << np.int64(52))
    return 0.0 if x < -708.0 else y


def exp_nonpositive(x):
    """exp(x) for x <= 0 in x's own precision: :func:`exp32` or :func:`exp64`."""
    raise NotImplementedError("compiled only: call it from a numba kernel")


@overload(exp_nonpositive, fastmath=_EXACT)
def _exp_nonpositive(x):
    if x == types.float32:
        return lambda x: exp32(x)
    return lambda x: exp64(x)
