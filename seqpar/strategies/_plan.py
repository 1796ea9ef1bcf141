"""Which (query rows, key rows) blocks a rank computes, given global positions."""
from __future__ import annotations

from dataclasses import dataclass

from ..masks import FULL, HIDDEN

__all__ = ["Block", "plan_blocks"]


@dataclass(frozen=True)
class Block:
    q_rows: slice    # local query rows
    k_rows: slice    # local key rows
    masked: bool     # some pairs of the block are hidden: the kernel applies the mask
    q_offset: int    # global position of the first query row
    k_offset: int    # global position of the first key row


def plan_blocks(q_segments, k_segments, mask) -> list[Block]:
    """Kernel calls covering every visible (query, key) pair exactly once.

    Segments are (global start, length) runs in local order; ``mask`` is a
    :class:`seqpar.masks.Mask` or None. Pairs of segments the mask hides entirely
    are dropped; fully visible neighbours are fused into one call without a mask,
    so a zigzag step costs at most three calls.
    """
    q_segments, k_segments = _coalesce(q_segments), _coalesce(k_segments)
    q_local, k_local = _local_slices(q_segments), _local_slices(k_segments)
    per_q: list[list[Block]] = []
    for (q_start, q_len), q_rows in zip(q_segments, q_local):
        blocks: list[Block] = []
        for (k_start, k_len), k_rows in zip(k_segments, k_local):
            if q_len == 0 or k_len == 0:
                continue
            kind = FULL if mask is None else mask.classify(q_start, q_len, k_start, k_len)
            if kind == HIDDEN:
                continue
            last = blocks[-1] if blocks else None
            if (kind == FULL and last is not None and not last.masked
                    and last.k_rows.stop == k_rows.start):
                blocks[-1] = Block(q_rows, slice(last.k_rows.start, k_rows.stop), False,
                                   q_start, last.k_offset)
            else:
                blocks.append(Block(q_rows, k_rows, kind != FULL, q_start, k_start))
        per_q.append(blocks)
    # fuse neighbouring query segments that see the same keys without a mask
    plan: list[Block] = []
    for blocks in per_q:
        for block in blocks:
            for i, prev in enumerate(plan):
                if (not block.masked and not prev.masked and prev.k_rows == block.k_rows
                        and prev.q_rows.stop == block.q_rows.start):
                    plan[i] = Block(slice(prev.q_rows.start, block.q_rows.stop), block.k_rows,
                                    False, prev.q_offset, prev.k_offset)
                    break
            else:
                plan.append(block)
    return plan


def _coalesce(segments):
    """Join neighbouring runs that are also neighbours in global position."""
    joined: list[tuple[int, int]] = []
    for start, length in segments:
        if joined and joined[-1][0] + joined[-1][1] == start:
            joined[-1] = (joined[-1][0], joined[-1][1] + length)
        elif length:
            joined.append((start, length))
    return joined


def _local_slices(segments):
    slices, offset = [], 0
    for _, length in segments:
        slices.append(slice(offset, offset + length))
        offset += length
    return slices
