"""Small statistics shared by tasks and the search: the binomial interval of a success rate."""

from __future__ import annotations

import math


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial rate.

    ``center = (p + z^2/2n) / (1 + z^2/n)``,
    ``half = z * sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)``; returns ``(center-half, center+half)``.
    Unlike the normal interval it stays inside [0, 1] and is not degenerate at p=0 or p=1.
    """
    if trials <= 0:
        raise ValueError(f"wilson_interval: trials={trials} must be > 0")
    p = successes / trials
    denom = 1 + z * z / trials
    center = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    lo = 0.0 if successes == 0 else max(0.0, center - half)
    hi = 1.0 if successes == trials else min(1.0, center + half)  # exact at the ends
    return lo, hi
