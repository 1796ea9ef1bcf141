"""Which keys each query sees, by global position: one description for every layer.

Every mask seqpar supports (causal, sliding window, packed documents) gives each
query at global position ``i`` one interval of visible keys ``[lo(i), hi(i)]``:

    causal          hi(i) = i
    window (L, R)   lo(i) = i - L,  hi(i) = i + R
    documents       lo(i) = start of i's document,  hi(i) = its end - 1

and their intersection is again an interval. Both bounds never decrease as ``i``
grows, so a block of consecutive queries against a block of consecutive keys is
classified from its corners alone: hidden (no pair visible), full (every pair
visible: no mask arithmetic) or partial. The plan, the NumPy kernel and the CUDA
kernels (``kernels/mask.cuh``) all use this one rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = ["Mask", "HIDDEN", "FULL", "PARTIAL", "UNBOUNDED", "check_mask_arguments"]

HIDDEN, FULL, PARTIAL = "hidden", "full", "partial"
# "no bound": far beyond any position, and its negation and sums still fit int64. A window
# bound this large or larger is the same as None (no sequence is that long).
UNBOUNDED = 1 << 60


@dataclass(frozen=True)
class Mask:
    """Visibility by global position; the same on every rank.

    Parameters
    ----------
    causal : bool
        Query i sees key j only if j <= i.
    window : (left, right)
        Query i sees key j only if i - left <= j <= i + right; ``None`` is unbounded, and
        so is any bound of UNBOUNDED (2**60) or more.
    doc_starts : tuple of int, optional
        Global start of each packed document, then the total length (strictly
        increasing, starting at 0). A query sees only keys of its own document.
    """

    causal: bool = False
    window: Tuple[Optional[int], Optional[int]] = (None, None)
    doc_starts: Optional[Tuple[int, ...]] = None

    @classmethod
    def build(cls, causal: bool = False, window=None, seqlens=None) -> "Mask | None":
        """The mask for the public keywords, or None when every pair is visible."""
        left, right = (None, None) if window is None else (_bound(b) for b in window)
        starts = None
        if seqlens is not None:
            lengths = [int(n) for n in seqlens if int(n) > 0]
            starts = tuple(int(x) for x in np.concatenate([[0], np.cumsum(lengths)]))
            if len(starts) <= 2:  # one document: no constraint
                starts = None
        if not causal and left is None and right is None and starts is None:
            return None
        return cls(bool(causal), (left, right), starts)

    # -- bounds ---------------------------------------------------------------
    @property
    def left(self) -> int:
        """How far back a query sees (UNBOUNDED when it is not limited)."""
        return UNBOUNDED if self.window[0] is None else self.window[0]

    @property
    def right(self) -> int:
        """How far ahead a query sees; 0 when causal."""
        right = UNBOUNDED if self.window[1] is None else self.window[1]
        return min(right, 0) if self.causal else right

    def bounds(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """Visible key interval ``[lo, hi]`` (global, int64) of queries at ``positions``.

        ``lo > hi`` means the query sees no key.
        """
        pos = np.asarray(positions, dtype=np.int64)
        lo = pos - self.left
        hi = pos + self.right
        if self.doc_starts is not None:
            starts = np.asarray(self.doc_starts, dtype=np.int64)
            doc = np.clip(np.searchsorted(starts, pos, side="right") - 1, 0, len(starts) - 2)
            lo = np.maximum(lo, starts[doc])
            hi = np.minimum(hi, starts[doc + 1] - 1)
        return lo, hi

    def classify(self, q_start: int, q_len: int, k_start: int, k_len: int) -> str:
        """HIDDEN, FULL or PARTIAL for queries [q_start, +q_len) against keys [k_start, +k_len).

        Exact from the corners: both bounds never decrease with the position, and
        every query's interval holds its own position (window bounds are >= 0), so
        the intervals of consecutive queries leave no gap between them.
        """
        if q_len <= 0 or k_len <= 0:
            return HIDDEN
        (lo_first, lo_last), (hi_first, hi_last) = self.bounds([q_start, q_start + q_len - 1])
        k_last = k_start + k_len - 1
        if lo_first > k_last or hi_last < k_start:
            return HIDDEN
        if lo_last <= k_start and hi_first >= k_last:
            return FULL
        return PARTIAL

    def visible_pairs(self, q_positions, k_positions) -> np.ndarray:
        """Boolean (len(q), len(k)) matrix of visible pairs (small sizes: tests, plans)."""
        lo, hi = self.bounds(q_positions)
        k = np.asarray(k_positions, dtype=np.int64)
        return (k[None, :] >= lo[:, None]) & (k[None, :] <= hi[:, None])


def _bound(bound) -> int | None:
    """A checked window bound as the mask holds it: an int, or None for unbounded."""
    return None if bound is None or bound >= UNBOUNDED else int(bound)


def check_mask_arguments(window, seqlens, total: int | None = None):
    """Local checks of ``window=`` and ``seqlens=``; raises naming the argument.

    ``window`` is ``(left, right)``, each an int >= 0 (Python or NumPy, not bool) or
    None for unbounded. Any bound of 2**60 or more (``sys.maxsize``,
    ``np.iinfo(np.int64).max``, ``10**30``) also means unbounded: it lies beyond every
    position, so the mask is exactly the same, and the position arithmetic stays within
    int64. Floats (``math.inf`` too) are refused rather than rounded.

    Returns the settings ranks must share: (window as a tuple or None, seqlens
    as a tuple or None).
    """
    if window is not None:
        if not (isinstance(window, Sequence) and len(window) == 2):
            raise TypeError(f"window must be (left, right) with ints or None, got {window!r}")
        for side, bound in zip(("left", "right"), window):
            if bound is None:
                continue
            if isinstance(bound, (bool, np.bool_)) or not isinstance(bound, (int, np.integer)):
                raise TypeError(f"window {side} bound must be an int >= 0 or None (unbounded), "
                                f"got {bound!r}")
            if bound < 0:
                raise ValueError(f"window {side} bound must be >= 0, got {bound}")
        window = tuple(_bound(b) for b in window)
    if seqlens is not None:
        try:
            lengths = np.asarray(seqlens)
        except Exception:  # noqa: BLE001 - anything that is not a sequence of ints
            lengths = None
        if lengths is None or lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
            raise TypeError(f"seqlens must be a 1-D sequence of ints, got {seqlens!r}")
        if np.any(lengths < 0):
            raise ValueError(f"seqlens must be >= 0, got {lengths.tolist()}")
        if total is not None and int(lengths.sum()) != total:
            raise ValueError(f"seqlens sum to {int(lengths.sum())} but the global sequence "
                             f"has {total} tokens")
        seqlens = tuple(int(n) for n in lengths)
    return window, seqlens
