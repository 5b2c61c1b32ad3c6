"""Tracking against a real MLflow server process (SQLite backend) and a real local store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from mpq.search.runner import Runner
from mpq.search.tracking import Tracker, sync
from tests.mlflow_server import MlflowServer
from tests.search.helpers import conv_config


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


def _search(cfg):  # type: ignore[no-untyped-def]
    tracker = Tracker(cfg)
    runner = Runner(cfg, on_trial=tracker.on_trial)
    runner.prepare()
    tracker.start(runner.study, searching=True)
    result = runner.run()
    tracker.finish(result.study, out_of_time=result.out_of_time)
    return result.study, tracker


@pytest.mark.slow
def test_runs_match_optuna_storage(
    ray_local: None, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    cfg = conv_config(
        tmp_path,
        name="tracked",
        trials=6,
        screen_budget=8,
        tracking={"enabled": True, "uri": mlflow_server.uri},
    )
    study, tracker = _search(cfg)
    client = MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("tracked")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # a runs table
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parent = [r for r in runs if r.data.tags.get("mpq_kind") == "study"]
    children = [r for r in runs if r.data.tags.get("mpq_kind") == "trial"]
    assert len(parent) == 1
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(children) == len(finished) == 6
    by_number = {int(r.data.tags["mpq_trial"]): r for r in children}
    front = {t.number for t in study.best_trials}
    for t in finished:
        r = by_number[t.number]
        assert r.data.tags["mpq_study_run"] == parent[0].info.run_id
        assert "mlflow.parentRunId" not in r.data.tags  # in view in the runs table
        assert r.data.tags["state"] == t.state.name.lower()
        assert r.data.tags["on_front"] == str(t.number in front).lower()
        if t.state == TrialState.COMPLETE:
            assert r.data.metrics["success"] == pytest.approx(t.values[0])
            assert r.data.metrics["size_bytes"] == pytest.approx(t.values[1])
            assert r.data.metrics["latency_ms"] == pytest.approx(t.values[2])
            assert "compression" in r.data.metrics and "speedup" in r.data.metrics
            assert r.data.params["fc.w_bits"] == str(
                t.user_attrs["config"]["layers"]["fc"]["w_bits"]
            )
            ran = t.user_attrs.get("ran_config", t.user_attrs["config"])
            assert r.data.params["ran.fc.w_bits"] == str(ran["layers"]["fc"]["w_bits"])
            names = {a.path for a in client.list_artifacts(r.info.run_id)}
            assert {"config.yaml", "config.json", "kernels.json"} <= names
    parent_artifacts = {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    assert {"pareto_front.csv", "pareto_front.png", "bit_map.png"} <= parent_artifacts
    assert not any(p.endswith(".html") for p in parent_artifacts)  # blank in MLflow's viewer
    assert parent_artifacts == {"pareto_front.csv", "pareto_front.png", "bit_map.png"}
    history = client.get_metric_history(parent[0].info.run_id, "hypervolume")
    assert len(history) == 6 and history[-1].value >= history[0].value
    assert "float.success" in client.get_run(parent[0].info.run_id).data.metrics
    assert parent[0].data.tags["ended_by"] == "trial budget"


def test_a_run_ended_by_its_time_budget_is_tagged_so(ray_local: None, tmp_path: Path) -> None:
    cfg = conv_config(
        tmp_path, name="timed", trials=4, time_budget_s=1e-3, tracking={"enabled": True}
    )
    study, _ = _search(cfg)
    assert not [t for t in study.trials if t.state.is_finished()]  # spent before the first
    client = MlflowClient(cfg.tracking_uri())
    exp = client.get_experiment_by_name("timed")
    (parent,) = client.search_runs([exp.experiment_id], "tags.mpq_kind = 'study'")
    assert parent.data.tags["ended_by"] == "time budget"
    assert parent.info.status == "FINISHED"
    Tracker(cfg).start(study, searching=True)  # a resumed search: not ended (yet)
    assert "ended_by" not in client.get_run(parent.info.run_id).data.tags


def test_local_store_and_sync_backfills(ray_local: None, tmp_path: Path) -> None:
    cfg = conv_config(tmp_path, name="local", trials=4, tracking={"enabled": True})
    runner = Runner(cfg)  # tracking left out on purpose: sync must back-fill every trial
    runner.prepare()
    study = runner.run().study
    assert sync(cfg, study) == 4
    assert sync(cfg, study) == 0  # idempotent
    client = MlflowClient(cfg.tracking_uri())
    exp = client.get_experiment_by_name("local")
    runs = client.search_runs([exp.experiment_id], "tags.mpq_kind = 'trial'")
    assert len(runs) == 4


def test_unreachable_tracking_is_an_error_only_when_required(tmp_path: Path) -> None:
    cfg = conv_config(
        tmp_path, tracking={"enabled": True, "uri": "http://127.0.0.1:9", "required": True}
    )
    import os

    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "2"
    with pytest.raises(ValueError, match="tracking uri 'http://127.0.0.1:9' does not answer"):
        Tracker(cfg)
    relaxed = conv_config(tmp_path, tracking={"enabled": True, "uri": "http://127.0.0.1:9"})
    tracker = Tracker(relaxed)
    assert tracker.down


def _trial(**attrs):  # type: ignore[no-untyped-def]
    from optuna.trial import create_trial

    base = {
        "config": {"layers": {"fc": {"w_bits": 3}, "conv1": {"w_bits": 8}}},
        "ran_config": {
            "layers": {
                "fc": {"w_bits": 4, "granularity": "per_group", "group_size": 32},
                "conv1": {"w_bits": 8},
            }
        },
        "success": 0.9,
        "size_bytes": 500,
        "latency_ms": 1.0,
        "speedup": 1.5,
        "constraints": [-0.1],
        "kernels": {"fc": "MatMulNBits int4 block32 acc4"},
        "fallbacks": {"fc": "w3 per_channel -> int4 block32"},
        "seed": "uniform-4bit",
    }
    return create_trial(values=[0.9, 500, 1.0], state=TrialState.COMPLETE, user_attrs=base | attrs)


def test_a_trial_run_holds_asked_and_ran_bits() -> None:
    """The run's payload, built from a trial made directly: per layer the bits asked and the
    bits that ran, every figure, who proposed it, the kernels and the ran config as files."""
    from mpq.search.tracking import trial_run

    run = trial_run("s", "parent", _trial(), {"size_bytes": 1000})
    assert run.params["fc.w_bits"] == "3" and run.params["ran.fc.w_bits"] == "4"
    assert run.params["ran.fc.granularity"] == "per_group"
    assert run.params["ran.fc.group_size"] == "32" and "fc.group_size" not in run.params
    assert run.params["proposed_by"] == "uniform-4bit"
    assert run.metrics["compression"] == pytest.approx(2.0) and run.metrics["speedup"] == 1.5
    assert run.tags["feasible"] == "true" and run.tags["state"] == "complete"
    assert "w3 per_channel -> int4 block32" in run.tags["kernel_fallbacks"]
    assert {"config.yaml", "config.json", "ran_config.yaml", "kernels.json"} <= set(run.texts)
    assert run.status == "FINISHED"
    unlowered = trial_run("s", "parent", _trial(ran_config=None), {"size_bytes": 1000})
    assert "ran.fc.w_bits" not in unlowered.params  # never claim what did not run
    assert "qat" not in run.tags and "qat_steps" not in run.metrics
    qat = {"steps": 30, "seconds": 4.5, "ptq_success": 0.4, "checkpoint": "qat/trial-0.pt"}
    tuned = trial_run("s", "parent", _trial(qat=qat), {"size_bytes": 1000})
    assert tuned.tags["qat"] == "true" and tuned.metrics["qat_ptq_success"] == 0.4
    assert tuned.metrics["qat_steps"] == 30 and tuned.metrics["success"] == 0.9  # after QAT


def test_a_bug_in_mpq_is_not_reported_as_an_outage(tmp_path: Path) -> None:
    """Only MLflow's own calls are guarded: a trial mpq cannot read raises, it does not pass
    for "tracking unavailable"."""
    import optuna
    from pydantic import ValidationError

    cfg = conv_config(tmp_path, tracking={"enabled": True})
    tracker = Tracker(cfg)
    study = optuna.create_study(study_name="conv", directions=["maximize", "minimize", "minimize"])
    tracker.start(study)
    broken = _trial(config={"layers": {"fc": {"w_bits": 7}}})  # not a bit-width mpq has
    with pytest.raises(ValidationError, match="w_bits=7"):
        tracker.on_trial(study, broken)
    assert not tracker.down
