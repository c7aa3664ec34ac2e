"""Statistics shared by the interleaved benchmarks; imports neither torch nor fusedres, so a
driver comparing two builds (paired_builds.py) loads neither."""

from __future__ import annotations

import math


def median_interval(values: list, z: float = 1.96) -> tuple[float, float]:
    """A distribution-free ~95% confidence interval of the median of ``values``: the order
    statistics ranked ``n/2 -+ z*sqrt(n)/2`` (the binomial's normal approximation)."""
    ordered = sorted(values)
    n = len(ordered)
    half_width = z * n ** 0.5 / 2
    low = max(0, int(n / 2 - half_width))
    high = min(n - 1, math.ceil(n / 2 + half_width) - 1)
    return ordered[low], ordered[high]
