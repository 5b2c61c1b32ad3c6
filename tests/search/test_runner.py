"""The search loop with a real Optuna RDB storage and a real local Ray runtime."""

from __future__ import annotations

from pathlib import Path

import pytest
from optuna.trial import TrialState

from mpq.search.record import StudyAttr
from mpq.search.runner import Runner
from tests.search.helpers import conv_config


def _run(cfg, resume: bool = False):  # type: ignore[no-untyped-def]
    runner = Runner(cfg, resume)
    runner.prepare()
    return runner.run()


def test_search_finishes_its_budget_with_seeds(ray_local: None, tmp_path: Path) -> None:
    cfg = conv_config(tmp_path)
    result = _run(cfg)
    trials = result.study.get_trials()
    finished = [t for t in trials if t.state.is_finished()]
    assert len(finished) == 8
    seeds = {t.user_attrs.get("seed") for t in trials} - {None}
    assert {"uniform-8bit", "uniform-4bit", "greedy-50pct"} <= seeds
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert complete and all(len(t.values) == 3 for t in complete)
    for t in complete:
        assert t.user_attrs["size_bytes"] == t.values[1]
        assert 0.0 <= t.values[0] <= 1.0 and t.values[2] > 0
        assert t.user_attrs["kernels"]  # what really ran, per layer
    assert result.float_reference["success"] == 1.0


def test_resume_keeps_finished_trials_and_continues(ray_local: None, tmp_path: Path) -> None:
    cfg = conv_config(tmp_path, trials=4)
    first = {t.number: t.values for t in _run(cfg).study.get_trials() if t.values}
    with pytest.raises(ValueError, match="already exists .* use --resume"):
        Runner(cfg, resume=False)
    more = conv_config(tmp_path, trials=7)
    study = _run(more, resume=True).study
    assert len([t for t in study.get_trials() if t.state.is_finished()]) == 7
    for number, values in first.items():
        assert study.trials[number].values == values  # unchanged, exactly once


def test_a_spent_time_budget_starts_no_trial_and_resume_goes_on(
    ray_local: None, tmp_path: Path
) -> None:
    seen: list[dict[str, int]] = []
    runner = Runner(conv_config(tmp_path, trials=4, time_budget_s=1e-3), progress=seen.append)
    runner.prepare()
    result = runner.run()
    assert result.out_of_time and not result.interrupted
    assert seen and seen[-1]["time_left_s"] == 0  # the progress bar says the budget is spent
    assert not [t for t in result.study.get_trials() if t.state.is_finished()]
    more = _run(conv_config(tmp_path, trials=4), resume=True)  # no budget: the trial budget
    assert not more.out_of_time
    assert len([t for t in more.study.get_trials() if t.state.is_finished()]) == 4


def test_resume_of_a_missing_study_creates_it(tmp_path: Path) -> None:
    runner = Runner(conv_config(tmp_path), resume=True)
    assert runner.study.study_name == "conv" and not runner.study.trials


def test_failing_trials_are_recorded_and_the_search_goes_on(
    ray_local: None, tmp_path: Path
) -> None:
    cfg = conv_config(
        tmp_path,
        task="tests.models:flaky_task",
        trials=10,
        space={"defaults": {"w_bits": [2, 3, 8]}},
        sensitivity={"uniform_bits": [2, 3, 8], "budgets": []},  # 2-bit seed first
    )
    study = _run(cfg).study
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    reasons = {t.user_attrs["fail_reason"] for t in failed}
    assert any("RuntimeError: injected: fc at 2 bits" in r for r in reasons)
    assert any("returned success=nan, not a finite number" in r for r in reasons)
    assert len([t for t in study.trials if t.state.is_finished()]) == 10
    assert any(t.state == TrialState.COMPLETE for t in study.trials)


def test_time_limit_fails_the_trial(ray_local: None, tmp_path: Path) -> None:
    cfg = conv_config(
        tmp_path,
        task="tests.models:slow_task",
        trials=4,
        trial_timeout_s=8,
        space={"defaults": {"w_bits": [2, 8]}},
        sensitivity={"uniform_bits": [2, 8], "budgets": []},  # 2-bit seed first
    )
    study = _run(cfg).study
    reasons = [t.user_attrs.get("fail_reason", "") for t in study.trials]
    assert any("time limit 8s exceeded" in r for r in reasons)
    assert len([t for t in study.trials if t.state.is_finished()]) == 4


