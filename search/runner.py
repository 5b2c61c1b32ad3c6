"""The search loop: ``study.ask()`` -> a Ray task per trial -> ``study.tell()``.

Optuna's ask/tell drives Ray core directly (not Ray Tune), so the Optuna RDB storage stays the
one record of every trial: a trial is told exactly once, when its result is in, and a process
killed at any moment leaves finished trials untouched and running ones to be failed as stale
(``hygiene.py``). Only this module catches trial errors: a trial that raises, returns NaN,
passes its time limit or loses its worker is told FAIL with the reason, and the search goes on.

A trial runs in stages (``record.Stage``): with ``screen_budget`` > 0 it is screened first and
pruned or promoted by ``rules.prune_after_screen``; the full stage spends ``task_budget``
episodes; with ``refine_budget`` > 0 a close call (``rules.close_call``: its success interval
holds the constraint's threshold) runs again on ``task_budget + refine_budget`` episodes, which
decide it; the QAT stage (``qat.when``) fine-tunes what post-training quantization cannot make
feasible. Duplicate configurations are answered from the first evaluation.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mpq.evaluators.backends.base import check_no_fallback
from mpq.evaluators.evaluator import get_evaluator
from mpq.evaluators.size import config_size
from mpq.files import owned_folder, write_atomic
from mpq.search import fingerprint, hygiene, rules, study_setup
from mpq.search.cluster import TrialTasks
from mpq.search.config import SearchConfig
from mpq.search.pareto import feasible_complete, front_trials
from mpq.search.record import Stage, StudyAttr, TrialAttr, jsonable
from mpq.search.storage import make_storage
from mpq.search.study import config_from_params, distributions, open_study
from mpq.search.worker import QAT_WEIGHTS, ArtifactFigures, eval_spec
from mpq.spaces.space import LayerOptions, QuantConfig

SUCCESS_KEYS = ("success", "success_lo", "success_hi")  # a success and its interval


def preflight(cfg: SearchConfig, source: str) -> dict[str, LayerOptions]:
    """Check what can be checked before anything is written: the model loads, the task answers
    one episode per level with a valid success rate (``run_task``'s checks), the space
    resolves on the model's layers and leaves something to search, and (``latency.allow_fallback:
    false``) the backend runs every choice of the space as asked. Returns the resolved space.

    Raises:
        ValueError: one line starting with ``source``, naming the field and value.
    """
    evaluator = get_evaluator(eval_spec(cfg))
    evaluator.success(None, 1)  # the task answers, with a success rate, before anything is kept
    resolved = cfg.space.resolve(evaluator.layers, f"{source}: space")
    if not distributions(resolved):
        raise ValueError(f"{source}: space: every layer is fixed; nothing to search")
    if cfg.latency.enabled and not cfg.latency.allow_fallback:
        choices = {name: options.choices() for name, options in resolved.items()}
        check_no_fallback(evaluator.backend, evaluator.layers, choices, f"{source}: space")
    cap = cfg.constraints.max_size_bytes
    if cap is not None:  # can anything in the space meet it? (packing formula, exact)
        smallest = QuantConfig(
            layers={
                n: min(o.choices(), key=lambda c, n=n: _layer_bytes(evaluator, n, c))
                for n, o in resolved.items()
            }
        )
        least = config_size(evaluator.model, evaluator.layers, smallest).total_bytes
        if least > cap:
            raise ValueError(
                f"{source}: constraints.max_size_bytes={cap:,}: the smallest configuration "
                f"of the space has {least:,} bytes; nothing can meet it"
            )
    return resolved


def _layer_bytes(evaluator: Any, name: str, choice: Any) -> int:
    from mpq.evaluators.size import layer_size_bytes

    layer = next(la for la in evaluator.layers if la.name == name)
    return layer_size_bytes(layer, choice)


def bind_sampler(study: optuna.Study, resolved: dict[str, LayerOptions], evaluator: Any) -> None:
    """Give a model-based sampler the space, the packing formula of this model and what the
    backend's plan runs for a configuration."""
    from mpq.search.model_sampler import ModelBasedSampler

    if isinstance(study.sampler, ModelBasedSampler):

        def layer_bytes(config: QuantConfig) -> dict[str, int]:
            size = config_size(evaluator.model, evaluator.layers, config)
            return {**size.layer_bytes, "other": size.other_bytes}

        def as_ran(config: QuantConfig) -> QuantConfig:
            if not evaluator.spec.measure_latency:
                return config
            return evaluator.backend.plan(evaluator.model, evaluator.layers, config).ran_config

        study.sampler.bind(resolved, layer_bytes, as_ran)


