"""The study's Optuna RDB storage: opened once (schema races settled), and kept through a
database server's restart.

A search on a server database (PostgreSQL, MySQL) outlives short outages of that server: every
storage call that loses its connection is retried with a bounded exponential back-off
(0.5 s, 1 s, 2 s, ... at most 8 s apart) for up to ``storage_retry_s`` (default 300 s). The
search says so once per outage, and once when the server is back; past the bound the search
stops with the database's own one-line error, and its trials in flight are failed when the
storage answers again (``mpq search --resume`` continues). SQLite is a local file: its calls
are not retried (SQLite's own 30 s lock timeout covers concurrent writers).

NOTE: a write whose commit reached the server but whose answer was lost is retried too. For a
trial's final state this is recognised (the trial already holds that state: done); creating a
trial could in principle create two, one of which is then failed as an orphan by
``hygiene.fail_orphans`` (never a silent duplicate result).
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.storages import BaseStorage

from mpq.search.config import masked_url
from mpq.search.hygiene import GRACE_PERIOD_S, HEARTBEAT_INTERVAL_S, RETRY_MAX_S

RETRY_FIRST_S = 0.5


def make_storage(
    url: str, retry_s: float = 300.0, attempts: int = 5
) -> optuna.storages.RDBStorage:
    """The study's RDB storage, with heartbeats; a server database's calls are retried for up
    to ``retry_s`` seconds when the connection is lost (``RetryingStorage``).

    NOTE: two searches started at once on a new database race to create its schema (SQLAlchemy:
    "table studies already exists", or alembic's version row inserted twice). For SQLite the
    creation is serialised with a lock file next to the database; for other databases it is
    retried, and the winner's schema is then simply loaded.

    Raises:
        ValueError: the database cannot be opened (one line, password masked).
    """
    sqlite = url.startswith("sqlite")
    # pre-ping: a pooled connection that a server restart closed is replaced, not used
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("postgresql"):  # a try never hangs past the bound (a dead host)
        engine["connect_args"] = {"connect_timeout": 10, "keepalives_idle": 30}
    if sqlite:
        engine = {"connect_args": {"timeout": 30}}
    lock: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if url.startswith("sqlite:///"):
        db = Path(url.removeprefix("sqlite:///"))
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"storage folder {str(db.parent)!r}: {exc.strerror or exc}") from None
        lock = _file_lock(db.with_name(f".{db.name}.lock"))
    try:
        with lock:
            storage = _connect(url, engine, attempts)
    except OSError as exc:  # the lock file: a read-only folder
        raise ValueError(f"storage {masked_url(url)}: {exc.strerror or exc}") from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
        raise ValueError(f"storage {masked_url(url)}: {root_cause(exc)}") from None
    except ImportError as exc:  # the database's driver: psycopg for postgresql://
        raise ValueError(
            f"storage {masked_url(url)}: {exc} (pip install 'mpq[postgres]')"
        ) from None
    storage.retry_s = 0.0 if sqlite else retry_s
    return storage


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what caused it (``__cause__``, else ``__context__``), to the innermost."""
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def _driver_errors(exc: BaseException) -> Iterator[sqlalchemy.exc.DBAPIError]:
    """The errors in ``exc``'s chain that wrap a database driver's own (``.orig``)."""
    return (e for e in _chain(exc) if isinstance(e, sqlalchemy.exc.DBAPIError))


def root_cause(exc: BaseException) -> str:
    """The innermost error's first line (SQLite's "unable to open database file", not
    Optuna's "e.g. exceeding max length" guess around it)."""
    *_, exc = _chain(exc)
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


def _connect(url: str, engine: dict[str, Any], attempts: int) -> RetryingStorage:
    """The RDB storage, retried while another process is creating the same schema."""
    for attempt in range(attempts):
        try:
            return RetryingStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=HEARTBEAT_INTERVAL_S,
                grace_period=GRACE_PERIOD_S,
            )
        except sqlalchemy.exc.DBAPIError as exc:
            # the other creator's tables (PostgreSQL: DuplicateTable, a ProgrammingError), its
            # types (IntegrityError) or its alembic stamp, met halfway
            race = "already exists" in str(exc) or "alembic_version" in str(exc)
            if not race or attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# SQLSTATE of a connection lost or refused (class 08), or a server shutting down or starting
