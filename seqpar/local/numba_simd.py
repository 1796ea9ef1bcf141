"""Explicit 16-lane float32 vectors for the numba kernels, written as LLVM IR.

LLVM vectorises a numba loop along its innermost axis; the decode kernel's score pass
needs it along keys instead (a dot product per key ends otherwise in a horizontal
reduction per key: benchmarks/cpu_decode.md). These intrinsics give a numba function
values of one LLVM ``<16 x float>`` type, which LLVM keeps in registers (one zmm with
AVX-512, two ymm with AVX2, four q registers on Arm), and the few operations the kernel
needs: unaligned loads and stores at an index of a 1-D float32 array with unit stride,
a broadcast, a fused multiply-add, the shuffle-and-add steps that reduce 16 vectors to
one vector of 16 sums, and a prefetch hint.

Every operation has one rounding and a fixed order (no fast-math flags), so results
are the same bytes run to run. The loads and stores do no bounds checks: callers keep
``index + 16`` within the array. Importing this module needs numba.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

__all__ = ["LANES", "fold1", "fold2", "fold4", "fold8", "prefetch", "vfma", "vload",
           "vsplat", "vstore", "vzero"]

LANES = 16
_FLOAT = ir.FloatType()
_VECTOR = ir.VectorType(_FLOAT, LANES)
_I32 = ir.IntType(32)


class Float32x16(types.Type):
    """The numba type of a ``<16 x float>`` value."""

    def __init__(self):
        super().__init__(name="Float32x16")


float32x16 = Float32x16()


@register_model(Float32x16)
class _Float32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VECTOR)


def _is_float32_vector_source(arr):
    return isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.ndim == 1


def _element_pointer(context, builder, arrty, arr, indexty, index):
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.gep(data, [context.cast(builder, index, indexty, types.intp)])


@intrinsic
def vload(typingctx, arr, index):
    """``arr[index:index + 16]`` of a 1-D float32 array with unit stride, as a vector."""
    if not _is_float32_vector_source(arr) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        pointer = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        return builder.load(builder.bitcast(pointer, _VECTOR.as_pointer()), align=4)

    return float32x16(arr, index), codegen


@intrinsic
def vstore(typingctx, arr, index, value):
    """``arr[index:index + 16] = value`` (1-D float32, unit stride, writable)."""
    if (not _is_float32_vector_source(arr) or not isinstance(index, types.Integer)
            or value != float32x16):
        return None

    def codegen(context, builder, sig, args):
        pointer = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        builder.store(args[2], builder.bitcast(pointer, _VECTOR.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(arr, index, value), codegen


@intrinsic
def vsplat(typingctx, x):
    """A vector of 16 copies of float32 ``x``."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, sig, args):
        x = context.cast(builder, args[0], sig.args[0], types.float32)
        one = builder.insert_element(ir.Constant(_VECTOR, ir.Undefined), x, ir.Constant(_I32, 0))
        return builder.shuffle_vector(one, ir.Constant(_VECTOR, ir.Undefined),
                                      ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))

    return float32x16(x), codegen


@intrinsic
def vzero(typingctx):
    """A vector of zeros."""
    def codegen(context, builder, sig, args):
        return ir.Constant(_VECTOR, [0.0] * LANES)

    return float32x16(), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """``a * b + c`` lane by lane, rounded once (``llvm.fma``)."""
    if not a == b == c == float32x16:
        return None

    def codegen(context, builder, sig, args):
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VECTOR, [_VECTOR] * 3), "llvm.fma.v16f32")
        return builder.call(function, args)

    return float32x16(a, b, c), codegen


def _fold(half):
    """The reduction step over lane blocks of 2 * half: for each block, the sum of the
    block's two halves of ``a`` fills its first half, that of ``b`` its second."""
    blocks = range(LANES // (2 * half))
    first = [t * 2 * half + i + side for t in blocks for side in (0, LANES) for i in range(half)]
    second = [lane + half for lane in first]

    @intrinsic
    def fold(typingctx, a, b):
        if not a == b == float32x16:
            return None

        def codegen(context, builder, sig, args):
            def pick(lanes):
                return builder.shuffle_vector(args[0], args[1],
                                              ir.Constant(ir.VectorType(_I32, LANES), lanes))

            return builder.fadd(pick(first), pick(second))

        return float32x16(a, b), codegen

    fold.__doc__ = f"One reduction step over blocks of {2 * half} lanes (see _fold)."
    return fold


# Folding 16 vectors pairwise with fold8, then fold4, fold2 and fold1 leaves one vector
# whose lane i is the sum of the lanes of input bitrev4(i) (bitrev4 reverses 4 bits).
fold8, fold4, fold2, fold1 = (_fold(half) for half in (8, 4, 2, 1))


@intrinsic
def prefetch(typingctx, arr, index):
    """Hint that the cache line of ``arr[index]`` will be read soon (into L2 and below:
    ``llvm.prefetch`` with locality 2); never faults."""
    if not isinstance(arr, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        pointer = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        byte_pointer = ir.IntType(8).as_pointer()
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, _I32, _I32, _I32]),
            "llvm.prefetch.p0i8")
        builder.call(function, [builder.bitcast(pointer, byte_pointer), ir.Constant(_I32, 0),
                                ir.Constant(_I32, 2), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.none(arr, index), codegen