@dataclass
class Running:
    """A trial in flight: its current stage and Ray reference."""

    trial: optuna.Trial
    config: QuantConfig
    stage: Stage
    ref: Any
    started: float
    screen: dict[str, Any] = field(default_factory=dict)
    ptq: dict[str, Any] = field(default_factory=dict)  # before the QAT stage, if it runs
    full: dict[str, Any] = field(default_factory=dict)  # before the REFINE stage, if it runs
    qat_from: Stage = Stage.FULL  # the stage whose figures the QAT stage started from


@dataclass
class SearchResult:
    study: optuna.Study
    float_reference: dict[str, Any]
    interrupted: bool = False
    plots: list[Path] = field(default_factory=list)  # written by run_search
    out_of_time: bool = False  # time_budget_s ended it before the trial budget


class Runner:
    """One search: owns the study, the Ray tasks in flight and the tracking callback."""

    def __init__(
        self,
        cfg: SearchConfig,
        resume: bool = False,
        on_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None,
        progress: Callable[[dict[str, int]], None] | None = None,
        resolved: dict[str, LayerOptions] | None = None,
    ) -> None:
        self.cfg = cfg
        self.spec = eval_spec(cfg)
        # checked before the study exists, so a bad space writes nothing (``resolved``: the
        # caller ran ``preflight`` already)
        self.resolved = resolved if resolved is not None else preflight(cfg, cfg.name)
        self.dists = distributions(self.resolved)
        storage = make_storage(cfg.storage_url(), cfg.storage_retry_s)
        names = optuna.study.get_all_study_names(storage)
        self._created = cfg.name not in names  # this process made the study: may drop it
        self.study = open_study(cfg, resume)
        fingerprint.guard(self.study, cfg, get_evaluator(self.spec).model)
        bind_sampler(self.study, self.resolved, get_evaluator(self.spec))
        self.on_trial = on_trial
        self.progress = progress
        self.tasks = TrialTasks(cfg, self.spec)
        self.running: dict[int, Running] = {}
        self.heartbeat = hygiene.Heartbeat(self.study)
        self.float_reference: dict[str, Any] = {}
        self.latency_table: str | None = None
        self._stop = False
        budget = cfg.time_budget_s  # counted from here: the float reference and tables count
        self._deadline = None if budget is None else time.monotonic() + budget
        self._orphans_checked = 0.0
        self._seeds_lost = False
        self.seen: dict[str, FrozenTrial] = {
            t.user_attrs[TrialAttr.CONFIG_KEY]: t
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if TrialAttr.CONFIG_KEY in t.user_attrs
        }

    def prepare(self) -> dict[str, Any]:
        """Float reference and seed trials (once per study); ``run`` builds the latency
        table."""
        evaluator = get_evaluator(self.spec)
        try:
            self.float_reference = study_setup.float_reference(
                self.study, self.cfg, evaluator, self.resolved
            )
        except BaseException:  # an error or Ctrl-C before the first trial
            self._drop_if_empty()
            raise
        study_setup.requeue_lost_seeds(self.study)  # a resumed study keeps its starting points
        return self.float_reference

    def _drop_if_empty(self) -> None:
        """Delete the study when it holds nothing yet (no trial, no float reference): a
        failure before the first trial leaves no empty study that the fixed rerun would be
        told "already exists" about."""
        empty = not self.study.get_trials(deepcopy=False)
        if self._created and empty and StudyAttr.FLOAT_REFERENCE not in self.study.user_attrs:
            optuna.delete_study(study_name=self.study.study_name, storage=self.study._storage)

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> SearchResult:
        """Fill the workers, poll, tell, until the trial budget is spent or Ctrl-C."""
        if not self.float_reference:
            self.prepare()
        study_setup.kernel_table(self.study, self.cfg, self.resolved, self.tasks.tune_kernels)
        self.latency_table = study_setup.latency_table(
            self.study, self.cfg, self.resolved, self.tasks.build_table
        )
        # Ctrl-C sets a flag that the loop reads between steps: a KeyboardInterrupt raised in
        # the middle of study.ask() or a storage write would leave a trial RUNNING that no one
        # fails. A second Ctrl-C interrupts at once.
        self._stop = False
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            with self.heartbeat:
                self._loop()
        except KeyboardInterrupt:
            self._stop = True
        except BaseException as exc:  # a bug or a storage error: no trial left RUNNING behind
            # NOTE: failing the trials may fail too (a storage error); the original error is
            # what the user needs, so it is re-raised whatever happens here.
            # Not tracked: tracking may be what failed.
            with contextlib.suppress(Exception):
                reason = f"search stopped: {type(exc).__name__}: {str(exc)[:200]}"
                self._interrupt(reason, track=False)
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        if self._stop:
            self._interrupt()
        self._report()
        short = self.out_of_time() and self.finished_count() < self.cfg.trials
        return SearchResult(self.study, self.float_reference, self._stop, out_of_time=short)

    def _loop(self) -> None:
        while not self._stop:
            hygiene.fail_stale(self.study, self._lost, self.running)
            self._fail_orphans()
            if self._seeds_lost:  # a killed search's seed, failed only now: it runs again
                self._seeds_lost = False
                study_setup.requeue_lost_seeds(self.study)
            self._fill()
            if not self.running:
                break
            self._poll()
            self._report()
        if not self._stop:
            hygiene.settle(self.study, self._track)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self._stop = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _fail_orphans(self) -> None:
        now = time.monotonic()
        if now - self._orphans_checked >= hygiene.HEARTBEAT_INTERVAL_S:
            self._orphans_checked = now
            hygiene.fail_orphans(self.study, self.running, self._lost)

    def _lost(self, frozen: FrozenTrial) -> None:
        """A trial of a killed process, failed by ``hygiene`` (stale or orphaned)."""
        self._seeds_lost |= bool(frozen.user_attrs.get(TrialAttr.PROPOSED_BY))
        self._track(frozen)

    def finished_count(self) -> int:
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        return len(self.study.get_trials(deepcopy=False, states=states))

    def out_of_time(self) -> bool:
        """This run's ``time_budget_s`` is spent (counted from the runner's start, so a fresh
        study's float reference and tables count too): no trial starts any more."""
        return self._deadline is not None and time.monotonic() >= self._deadline

    def _fill(self) -> None:
        while (
            not self._stop
            and len(self.running) < self.cfg.ray.workers
            and (self.finished_count() + len(self.running) < self.cfg.trials)
            and not self.out_of_time()
        ):
            trial = self.study.ask(self.dists)
            self.heartbeat.add(trial)
            config = config_from_params(self.resolved, trial.params)
            trial.set_user_attr(TrialAttr.CONFIG_KEY, config.key())
            trial.set_user_attr(
                TrialAttr.CONFIG, config.model_dump(mode="json", exclude_none=True)
            )
            if config.key() in self.seen:
                self._tell_duplicate(trial, self.seen[config.key()])
                continue
            screened = self.cfg.screen_budget > 0
            stage = Stage.SCREEN if screened else Stage.FULL
            budget = self.cfg.screen_budget if screened else self.cfg.task_budget
            artifact = (
                ArtifactFigures.PREDICTED if self.latency_table else ArtifactFigures.MEASURED
            )
            ref = self.tasks.submit(config.model_dump_json(), artifact, budget, self.latency_table)
            self.running[trial.number] = Running(trial, config, stage, ref, time.monotonic())

    def _poll(self) -> None:
        ready = self.tasks.ready([r.ref for r in self.running.values()])
        for run in list(self.running.values()):
            with self._unless_failed_elsewhere(run):
                self._poll_one(run, ready)

    def _poll_one(self, run: Running, ready: Collection[Any]) -> None:
        if run.ref in ready:
            try:
                result = self.tasks.result(run.ref)
            except Exception as exc:  # noqa: BLE001  a failed trial is data, not a crash
                # Ctrl-C reaches the Ray workers of the process group too: what fails after
                # it was interrupted, whatever the worker's own error says
                reason = "interrupted (SIGINT)" if self._stop else _reason(exc)
                self._stage_failed(run, reason)
                return
            self._advance(run, result)
        elif time.monotonic() - run.started > self.cfg.trial_timeout_s:
            self.tasks.cancel(run.ref)
            self._stage_failed(run, f"time limit {self.cfg.trial_timeout_s:.0f}s exceeded")

    @contextlib.contextmanager
    def _unless_failed_elsewhere(self, run: Running) -> Iterator[None]:
        """Let go of a trial that another search failed as stale while it ran here (this
        process stalled past the heartbeat's grace period, e.g. suspended): the storage refuses
        a second answer and keeps the first, so this one is dropped, and said so."""
        try:
            yield
        except optuna.exceptions.UpdateFinishedTrialError:
            reason = hygiene.failed_here(self.study, run.trial)
            if reason is None:  # finished by something else: a bug, not a stall
                raise
            self._release(run.trial.number)
            warnings.warn(
                f"trial {run.trial.number} was failed by another search while it ran here "
                f"({reason}): its result is dropped",
                RuntimeWarning,
                stacklevel=3,
            )

    def _release(self, number: int) -> None:
        self.running.pop(number, None)
        self.heartbeat.discard(number)

    def _advance(self, run: Running, result: dict[str, Any]) -> None:
        result = rules.paired_latency(result, self.float_reference.get("latency_ms"))
        float_success = float(self.float_reference["success"])
        artifact = ArtifactFigures.MEASURED if self.latency_table else ArtifactFigures.NONE
        if run.stage == Stage.SCREEN:
            run.screen = result
            finished = self._feasible_values()
            if rules.qat_worth(
                self.cfg, result, float_success, finished, self.cfg.screen_budget, run.config
            ):
                self._start_qat(run, result, artifact)  # a full PTQ budget would be wasted
                return
            if rules.prune_after_screen(self.cfg, result, float_success, finished):
                self._tell(run, result, TrialState.PRUNED)
                return
            run.stage = Stage.FULL
            run.ref = self.tasks.submit(
                run.config.model_dump_json(), artifact, self.cfg.task_budget, self.latency_table
            )
            return
        if run.stage == Stage.QAT:
            self._tell(run, self._after_qat(run, result), TrialState.COMPLETE)
            return
        if run.stage == Stage.REFINE:
            metrics = _refined(run.full, result)
        else:
            metrics = _spent(run.screen, result)
            if rules.close_call(self.cfg, metrics, float_success):
                run.full, run.stage = metrics, Stage.REFINE
                run.started = time.monotonic()  # a stage of its own: its own time limit
                episodes = self.cfg.task_budget + self.cfg.refine_budget
                run.ref = self.tasks.submit(
                    run.config.model_dump_json(), ArtifactFigures.NONE, episodes, None
                )
                return
        if rules.qat_worth(
            self.cfg, metrics, float_success, self._feasible_values(), config=run.config
        ):
            self._start_qat(run, metrics, ArtifactFigures.NONE)  # its figures are measured
            return
        self._tell(run, metrics, TrialState.COMPLETE)

    def _start_qat(self, run: Running, ptq: dict[str, Any], artifact: ArtifactFigures) -> None:
        """The QAT stage: fine-tune, then the full task budget on the fine-tuned model (a time
        limit of its own: training is a stage of its own)."""
        run.qat_from, run.ptq, run.stage = run.stage, ptq, Stage.QAT
        run.started = time.monotonic()
        run.ref = self.tasks.submit(
            run.config.model_dump_json(),
            artifact,
            self.cfg.task_budget,
            self.latency_table,
            qat=True,
        )

    def _stage_failed(self, run: Running, reason: str) -> None:
        """A trial's stage raised or ran out of time: a QAT or close-call stage keeps what the
        stage before it measured (``_qat_failed``, ``_refine_failed``); anything else, or
        anything after Ctrl-C, fails the trial."""
        if self._stop:
            self._fail(run, "interrupted (SIGINT)")
        elif run.stage == Stage.QAT:
            self._qat_failed(run, reason)
        elif run.stage == Stage.REFINE:
            self._refine_failed(run, reason)
        else:
            self._fail(run, reason)

    def _refine_failed(self, run: Running, reason: str) -> None:
        """The close call's larger run failed (time, memory, a worker): the trial is complete on
        the full budget's figures, with the reason under ``refined``."""
        run.stage = Stage.FULL
        self._tell(
            run, {**run.full, TrialAttr.REFINED: {"failed": reason[:500]}}, TrialState.COMPLETE
        )

    def _qat_failed(self, run: Running, reason: str) -> None:
        """QAT failed (a loss that is not finite, out of memory, time): the trial keeps what
        post-training quantization measured, with the reason; after a full evaluation it is
        complete on those figures, after screening alone it is pruned (its figures are the
        screen's), never a failure that loses them."""
        metrics = {**run.ptq, TrialAttr.QAT: {"failed": reason[:500]}}
        run.stage = run.qat_from
        state = TrialState.PRUNED if run.qat_from == Stage.SCREEN else TrialState.COMPLETE
        self._tell(run, metrics, state)

    def _after_qat(self, run: Running, result: dict[str, Any]) -> dict[str, Any]:
        """The trial's figures after QAT (success of the fine-tuned model; size and latency
        the same artifact's), with the PTQ success before it and where the weights are kept
        (``output_dir/qat/trial-N.pt``, what the export ships)."""
        import hashlib

        result = dict(result)
        weights, qat = result.pop(QAT_WEIGHTS), result.pop(TrialAttr.QAT)
        folder = owned_folder(self.cfg.output_dir, "qat", self.cfg.name)  # this study's
        path = (folder / f"trial-{run.trial.number}.pt").relative_to(self.cfg.output_dir)
        write_atomic(Path(self.cfg.output_dir) / path, weights)
        qat["sha256"] = hashlib.sha256(weights).hexdigest()  # the export ships these bytes
        metrics = _spent(run.ptq, result)
        metrics.pop(TrialAttr.REFINED, None)  # its success is the fine-tuned model's
        before = {f"ptq_{k}": run.ptq[k] for k in SUCCESS_KEYS if k in run.ptq}
        metrics[TrialAttr.QAT] = {**qat, **before, "checkpoint": str(path)}
        return metrics

    def _feasible_values(self) -> list[tuple[float, ...]]:
        """Objective values of the finished feasible trials (what can dominate a candidate)."""
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return [tuple(t.values) for t in feasible_complete(complete)]

    def _tell(self, run: Running, metrics: dict[str, Any], state: TrialState) -> None:
        trial = run.trial
        for k, v in jsonable(metrics).items():
            trial.set_user_attr(k, v)
        trial.set_user_attr(TrialAttr.STAGE, run.stage)
        if state == TrialState.COMPLETE:
            values = rules.objective_values(self.cfg, metrics)
            if not all(math.isfinite(v) for v in values):
                self._fail(run, f"non-finite objective values {values}")
                return
            ref_success = float(self.float_reference["success"])
            cons = rules.constraint_values(self.cfg, metrics, ref_success)
            for name, value in cons.items():
                trial.set_constraint(name, value)
            trial.set_user_attr(TrialAttr.CONSTRAINTS, list(cons.values()))
            frozen = self._told(trial, values, TrialState.COMPLETE)
            self.seen[run.config.key()] = frozen
        else:
            frozen = self._told(trial, None, state)
        self._release(trial.number)
        self._track(frozen)

    def _told(
        self, trial: optuna.Trial, values: list[float] | None, state: TrialState
    ) -> FrozenTrial:
        """``study.tell``. A trial another search finished between this process's last
        attribute write and the tell raises ``UpdateFinishedTrialError``, as those writes do
        (Optuna's own tell raises a ValueError then)."""
        frozen = self.study.tell(trial, values, state=state, skip_if_finished=True)
        if frozen.state != state:
            raise optuna.exceptions.UpdateFinishedTrialError(
                f"trial {trial.number} was already {frozen.state.name}"
            )
        return frozen

    def _tell_duplicate(self, trial: optuna.Trial, first: FrozenTrial) -> None:
        """Answer a repeated configuration with the first one's figures (no episodes spent)."""
        for k, v in first.user_attrs.items():
            if k != TrialAttr.PROPOSED_BY:
                trial.set_user_attr(k, v)
        constraints = first.user_attrs.get(TrialAttr.CONSTRAINTS, [])
        for name, value in zip(rules.constraint_names(self.cfg), constraints, strict=False):
            trial.set_constraint(name, value)
        trial.set_user_attr(TrialAttr.DUPLICATE_OF, first.number)
        trial.set_user_attr("episodes", 0)
        self.heartbeat.discard(trial.number)
        self._track(self._told(trial, list(first.values or []), TrialState.COMPLETE))

    def _fail(self, run: Running, reason: str, track: bool = True) -> None:
        run.trial.set_user_attr(TrialAttr.FAIL_REASON, reason[:500])
        frozen = self._told(run.trial, None, TrialState.FAIL)
        self._release(run.trial.number)
        if track:
            self._track(frozen)

    def _track(self, frozen: FrozenTrial) -> None:
        if self.on_trial is not None:
            self.on_trial(self.study, frozen)

    def _interrupt(self, reason: str = "interrupted (SIGINT)", track: bool = True) -> None:
        """Cancel the trials in flight and fail them with ``reason``."""
        for run in list(self.running.values()):
            self.tasks.cancel(run.ref)
            with self._unless_failed_elsewhere(run):
                self._fail(run, reason, track)

    def _report(self) -> None:
        if self.progress is None:
            return
        counts = {s.name.lower(): 0 for s in TrialState}
        for t in self.study.get_trials(deepcopy=False):
            counts[t.state.name.lower()] += 1
        counts["in_flight"] = len(self.running)
        counts["front"] = len(front_trials(self.study))
        counts["target"] = self.cfg.trials
        if self._deadline is not None:  # the seconds of time_budget_s left
            counts["time_left_s"] = max(0, math.ceil(self._deadline - time.monotonic()))
        self.progress(counts)


