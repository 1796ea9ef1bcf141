"""Which (query rows, key rows) blocks a rank computes, given global positions."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Block:
    q_rows: slice    # local query rows
    k_rows: slice    # local key rows
    causal: bool     # mask needed inside the block
    q_offset: int    # global position of the first query row (when causal)
    k_offset: int    # global position of the first key row (when causal)


def plan_blocks(q_segments, k_segments, causal: bool) -> list[Block]:
    """Kernel calls covering every visible (query, key) pair exactly once.

    Segments are (global start, length) runs in local order. Pairs that causality
    hides entirely are dropped; fully visible neighbours are fused into one call
    without a mask, so a zigzag step costs at most three calls.
    """
    q_segments, k_segments = _coalesce(q_segments), _coalesce(k_segments)
    q_local = _local_slices(q_segments)
    k_local = _local_slices(k_segments)
    if not causal:
        return [Block(slice(0, q_local[-1].stop), slice(0, k_local[-1].stop), False, 0, 0)]
    # per query segment: runs of fully visible key segments, and masked ones
    per_q: list[list[Block]] = []
    for (q_start, q_len), q_rows in zip(q_segments, q_local):
        blocks: list[Block] = []
        for (k_start, k_len), k_rows in zip(k_segments, k_local):
            if q_len == 0 or k_len == 0 or k_start > q_start + q_len - 1:
                continue  # hidden from every query of the segment
            masked = k_start + k_len - 1 > q_start
            last = blocks[-1] if blocks else None
            if not masked and last and not last.causal and last.k_rows.stop == k_rows.start:
                blocks[-1] = Block(q_rows, slice(last.k_rows.start, k_rows.stop), False, 0, 0)
            else:
                blocks.append(Block(q_rows, k_rows, masked, q_start, k_start))
        per_q.append(blocks)
    # fuse neighbouring query segments that see the same keys without a mask
    plan: list[Block] = []
    for blocks in per_q:
        for block in blocks:
            for i, prev in enumerate(plan):
                if (not block.causal and not prev.causal and prev.k_rows == block.k_rows
                        and prev.q_rows.stop == block.q_rows.start):
                    plan[i] = Block(slice(prev.q_rows.start, block.q_rows.stop),
                                    block.k_rows, False, 0, 0)
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
        else:
            joined.append((start, length))
    return joined


def _local_slices(segments):
    slices, offset = [], 0
    for _, length in segments:
        slices.append(slice(offset, offset + length))
        offset += length
    return slices
