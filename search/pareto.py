"""The Pareto front, its hypervolume and the front table, all from Optuna's own code.

The front is ``study.best_trials`` (Optuna: non-dominated among feasible complete trials). The
hypervolume is Optuna's ``compute_hypervolume`` on normalised losses:
``-success``, ``size_bytes / float_size_bytes`` and ``latency_ms / float_latency_ms``, with the
reference point ``(0, 1, 2)``: a front point counts only if it has some success, is no larger
than the float model and at most twice its latency.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from mpq.search.record import (
    SEARCH,
    StudyAttr,
    TrialAttr,
    TrialRecord,
    feasible,
    float_reference,
    loss_signs,
)

REFERENCE = {"success": 0.0, "size_bytes": 1.0, "latency_ms": 2.0}
NON_INFERIORITY_MARGIN = 0.01  # success points a dominating search point may lose, at most


def _is_pareto_front(losses: np.ndarray) -> np.ndarray:
    """Optuna's non-dominated mask over rows of losses (minimised).

    NOTE: private in Optuna 5.0 (``optuna.study._multi_objective``); the public
    ``Study.best_trials`` needs trials in a study, the screening rule needs it over arrays.
    """
    from optuna.study._multi_objective import _is_pareto_front as optuna_front

    return np.asarray(optuna_front(losses, assume_unique_lexsorted=False))


def _compute_hypervolume(losses: np.ndarray, reference: np.ndarray) -> float:
    """Optuna's hypervolume of ``losses`` (minimised) up to ``reference``.

    NOTE: ``optuna._hypervolume`` has no public alias in Optuna 5.0; this function is the one
    place that imports it (the model-based sampler calls it too).
    """
    from optuna._hypervolume import compute_hypervolume

    return float(compute_hypervolume(losses, reference))


def dominated(
    values: Sequence[float],
    others: Sequence[Sequence[float]],
    directions: Sequence[StudyDirection | str],
) -> bool:
    """True when some point of ``others`` dominates ``values`` (no worse in every objective,
    strictly better in one), under the study's directions."""
    if not others:
        return False
    signs = np.asarray(loss_signs(directions))
    losses = np.asarray([*others, values], dtype=float) * signs
    # Optuna's mask gives equal rows one flag, so a candidate equal to a non-dominated point
    # stays non-dominated, as the strict rule says
    return not bool(_is_pareto_front(losses)[-1])