def _spent(before: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """A later stage's figures over an earlier one's, with the episodes and evaluation time
    of both stages added up (what the trial spent in all)."""
    metrics = {**before, **result}
    for key in ("episodes", "eval_s"):
        metrics[key] = before.get(key, 0) + result.get(key, 0)
    return metrics


def _refined(full: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """A close call's figures: the success measured on the larger budget (its interval, its
    per-level rates), the artifact's figures of the full stage, the episodes and seconds of
    every stage; what the full budget said is kept (``TrialAttr.REFINED``). ``outcomes`` stay
    the full budget's: the episodes every trial ran, which paired comparisons read."""
    outcomes = full.get("outcomes")
    metrics = _spent(full, result)
    if outcomes is not None:
        metrics["outcomes"] = outcomes
    before = {f"{k}_before": full[k] for k in SUCCESS_KEYS if k in full}
    metrics[TrialAttr.REFINED] = {**before, "episodes": result.get("episodes")}
    return metrics


def _reason(exc: BaseException) -> str:
    """One line: the innermost error type and message, without Ray's traceback dump."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    last = next((ln for ln in reversed(text) if ln.strip()), "") if text else ""
    name = type(cause).__name__
    oom = "OutOfMemory" in name or name == "MemoryError" or "can't allocate memory" in last
    if oom or ("memory" in last.lower() and "kill" in last.lower()):
        return f"out of memory: {last[:300]}"
    if "WorkerCrashed" in name or "died" in last.lower():
        return f"worker died: {last[:300]}"
    return f"{name}: {last[:300]}"
