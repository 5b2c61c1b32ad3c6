"""What a study measures once, before its trials: the float reference, the seed trials of the
one-shot allocators (uniform, greedy on sensitivity) and the latency table of the target."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from mpq.evaluators.evaluator import Evaluator
from mpq.search import sensitivity as sens
from mpq.search.config import SearchConfig
from mpq.search.record import StudyAttr, TrialAttr, jsonable
from mpq.search.study import params_from_config
from mpq.spaces.space import LayerOptions, QuantConfig


def float_reference(
    study: optuna.Study,
    cfg: SearchConfig,
    evaluator: Evaluator,
    resolved: dict[str, LayerOptions],
) -> dict[str, Any]:
    """The float model's figures, measured once per study (with the seed trials enqueued then);
    a resumed study reads them back."""
    ref = study.user_attrs.get(StudyAttr.FLOAT_REFERENCE)
    if ref is None:
        ref = jsonable(evaluator.float_reference(cfg.task_budget))
        study.set_user_attr(StudyAttr.FLOAT_REFERENCE, ref)
        study.set_user_attr(StudyAttr.LAYERS, [la.name for la in evaluator.layers])
        enqueue_seeds(study, cfg, evaluator, resolved)
    return dict(ref)


def seed_configs(
    cfg: SearchConfig, evaluator: Evaluator, resolved: dict[str, LayerOptions]
) -> tuple[list[tuple[str, QuantConfig]], sens.Sensitivity]:
    """The one-shot allocations, labelled by who proposes them: uniform at each of
    ``sensitivity.uniform_bits``, greedy and ILP at each of their fractions of the uniform
    8-bit size."""
    seeds = [
        (f"uniform-{bits}bit", sens.uniform_config(resolved, bits))
        for bits in cfg.sensitivity.uniform_bits
    ]
    s = sens.measure_sensitivity(evaluator, resolved, Path(cfg.output_dir))
    for method, fractions in (
        ("greedy", cfg.sensitivity.budgets),
        ("ilp", cfg.sensitivity.ilp_budgets),
    ):
        for frac in fractions:
            config = sens.allocation_at(evaluator, resolved, s, method, frac)
            seeds.append((f"{method}-{int(frac * 100)}pct", config))
    return seeds, s


def enqueue_seeds(
    study: optuna.Study,
    cfg: SearchConfig,
    evaluator: Evaluator,
    resolved: dict[str, LayerOptions],
) -> None:
    """Enqueue each distinct seed configuration once, labelled ``proposed_by``. The
    model-based sampler predicts success from the per-layer sensitivity, so ``sampler: mpq``
    measures it (and enqueues nothing) with the seeds off."""
    if not cfg.sensitivity.enabled:
        if cfg.sampler == "mpq":
            s = sens.measure_sensitivity(evaluator, resolved, Path(cfg.output_dir))
            study.set_user_attr(StudyAttr.SENSITIVITY, _jsonable_sensitivity(s))
        return
    seeds, s = seed_configs(cfg, evaluator, resolved)
    study.set_user_attr(StudyAttr.SENSITIVITY, _jsonable_sensitivity(s))
    enqueue_configs(study, resolved, seeds)


def _jsonable_sensitivity(s: sens.Sensitivity) -> dict[str, dict[str, float]]:
    return {k: {str(b): v for b, v in d.items()} for k, d in s.items()}


LOST = ("stale:", "killed before it started", "interrupted")  # fail reasons of a lost trial


def requeue_lost_seeds(study: optuna.Study) -> list[str]:
    """Enqueue again each seed trial (uniform, greedy, ILP) that was lost, not failed on its
    merits: its process was killed or interrupted (``LOST``), and no trial of the same
    configuration finished, runs or waits. Returns the labels re-queued."""
    trials = study.get_trials(deepcopy=False)
    alive = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    # NOTE: a waiting (enqueued) trial has no params yet: Optuna keeps them in its
    # ``fixed_params`` system attribute until the trial is asked
    taken = [
        t.params or t.system_attrs.get("fixed_params", {}) for t in trials if t.state in alive
    ]
    out = []
    for t in trials:
        label = t.user_attrs.get(TrialAttr.PROPOSED_BY)
        reason = str(t.user_attrs.get(TrialAttr.FAIL_REASON, ""))
        if t.state != TrialState.FAIL or not label or not reason.startswith(LOST):
            continue
        params = t.params or t.system_attrs.get("fixed_params", {})
        if not params or params in taken:  # (lost before its parameters were set: unknown)
            continue
        study.enqueue_trial(params, user_attrs={TrialAttr.PROPOSED_BY: label})
        taken.append(params)
        out.append(str(label))
    return out


def enqueue_configs(
    study: optuna.Study,
    resolved: dict[str, LayerOptions],
    configs: Sequence[tuple[str, QuantConfig]],
) -> None:
    """Enqueue each distinct ``(proposed_by, config)`` once, to run before the sampler's.

    Raises:
        ValueError: a configuration is outside the space.
    """
    done: set[str] = set()
    for label, config in configs:
        if config.key() in done:
            continue
        done.add(config.key())
        params = params_from_config(resolved, config)
        study.enqueue_trial(params, user_attrs={TrialAttr.PROPOSED_BY: label})


def kernel_table(
    study: optuna.Study,
    cfg: SearchConfig,
    resolved: dict[str, LayerOptions],
    tune: Any,
) -> str | None:
    """The kernel autotune's table (JSON) from ``tune(options_json, cached_json)`` run where
    the trials run (the target); kept in the study and in ``output_dir/kernel_table.json``,
    reused on resume when the target and space match (so a study's trials keep their
    kernels). None where latency is not measured, ``latency.autotune`` is off, or an agent
    times the trials (the table would be of this machine, not the target)."""
    if not (cfg.latency.enabled and cfg.latency.autotune) or cfg.latency.agent:
        return None
    return _kept_table(study, cfg, resolved, tune, StudyAttr.KERNEL_TABLE, "kernel_table.json")


def latency_table(
    study: optuna.Study,
    cfg: SearchConfig,
    resolved: dict[str, LayerOptions],
    build: Any,
) -> str | None:
    """The study's latency table (JSON) for predicted screening, from ``build(options_json,
    cached_json)`` run where the trials run (the target); kept in the study and in
    ``output_dir/latency_table.json``, reused on resume when the target and space match."""
    lat = cfg.latency
    if not (lat.enabled and lat.predict_screen and cfg.screen_budget > 0) or lat.agent:
        return None
    return _kept_table(study, cfg, resolved, build, StudyAttr.LATENCY_TABLE, "latency_table.json")


def _kept_table(
    study: optuna.Study,
    cfg: SearchConfig,
    resolved: dict[str, LayerOptions],
    build: Any,
    attr: StudyAttr,
    file_name: str,
) -> str:
    """``build(options_json, cached_json)``'s table, kept in the study's ``attr`` and in
    ``output_dir/file_name`` when it is new (or the cached one was of another target or a
    smaller space)."""
    cached = study.user_attrs.get(attr)
    options = {n: o.model_dump(mode="json") for n, o in resolved.items()}
    cached_json = json.dumps(cached) if cached is not None else None
    table = json.loads(build(json.dumps(options), cached_json))
    if table != cached:
        study.set_user_attr(attr, table)
        path = Path(cfg.output_dir) / file_name
        path.write_text(json.dumps(table, indent=1, sort_keys=True))
    return json.dumps(table)