# (57P01-57P03); an error with no SQLSTATE is the client's own (refused, closed, timed out)
_LOST_STATES = ("08", "57P01", "57P02", "57P03")
# never waited out: they will not heal by themselves (a rotated password, a dropped database)
_PERMANENT = ("password authentication failed", "does not exist", "no pg_hba.conf entry")


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a lost or refused database connection, which a
    restart of the server heals: a connection SQLAlchemy invalidated, or a driver error with
    a connection SQLSTATE or none; never an authentication or a missing-database error."""
    seen = next(_driver_errors(exc), None)
    if seen is None or any(p in str(seen.orig) for p in _PERMANENT):
        return False
    state = getattr(seen.orig, "sqlstate", None) or getattr(seen.orig, "pgcode", None)
    if seen.connection_invalidated:
        return True
    lost_kind = isinstance(seen, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError))
    return lost_kind and (not state or state.startswith(_LOST_STATES))


def _lost_why(exc: BaseException) -> str:
    """The database driver's own first line for a lost connection."""
    for err in _driver_errors(exc):
        if str(err.orig).strip():
            return str(err.orig).strip().splitlines()[0]
    return root_cause(exc)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class RetryingStorage(optuna.storages.RDBStorage):
    """Optuna's ``RDBStorage`` whose calls wait out a lost database connection.

    ``retry_s``: how long one call may wait (0: no retry). ``notify``: where the two lines per
    outage go (stderr by default). ``outage_ended_at``: ``time.monotonic()`` when the last
    outage ended; no search could write heartbeats during it, so ``hygiene`` calls no trial
    stale or orphaned until ``OUTAGE_GRACE_S`` after it.
    """

    retry_s: float = 0.0
    notify: Callable[[str], None] | None = None
    outage_ended_at: float = -math.inf
    _down_since: float | None = None
    _local = threading.local()

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state.pop("notify", None)  # a console is not sent along with the storage
        return state

    def _say(self, message: str) -> None:
        (self.notify or _stderr)(message)

    def _retry(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        local = RetryingStorage._local
        if getattr(local, "active", False) or self.retry_s <= 0:
            return method(self, *args, **kwargs)  # nested, or not a server database
        local.active = True
        try:
            return self._retry_outermost(method, *args, **kwargs)
        finally:
            local.active = False

    def _retry_outermost(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        delay, deadline, retried = RETRY_FIRST_S, None, False
        while True:
            try:
                result = method(self, *args, **kwargs)
            except optuna.exceptions.UpdateFinishedTrialError:
                if retried and method.__name__ == "set_trial_state_values":
                    # the first attempt's commit reached the server before the connection was
                    # lost: the trial holds the state asked for
                    trial_id = args[0]
                    state = kwargs.get("state", args[1] if len(args) > 1 else None)
                    if state is not None and self.get_trial(trial_id).state == state:
                        return True
                raise
            except Exception as exc:
                if not connection_lost(exc):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.retry_s
                if self._down_since is None:
                    self._down_since = now
                    self._say(
                        f"storage {masked_url(self.url)} unavailable ({_lost_why(exc)}); "
                        f"retrying for up to {self.retry_s:.0f} s"
                    )
                if now >= deadline:
                    raise
                time.sleep(min(delay, deadline - now))
                delay, retried = min(2 * delay, RETRY_MAX_S), True
                continue
            if self._down_since is not None:
                down_s = time.monotonic() - self._down_since
                self._down_since = None
                self.outage_ended_at = time.monotonic()
                self._say(f"storage back after {down_s:.1f} s; the search goes on")
            return result


def _retried(name: str) -> Callable[..., Any]:
    method = getattr(optuna.storages.RDBStorage, name)

    @functools.wraps(method)
    def call(self: RetryingStorage, *args: Any, **kwargs: Any) -> Any:
        return self._retry(method, *args, **kwargs)

    return call


# every storage call a search makes: Optuna's storage API, the heartbeat calls, and the
# private ones through which Optuna's _CachedStorage (around every RDBStorage) reaches it
_PRIVATE = ("_create_new_trial", "_get_best_trial_id", "_get_trials", "_set_trial_param")
for _name in [n for n, v in vars(BaseStorage).items() if callable(v) and not n.startswith("_")]:
    if _name != "remove_session":
        setattr(RetryingStorage, _name, _retried(_name))
for _name in ("record_heartbeat", "_get_stale_trial_ids", *_PRIVATE):
    setattr(RetryingStorage, _name, _retried(_name))
