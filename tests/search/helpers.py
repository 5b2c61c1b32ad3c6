"""Search configs for the tests: the ConvNet with a real task, real storage, tiny budgets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mpq.search.config import SearchConfig


def conv_config(tmp_path: Path, **overrides: Any) -> SearchConfig:
    data: dict[str, Any] = {
        "name": "conv",
        "model": "tests.models:build_convnet",
        "task": "tests.models:convnet_task",
        "calibration": "tests.models:convnet_calibration",
        "task_budget": 32,
        "trials": 8,
        "output_dir": str(tmp_path / "out"),
        "space": {"defaults": {"w_bits": [2, 3, 4, 8, 32]}},
        "latency": {"runs": 5, "warmup": 1},
        "ray": {"workers": 2},
        "tracking": {"enabled": False},
        "sampler": "nsga2",  # the tests' behaviour was pinned on it
        "sensitivity": {"budgets": [0.5], "uniform_bits": [8, 4]},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return SearchConfig.model_validate(data)


def measured_study(cfg: SearchConfig, configs: list[Any]) -> Any:
    """A study in ``cfg``'s storage whose trials are built directly (Optuna's ``create_trial``)
    from real measurements of ``configs`` on this process's evaluator: no Ray, no sampler.

    Each trial carries what the runner stores: the asked configuration, the evaluator's
    figures (the paired latency objective), objective values and constraints.
    """
    from optuna.trial import TrialState, create_trial

    from mpq.evaluators.evaluator import get_evaluator
    from mpq.search import fingerprint, rules
    from mpq.search.record import StudyAttr, TrialAttr, jsonable
    from mpq.search.study import open_study
    from mpq.search.worker import eval_spec

    study = open_study(cfg, resume=False)
    ev = get_evaluator(eval_spec(cfg))
    fingerprint.guard(study, cfg, ev.model)  # as the runner records it
    ref = jsonable(ev.float_reference(cfg.task_budget))
    study.set_user_attr(StudyAttr.FLOAT_REFERENCE, ref)
    for config in configs:
        metrics = {**ev.screen(config), **ev.success(config, cfg.task_budget)}
        metrics = rules.paired_latency(metrics, ref.get("latency_ms"))
        constraints = rules.constraint_values(cfg, metrics, float(ref["success"]))
        attrs = jsonable(metrics) | {
            TrialAttr.CONFIG: config.model_dump(mode="json", exclude_none=True),
            TrialAttr.CONFIG_KEY: config.key(),
            TrialAttr.CONSTRAINTS: list(constraints.values()),
            TrialAttr.STAGE: "full",
        }
        trial = create_trial(
            values=rules.objective_values(cfg, metrics),
            state=TrialState.COMPLETE,
            user_attrs=attrs,
            system_attrs={"constraints": list(constraints.values())},
        )
        study.add_trial(trial)
    return study
