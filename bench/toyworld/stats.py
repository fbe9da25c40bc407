"""Intervals for the benchmark's tables: Wilson for pooled proportions, t for means over concept × seed cells and
for paired differences between two rows on the same cells."""

from __future__ import annotations

import math
import statistics
from typing import Sequence

Interval = tuple[float, float]   # (mean, half-width of the 95% interval); NaN half-width with one value


def wilson(k: int, n: int) -> tuple[float, float, float]:
    """Proportion and its Wilson score 95% interval."""
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    z, p = 1.96, k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return p, centre - half, centre + half


def mean_ci(values: Sequence[float | None]) -> Interval:
    """Mean and the half-width of its t 95% interval (None and NaN values left out)."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return float("nan"), float("nan")
    if len(kept) == 1:
        return kept[0], float("nan")
    from scipy.stats import t  # a ComfyUI requirement

    n = len(kept)
    return statistics.mean(kept), float(t.ppf(0.975, n - 1)) * statistics.stdev(kept) / math.sqrt(n)


def verdict(difference: Interval, direction: int = 1) -> str:
    """'found' when the interval lies wholly on the claimed side of 0, 'opposite' when wholly on the other,
    else 'not found'."""
    mean, half = difference
    if math.isnan(mean) or math.isnan(half):
        return "not testable"
    low, high = sorted((direction * (mean - half), direction * (mean + half)))
    return "found" if low > 0 else "opposite" if high < 0 else "not found"