def test_worker_killed_mid_trial(ray_local: None, tmp_path: Path) -> None:
    cfg = conv_config(
        tmp_path,
        task="tests.models:dying_task",
        trials=5,
        space={"defaults": {"w_bits": [2, 8]}},
        sensitivity={"uniform_bits": [2, 8], "budgets": []},  # 2-bit seed first
        ray={"max_retries": 1},
    )
    study = _run(cfg).study
    killed = [t for t in study.trials if t.user_attrs["config"]["layers"]["fc"]["w_bits"] == 2]
    assert killed
    assert all(t.state == TrialState.FAIL for t in killed)
    assert all("worker died" in t.user_attrs["fail_reason"] for t in killed)
    assert len([t for t in study.trials if t.state.is_finished()]) == 5


def test_screening_prunes_and_saves_episodes(ray_local: None, tmp_path: Path) -> None:
    cfg = conv_config(tmp_path, task_budget=64, screen_budget=8, trials=10)
    study = _run(cfg).study
    states = [t.state for t in study.trials]
    assert TrialState.COMPLETE in states
    for t in study.trials:
        if t.state == TrialState.PRUNED:
            assert t.user_attrs["episodes"] == 8 and t.user_attrs["stage"] == "screen"
        elif t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs:
            assert t.user_attrs["episodes"] == 72


def test_a_close_call_is_decided_on_more_episodes(ray_local: None, tmp_path: Path) -> None:
    """A trial whose success interval after the full budget holds the constraint's threshold
    runs again on task_budget + refine_budget episodes; its success is that run's, what the
    full budget said is kept; a trial the full budget decided is not run again."""
    from mpq.search import rules

    cfg = conv_config(tmp_path, task_budget=16, refine_budget=48, trials=4)
    larger = cfg.task_budget + cfg.refine_budget
    result = _run(cfg)
    float_success = float(result.float_reference["success"])
    stages = []
    for t in result.study.get_trials(states=(TrialState.COMPLETE,)):
        if "duplicate_of" in t.user_attrs:
            continue
        stages.append(t.user_attrs["stage"])
        before = t.user_attrs.get("refined")
        if t.user_attrs["stage"] == "refine":
            full = {"success": before["success_before"]}  # the task gives no interval: Wilson's
            assert rules.close_call(cfg, full, float_success), before
            assert t.user_attrs["episodes"] == cfg.task_budget + larger
            assert before["episodes"] == larger
            lo, hi = rules.success_interval(t.user_attrs, larger)
            lo_before, hi_before = rules.success_interval(full, cfg.task_budget)
            assert hi - lo < hi_before - lo_before
        else:
            assert before is None and not rules.close_call(cfg, t.user_attrs, float_success)
            assert t.user_attrs["episodes"] == cfg.task_budget
    assert "refine" in stages


def test_a_close_call_whose_larger_run_fails_keeps_the_full_budgets_figures(
    ray_local: None, tmp_path: Path
) -> None:
    cfg = conv_config(
        tmp_path, task="tests.models:capped_task", task_budget=16, refine_budget=48, trials=3
    )
    trials = _run(cfg).study.get_trials()
    refined = [t for t in trials if "refined" in t.user_attrs]
    assert refined  # every close call's larger run raised
    for t in refined:
        assert t.state == TrialState.COMPLETE and t.user_attrs["stage"] == "full"
        assert t.user_attrs["episodes"] == cfg.task_budget
        assert "no more than 16 inputs, asked for 64" in t.user_attrs["refined"]["failed"]


def test_duplicates_are_not_evaluated_twice(ray_local: None, tmp_path: Path) -> None:
    cfg = conv_config(
        tmp_path,
        trials=12,
        space={"defaults": {"w_bits": [4, 8]}},
        sensitivity={"enabled": False},
        sampler="random",
    )
    study = _run(cfg).study
    dups = [t for t in study.trials if "duplicate_of" in t.user_attrs]
    assert dups, "16 configs, 12 random draws: some must repeat"
    for t in dups:
        first = study.trials[t.user_attrs["duplicate_of"]]
        assert t.values == first.values and t.user_attrs["episodes"] == 0
        assert t.user_attrs["config_key"] == first.user_attrs["config_key"]


def test_a_ray_address_that_does_not_answer(tmp_path: Path) -> None:
    from mpq.search.cluster import init_ray
    from tests.mlflow_server import free_port

    cfg = conv_config(tmp_path, ray={"address": f"127.0.0.1:{free_port()}"})
    with pytest.raises(ValueError, match=r"ray.address='127.0.0.1:\d+' does not answer"):
        init_ray(cfg)


