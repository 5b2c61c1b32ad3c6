"""The model-based sampler on a problem whose truth it can learn: the tests' ConvNet, its real
packing formula for size, and success and latency that follow the sensitivities and bytes."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from mpq.evaluators.evaluator import EvalSpec, Evaluator
from mpq.evaluators.size import config_size
from mpq.search.model_sampler import PREDICTED, ModelBasedSampler
from mpq.search.pareto import hypervolume
from mpq.search.record import StudyAttr, TrialAttr
from mpq.search.study import config_from_params, distributions
from mpq.spaces.space import LayerChoice, LayerOptions, QuantConfig, SearchSpace

SPEC = EvalSpec(
    model="tests.models:build_convnet",
    task="tests.models:convnet_task",
    calibration="tests.models:convnet_calibration",
    measure_latency=False,
)
OBJECTIVES = ["success", "size_bytes", "latency_ms"]
SENS = {"conv1": {2: 0.30, 4: 0.02, 8: 0.0}, "conv2": {2: 0.05, 4: 0.01, 8: 0.0},
        "conv1d": {2: 0.02, 4: 0.0, 8: 0.0}, "fc": {2: 0.4, 4: 0.03, 8: 0.0}}  # fmt: skip


@pytest.fixture(scope="module")
def problem():  # type: ignore[no-untyped-def]
    ev = Evaluator(SPEC)
    resolved = SearchSpace(defaults=LayerOptions(w_bits=(2, 4, 8, 32))).resolve(ev.layers)
    float_bytes = config_size(ev.model, ev.layers, QuantConfig.uniform(ev.layers, LayerChoice()))

    def layer_bytes(config: QuantConfig) -> dict[str, int]:
        size = config_size(ev.model, ev.layers, config)
        return {**size.layer_bytes, "other": size.other_bytes}

    def truth(config: QuantConfig) -> list[float]:
        kl = sum(SENS[n].get(c.w_bits, 0.0) for n, c in config.layers.items())
        size = config_size(ev.model, ev.layers, config).total_bytes
        return [1.0 - 0.5 * kl, float(size), 1.0 * size / float_bytes.total_bytes]

    ref = {"success": 1.0, "size_bytes": float_bytes.total_bytes, "latency_ms": 1.0}
    return resolved, layer_bytes, truth, ref


def _run(problem, sampler: optuna.samplers.BaseSampler, trials: int) -> optuna.Study:  # type: ignore[no-untyped-def]
    resolved, layer_bytes, truth, ref = problem
    if isinstance(sampler, ModelBasedSampler):
        sampler.bind(resolved, layer_bytes)
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"], sampler=sampler)
    study.set_user_attr(StudyAttr.OBJECTIVES, OBJECTIVES)
    study.set_user_attr(StudyAttr.FLOAT_REFERENCE, ref)
    study.set_user_attr(
        StudyAttr.SENSITIVITY, {n: {str(b): v for b, v in s.items()} for n, s in SENS.items()}
    )
    dists = distributions(resolved)
    for w in (8, 4):  # the seeds a study starts from
        study.enqueue_trial({p: (1 if w == 4 else 2) for p in dists})
    for _ in range(trials):
        trial = study.ask(dists)
        config = config_from_params(resolved, trial.params)
        trial.set_user_attr(TrialAttr.CONFIG, config.model_dump(mode="json", exclude_none=True))
        trial.set_user_attr(TrialAttr.CONFIG_KEY, config.key())
        trial.set_user_attr(TrialAttr.CONSTRAINTS, [])
        study.tell(trial, truth(config))
    return study


def test_proposals_are_new_configurations_with_their_prediction_recorded(problem) -> None:  # type: ignore[no-untyped-def]
    study = _run(problem, ModelBasedSampler(seed=0), 14)
    keys = [t.user_attrs[TrialAttr.CONFIG_KEY] for t in study.trials]
    assert len(keys) == len(set(keys))  # never the same configuration twice
    proposed = [t for t in study.trials if PREDICTED in t.system_attrs]
    assert len(proposed) >= 10  # all but the two seeds (the first needs two measured trials)
    for t in proposed:
        predicted = t.system_attrs[PREDICTED]
        assert set(predicted) == set(OBJECTIVES)
        # size: the formula plus the file's median overhead (here the truth is the formula)
        assert predicted["size_bytes"] == pytest.approx(t.values[1], rel=1e-6)


def test_success_is_predicted_from_sensitivity_once_drops_are_seen(problem) -> None:  # type: ignore[no-untyped-def]
    study = _run(problem, ModelBasedSampler(seed=1), 12)
    late = [t for t in study.trials[6:] if PREDICTED in t.system_attrs]
    assert late
    for t in late:  # truth: 1 - 0.5 * KL, which the model's k recovers
        assert t.system_attrs[PREDICTED]["success"] == pytest.approx(t.values[0], abs=1e-6)


def test_it_beats_random_search_at_equal_trials(problem) -> None:  # type: ignore[no-untyped-def]
    model = [hypervolume(_run(problem, ModelBasedSampler(seed=s), 12)) for s in (0, 1, 2)]
    rand = [
        hypervolume(_run(problem, optuna.samplers.RandomSampler(seed=s), 12)) for s in (0, 1, 2)
    ]
    assert min(model) > max(rand)


def test_unbound_or_unmeasured_it_samples_at_random(problem) -> None:  # type: ignore[no-untyped-def]
    resolved = problem[0]
    study = optuna.create_study(
        directions=["maximize", "minimize", "minimize"], sampler=ModelBasedSampler(seed=0)
    )
    trial = study.ask(distributions(resolved))  # unbound: Optuna's random draw
    assert set(trial.params) == set(distributions(resolved))
    assert PREDICTED not in study.trials[0].system_attrs
    assert study.trials[0].state == TrialState.RUNNING


def test_the_residual_model_learns_what_the_sensitivity_misses(problem) -> None:  # type: ignore[no-untyped-def]
    """Truth: the sensitivity's drop plus 0.2 whenever conv2 runs at 2 bits (an interaction the
    per-layer KL under-reports). On held-out configurations the ridge correction predicts it;
    the sensitivity alone cannot."""
    import numpy as np

    from mpq.search.model_sampler import _Model

    resolved, layer_bytes, truth, ref = problem
    dists = distributions(resolved)
    rng = np.random.default_rng(0)

    def configs(n: int) -> list[QuantConfig]:
        return [
            config_from_params(resolved, {p: int(rng.integers(0, 4)) for p in dists})
            for _ in range(n)
        ]

    def success(config: QuantConfig) -> float:
        return truth(config)[0] - (0.2 if config.layers["conv2"].w_bits == 2 else 0.0)

    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    for config in configs(24):
        values = truth(config)
        study.add_trial(
            optuna.trial.create_trial(
                params={},
                distributions={},
                values=[success(config), *values[1:]],
                user_attrs={TrialAttr.CONFIG: config.model_dump(mode="json", exclude_none=True)},
            )
        )
    errors = {}
    for residual in (True, False):
        sampler = ModelBasedSampler(seed=0, residual=residual)
        sampler.bind(resolved, layer_bytes)
        model = _Model(sampler, OBJECTIVES, ref, SENS, study.trials, residual=residual)
        held_out = configs(40)
        errors[residual] = max(abs(model.predict(c)["success"] - success(c)) for c in held_out)
    assert errors[True] < 0.05 < errors[False]


def test_the_leave_one_out_shortcut_is_a_refit_without_the_point() -> None:
    import numpy as np

    from mpq.search.model_sampler import ridge_loo

    rng = np.random.default_rng(3)
    x = rng.integers(0, 2, size=(12, 5)).astype(float) * rng.uniform(0.5, 1.5, (12, 1))
    r = rng.normal(size=12)
    for lam in (0.1, 10.0):
        _, loo = ridge_loo(x, r, lam)
        for i in range(12):
            keep = np.arange(12) != i
            u, _ = ridge_loo(x[keep], r[keep], lam)
            assert loo[i] == pytest.approx(r[i] - x[i] @ u, rel=1e-9, abs=1e-12)


def test_the_qat_plan_learns_what_the_study_s_qat_stages_won_back_and_cost() -> None:
    from datetime import datetime, timedelta

    from mpq.search.model_sampler import QAT_PRIOR_COST, QAT_PRIOR_RECOVERED, QatPlan

    t0 = datetime(2026, 1, 1)

    def trial(seconds: float, success: float, qat: dict | None = None, **attrs):  # type: ignore[no-untyped-def]
        attrs |= {"success": success} | ({TrialAttr.QAT: qat} if qat else {})
        pruned = qat is not None and "failed" in qat
        t = optuna.trial.create_trial(
            state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
            values=None if pruned else [success, 1.0, 1.0],
            user_attrs=attrs,
        )
        t.datetime_start, t.datetime_complete = t0, t0 + timedelta(seconds=seconds)
        return t

    assert QatPlan.of([trial(10, 0.9)], 1.0) == QatPlan(QAT_PRIOR_RECOVERED, QAT_PRIOR_COST)
    won_back = {"steps": 250, "ptq_success": 0.6}  # 0.3 of the 0.4 lost: 0.75
    trials = [
        trial(10, 0.95),
        trial(12, 0.96),
        trial(60, 0.9, won_back),
        trial(80, 0.8, {"failed": "time limit 900s exceeded"}),  # after screening: nothing
        trial(0.01, 0.9, won_back, **{TrialAttr.DUPLICATE_OF: 2}),  # counts for nothing
        trial(0.01, 0.95, **{TrialAttr.DUPLICATE_OF: 0}),
        trial(70, 0.9, {"steps": 250, "ptq_success": float("nan")}),  # a time, no share
    ]
    plan = QatPlan.of(trials, 1.0)
    assert plan.recovered == pytest.approx((QAT_PRIOR_RECOVERED + 0.75 + 0.0) / 3)
    assert plan.cost_ratio == pytest.approx(70 / 11)  # medians: (60, 70, 80) over (10, 12)
    assert plan.after(0.6, 1.0) == pytest.approx(0.6 + plan.recovered * 0.4)


def test_with_the_qat_stage_on_it_proposes_what_only_fine_tuning_makes_feasible(problem) -> None:  # type: ignore[no-untyped-def]
    """Within 3 points of float: with the stage off every proposal is predicted feasible after
    post-training quantization; with it on, some are predicted to need fine-tuning (their
    PTQ success recorded below the constraint, their success after QAT)."""
    from mpq.search.model_sampler import QAT_PRIOR_RECOVERED

    def planned(qat: bool) -> list[dict[str, float]]:
        sampler = ModelBasedSampler(seed=0, max_success_drop=0.03, qat=qat)
        study = _run(problem, sampler, 16)
        return [t.system_attrs[PREDICTED] for t in study.trials if PREDICTED in t.system_attrs]

    off = planned(False)
    assert min(p["success"] for p in off) >= 0.97 - 0.02  # within the optimism of sigma / 2
    fine_tuned = [p for p in planned(True) if "ptq_success" in p]
    assert fine_tuned
    for p in fine_tuned:  # no stage measured yet: the prior share of the drop won back
        assert p["ptq_success"] < 0.97
        won_back = QAT_PRIOR_RECOVERED * (1.0 - p["ptq_success"])
        assert p["success"] == pytest.approx(p["ptq_success"] + won_back)


def test_the_dearer_a_qat_stage_the_fewer_proposals_plan_on_one(problem, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from mpq.search import model_sampler

    def fine_tuned(cost_ratio: float) -> int:
        plan = model_sampler.QatPlan(recovered=1.0, cost_ratio=cost_ratio)
        monkeypatch.setattr(model_sampler.QatPlan, "of", classmethod(lambda cls, t, s: plan))
        sampler = ModelBasedSampler(seed=0, max_success_drop=0.03, qat=True)
        study = _run(problem, sampler, 16)
        return sum("ptq_success" in t.system_attrs.get(PREDICTED, {}) for t in study.trials)

    assert fine_tuned(1.0) > fine_tuned(1e6)
