"""How tokens are grouped into forward calls: cost-optimal chunks and first-fit packed rows.

Both are pure functions of lengths, tested on their own.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

CHUNK_ROWS = 64  # a scorer's chunk holds as many tokens as this many of its longest rows
CALL_COST_TOKENS = 256  # a forward call's fixed cost (kernel launches, routing sort), in tokens' worth


def chunk_by_cost(sizes: Sequence[int], budget: int, call_cost: int = CALL_COST_TOKENS) -> list[list[int]]:
    """Indices grouped into right-padded chunks of at most ``budget`` tokens, at least cost.

    A chunk costs its rows times its widest row (padding included) plus
    ``call_cost``, the fixed cost of a forward call in tokens. Sorted longest
    first, the best split into contiguous runs is found exactly by dynamic
    programming: short rows are neither padded to long ones, nor run in many
    small calls.
    """
    order = sorted(range(len(sizes)), key=lambda n: -sizes[n])
    widths = [max(sizes[n], 1) for n in order]
    best = [0] + [sys.maxsize] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end - 1, -1, -1):
            if end - start > 1 and (end - start) * widths[start] > budget:
                break
            cost = best[start] + (end - start) * widths[start] + call_cost
            if cost < best[end]:
                best[end], cut[end] = cost, start
    out, end = [], len(order)
    while end:
        out.append(order[cut[end]:end])
        end = cut[end]
    return out[::-1]


def pack_first_fit(sizes: Sequence[int]) -> list[list[int]]:
    """Non-empty sequences packed first-fit, longest first, into rows twice as long as the longest one.

    A packed row attends block-diagonally, so a prefix pass costs about the
    tokens it has rather than every row padded to the longest (attention over
    the row's width grows, but stays small next to the experts at twice a prefix).
    """
    capacity = 2 * max(sizes, default=0)
    rows: list[list[int]] = []
    free: list[int] = []
    for n in sorted(range(len(sizes)), key=lambda n: -sizes[n]):
        if not sizes[n]:
            continue
        fit = next((r for r, room in enumerate(free) if room >= sizes[n]), None)
        if fit is None:
            rows.append([])
            free.append(capacity)
            fit = len(rows) - 1
        rows[fit].append(n)
        free[fit] -= sizes[n]
    return rows
