"""Heartbeats of a live search, against a real SQLite RDB storage."""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest

from mpq.search import hygiene


def _stale(study: optuna.Study) -> list[int]:
    return study._storage._get_stale_trial_ids(study._study_id)  # noqa: SLF001


def test_heartbeat_keeps_a_trial_alive_while_the_loop_stalls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop does nothing for longer than the grace period (a slow call): the thread's
    beats keep the trial from being called stale; once it stops, the trial goes stale."""
    monkeypatch.setattr(hygiene, "HEARTBEAT_INTERVAL_S", 0.2)
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 'hb.db'}", heartbeat_interval=1, grace_period=1
    )
    study = optuna.create_study(storage=storage)
    trial, other = study.ask(), study.ask()
    with hygiene.Heartbeat(study) as beat:
        beat.add(trial)
        beat.add(other)
        beat.discard(other.number)  # told: no more beats for it
        time.sleep(2.0)
        assert _stale(study) == [other._trial_id]  # noqa: SLF001
    time.sleep(2.5)
    assert sorted(_stale(study)) == sorted([trial._trial_id, other._trial_id])  # noqa: SLF001
