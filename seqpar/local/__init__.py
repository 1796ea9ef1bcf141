"""Local (single-device) attention kernels; they know nothing of ranks.

Every backend module provides ``forward`` and ``backward`` with this contract::

    forward(q, k, v, *, scale, mask=None, q_offset=0, k_offset=0, key_lengths=None,
            out=None, lse=None, accumulate=False) -> (out, lse)

    backward(dout, q, k, v, lse, delta, *, scale, mask=None, q_offset=0, k_offset=0,
             dq=None, dk=None, dv=None, accumulate=False, deterministic=True) -> (dq, dk, dv)

q is (B, Sq, Hq, D); k, v are (B, Sk, Hk, D) with Hq a multiple of Hk (query
head h reads K/V head h // (Hq // Hk)); any strides. ``mask`` is a
:class:`seqpar.masks.Mask` or None (every pair visible); ``q_offset`` and
``k_offset`` are the global positions of query row 0 and key row 0, so any pair
of sequence blocks can be computed. ``key_lengths`` (int array of shape (B,), on
the arrays' device) hides keys at local index >= key_lengths[b] of batch row b.
Tiles that the mask hides entirely are never computed, tiles it shows entirely
skip the mask arithmetic.

Besides: ``plan_forward(q, k, v, *, scale, mask=None, q_offset=0, key_lengths=None,
out_dtype=None, need_lse=True)``, a callable ``(q, k, v, key_lengths, out=None,
lse=None)`` running forward for arrays of that description with what can be worked out
once done; and the
K/V-sharded merge steps ``sum_weights``, ``normalise_sums``, ``sums_lse`` (those of
:mod:`seqpar.merge`; the GPU's are fused kernels).

forward: out is (B, Sq, Hq, D), of q's dtype or the accumulation dtype (float32;
float64 for float64 input); lse is (B, Hq, Sq) float64 (the precision carried
between merges, see :mod:`seqpar.merge`), natural log, or, where the backend's
``SPLIT_CARRY`` is true and the caller passes one, a split carry (B, Hq, Sq, 2)
of (top, rest) with lse = top + rest. Both are allocated (plain) when not given.
accumulate=False overwrites them with this block's normalised output
and log-sum-exp; a row that sees no key gets out 0 and lse -inf.
accumulate=True treats them as a running partial result and merges this block
into them in place (rows that see no key stay unchanged).

backward: the gradients of attention over this block of keys, given the
forward's ``lse`` over ALL keys of each query (any float dtype) and
``delta = rowsum(dout * out)`` of the forward's final output, (B, Hq, Sq) float32
(float64 for float64 input) (see :func:`backward_delta`). dq is (B, Sq, Hq, D),
dk and dv are (B, Sk, Hk, D), all in the accumulation dtype; dk and dv sum
over the query heads that share a K/V head. accumulate=False overwrites them,
accumulate=True adds this block's contribution. Rows with lse -inf contribute
nothing (never NaN). deterministic=True (the default) gives the same bytes run to
run; False lets a backend that adds dq in parallel (the Hopper kernel's bulk
reductions) drop the waits that fix their order.
"""

from types import ModuleType

import numpy as np

__all__ = ["kernel_for"]


def kernel_for(xp: ModuleType) -> ModuleType:
    """The backend module (with ``forward`` and ``backward``) for arrays of module ``xp``."""
    if xp is np:
        from . import numpy_kernel

        return numpy_kernel
    from . import cupy_kernel

    return cupy_kernel
