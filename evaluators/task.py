"""The generic task interface: a user's ``module:function`` that scores a (quantized) model.

A task is any callable ``task(model, budget) -> Mapping[str, float]`` whose result includes
``"success"`` (a rate in [0, 1], or any score where higher is better). ``budget`` is the number
of episodes (or samples) the caller can afford; a multi-fidelity search calls the same task with
a small budget first. Extra metrics (per-level success, intervals, lengths) are passed through.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

TaskFn = Callable[[nn.Module, int], Mapping[str, float]]
SUCCESS_KEY = "success"


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


def load_callable(spec: str, what: str = "callable") -> Callable[..., Any]:
    """Import ``"package.module:function"`` and return the function.

    The current directory is importable (appended to ``sys.path``), as with ``python -m``.

    Raises:
        ValueError: one line naming the spec, when it is malformed, does not import, or does
            not name a callable.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {spec!r}: expected 'package.module:function'")
    # NOTE: like `python -m` and uvicorn, modules next to where mpq runs are importable.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"{what} {spec!r}: module {module_name!r} does not import ({exc})"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {spec!r}: {attr!r} is not callable")
    return obj  # type: ignore[no-any-return]


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
