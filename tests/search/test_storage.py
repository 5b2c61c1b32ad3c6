"""The study storage against a real PostgreSQL server that stops and comes back."""

from __future__ import annotations

import threading
import time

import optuna
import pytest
from optuna.trial import TrialState

from mpq.search.storage import RetryingStorage, connection_lost, make_storage
from tests.postgres_server import PostgresServer


def _study(url: str, retry_s: float, name: str) -> tuple[optuna.Study, list[str]]:
    said: list[str] = []
    storage = make_storage(url, retry_s)
    assert isinstance(storage, RetryingStorage)
    storage.notify = said.append
    return optuna.create_study(storage=storage, study_name=name, directions=["minimize"]), said


def test_a_restart_is_waited_out_said_once_and_loses_nothing(pg: PostgresServer) -> None:
    study, said = _study(pg.create_database("storage_restart"), 60, "restart")

    def bounce() -> None:
        time.sleep(0.5)
        pg.stop()
        time.sleep(3)
        pg.start()

    thread = threading.Thread(target=bounce)
    thread.start()
    deadline = time.monotonic() + 8
    told = 0
    while time.monotonic() < deadline:  # ask/tell through the outage
        trial = study.ask()
        study._storage.record_heartbeat(trial._trial_id)  # noqa: SLF001
        study.tell(trial, float(trial.number))
        told += 1
        time.sleep(0.05)
    thread.join()
    assert len(said) == 2, said  # once when it went, once when it came back
    assert "unavailable" in said[0] and "retrying for up to 60 s" in said[0]
    assert said[1].startswith("storage back after")
    assert "***" in said[0] and pg.password not in said[0]  # the URL, masked
    trials = optuna.load_study(study_name="restart", storage=pg.url("storage_restart")).trials
    assert len(trials) == told  # every told trial, once
    assert all(t.state == TrialState.COMPLETE and t.value == t.number for t in trials)


def test_past_the_bound_the_database_error_is_raised(pg: PostgresServer) -> None:
    study, said = _study(pg.create_database("storage_bound"), 1.5, "bound")
    pg.stop()
    try:
        start = time.monotonic()
        with pytest.raises(Exception) as info:  # noqa: PT011  Optuna's wrapper of it
            study.ask()
        waited = time.monotonic() - start
    finally:
        pg.start()
    assert connection_lost(info.value)
    assert 1.4 <= waited < 10
    assert len(said) == 1 and "retrying for up to 2 s" in said[0]


def test_sqlite_is_not_retried(tmp_path) -> None:  # type: ignore[no-untyped-def]
    storage = make_storage(f"sqlite:///{tmp_path / 'study.db'}", 300)
    assert storage.retry_s == 0  # a local file: SQLite's own lock timeout, no outage to wait


def test_a_wrong_password_is_one_line_and_masked(pg: PostgresServer) -> None:
    url = pg.url("postgres").replace(pg.password, "not-the-password")
    with pytest.raises(ValueError) as info:
        make_storage(url, 300)
    message = str(info.value)
    assert "\n" not in message and "not-the-password" not in message
    assert message.startswith("storage postgresql://mpq:***@127.0.0.1")
    assert "password authentication failed" in message


def test_the_notice_goes_to_stderr_by_default(pg: PostgresServer, capsys) -> None:  # type: ignore[no-untyped-def]
    storage = make_storage(pg.create_database("storage_notice"), 0.2)
    pg.stop()
    try:
        with pytest.raises(Exception):  # noqa: B017, PT011
            storage.get_all_studies()
    finally:
        pg.start()
    err = capsys.readouterr().err
    assert err.count("unavailable") == 1 and pg.password not in err


def test_a_schema_created_by_another_search_meanwhile_is_retried(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """Two users starting at once on an empty PostgreSQL database: one's ``CREATE TABLE`` meets
    the other's table (psycopg's DuplicateTable, which SQLAlchemy raises as a ProgrammingError;
    seen once in CI, too rare to reproduce on demand). That error is injected here, once, in
    front of the real storage: the connection is retried, not reported."""
    import psycopg
    import sqlalchemy.exc

    from mpq.search import storage

    real, calls = storage.RetryingStorage.__init__, []

    def first_meets_the_other_creator(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            duplicate = psycopg.errors.DuplicateTable('relation "studies" already exists')
            raise sqlalchemy.exc.ProgrammingError("CREATE TABLE studies", {}, duplicate)
        real(self, *args, **kwargs)

    monkeypatch.setattr(storage.RetryingStorage, "__init__", first_meets_the_other_creator)
    connected = storage._connect(f"sqlite:///{tmp_path / 'race.db'}", {}, attempts=3)  # noqa: SLF001
    assert isinstance(connected, storage.RetryingStorage) and len(calls) == 2
