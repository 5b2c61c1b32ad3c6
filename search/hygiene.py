"""Study hygiene: heartbeats, and trials that a killed process left RUNNING.

Optuna fails a RUNNING trial whose heartbeat is stale (``fail_stale_trials``); a trial killed
between ``ask`` and its first heartbeat has none, so Optuna skips it: ``fail_orphans`` fails it
once its grace period is over.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import threading
import time
from collections.abc import Callable, Collection

import optuna
from optuna.trial import FrozenTrial, TrialState

from mpq.search.record import TrialAttr

HEARTBEAT_INTERVAL_S = 2
GRACE_PERIOD_S = 8
RETRY_MAX_S = 8.0  # the longest wait between two tries of a storage call (storage.py)
# after an outage, another search may come back up to one back-off step later than this one,
# and records its heartbeats at the end of its next loop
OUTAGE_GRACE_S = GRACE_PERIOD_S + RETRY_MAX_S + HEARTBEAT_INTERVAL_S


def _just_back(study: optuna.Study) -> bool:
    """Whether the storage came back from an outage less than ``OUTAGE_GRACE_S`` ago: no
    search could write heartbeats or attributes during it, so none is called dead yet."""
    backend = getattr(study._storage, "_backend", study._storage)  # noqa: SLF001  (cached)
    ended = getattr(backend, "outage_ended_at", -math.inf)  # storage.RetryingStorage's
    return time.monotonic() - ended < OUTAGE_GRACE_S


def record_heartbeat(study: optuna.Study, trial: optuna.Trial) -> None:
    """Mark ``trial`` alive now.

    NOTE: Optuna records heartbeats itself only inside ``Study.optimize``; an ask/tell loop has
    no public call for it, so this reaches the storage (``_storage``, ``_trial_id``) here only.
    """
    study._storage.record_heartbeat(trial._trial_id)  # noqa: SLF001


class Heartbeat:
    """Records the heartbeats of this process's RUNNING trials every ``HEARTBEAT_INTERVAL_S``
    from a thread, as Optuna's ``Study.optimize`` does: a trial is alive while its process is,
    not only while the search loop turns. A loop that stalls past ``GRACE_PERIOD_S`` (a slow
    tracking call, two searches on two busy cores) would otherwise see its trial failed as
    stale by another search, and its result refused by the storage.
    """

    def __init__(self, study: optuna.Study) -> None:
        self._study = study
        self._trials: dict[int, optuna.Trial] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, trial: optuna.Trial) -> None:
        """Beat for ``trial`` from now on (and once now)."""
        record_heartbeat(self._study, trial)
        with self._lock:
            self._trials[trial.number] = trial

    def discard(self, number: int) -> None:
        with self._lock:
            self._trials.pop(number, None)

    def __enter__(self) -> Heartbeat:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="mpq-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop beating; a beat stuck in a storage outage's retries is not waited for (the
        thread is a daemon, and the process is leaving or its trials are told)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * HEARTBEAT_INTERVAL_S)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL_S):
            with self._lock:
                trials = list(self._trials.values())
            for trial in trials:
                if self._stop.is_set():
                    return
                # a storage outage: the loop's own calls meet it and say so
                with contextlib.suppress(Exception):
                    record_heartbeat(self._study, trial)


def _fail_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> FrozenTrial:
    """Fail a trial this process never asked for (so it holds no ``optuna.Trial``).

    NOTE: the public ``Study.tell`` takes a trial number but cannot record why the trial
    failed first; the two storage calls do both, and are this module's only other private use.
    """
    storage = study._storage  # noqa: SLF001
    trial_id = trial._trial_id  # noqa: SLF001
    storage.set_trial_user_attr(trial_id, TrialAttr.FAIL_REASON, reason)
    storage.set_trial_state_values(trial_id, TrialState.FAIL)
    return storage.get_trial(trial_id)


STALE = "stale: the process running it stopped"  # a fail reason's start: resume re-queues seeds
ORPHAN = "killed before it started"


def failed_here(study: optuna.Study, trial: optuna.Trial) -> str | None:
    """The reason this module failed ``trial`` with (in any search: stale or orphaned), or
    None where it did not."""
    frozen = study._storage.get_trial(trial._trial_id)  # noqa: SLF001
    reason = str(frozen.user_attrs.get(TrialAttr.FAIL_REASON, ""))
    ours = frozen.state == TrialState.FAIL and reason.startswith((STALE, ORPHAN))
    return reason if ours else None


def fail_stale(
    study: optuna.Study, on_fail: Callable[[FrozenTrial], None], ours: Collection[int] = ()
) -> None:
    """Fail the RUNNING trials whose heartbeat is stale, with the reason (Optuna's own
    ``fail_stale_trials`` records none, and a resumed study would not know why); never
    ``ours`` (this process runs them), and none within a grace period after the storage came
    back from an outage (no search could record a heartbeat during it).

    NOTE: the stale ids come from the storage's heartbeat API (``_get_stale_trial_ids``), which
    Optuna's ``fail_stale_trials`` uses too.
    """
    storage = study._storage  # noqa: SLF001
    if _just_back(study):
        return
    for trial_id in storage._get_stale_trial_ids(study._study_id):  # noqa: SLF001
        t = storage.get_trial(trial_id)
        if t.state != TrialState.RUNNING or t.number in ours:
            continue
        reason = f"{STALE} (no heartbeat for over {GRACE_PERIOD_S} s)"
        try:
            on_fail(_fail_trial(study, t, reason))
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another search failed it first


def fail_orphans(
    study: optuna.Study,
    ours: Collection[int],
    on_fail: Callable[[FrozenTrial], None],
    grace_period_s: float | None = None,
) -> None:
    """Fail RUNNING trials that never got a heartbeat (a kill between ``ask`` and the first
    heartbeat), other than ``ours``.

    A trial of this or another live search gets its heartbeat and ``config_key`` within
    milliseconds of ``ask``, so one without ``config_key`` past the grace period is dead.
    """
    grace = GRACE_PERIOD_S if grace_period_s is None else grace_period_s
    if _just_back(study):
        return
    wall = datetime.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number in ours or TrialAttr.CONFIG_KEY in t.user_attrs or not t.datetime_start:
            continue
        if (wall - t.datetime_start).total_seconds() > grace:
            on_fail(_fail_trial(study, t, ORPHAN))


def settle(study: optuna.Study, on_fail: Callable[[FrozenTrial], None]) -> None:
    """At the end: trials another (killed) process left RUNNING are failed once their grace
    period is over, rather than left RUNNING; a live search's trials keep their heartbeat
    and are waited for at most one grace period."""
    deadline = time.monotonic() + GRACE_PERIOD_S + HEARTBEAT_INTERVAL_S
    while True:
        fail_stale(study, on_fail)
        fail_orphans(study, (), on_fail)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running or time.monotonic() > deadline:
            return
        time.sleep(0.5)
