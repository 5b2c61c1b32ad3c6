"""The generic task interface: a user's ``module:function`` that scores a (quantized) model.

A task is any callable ``task(model, budget) -> Mapping[str, float]`` whose result includes
``"success"`` (a rate in [0, 1], or any score where higher is better). ``budget`` is the number
of episodes (or samples) the caller can afford; a multi-fidelity search calls the same task with
a small budget first. Extra metrics (per-level success, intervals, lengths) are passed through.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from torch import nn

TaskFn = Callable[[nn.Module, int], Mapping[str, float]]
SUCCESS_KEY = "success"


def run_task(task: TaskFn, model: nn.Module, budget: int) -> dict[str, float]:
    """Call a task and check its result: a mapping with a finite ``success``.

    Raises:
        ValueError: the task returned no ``success`` metric or a non-finite value.
    """
    if budget <= 0:
        raise ValueError(f"task budget={budget} must be > 0")
    result = task(model, budget)
    if not isinstance(result, Mapping) or SUCCESS_KEY not in result:
        keys = sorted(result) if isinstance(result, Mapping) else type(result).__name__
        raise ValueError(f"task returned no {SUCCESS_KEY!r} metric (got {keys})")
    metrics = {str(k): float(v) for k, v in result.items()}
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"task returned non-finite metrics {bad}")
    return metrics
