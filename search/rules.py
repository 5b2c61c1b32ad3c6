"""Pure rules of the search, over plain numbers: objectives, constraints, screening.

Multi-fidelity screening: a trial first runs the cheap stage (size, latency, proxy and
``screen_budget`` episodes); it gets the full ``task_budget`` only if, with the upper end of its
95% success interval (optimistic), it can still meet the success constraint and no finished
feasible trial dominates it. Otherwise it is pruned with the screening figures kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mpq.evaluators.stats import wilson_interval
from mpq.search.config import SearchConfig
from mpq.search.pareto import dominated
from mpq.spaces.space import INT_BITS_MAX, QuantConfig


def objective_values(cfg: SearchConfig, metrics: Mapping[str, Any]) -> list[float]:
    """The objectives' values in the config's order (Optuna's ``values``)."""
    return [float(metrics[o]) for o in cfg.objectives]


def constraint_values(
    cfg: SearchConfig, metrics: Mapping[str, Any], float_success: float
) -> dict[str, float]:
    """Named constraint values; <= 0 is satisfied (Optuna's ``Trial.set_constraint``).

    ``success_drop = float_success - max_success_drop - success``,
    ``size_budget = size_bytes - max_size_bytes``,
    ``latency_budget = latency_ms - max_latency_ms``.
    """
    c = cfg.constraints
    out = {}
    if c.max_success_drop is not None:
        out["success_drop"] = float(float_success - c.max_success_drop - metrics["success"])
    if c.max_size_bytes is not None:
        out["size_budget"] = float(metrics["size_bytes"] - c.max_size_bytes)
    if c.max_latency_ms is not None and "latency_ms" in metrics:
        out["latency_budget"] = float(metrics["latency_ms"] - c.max_latency_ms)
    return out


def constraint_names(cfg: SearchConfig) -> list[str]:
    """The constraints' names, in the order their values are stored."""
    probe = {"success": 0.0, "size_bytes": 0.0, "latency_ms": 0.0}
    return list(constraint_values(cfg, probe, 0.0))


def paired_latency(result: Mapping[str, Any], float_latency_ms: float | None) -> dict[str, Any]:
    """The latency objective is the paired one: ``latency_ms = float_latency_ms / speedup``,
    the float latency of the study over the speed-up measured against float in the same slot,
    so ``float latency_ms / latency_ms`` is the trial's ``speedup`` wherever it is shown (the
    raw median stays in ``latency_measured_ms``)."""
    if "speedup" not in result or not float_latency_ms:
        return dict(result)
    return {**result, "latency_ms": float(float_latency_ms) / float(result["speedup"])}


def success_interval(result: Mapping[str, Any], episodes: int) -> tuple[float, float]:
    """The 95% success interval: the task's own (``success_lo``, ``success_hi``), else
    Wilson's over ``episodes``."""
    lo, hi = wilson_interval(round(float(result["success"]) * episodes), episodes)
    return float(result.get("success_lo", lo)), float(result.get("success_hi", hi))


def success_upper(result: Mapping[str, Any], episodes: int) -> float:
    """Upper end of the 95% success interval (``success_interval``)."""
    return success_interval(result, episodes)[1]


def cannot_be_feasible(cfg: SearchConfig, success_hi: float, float_success: float) -> bool:
    """Even ``success_hi`` misses the success constraint ``float_success - max_success_drop``."""
    drop = cfg.constraints.max_success_drop
    return drop is not None and success_hi < float_success - drop


def close_call(cfg: SearchConfig, result: Mapping[str, Any], float_success: float) -> bool:
    """The full budget cannot decide whether ``result`` meets the success constraint: its 95%
    interval holds the threshold ``float_success - max_success_drop``, so one lucky (or
    unlucky) draw of episodes would decide whether it is feasible, and may put it on the front.
    With ``refine_budget`` set, such a trial runs again on ``task_budget + refine_budget``
    episodes (``Stage.REFINE``), which decide it."""
    drop = cfg.constraints.max_success_drop
    if not cfg.refine_budget or drop is None:
        return False
    lo, hi = success_interval(result, cfg.task_budget)
    return lo < float_success - drop <= hi


def qat_worth(
    cfg: SearchConfig,
    result: Mapping[str, Any],
    float_success: float,
    finished: Sequence[Sequence[float]],
    episodes: int | None = None,
    config: QuantConfig | None = None,
) -> bool:
    """Give a trial the QAT stage (``qat.when: infeasible``): its post-training success misses
    the success constraint (the upper end of its interval after screening, with ``episodes``;
    the point after the full budget), while with the float model's success -- the most QAT can
    win back -- its size and latency would not be dominated by a ``finished`` feasible trial;
    and its ``config`` has something integer to train."""
    if cfg.qat.when != "infeasible":
        return False
    if config is not None and all(
        c.w_bits > INT_BITS_MAX and c.a_bits > INT_BITS_MAX for c in config.layers.values()
    ):
        return False
    success = success_upper(result, episodes) if episodes else float(result["success"])
    if not cannot_be_feasible(cfg, success, float_success):
        return False
    optimistic = {**result, "success": float_success}
    return not dominated(objective_values(cfg, optimistic), finished, cfg.directions)


def prune_after_screen(
    cfg: SearchConfig,
    screen: Mapping[str, Any],
    float_success: float,
    finished: Sequence[Sequence[float]],
) -> bool:
    """Prune a screened trial: its optimistic figures (success at the upper end of its
    interval) cannot meet the success constraint, or are dominated by a ``finished`` feasible
    trial's objective values."""
    optimistic = {**screen, "success": success_upper(screen, cfg.screen_budget)}
    if cannot_be_feasible(cfg, optimistic["success"], float_success):
        return True
    return dominated(objective_values(cfg, optimistic), finished, cfg.directions)
