"""The generic task interface: a user's ``module:function`` that scores a (quantized) model.

A task is any callable ``task(model, budget) -> Mapping[str, float]`` whose result includes
``"success"`` (a rate in [0, 1], or any score where higher is better). ``budget`` is the number
of episodes (or samples) the caller can afford; a multi-fidelity search calls the same task with
a small budget first. Extra metrics (per-level success, intervals, lengths) are passed through.
Optionally ``"outcomes"``: each episode's result (0/1, a string or a sequence, the episodes in
a fixed order) so two configurations can be compared on the same episodes
(``stats.paired_difference``); it is kept as a string of ``0``/``1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

TaskFn = Callable[[nn.Module, int], Mapping[str, Any]]
SUCCESS_KEY = "success"
OUTCOMES_KEY = "outcomes"


def outcome_string(outcomes: Any) -> str:
    """Per-episode outcomes as a string of ``0``/``1``.

    Raises:
        ValueError: anything but 0/1 values (or booleans) per episode.
    """
    if isinstance(outcomes, str):
        text = outcomes
    else:
        try:
            text = "".join(
                "1" if float(x) == 1 else "0" if float(x) == 0 else "?" for x in outcomes
            )
        except (TypeError, ValueError):
            text = "?"
    if not text or set(text) - {"0", "1"}:
        raise ValueError("task returned outcomes that are not one 0/1 per episode")
    return text


def run_task(task: TaskFn, model: nn.Module, budget: int) -> dict[str, Any]:
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
    metrics: dict[str, Any] = {str(k): float(v) for k, v in result.items() if k != OUTCOMES_KEY}
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"task returned non-finite metrics {bad}")
    if OUTCOMES_KEY in result:
        metrics[OUTCOMES_KEY] = outcome_string(result[OUTCOMES_KEY])
    return metrics
