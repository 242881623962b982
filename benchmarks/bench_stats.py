"""Summaries shared by the benchmarks."""

from __future__ import annotations

import statistics


def spread(values: list[float]) -> dict[str, float]:
    """Median, 10th and 90th percentile, and count of ``values`` (not empty)."""
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "p10": ordered[len(ordered) // 10],
            "p90": ordered[(len(ordered) * 9) // 10], "n": len(ordered)}
