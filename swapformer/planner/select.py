"""The selection: one option per site, least total quality cost, total cost within a capacity.

This is a multiple-choice knapsack. :func:`choose` solves it exactly by dynamic programming over the
capacity in integer units: when every cost is an integer and the capacity fits in ``resolution``
units the units are the costs themselves and the answer is the exact optimum; otherwise the capacity
is cut into ``resolution`` units and costs are rounded *up*, so the plan always meets the real
capacity and is optimal among plans that fit ``resolution`` units (at most one unit per site is lost
to rounding). Cost is O(sites x options x resolution).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

DEFAULT_RESOLUTION = 4096


def choose(quality: Sequence[Sequence[float]], cost: Sequence[Sequence[float]], capacity: float, *,
           resolution: int = DEFAULT_RESOLUTION) -> list[int] | None:
    """The option index per group minimising total quality with total cost ``<= capacity``.

    Args:
        quality: per group, each option's quality cost (finite; lower is better).
        cost: per group, each option's cost (same shape as ``quality``; finite).
        capacity: the most the chosen options may cost in all.
        resolution: units the capacity is cut into when costs are not small integers.

    Returns:
        One index per group, or None when even the cheapest options exceed ``capacity``. Among
        plans of equal quality the cheapest wins, then the earliest options.

    Raises:
        ValueError: shapes differ, a group is empty, a number is not finite, resolution < 1.
    """
    _check(quality, cost, resolution)
    base = [min(c) for c in cost]
    room = capacity - sum(base)
    if room < -1e-9 * max(1.0, abs(capacity)):
        return None
    room = max(room, 0.0)
    extra = [[c - b for c in group] for group, b in zip(cost, base)]
    exact = all(float(c).is_integer() for group in extra for c in group) and room <= resolution
    # room / resolution underflows to 0 for the smallest subnormal rooms: one bin of the room then
    unit = 1.0 if exact or room == 0 else (room / resolution or room)
    bins = int(math.floor(room / unit + 1e-9))
    # an option heavier than the room can never be picked; capping its weight at bins + 1 keeps a
    # tiny (even subnormal) unit from overflowing the integer conversion
    weights = [[math.ceil(min(c / unit - 1e-9, bins + 1)) for c in group] for group in extra]
    return _solve(quality, weights, bins)


def _solve(quality: Sequence[Sequence[float]], weights: list[list[int]], bins: int) -> list[int]:
    """Exact DP: ``best[w]`` = least quality of the groups so far at total weight exactly ``w``."""
    best = np.full(bins + 1, np.inf)
    best[0] = 0.0
    back = np.zeros((len(weights), bins + 1), dtype=np.int64)
    for i, (qualities, group) in enumerate(zip(quality, weights)):
        new = np.full(bins + 1, np.inf)
        for j, (q, w) in enumerate(zip(qualities, group)):
            if w > bins:
                continue
            shifted = np.full(bins + 1, np.inf)
            shifted[w:] = best[: bins + 1 - w] + q
            better = shifted < new
            new[better] = shifted[better]
            back[i, better] = j
        best = new
    # every group has an option of weight 0 (its cheapest), so some total weight is reachable;
    # argmin takes the lightest among equal qualities
    w = int(np.argmin(best))
    picks = [0] * len(weights)
    for i in range(len(weights) - 1, -1, -1):
        picks[i] = int(back[i, w])
        w -= weights[i][picks[i]]
    return picks


def _check(quality: Sequence[Sequence[float]], cost: Sequence[Sequence[float]], resolution: int) -> None:
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if len(quality) != len(cost) or any(len(q) != len(c) for q, c in zip(quality, cost)):
        raise ValueError("quality and cost must have the same groups and options")
    if any(len(c) == 0 for c in cost):
        raise ValueError("every group needs at least one option")
    numbers = [x for rows in (quality, cost) for group in rows for x in group]
    if not all(math.isfinite(x) for x in numbers):
        raise ValueError("quality and cost must be finite")
