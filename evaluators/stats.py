"""Small statistics shared by tasks and the search: the binomial interval of a success rate,
and the paired difference of two success rates measured on the same episodes."""

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


def paired_difference(a: str, b: str, level: float = 0.95) -> tuple[float, float, float]:
    """Success of ``a`` minus success of ``b`` on the same episodes, with its interval.

    ``a`` and ``b`` are per-episode outcomes (``"0"``/``"1"``, the same episodes in the same
    order, as a task's ``outcomes``). Only the ``m`` episodes where they disagree carry
    information (McNemar): ``a`` wins ``k`` of them, ``k ~ Binomial(m, p)`` and the difference
    is ``(2p - 1) m / n``; the interval is the exact (Clopper-Pearson) one on ``p``, mapped
    the same way (conditional on ``m``). Two models that agree on every episode differ by
    exactly 0, interval ``[0, 0]``: the episodes cannot tell them apart, and no noise
    separates them either.

    Raises:
        ValueError: the outcomes are not of the same episodes (lengths differ) or empty.
    """
    from scipy.stats import binomtest

    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference: {len(a)} and {len(b)} outcomes, not one episode set")
    n = len(a)
    wins = sum(1 for x, y in zip(a, b, strict=True) if x == "1" and y == "0")
    losses = sum(1 for x, y in zip(a, b, strict=True) if x == "0" and y == "1")
    m = wins + losses
    if m == 0:
        return 0.0, 0.0, 0.0
    ci = binomtest(wins, m).proportion_ci(confidence_level=level, method="exact")
    return (wins - losses) / n, (2 * ci.low - 1) * m / n, (2 * ci.high - 1) * m / n