def test_memory_limit_fails_the_trial(ray_local: None, tmp_path: Path) -> None:
    cfg = conv_config(
        tmp_path,
        task="tests.models:hungry_task",
        trials=3,
        trial_memory_mb=1024,
        space={"defaults": {"w_bits": [2, 8]}},
        sensitivity={"uniform_bits": [2, 8], "budgets": []},  # 2-bit seed first
    )
    study = _run(cfg).study
    hungry = [t for t in study.trials if t.user_attrs["config"]["layers"]["fc"]["w_bits"] == 2]
    assert hungry and all(t.state == TrialState.FAIL for t in hungry)
    assert all(t.user_attrs["fail_reason"].startswith("out of memory") for t in hungry)
    assert any(t.state == TrialState.COMPLETE for t in study.trials)  # the worker lives on


def test_predicted_screening_measures_only_what_passes(ray_local: None, tmp_path: Path) -> None:
    cfg = conv_config(
        tmp_path, task_budget=64, screen_budget=8, trials=8, latency={"predict_screen": True}
    )
    study = _run(cfg).study
    table = study.user_attrs["latency_table"]
    assert table["delta_ms"] and (tmp_path / "out" / "latency_table.json").is_file()
    complete = [
        t
        for t in study.trials
        if t.state == TrialState.COMPLETE and "duplicate_of" not in t.user_attrs
    ]
    assert complete
    for t in study.trials:
        if t.state == TrialState.PRUNED:
            assert t.user_attrs["latency_source"] == "predicted"
            assert "kernels" not in t.user_attrs  # nothing was lowered for it
    for t in complete:  # measured in full: the size of what ships, not the formula screened
        assert t.user_attrs["latency_source"] == "measured" and t.user_attrs["kernels"]
        assert t.user_attrs["artifact"] == "onnx"
        assert t.user_attrs["size_bytes"] != t.user_attrs["asked_size_bytes"]


def test_a_trial_killed_before_its_first_heartbeat_is_failed(
    tmp_path: Path,
) -> None:
    """A kill between ``ask`` and the first heartbeat leaves a RUNNING trial that Optuna's stale
    check never fails (it skips trials without a heartbeat); the runner does."""
    import time

    import optuna

    from mpq.search import hygiene

    runner = Runner(conv_config(tmp_path))
    orphan = runner.study.ask()  # what the killed process left: RUNNING, no heartbeat
    time.sleep(0.3)
    optuna.storages.fail_stale_trials(runner.study)
    assert runner.study.trials[orphan.number].state == TrialState.RUNNING  # Optuna skips it
    failed: list[int] = []
    hygiene.fail_orphans(runner.study, (), lambda t: failed.append(t.number), 0.2)
    assert failed == [orphan.number]
    t = runner.study.trials[orphan.number]
    assert t.state == TrialState.FAIL and t.user_attrs["fail_reason"] == "killed before it started"


def test_a_trial_failed_as_stale_elsewhere_is_dropped_not_a_crash(
    ray_local: None, tmp_path: Path
) -> None:
    """Another search failed one of ours as stale while it ran here (this process stalled
    past the grace period): the storage keeps that first answer; the search says so and goes
    on, and the other trials are told as usual."""
    from mpq.search import hygiene

    runner = Runner(conv_config(tmp_path, trials=4))
    runner.prepare()
    result, victims = runner.tasks.result, []

    def fail_first_elsewhere(ref):  # type: ignore[no-untyped-def]
        if not victims:
            run = next(r for r in runner.running.values() if r.ref is ref)
            victims.append(run.trial.number)
            frozen = runner.study._storage.get_trial(run.trial._trial_id)  # noqa: SLF001
            hygiene._fail_trial(runner.study, frozen, hygiene.STALE)  # noqa: SLF001
        return result(ref)

    runner.tasks.result = fail_first_elsewhere  # type: ignore[method-assign]
    with pytest.warns(
        RuntimeWarning, match=r"was failed by another search while it ran here \(stale: .*dropped"
    ):
        study = runner.run().study
    (victim,) = victims
    assert study.trials[victim].state == TrialState.FAIL
    assert study.trials[victim].user_attrs["fail_reason"] == hygiene.STALE
    assert not runner.running
    others = [t for t in study.trials if t.number != victim]
    assert len([t for t in others if t.state.is_finished()]) == 3
    assert any(t.state == TrialState.COMPLETE for t in others)


