"""Summaries of timing samples: medians and tail percentiles, never a mean of noise alone."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks."""
    xs = sorted(values)
    if not xs:
        return math.nan
    if len(xs) == 1:
        return float(xs[0])
    k = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (k - lo))


def summary(values: Iterable[float]) -> dict[str, float]:
    """p50, p99, mean, min, max and the sample count of one set of samples."""
    xs = [float(v) for v in values]
    if not xs:
        return {
            "n": 0,
            "p50": math.nan,
            "p99": math.nan,
            "mean": math.nan,
            "min": math.nan,
            "max": math.nan,
        }
    return {
        "n": len(xs),
        "p50": percentile(xs, 50),
        "p99": percentile(xs, 99),
        "mean": statistics.fmean(xs),
        "min": min(xs),
        "max": max(xs),
    }


def median(values: Iterable[float]) -> float:
    xs = [float(v) for v in values if v is not None and not math.isnan(v)]
    return statistics.median(xs) if xs else math.nan


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b
