"""Sparsity-fidelity Pareto fronts (both objectives minimised) and their 2-D hypervolume."""
from __future__ import annotations

from typing import Sequence


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points, ordered by the first objective.

    A point is dominated when another is <= in both objectives and < in one. Of exact duplicates
    the first is kept.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    front, best_y = [], float("inf")
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def hypervolume(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by ``points`` and bounded by ``reference`` (both minimised); points that do not
    dominate the reference add nothing."""
    rx, ry = reference
    inside = [(x, y) for x, y in points if x < rx and y < ry]
    area, prev_y = 0.0, ry
    for i in pareto_front(inside):
        x, y = inside[i]
        area += (rx - x) * (prev_y - y)
        prev_y = y
    return area