def test_an_error_in_the_loop_leaves_no_trial_running(ray_local: None, tmp_path: Path) -> None:
    """A bug (here in the tracking callback) stops the search with that error; the trials in
    flight are failed with it rather than left RUNNING."""
    calls = []

    def broken(study, trial):  # type: ignore[no-untyped-def]
        calls.append(trial.number)
        raise RuntimeError("bug in a callback")

    runner = Runner(conv_config(tmp_path, trials=6), on_trial=broken)
    runner.prepare()
    with pytest.raises(RuntimeError, match="bug in a callback"):
        runner.run()
    states = [t.state for t in runner.study.trials]
    assert TrialState.RUNNING not in states and calls
    reasons = [t.user_attrs.get("fail_reason", "") for t in runner.study.trials]
    assert any(r.startswith("search stopped: RuntimeError: bug in a callback") for r in reasons)


def test_trials_run_each_layer_on_the_kernel_the_autotune_measured_fastest(
    ray_local: None, tmp_path: Path
) -> None:
    """Weight-only 4-bit ``fc`` (K = 16, blocks of 16) runs on a float MatMul of weights
    dequantized at load or on ``MatMulNBits`` with a float input: both are timed once per
    study on a worker, kept, and every trial (and the export) runs the faster one."""
    from mpq.search.export import export_trial

    cfg = conv_config(
        tmp_path,
        trials=4,
        space={
            "defaults": {
                "w_bits": [4, 32],
                "a_bits": [32],
                "granularity": ["per_group"],
                "group_size": [16],
            }
        },
        sensitivity={"uniform_bits": [4], "budgets": []},
    )
    study = _run(cfg).study
    table = study.user_attrs["kernel_table"]
    row = table["kernel_us"]["fc"]
    assert set(row) == {
        "MatMul float32 (int4 weights, dequantized at load)",
        "MatMulNBits int4 block16 acc1",
    }
    assert (tmp_path / "out" / "kernel_table.json").is_file()
    # the profiled picks run only where the whole model on them was faster (end-to-end check)
    rejected = set(table["rejected"].get("fc", []))
    usable = {k: us for k, us in row.items() if k not in rejected}
    fastest = min(usable, key=usable.__getitem__)
    (check,) = table["checks"].values() if table["checks"] else (None,)
    assert (check is not None and not check["kept"]) == bool(rejected)
    ran_w4 = [
        t
        for t in study.trials
        if t.state == TrialState.COMPLETE and t.user_attrs["config"]["layers"]["fc"]["w_bits"] == 4
    ]
    assert ran_w4
    for t in ran_w4:
        assert t.user_attrs["kernels"]["fc"] == fastest
        notes = t.user_attrs["latency_info"]["kernel_choice"]
        if len(usable) > 1:
            assert notes["fc"].startswith("fastest measured here:")
        else:
            assert "fc" not in notes
    trial = next(t for t in ran_w4 if "duplicate_of" not in t.user_attrs)
    info = export_trial(cfg, study, trial, tmp_path / "export")  # refuses other kernels
    assert info["size_bytes"] == trial.user_attrs["size_bytes"]


def test_the_model_based_sampler_proposes_and_records_its_predictions(
    ray_local: None, tmp_path: Path
) -> None:
    from mpq.search.pareto import records

    # seeds off: the sampler still gets the per-layer sensitivity its success model needs
    cfg = conv_config(tmp_path, trials=9, sampler="mpq", sensitivity={"enabled": False})
    study = _run(cfg).study
    assert study.user_attrs[StudyAttr.SENSITIVITY]
    recs = records(study)
    assert {r.proposed_by for r in recs} == {"search"}
    assert len([r for r in recs if r.state.is_finished()]) == 9
    searched = [r for r in recs if r.proposed_by == "search" and r.duplicate_of is None]
    predicted = [r for r in searched if r.predicted]
    assert predicted  # proposed on the model once two trials were measured
    for r in predicted:
        assert set(r.predicted) == {"success", "size_bytes", "latency_ms"}
        assert r.predicted["size_bytes"] > 0
    keys = [r.config.key() for r in searched if r.config is not None]
    assert len(keys) == len(set(keys))  # never a configuration asked before


