"""Faults with real processes on the default local setup (SQLite, local Ray): the search
interrupted (SIGINT), and two searches on one new SQLite study at once (the schema race).
The driver SIGKILLed and resumed, the MLflow server restarted, worker nodes lost and the
database restarted are tested on real services in ``test_distributed.py``."""

from __future__ import annotations

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
