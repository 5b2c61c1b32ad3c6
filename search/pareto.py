"""The Pareto front, its hypervolume and the front table, all from Optuna's own code.

The front is ``study.best_trials`` (Optuna: non-dominated among feasible complete trials). The
hypervolume is Optuna's ``compute_hypervolume`` on normalised losses:
``-success``, ``size_bytes / float_size_bytes`` and ``latency_ms / float_latency_ms``, with the
reference point ``(0, 1, 2)``: a front point counts only if it has some success, is no larger
than the float model and at most twice its latency.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna._hypervolume import compute_hypervolume
from optuna.trial import FrozenTrial, TrialState

REFERENCE = {"success": 0.0, "size_bytes": 1.0, "latency_ms": 2.0}


def front_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Feasible, non-dominated complete trials (Optuna's ``best_trials``), by number."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    if len(study.directions) == 1:
        try:
            return [study.best_trial]
        except ValueError:
            return []
    return sorted(study.best_trials, key=lambda t: t.number)


def _normalised_losses(study: optuna.Study, trials: list[FrozenTrial]) -> np.ndarray:
    objectives = list(study.user_attrs.get("objectives", []))
    ref = study.user_attrs.get("float_reference", {})
    rows = []
    for t in trials:
        row = []
        for name, v in zip(objectives, t.values or [], strict=True):
            if name == "success":
                row.append(-v)
            else:
                row.append(v / float(ref.get(name) or 1.0))
        rows.append(row)
    return np.asarray(rows, dtype=float)


def hypervolume(study: optuna.Study, trials: list[FrozenTrial] | None = None) -> float:
    """Hypervolume of the feasible non-dominated points among ``trials`` (default: all)."""
    objectives = list(study.user_attrs.get("objectives", []))
    pool = trials if trials is not None else study.get_trials(deepcopy=False)
    pool = [
        t
        for t in pool
        if t.state == TrialState.COMPLETE
        and t.values is not None
        and all(c <= 0 for c in t.user_attrs.get("constraints", [0.0]))
    ]
    if not pool or not objectives:
        return 0.0
    losses = _normalised_losses(study, pool)
    ref = np.asarray([-REFERENCE[o] if o == "success" else REFERENCE[o] for o in objectives])
    inside = losses[(losses < ref).all(axis=1)]
    if len(inside) == 0:
        return 0.0
    return float(compute_hypervolume(inside, ref))


def hypervolume_history(study: optuna.Study) -> list[tuple[int, float]]:
    """(trial number, hypervolume of everything finished up to it), in trial order."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    out = []
    for i, t in enumerate(trials):
        if t.state.is_finished():
            out.append((t.number, hypervolume(study, trials[: i + 1])))
    return out


def trial_row(study: optuna.Study, t: FrozenTrial) -> dict[str, Any]:
    ref = study.user_attrs.get("float_reference", {})
    a = t.user_attrs
    row: dict[str, Any] = {"trial": t.number, "state": t.state.name}
    row["success"] = a.get("success")
    row["success_lo"], row["success_hi"] = a.get("success_lo"), a.get("success_hi")
    row["size_bytes"] = a.get("size_bytes")
    if a.get("size_bytes"):
        row["compression"] = ref.get("size_bytes", 0) / a["size_bytes"]
    row["latency_ms"] = a.get("latency_ms")
    # The latency protocol's paired speed-up and its 95% interval, as measured, never
    # recomputed (latency_ms is the float reference's latency over it).
    row["speedup"] = a.get("speedup")
    row["speedup_lo"], row["speedup_hi"] = a.get("speedup_lo"), a.get("speedup_hi")
    config = a.get("config", {}).get("layers", {})
    bits = [c.get("w_bits", 32) for c in config.values()]
    row["mean_w_bits"] = float(np.mean(bits)) if bits else None
    row["feasible"] = all(c <= 0 for c in a.get("constraints", [0.0]))
    row["seed"] = a.get("seed", "")
    return row


def front_table(study: optuna.Study) -> pd.DataFrame:
    """One row per front trial: success with interval, size, compression, latency, speed-up."""
    rows = [trial_row(study, t) for t in front_trials(study)]
    df = pd.DataFrame(rows)
    if not df.empty and "success" in df:
        df = df.sort_values("size_bytes" if "size_bytes" in df else "trial")
    return df


def aa_speedup(ref: dict[str, Any]) -> dict[str, Any]:
    """The float reference's A/A check (``aa_speedup*``) as ``format_speedup`` reads it."""
    return {k.removeprefix("aa_"): v for k, v in ref.items() if k.startswith("aa_speedup")}


def format_speedup(attrs: dict[str, Any]) -> str:
    """``1.058x [1.031, 1.086]``: a trial's speed-up over float with its 95% interval, the one
    way it is written in tables, model cards and exports."""
    if attrs.get("speedup") is None:
        return "n/a"
    s, lo, hi = attrs["speedup"], attrs.get("speedup_lo"), attrs.get("speedup_hi")
    return f"{s:.3f}x" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


def format_success(attrs: dict[str, Any]) -> str:
    """``0.973 (0.951-0.985)``: a success rate with its 95% interval, written one way."""
    s, lo, hi = (attrs.get(k) for k in ("success", "success_lo", "success_hi"))
    if s is None:
        return "n/a"
    return f"{s:.3f}" + (f" ({lo:.3f}-{hi:.3f})" if lo is not None and hi is not None else "")
