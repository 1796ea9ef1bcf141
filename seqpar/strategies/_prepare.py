"""What every strategy does first: check, promote 3-D input, resolve the scale."""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType

from .._arrays import accumulation_dtype, array_module
from ..local import kernel_for


@dataclass(frozen=True)
class Prepared:
    q: object
    k: object
    v: object
    scale: float
    squeeze: bool  # the input was 3-D: drop the batch axis again on the way out
    xp: ModuleType
    kernel: ModuleType

    @property
    def accumulator(self):
        return accumulation_dtype(self.q.dtype)

    def finish(self, out, lse, return_lse):
        """Cast to q's dtype, drop the batch axis of 3-D input, attach lse if asked."""
        if out.dtype != self.q.dtype:
            out = out.astype(self.q.dtype)
        if self.squeeze:
            out, lse = out[0], lse[0]
        return (out, lse) if return_lse else out


def prepare(q, k, v, softmax_scale) -> Prepared:
    """Inputs already checked by :func:`seqpar.validation.check_attention_inputs`."""
    squeeze = q.ndim == 3
    if squeeze:
        q, k, v = q[None], k[None], v[None]
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    xp = array_module(q)
    return Prepared(q, k, v, scale, squeeze, xp, kernel_for(xp))
