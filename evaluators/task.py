"""The generic task interface: a user's ``module:function`` that scores a (quantized) model.

A task is any callable ``task(model, budget) -> Mapping[str, float]`` whose result includes
``"success"``, a rate in [0, 1] (the constraint ``max_success_drop`` is in its points).
``budget`` is the number of episodes (or samples) the caller can afford; a multi-fidelity
search calls the same task with a small budget first. Extra metrics (per-level success,
intervals, lengths) are passed through.
Optionally ``"outcomes"``: each episode's result (0/1, a string or a sequence, the episodes in
a fixed order) so two configurations can be compared on the same episodes
(``stats.paired_difference``); it is kept as a string of ``0``/``1``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from mpq.evaluators.callables import call_user

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


def run_task(task: TaskFn, model: nn.Module, budget: int, name: str = "task") -> dict[str, Any]:
    """Call a task (the user's ``name``) and check its result: a mapping with ``success`` a
    number in [0, 1], every other metric a finite number, ``outcomes`` one 0/1 per episode.

    Raises:
        ValueError: one line naming the task: it raised, or returned something else.
    """
    if budget <= 0:
        raise ValueError(f"task budget={budget} must be > 0")
    result = call_user(task, name, "task", model, budget)
    where = f"task {name!r}"
    if not isinstance(result, Mapping) or SUCCESS_KEY not in result:
        keys = sorted(result) if isinstance(result, Mapping) else type(result).__name__
        raise ValueError(f"{where} returned no {SUCCESS_KEY!r} metric (got {keys})")
    metrics: dict[str, Any] = {}
    for k, v in result.items():
        if k == OUTCOMES_KEY:
            continue
        if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):  # a 0-d tensor or array
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"{where} returned {k}={v!r}, not a finite number")
        metrics[str(k)] = float(v)
    if not 0.0 <= metrics[SUCCESS_KEY] <= 1.0:
        raise ValueError(
            f"{where} returned success={metrics[SUCCESS_KEY]!r}, outside [0, 1] (a success rate)"
        )
    if OUTCOMES_KEY in result:
        metrics[OUTCOMES_KEY] = outcome_string(result[OUTCOMES_KEY])
    return metrics