def feasible_complete(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """Complete trials with values whose constraints all hold (read directly: no
    configuration parsed per trial)."""
    return [
        t
        for t in trials
        if t.state == TrialState.COMPLETE
        and t.values is not None
        and feasible(t.user_attrs.get(TrialAttr.CONSTRAINTS, ()))
    ]


def records(
    study: optuna.Study, states: tuple[TrialState, ...] | None = None
) -> list[TrialRecord]:
    """The study's trials as typed records, in trial order."""
    return [TrialRecord.from_frozen(t) for t in study.get_trials(deepcopy=False, states=states)]


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


def _normalised_losses(study: optuna.Study, pool: list[FrozenTrial]) -> np.ndarray:
    objectives = list(study.user_attrs.get(StudyAttr.OBJECTIVES, []))
    ref = study.user_attrs.get(StudyAttr.FLOAT_REFERENCE, {})
    rows = []
    for t in pool:
        row = []
        for name, v in zip(objectives, t.values or [], strict=True):
            row.append(-v if name == "success" else v / float(ref.get(name) or 1.0))
        rows.append(row)
    return np.asarray(rows, dtype=float)


def normalised_losses(study: optuna.Study, trials: list[FrozenTrial] | None = None) -> np.ndarray:
    """The feasible complete trials among ``trials`` (default: all) as rows of minimised,
    normalised losses (``-success``, ``size_bytes / float``, ``latency_ms / float``: the
    paired ``1 / speedup``), comparable across studies of one model and target."""
    objectives = list(study.user_attrs.get(StudyAttr.OBJECTIVES, []))
    pool = feasible_complete(trials if trials is not None else study.get_trials(deepcopy=False))
    if not pool or not objectives:
        return np.zeros((0, len(objectives)))
    return _normalised_losses(study, pool)


def hypervolume_of(losses: np.ndarray, objectives: Sequence[str]) -> float:
    """Hypervolume of rows of normalised losses up to ``REFERENCE`` (points outside it add
    nothing)."""
    ref = np.asarray([-REFERENCE[o] if o == "success" else REFERENCE[o] for o in objectives])
    inside = losses[(losses < ref).all(axis=1)] if len(losses) else losses
    if len(inside) == 0:
        return 0.0
    return _compute_hypervolume(inside, ref)


def hypervolume(study: optuna.Study, trials: list[FrozenTrial] | None = None) -> float:
    """Hypervolume of the feasible non-dominated points among ``trials`` (default: all)."""
    objectives = list(study.user_attrs.get(StudyAttr.OBJECTIVES, []))
    return hypervolume_of(normalised_losses(study, trials), objectives)


def hypervolume_history(study: optuna.Study) -> list[tuple[int, float]]:
    """(trial number, hypervolume of everything finished up to it), in trial order."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    out = []
    for i, t in enumerate(trials):
        if t.state.is_finished():
            out.append((t.number, hypervolume(study, trials[: i + 1])))
    return out


def trial_row(study: optuna.Study, record: TrialRecord) -> dict[str, Any]:
    """One trial's figures as a table row: as measured, never recomputed (``latency_ms`` is
    the float reference's latency over the paired ``speedup``)."""
    m = record.measurements
    return {
        "trial": record.number,
        "state": record.state.name,
        "success": m.success,
        "success_lo": m.success_lo,
        "success_hi": m.success_hi,
        "size_bytes": m.size_bytes,
        "compression": m.compression(float_reference(study.user_attrs).size_bytes),
        "latency_ms": m.latency_ms,
        "speedup": m.speedup,
        "speedup_lo": m.speedup_lo,
        "speedup_hi": m.speedup_hi,
        "ran_mean_w_bits": record.mean_w_bits(),  # of what ran (asked: MLflow's mean_w_bits)
        "feasible": record.feasible,
        "proposed_by": record.proposed_by,
        # the QAT stage: success before it (post-training), None where it did not run
        "ptq_success": record.qat.get("ptq_success"),
        "qat_steps": record.qat.get("steps"),
        # a close call measured again: the full budget's success before it, None where not
        "success_before_refine": record.refined.get("success_before"),
    }


def seed_dominations(
    study: optuna.Study, margin: float = NON_INFERIORITY_MARGIN
) -> list[dict[str, Any]]:
    """Front trials the search proposed that dominate a feasible seed trial (a one-shot
    allocation: uniform, greedy, ILP), with the success difference paired on the same episodes
    (``stats.paired_difference`` on the task's ``outcomes``).

    ``beyond_noise``: the domination holds with the search trial's success taken at the lower
    end of the paired 95% interval (``success_lo_diff >= 0``): not one lucky draw.
    ``non_inferior``: the weaker, one-sided test ``success_lo_diff >= -margin``: at the lower
    end of its paired interval the search trial loses at most ``margin`` of success. Where the
    seed already runs at the float model's success (the flagship's seeds do), no quantized
    model is expected to beat it beyond noise, and two near-identical policies that disagree on
    a single episode fail ``beyond_noise`` while agreeing on all of them passes it;
    non-inferiority is what the episodes can show there. On ``n`` episodes one lost episode
    alone puts the lower end at ``-1/n``: below 100 episodes a margin of one point is no
    weaker than ``beyond_noise``. Where the task reports no outcomes the difference is None
    and neither holds.
    """
    from mpq.evaluators.stats import paired_difference

    directions = study.directions
    found = [TrialRecord.from_frozen(t) for t in front_trials(study)]
    seeds = [
        r
        for r in records(study, (TrialState.COMPLETE,))
        if r.proposed_by != SEARCH and r.duplicate_of is None and r.feasible and r.values
    ]
    rows = []
    for s in (r for r in found if r.proposed_by == SEARCH and r.values):
        for d in seeds:
            if not dominated(d.values, [s.values], directions):  # type: ignore[arg-type]
                continue
            a, b = s.attrs.get("outcomes"), d.attrs.get("outcomes")
            diff = lo = hi = None
            if isinstance(a, str) and isinstance(b, str) and len(a) == len(b):
                diff, lo, hi = paired_difference(a, b)
            ms, md = s.measurements, d.measurements
            rows.append(
                {
                    "trial": s.number,
                    "seed_trial": d.number,
                    "seed": d.proposed_by,
                    "size_ratio": (md.size_bytes / ms.size_bytes)
                    if md.size_bytes and ms.size_bytes
                    else None,
                    "speedup_ratio": (ms.speedup / md.speedup)
                    if ms.speedup and md.speedup
                    else None,
                    "success_diff": diff,
                    "success_lo_diff": lo,
                    "success_hi_diff": hi,
                    "episodes": len(a) if isinstance(a, str) else None,
                    "beyond_noise": lo is not None and lo >= 0,
                    "non_inferior": lo is not None and lo >= -margin,
                    "margin": margin,
                }
            )
    return rows


def front_table(study: optuna.Study) -> pd.DataFrame:
    """One row per front trial: success with interval, size, compression, latency, speed-up."""
    rows = [trial_row(study, TrialRecord.from_frozen(t)) for t in front_trials(study)]
    df = pd.DataFrame(rows)
    if not df.empty and "success" in df:
        df = df.sort_values("size_bytes" if df["size_bytes"].notna().any() else "trial")
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