def _mlp_qat_config(tmp_path: Path, w_bits: list[int], qat: dict, **changes: object):  # type: ignore[no-untyped-def]
    """The MLP of the QAT tests, with the QAT stage on for what misses the constraint."""
    return conv_config(
        tmp_path,
        model="tests.models:build_mlp",
        task="tests.models:mlp_task",
        calibration="tests.models:mlp_calibration",
        sampler="random",
        sensitivity={"enabled": False},
        space={
            "defaults": {
                "w_bits": w_bits,
                "a_bits": [8],
                "granularity": ["per_group"],
                "group_size": [16],
            }
        },
        qat={"when": "infeasible", **qat},
        **changes,
    )


def test_the_qat_stage_fine_tunes_what_post_training_quantization_loses(
    ray_local: None, tmp_path: Path
) -> None:
    """A trial whose PTQ success misses the constraint but whose size would reach the front is
    fine-tuned; its success is the fine-tuned model's, whose weights the export ships."""
    import torch

    from mpq.evaluators.apply import apply_config
    from mpq.evaluators.artifact import unpack_state
    from mpq.evaluators.quantize import fake_quantize_weight
    from mpq.search.export import ARTIFACT, export_trial
    from mpq.search.record import Stage, TrialRecord
    from mpq.spaces.discover import discover_layers
    from tests.models import build_mlp, mlp_task

    cfg = _mlp_qat_config(
        tmp_path, task_budget=128, trials=5, w_bits=[2, 8], qat={"steps": 30, "lr": 1e-3}
    )
    study = _run(cfg).study
    tuned = [
        TrialRecord.from_frozen(t)
        for t in study.get_trials(states=(TrialState.COMPLETE,))
        if t.user_attrs.get("stage") == Stage.QAT
    ]
    assert tuned, "no trial got the QAT stage"
    record = tuned[0]
    qat = record.qat
    assert qat["steps"] == 30 and qat["ptq_success"] < 0.97  # it missed the constraint
    weights = torch.load(Path(cfg.output_dir) / qat["checkpoint"], weights_only=True)
    model = build_mlp()
    model.load_state_dict(weights)
    assert record.config is not None
    layers = discover_layers(model)
    simulated = apply_config(model, record.config_as_ran, layers=layers)
    assert mlp_task(simulated, 128)["success"] == record.measurements.success
    info = export_trial(cfg, study, study.trials[record.number], tmp_path / "best")
    assert info["size_bytes"] == record.measurements.size_bytes
    packed = unpack_state(torch.load(tmp_path / "best" / ARTIFACT, weights_only=True))
    for la in layers:
        c = record.config_as_ran.layers[la.name]
        expected = fake_quantize_weight(
            weights[f"{la.module}.{la.param}"], c.w_bits, c.granularity, c.group_size, True
        )
        torch.testing.assert_close(packed[f"{la.module}.{la.param}"], expected)
    card = (tmp_path / "best" / "MODEL_CARD.md").read_text()
    assert "quantization-aware training in the search: 30 steps" in card


def test_a_failure_before_the_first_trial_leaves_no_empty_study(tmp_path: Path) -> None:
    from mpq.search.study import open_study

    cfg = conv_config(tmp_path, task="tests.models:stringly_task")
    with pytest.raises(ValueError, match=r"^task 'tests.models:stringly_task' returned success="):
        Runner(cfg).prepare()
    fixed = conv_config(tmp_path)  # the same name and storage, the task fixed
    assert open_study(fixed, resume=False).study_name == "conv"  # not "already exists"


def test_a_failed_qat_stage_keeps_what_post_training_quantization_measured(
    ray_local: None, tmp_path: Path
) -> None:
    from mpq.search.record import Stage, TrialRecord

    cfg = _mlp_qat_config(  # 2 and 3 bits: every configuration misses the constraint
        tmp_path,
        task_budget=64,
        trials=3,
        w_bits=[2, 3],
        qat={"steps": 3, "step": "tests.models:nan_step"},
    )
    study = _run(cfg).study
    tried = [TrialRecord.from_frozen(t) for t in study.trials if t.user_attrs.get("qat")]
    assert tried, "no trial got the QAT stage"
    for r in tried:  # QAT failed; what post-training quantization measured is kept
        assert r.state == TrialState.COMPLETE and r.stage == Stage.FULL
        assert r.measurements.success is not None and r.measurements.size_bytes
        assert "is nan (not finite)" in r.qat["failed"]  # why QAT did not help
