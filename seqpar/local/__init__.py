"""Local (single-device) attention kernels; they know nothing of ranks.

Every backend module provides one function with this contract::

    forward(q, k, v, *, scale, causal=False, q_offset=0, k_offset=0,
            out=None, lse=None, accumulate=False) -> (out, lse)

q is (B, Sq, Hq, D); k and v are (B, Sk, Hk, D) with Hq % Hk == 0 (grouped-query
attention: query head h reads key/value head h // (Hq // Hk)); all three share one
dtype and may be views strided along the sequence axis (the last axis is
contiguous). With ``causal``, key j is hidden from query i when
``k_offset + j > q_offset + i``: offsets are global positions, so any pair of
sequence blocks can be computed.

out is (B, Sq, Hq, D), of q's dtype or float32; lse is (B, Hq, Sq), float32
(float64 for float64 input), natural log. Both are allocated when not given.
accumulate=False overwrites them with this block's normalised output and
log-sum-exp; a row that sees no key gets out 0 and lse -inf. accumulate=True
treats them as a running partial result and merges this block into them in
place with the log-sum-exp identity (rows that see no key stay unchanged).
"""

from types import ModuleType

import numpy as np

__all__ = ["kernel_for"]


def kernel_for(xp: ModuleType) -> ModuleType:
    """The backend module (with ``forward``) for arrays of module ``xp``."""
    if xp is np:
        from . import numpy_kernel

        return numpy_kernel
    from . import cupy_kernel

    return cupy_kernel
