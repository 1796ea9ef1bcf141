"""Explicit 512-bit vectors (16 float32 or 8 float64 lanes) for the numba kernels, written
as LLVM IR.

LLVM vectorises a numba loop along its innermost axis; the decode kernel's score pass
needs it along keys instead (a dot product per key ends otherwise in a horizontal
reduction per key: benchmarks/cpu_decode.md). These intrinsics give a numba function
values of the LLVM types ``<16 x float>`` and ``<8 x double>``, which LLVM keeps in
registers (one zmm with AVX-512, two ymm with AVX2, four q registers on Arm), and the
few operations the kernels need: unaligned loads and stores at an index of a 1-D array
with unit stride, a broadcast, an add, a fused multiply-add, the shuffle-and-add steps that
reduce 16 float32 vectors to one vector of 16 sums, and a prefetch hint.

Every operation has one rounding and a fixed order (no fast-math flags), so results
are the same bytes run to run. The loads and stores do no bounds checks: callers keep
``index + lanes`` within the array. Importing this module needs numba.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

__all__ = ["LANES", "fold1", "fold2", "fold4", "fold8", "lanes", "prefetch", "vadd", "vfma",
           "vload", "vsplat", "vstore", "vzero", "vzero_like"]

LANES = 16  # float32 lanes; float64 vectors have 8, of the same 512 bits
_FLOAT = ir.FloatType()
_VECTOR = ir.VectorType(_FLOAT, LANES)
_I32 = ir.IntType(32)


class _Vector(types.Type):
    """The numba type of a 512-bit vector value: ``<16 x float>`` or ``<8 x double>``."""

    def __init__(self, dtype: types.Float):
        self.dtype = dtype
        self.lanes = 64 // (dtype.bitwidth // 8)
        super().__init__(name=f"{dtype}x{self.lanes}")

    def llvm(self) -> ir.VectorType:
        element = ir.FloatType() if self.dtype == types.float32 else ir.DoubleType()
        return ir.VectorType(element, self.lanes)


float32x16 = _Vector(types.float32)
float64x8 = _Vector(types.float64)
_VECTORS = {types.float32: float32x16, types.float64: float64x8}


@intrinsic
def lanes(typingctx, arr):
    """The lanes of the vectors loaded from 1-D array ``arr`` (16 or 8): a constant."""
    vector = _vector_of(arr)
    if vector is None:
        return None

    def codegen(context, builder, sig, args):
        return context.get_constant(types.intp, vector.lanes)

    return types.intp(arr), codegen


@register_model(_Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, fe_type.llvm())


def _vector_of(arr):
    """The vector type loaded from a 1-D float32 or float64 array, else None."""
    if isinstance(arr, types.Array) and arr.ndim == 1:
        return _VECTORS.get(arr.dtype)
    return None


def _element_pointer(context, builder, arrty, arr, indexty, index):
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.gep(data, [context.cast(builder, index, indexty, types.intp)])


@intrinsic
def vload(typingctx, arr, index):
    """``arr[index:index + lanes]`` of a 1-D float32 (16 lanes) or float64 (8 lanes)
    array with unit stride, as a vector."""
    vector = _vector_of(arr)
    if vector is None or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        pointer = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        return builder.load(builder.bitcast(pointer, vector.llvm().as_pointer()),
                            align=vector.dtype.bitwidth // 8)

    return vector(arr, index), codegen


@intrinsic
def vstore(typingctx, arr, index, value):
    """``arr[index:index + lanes] = value`` (1-D, unit stride, writable, of the vector's
    element type)."""
    vector = _vector_of(arr)
    if vector is None or not isinstance(index, types.Integer) or value != vector:
        return None

    def codegen(context, builder, sig, args):
        pointer = _element_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        builder.store(args[2], builder.bitcast(pointer, vector.llvm().as_pointer()),
                      align=vector.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(arr, index, value), codegen


@intrinsic
def vsplat(typingctx, x):
    """A vector of copies of ``x``: 16 of a float32, 8 of a float64 (another number
    is taken as float32)."""
    if not isinstance(x, (types.Float, types.Integer)):
        return None
    vector = float64x8 if x == types.float64 else float32x16

    def codegen(context, builder, sig, args):
        x = context.cast(builder, args[0], sig.args[0], vector.dtype)
        llvm = vector.llvm()
        one = builder.insert_element(ir.Constant(llvm, ir.Undefined), x, ir.Constant(_I32, 0))
        return builder.shuffle_vector(one, ir.Constant(llvm, ir.Undefined),
                                      ir.Constant(ir.VectorType(_I32, vector.lanes),
                                                  [0] * vector.lanes))

    return vector(x), codegen


@intrinsic
def vzero(typingctx):
    """A float32 vector of zeros."""
    def codegen(context, builder, sig, args):
        return ir.Constant(_VECTOR, [0.0] * LANES)

    return float32x16(), codegen


@intrinsic
def vzero_like(typingctx, arr):
    """A vector of zeros of the vectors loaded from 1-D array ``arr``."""
    vector = _vector_of(arr)
    if vector is None:
        return None

    def codegen(context, builder, sig, args):
        return ir.Constant(vector.llvm(), [0.0] * vector.lanes)

    return vector(arr), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """``a * b + c`` lane by lane, rounded once (``llvm.fma``)."""
    if not (a == b == c and isinstance(a, _Vector)):
        return None

    def codegen(context, builder, sig, args):
        llvm = a.llvm()
        name = f"llvm.fma.v{a.lanes}f{a.dtype.bitwidth}"
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(llvm, [llvm] * 3), name)
        return builder.call(function, args)

    return a(a, b, c), codegen


@intrinsic
def vadd(typingctx, a, b):
    """``a + b`` lane by lane."""
    if not (a == b and isinstance(a, _Vector)):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return a(a, b), codegen


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
