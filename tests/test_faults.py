"""Faults with real processes: the search killed (SIGKILL) and resumed, interrupted (SIGINT),
two searches on one study at once, and the MLflow server going away mid-search."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from rich.console import Console

from mpq.search.runner import Runner
from mpq.search.tracking import Tracker
from tests.mlflow_server import MlflowServer
from tests.search.helpers import conv_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _write_config(tmp_path: Path, **extra: object) -> Path:
    """The tests' ConvNet search as a YAML file for the CLI, tracked, with a ~1 s task."""
    changes: dict[str, object] = {
        "name": "faults",
        "task": "tests.models:paced_task",
        "trials": 10,
        "tracking": {"enabled": True},
        **extra,
    }
    cfg = conv_config(tmp_path, **changes)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    return path


def _mpq(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.Popen(
        [sys.executable, "-m", "mpq.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _study(tmp_path: Path) -> optuna.Study:
    url = f"sqlite:///{tmp_path / 'out' / 'study.db'}"
    return optuna.load_study(study_name="faults", storage=url)


def _wait_complete(tmp_path: Path, n: int, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            done = [t for t in _study(tmp_path).trials if t.state == TrialState.COMPLETE]
            if len(done) >= n:
                return
        except Exception:  # noqa: BLE001  the study is not created yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"fewer than {n} complete trials after {timeout_s}s")


def test_sigkill_then_resume_loses_nothing(tmp_path: Path) -> None:
    config = _write_config(tmp_path)
    proc = _mpq("search", str(config))
    _wait_complete(tmp_path, 3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {
        t.number: t.values for t in _study(tmp_path).trials if t.state == TrialState.COMPLETE
    }
    assert len(before) >= 3
    resumed = _mpq("search", str(config), "--resume")
    out, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, out[-3000:]
    assert "Pareto front of 'faults'" in out
    study = _study(tmp_path)
    for number, values in before.items():  # every finished trial: still there, same values
        assert study.trials[number].state == TrialState.COMPLETE
        assert study.trials[number].values == values
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) >= 10
    for t in study.trials:  # what was running at the kill came back failed, never complete
        if t.number not in before and t.state == TrialState.COMPLETE:
            assert "config_key" in t.user_attrs and "success" in t.user_attrs
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert all(t.user_attrs.get("fail_reason") for t in failed)  # each says why
    for t in failed:  # a seed lost to the kill ran again after the resume
        if t.user_attrs.get("seed"):
            again = [u for u in study.trials if u.params == t.params and u.number > t.number]
            assert any(u.state == TrialState.COMPLETE for u in again), t.user_attrs
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("faults")
    runs = client.search_runs([exp.experiment_id], "tags.mpq_kind = 'trial'", max_results=1000)
    numbers = [int(r.data.tags["mpq_trial"]) for r in runs]
    assert len(numbers) == len(set(numbers)) == len(finished)  # each trial once in MLflow


def test_sigint_stops_cleanly_and_prints_what_finished(tmp_path: Path) -> None:
    config = _write_config(tmp_path, trials=40)
    proc = _mpq("search", str(config))
    _wait_complete(tmp_path, 2)
    os.killpg(proc.pid, signal.SIGINT)
    start = time.monotonic()
    out, _ = proc.communicate(timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out and "Pareto front of 'faults'" in out
    study = _study(tmp_path)
    states = [t.state for t in study.trials]
    assert TrialState.RUNNING not in states
    interrupted = [
        t for t in study.trials if t.user_attrs.get("fail_reason") == "interrupted (SIGINT)"
    ]
    seen = [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in study.trials]
    assert interrupted and all(t.state == TrialState.FAIL for t in interrupted), seen
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("faults")
    (parent,) = client.search_runs([exp.experiment_id], "tags.mpq_kind = 'study'")
    assert parent.info.status == "KILLED"  # an interrupted study is not a finished one


def test_two_searches_on_one_study_at_once(tmp_path: Path) -> None:
    config = _write_config(tmp_path, trials=12, sensitivity={"enabled": False})
    first = _mpq("search", str(config), "--resume", "--no-tracking")  # both at once: they
    second = _mpq("search", str(config), "--resume", "--no-tracking")  # race to create the db
    out1, _ = first.communicate(timeout=400)
    out2, _ = second.communicate(timeout=400)
    assert first.returncode == 0, out1[-3000:]
    assert second.returncode == 0, out2[-3000:]
    study = _study(tmp_path)
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers)))  # no duplicated or skipped trial numbers
    finished = [t for t in study.trials if t.state.is_finished()]
    assert 12 <= len(finished) <= 14  # each stops at the budget; at most one extra in flight each
    assert all(len(t.values) == 3 for t in finished if t.state == TrialState.COMPLETE)


def test_mlflow_outage_is_back_filled(ray_local: None, tmp_path: Path) -> None:
    server = MlflowServer(tmp_path / "mlflow").start()
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "3"
    try:
        cfg = conv_config(
            tmp_path, name="outage", trials=8, tracking={"enabled": True, "uri": server.uri}
        )
        out = io.StringIO()
        tracker = Tracker(cfg, Console(file=out, width=200))
        seen = []

        def on_trial(study, trial):  # type: ignore[no-untyped-def]
            seen.append(trial.number)
            if len(seen) == 2:
                server.stop()  # the server goes away mid-search
            tracker.on_trial(study, trial)

        runner = Runner(cfg, on_trial=on_trial)
        runner.prepare()
        tracker.start(runner.study)
        study = runner.run().study
        finished = [t for t in study.trials if t.state.is_finished()]
        assert len(finished) == 8  # the search went on
        assert out.getvalue().count("tracking unavailable") == 1  # one warning per outage
        server.start()
        tracker.finish(study)  # back-fill once it answers again
        client = MlflowClient(server.uri)
        exp = client.get_experiment_by_name("outage")
        runs = client.search_runs([exp.experiment_id], "tags.mpq_kind = 'trial'")
        assert sorted(int(r.data.tags["mpq_trial"]) for r in runs) == [t.number for t in finished]
    finally:
        server.stop()
