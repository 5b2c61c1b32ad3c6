"""The search loop: ``study.ask()`` -> a Ray task per trial -> ``study.tell()``.

Optuna's ask/tell drives Ray core directly (not Ray Tune), so the Optuna RDB storage stays the
one record of every trial: a trial is told exactly once, when its result is in, and a process
killed at any moment leaves finished trials untouched and running ones to be failed as stale
(heartbeats, ``study.py``). Only this module catches trial errors: a trial that raises, returns
NaN, passes its time limit or loses its worker is told FAIL with the reason, and the search
goes on.

Multi-fidelity: with ``screen_budget`` > 0 a trial first runs the cheap stage (size, latency,
proxy and ``screen_budget`` episodes); it gets the full ``task_budget`` only if, with the upper
end of its 95% success interval, it can still meet the success constraint and no finished
trial dominates it; otherwise it is PRUNED with the screening figures kept. Duplicate
configurations are answered from the first evaluation.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
from optuna.trial import FrozenTrial, TrialState

from mpq.evaluators.backends.base import check_no_fallback
from mpq.evaluators.latency_table import LatencyTable, reuse_or_build
from mpq.evaluators.measure import EvalSpec, finite_or_error, get_evaluator
from mpq.evaluators.size import config_size
from mpq.evaluators.task import wilson_interval
from mpq.search import fingerprint
from mpq.search import study as study_mod
from mpq.search.config import SearchConfig
from mpq.search.pareto import front_trials
from mpq.spaces.space import LayerOptions, QuantConfig

optuna.logging.set_verbosity(optuna.logging.WARNING)
POLL_S = 0.5


def eval_spec(cfg: SearchConfig) -> EvalSpec:
    return EvalSpec(
        model=cfg.model,
        task=cfg.task,
        calibration=cfg.calibration,
        checkpoint=cfg.checkpoint,
        example_inputs=cfg.example_inputs,
        backend=cfg.latency.backend,
        observer=cfg.observer,
        latency_threads=cfg.latency.threads,
        latency_warmup=cfg.latency.warmup,
        latency_runs=cfg.latency.runs,
        latency_visits=cfg.latency.visits,
        measure_latency=cfg.latency.enabled,
        allow_fallback=cfg.latency.allow_fallback,
    )


def evaluate_stage(
    spec: EvalSpec,
    config_json: str,
    stage: str,
    budget: int,
    memory_mb: int | None = None,
    latency_table: str | None = None,
) -> dict[str, Any]:
    """Runs in a Ray worker: ``screen`` (size, latency, proxy, small task) or ``full`` task.

    With ``latency_table`` (JSON), screening predicts latency from it and the ``full`` stage
    measures it on the real kernels.

    With ``memory_mb``, the worker may grow its address space by at most that much during the
    trial (``RLIMIT_AS``, restored after): an allocation past it raises instead of taking the
    machine down.
    """
    table = LatencyTable.from_json(latency_table) if latency_table else None
    with _memory_limit(memory_mb):
        return _evaluate(spec, config_json, stage, budget, table)


def build_table(spec: EvalSpec, options_json: str, cached_json: str | None = None) -> str:
    """Runs in a Ray worker with the trials' resources (the target): the latency table, JSON;
    ``cached_json`` is kept when it was built on this target for this space."""
    evaluator = get_evaluator(spec)
    raw = json.loads(options_json)
    options = {name: LayerOptions.model_validate(o) for name, o in raw.items()}
    return reuse_or_build(cached_json, evaluator, options).to_json()


@contextlib.contextmanager
def _memory_limit(memory_mb: int | None) -> Iterator[None]:
    if not memory_mb:
        yield
        return
    import resource

    old = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        vm_kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmSize:"))
    limit = vm_kb * 1024 + memory_mb * 1024 * 1024
    if old[1] != resource.RLIM_INFINITY:
        limit = min(limit, old[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)


def _evaluate(
    spec: EvalSpec, config_json: str, stage: str, budget: int, table: LatencyTable | None = None
) -> dict[str, Any]:
    start = time.perf_counter()
    evaluator = get_evaluator(spec)
    config = QuantConfig.model_validate_json(config_json)
    out: dict[str, Any] = {}
    if stage == "screen":
        out.update(evaluator.screen(config, table))
    elif table is not None and spec.measure_latency:
        # passed a predicted screen: now the artifact itself (size, proxy, latency)
        out.update(evaluator.screen(config))
    if budget > 0:
        out.update(evaluator.success(config, budget))
        out["episodes"] = budget
    out["eval_s"] = time.perf_counter() - start
    out["node"] = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    finite_or_error(out, ("success",) if budget > 0 else ("size_bytes",))
    return out


def preflight(cfg: SearchConfig, source: str) -> None:
    """Check what can be checked before anything is written: the model and task load, the space
    resolves on the model's layers, and (``latency.allow_fallback: false``) the backend runs
    every choice of the space as asked.

    Raises:
        ValueError: one line starting with ``source``, naming the field and value.
    """
    evaluator = get_evaluator(eval_spec(cfg))
    resolved = cfg.space.resolve(evaluator.layers, f"{source}: space")
    if cfg.latency.enabled and not cfg.latency.allow_fallback:
        choices = {name: options.choices() for name, options in resolved.items()}
        check_no_fallback(evaluator.backend, evaluator.layers, choices, f"{source}: space")


@dataclass
class Running:
    trial: optuna.Trial
    config: QuantConfig
    stage: str
    ref: Any
    started: float
    screen: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchResult:
    study: optuna.Study
    float_reference: dict[str, Any]
    interrupted: bool = False


class Runner:
    """One search: owns the study, the Ray tasks in flight and the tracking callback."""

    def __init__(
        self,
        cfg: SearchConfig,
        resume: bool = False,
        on_trial: Callable[[optuna.Study, FrozenTrial], None] | None = None,
        progress: Callable[[dict[str, int]], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.spec = eval_spec(cfg)
        preflight(cfg, cfg.name)  # before the study exists: a bad space writes nothing
        self.study = study_mod.open_study(cfg, resume)
        fingerprint.guard(self.study, cfg, get_evaluator(self.spec).model)
        self.on_trial = on_trial
        self.progress = progress
        self.running: dict[int, Running] = {}
        self._orphans_checked = 0.0
        self._stop = False
        self.seen: dict[str, FrozenTrial] = {
            t.user_attrs["config_key"]: t
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "config_key" in t.user_attrs
        }

    # -- set-up -------------------------------------------------------------------------------
    def prepare(self) -> dict[str, Any]:
        """Float reference, resolved space and seed trials (sensitivity), once per study."""
        evaluator = get_evaluator(self.spec)
        self.resolved = self.cfg.space.resolve(evaluator.layers, f"{self.cfg.name}: space")
        self.dists = study_mod.distributions(self.resolved)
        if not self.dists:
            raise ValueError(f"{self.cfg.name}: space: every layer is fixed; nothing to search")
        ref = self.study.user_attrs.get("float_reference")
        if ref is None:
            ref = _jsonable(evaluator.float_reference(self.cfg.task_budget))
            self.study.set_user_attr("float_reference", ref)
            self.study.set_user_attr("layers", [la.name for la in evaluator.layers])
            self._enqueue_seeds(evaluator)
        self.float_reference = ref
        return ref

    def _latency_table(self) -> str | None:
        """The study's latency table (JSON) for predicted screening, built on a worker with
        the trials' resources, so on the target hardware; kept in the study and in
        ``output_dir/latency_table.json``, and reused on resume when that worker finds it was
        built on its target for this space."""
        lat = self.cfg.latency
        if not (lat.enabled and lat.predict_screen and self.cfg.screen_budget > 0):
            return None
        cached = self.study.user_attrs.get("latency_table")
        task = ray.remote(build_table).options(
            num_cpus=self.cfg.ray.cpus_per_trial,
            num_gpus=self.cfg.ray.gpus_per_trial,
            resources=dict(self.cfg.ray.resources_per_trial),
        )
        options = {n: o.model_dump(mode="json") for n, o in self.resolved.items()}
        cached_json = json.dumps(cached) if cached is not None else None
        table = json.loads(ray.get(task.remote(self.spec, json.dumps(options), cached_json)))
        if table != cached:  # new, or the cached one was of another target or a smaller space
            self.study.set_user_attr("latency_table", table)
            path = Path(self.cfg.output_dir) / "latency_table.json"
            path.write_text(json.dumps(table, indent=1, sort_keys=True))
        return json.dumps(table)

    def _enqueue_seeds(self, evaluator: Any) -> None:
        from mpq.search import sensitivity as sens

        if not self.cfg.sensitivity.enabled:
            return
        seeds: list[tuple[str, QuantConfig]] = []
        for bits in self.cfg.sensitivity.uniform_bits:
            seeds.append((f"uniform-{bits}bit", sens.uniform_config(self.resolved, bits)))
        s = sens.measure_sensitivity(evaluator, self.resolved, Path(self.cfg.output_dir))
        self.study.set_user_attr(
            "sensitivity", {k: {str(b): v for b, v in d.items()} for k, d in s.items()}
        )
        size8 = config_size(
            evaluator.model, evaluator.layers, sens.uniform_config(self.resolved, 8)
        ).total_bytes
        for frac in self.cfg.sensitivity.budgets:
            config = sens.greedy_allocation(evaluator, self.resolved, s, int(size8 * frac))
            seeds.append((f"greedy-{int(frac * 100)}pct", config))
        done: set[str] = set()
        for label, config in seeds:
            if config.key() in done:
                continue
            done.add(config.key())
            params = study_mod.params_from_config(self.resolved, config)
            self.study.enqueue_trial(params, user_attrs={"seed": label})

    # -- the loop -----------------------------------------------------------------------------
    def finished_count(self) -> int:
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        return len(self.study.get_trials(deepcopy=False, states=states))

    def run(self) -> SearchResult:
        remote = ray.remote(evaluate_stage).options(
            num_cpus=self.cfg.ray.cpus_per_trial,
            num_gpus=self.cfg.ray.gpus_per_trial,
            resources=dict(self.cfg.ray.resources_per_trial),
            max_retries=self.cfg.ray.max_retries,
            retry_exceptions=False,
        )
        self.remote = remote
        self.latency_table = self._latency_table()
        # Ctrl-C sets a flag that the loop reads between steps: a KeyboardInterrupt raised in
        # the middle of study.ask() or a storage write would leave a trial RUNNING that no one
        # fails. A second Ctrl-C interrupts at once.
        self._stop = False
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            while not self._stop:
                optuna.storages.fail_stale_trials(self.study)
                self._fail_orphans()
                self._fill()
                if not self.running:
                    break
                self._poll()
                self._heartbeat()
                self._report()
            if not self._stop:
                self._settle()
        except KeyboardInterrupt:
            self._stop = True
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        if self._stop:
            self._interrupt()
        self._report()
        return SearchResult(self.study, self.float_reference, self._stop)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self._stop = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def _fill(self) -> None:
        while (
            not self._stop
            and len(self.running) < self.cfg.ray.workers
            and (self.finished_count() + len(self.running) < self.cfg.trials)
        ):
            trial = self.study.ask(self.dists)
            self.study._storage.record_heartbeat(trial._trial_id)  # noqa: SLF001
            config = study_mod.config_from_params(self.resolved, trial.params)
            key = config.key()
            trial.set_user_attr("config_key", key)
            trial.set_user_attr("config", config.model_dump(mode="json", exclude_none=True))
            if key in self.seen:
                self._tell_duplicate(trial, self.seen[key])
                continue
            stage = "screen" if self.cfg.screen_budget > 0 else "full"
            budget = self.cfg.screen_budget if stage == "screen" else self.cfg.task_budget
            ref = self.remote.remote(
                self.spec,
                config.model_dump_json(),
                "screen",
                budget,
                self.cfg.trial_memory_mb,
                self.latency_table,
            )
            self.running[trial.number] = Running(trial, config, stage, ref, time.monotonic())

    def _poll(self) -> None:
        refs = [r.ref for r in self.running.values()]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=POLL_S)
        ready_set = set(ready)
        for run in list(self.running.values()):
            if run.ref in ready_set:
                try:
                    result = ray.get(run.ref)
                except Exception as exc:  # noqa: BLE001  a failed trial is data, not a crash
                    # Ctrl-C reaches the Ray workers of the process group too: what fails after
                    # it was interrupted, whatever the worker's own error says
                    self._fail(run, "interrupted (SIGINT)" if self._stop else _reason(exc))
                    continue
                self._advance(run, result)
            elif time.monotonic() - run.started > self.cfg.trial_timeout_s:
                ray.cancel(run.ref, force=True)
                self._fail(run, f"time limit {self.cfg.trial_timeout_s:.0f}s exceeded")

    def _advance(self, run: Running, result: dict[str, Any]) -> None:
        result = self._paired_latency(result)
        if run.stage == "screen" and self.cfg.screen_budget > 0:
            run.screen = result
            optimistic = {**result, "success": self._success_upper(result)}
            if self._cannot_be_feasible(optimistic) or self._dominated(optimistic):
                self._tell(run, result, TrialState.PRUNED)
                return
            run.stage = "full"
            run.ref = self.remote.remote(
                self.spec,
                run.config.model_dump_json(),
                "full",
                self.cfg.task_budget,
                self.cfg.trial_memory_mb,
                self.latency_table,
            )
            return
        metrics = {**run.screen, **result}
        if run.screen:
            metrics["episodes"] = run.screen.get("episodes", 0) + result.get("episodes", 0)
            metrics["eval_s"] = run.screen.get("eval_s", 0.0) + result.get("eval_s", 0.0)
        self._tell(run, metrics, TrialState.COMPLETE)

    def _paired_latency(self, result: dict[str, Any]) -> dict[str, Any]:
        """The latency objective is the paired one: the study's float latency over the speed-up
        measured against float in the same slot, so ``float latency_ms / latency_ms`` is the
        trial's ``speedup`` everywhere it is shown (its raw median: ``latency_measured_ms``)."""
        ref_ms = self.float_reference.get("latency_ms")
        if "speedup" not in result or not ref_ms:
            return result
        return {**result, "latency_ms": float(ref_ms) / float(result["speedup"])}

    def _cannot_be_feasible(self, optimistic: dict[str, Any]) -> bool:
        """Even the upper end of its success interval misses the success constraint."""
        drop = self.cfg.constraints.max_success_drop
        if drop is None:
            return False
        return float(optimistic["success"]) < float(self.float_reference["success"]) - drop

    def _success_upper(self, result: dict[str, Any]) -> float:
        """Upper end of the 95% interval: the task's own, else Wilson over the budget."""
        if "success_hi" in result:
            return float(result["success_hi"])
        n = self.cfg.screen_budget
        return wilson_interval(round(float(result["success"]) * n), n)[1]

    def _dominated(self, metrics: dict[str, Any]) -> bool:
        values = study_mod.objective_values(self.cfg, metrics)
        signs = [1 if d == "minimize" else -1 for d in self.cfg.directions]
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if not _feasible(t) or t.values is None:
                continue
            a = [s * v for s, v in zip(signs, t.values, strict=True)]
            b = [s * v for s, v in zip(signs, values, strict=True)]
            if all(x <= y for x, y in zip(a, b, strict=True)) and any(
                x < y for x, y in zip(a, b, strict=True)
            ):
                return True
        return False

    def _tell(self, run: Running, metrics: dict[str, Any], state: TrialState) -> None:
        trial = run.trial
        for k, v in _jsonable(metrics).items():
            trial.set_user_attr(k, v)
        trial.set_user_attr("stage", run.stage)
        if state == TrialState.COMPLETE:
            values = study_mod.objective_values(self.cfg, metrics)
            if not all(math.isfinite(v) for v in values):
                self._fail(run, f"non-finite objective values {values}")
                return
            ref_success = float(self.float_reference["success"])
            cons = study_mod.constraint_values(self.cfg, metrics, ref_success)
            for name, value in cons.items():
                trial.set_constraint(name, value)
            trial.set_user_attr("constraints", list(cons.values()))
            frozen = self.study.tell(trial, values)
            self.seen[run.config.key()] = frozen
        else:
            frozen = self.study.tell(trial, state=state)
        self.running.pop(trial.number, None)
        self._track(frozen)

    def _tell_duplicate(self, trial: optuna.Trial, first: FrozenTrial) -> None:
        for k, v in first.user_attrs.items():
            if k not in ("seed",):
                trial.set_user_attr(k, v)
        for name, value in zip(
            self._constraint_names(), first.user_attrs.get("constraints", []), strict=False
        ):
            trial.set_constraint(name, value)
        trial.set_user_attr("duplicate_of", first.number)
        trial.set_user_attr("episodes", 0)
        frozen = self.study.tell(trial, list(first.values or []))
        self._track(frozen)

    def _constraint_names(self) -> list[str]:
        probe = {"success": 0.0, "size_bytes": 0.0, "latency_ms": 0.0}
        return list(study_mod.constraint_values(self.cfg, probe, 0.0))

    def _fail(self, run: Running, reason: str) -> None:
        run.trial.set_user_attr("fail_reason", reason[:500])
        frozen = self.study.tell(run.trial, state=TrialState.FAIL)
        self.running.pop(run.trial.number, None)
        self._track(frozen)

    def _track(self, frozen: FrozenTrial) -> None:
        if self.on_trial is not None:
            self.on_trial(self.study, frozen)

    def _fail_orphans(self, force: bool = False) -> None:
        """Fail RUNNING trials that never got a heartbeat (a kill between ``ask`` and the first
        heartbeat); Optuna's stale check skips trials without one, so they would stay RUNNING.

        A trial of this or another live search gets its heartbeat and ``config_key`` within
        milliseconds of ``ask``, so one without ``config_key`` past the grace period is dead.
        """
        now = time.monotonic()
        if not force and now - self._orphans_checked < study_mod.HEARTBEAT_INTERVAL_S:
            return
        self._orphans_checked = now
        storage = self.study._storage  # noqa: SLF001
        wall = datetime.datetime.now()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number in self.running or "config_key" in t.user_attrs or not t.datetime_start:
                continue
            if (wall - t.datetime_start).total_seconds() > study_mod.GRACE_PERIOD_S:
                trial_id = t._trial_id  # noqa: SLF001
                storage.set_trial_user_attr(trial_id, "fail_reason", "killed before it started")
                storage.set_trial_state_values(trial_id, TrialState.FAIL)
                self._track(storage.get_trial(trial_id))

    def _settle(self) -> None:
        """At the end: trials another (killed) process left RUNNING are failed once their grace
        period is over, rather than left RUNNING; a live search's trials keep their heartbeat
        and are waited for at most one grace period."""
        deadline = time.monotonic() + study_mod.GRACE_PERIOD_S + study_mod.HEARTBEAT_INTERVAL_S
        while True:
            optuna.storages.fail_stale_trials(self.study)
            self._fail_orphans(force=True)
            running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not running or time.monotonic() > deadline:
                return
            time.sleep(0.5)

    def _heartbeat(self) -> None:
        for run in self.running.values():
            self.study._storage.record_heartbeat(run.trial._trial_id)  # noqa: SLF001

    def _interrupt(self) -> None:
        for run in list(self.running.values()):
            ray.cancel(run.ref, force=True)
            self._fail(run, "interrupted (SIGINT)")

    def _report(self) -> None:
        if self.progress is None:
            return
        trials = self.study.get_trials(deepcopy=False)
        counts = {s.name.lower(): 0 for s in TrialState}
        for t in trials:
            counts[t.state.name.lower()] += 1
        counts["in_flight"] = len(self.running)
        counts["front"] = len(front_trials(self.study))
        counts["target"] = self.cfg.trials
        self.progress(counts)


def _feasible(trial: FrozenTrial) -> bool:
    return all(c <= 0 for c in trial.user_attrs.get("constraints", [0.0]))


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


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(metrics, default=str))


def _check_answers(address: str, timeout_s: float = 3.0) -> None:
    """Fail fast on a ``host:port`` that refuses connections (Ray itself waits minutes)."""
    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise ValueError(f"ray.address={address!r} does not answer: {exc}") from None


def _use_cluster_token() -> None:
    """Turn on Ray's token authentication for an attach when a token is at hand.

    ``ray start --head`` (Ray >= 2.5x) enables token authentication and writes
    ``~/.ray/auth_token``, but a process that merely connects stays in mode ``disabled`` and is
    refused ("InvalidAuthToken"). With ``RAY_AUTH_MODE`` unset and a token in
    ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, attach in token mode,
    as ``ray start --address`` must be told to.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # Ray caches its config at import: refresh it, as Ray's own `ray start` path does
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):  # a Ray without token authentication
        pass


def init_ray(cfg: SearchConfig) -> bool:
    """Attach to ``cfg.ray.address`` or start a local Ray; returns True if we started it.

    Raises:
        ValueError: the address does not answer.
    """
    if cfg.ray.address:
        _check_answers(cfg.ray.address)
    if ray.is_initialized():
        return False
    # Workers import the user's modules from where mpq runs, like the driver does.
    pythonpath = os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath, "PYTHONWARNINGS": "ignore"}}
    if cfg.ray.address:
        _use_cluster_token()
        try:
            ray.init(
                address=cfg.ray.address,
                runtime_env=runtime_env,
                log_to_driver=False,
                configure_logging=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as exc:
            text = f"{exc} {exc.__cause__ or ''}"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "AuthToken" in text or "Authentication" in text:
                raise ValueError(
                    f"ray.address={cfg.ray.address!r} refused this process's token: put the "
                    "cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token"
                ) from None
            raise ValueError(f"ray.address={cfg.ray.address!r} does not answer: {first}") from None
        return False
    cpus = max(1, math.ceil(cfg.ray.workers * cfg.ray.cpus_per_trial))
    ray.init(
        address="local",  # always a fresh runtime, never a `ray start` cluster found on disk
        num_cpus=cpus,
        include_dashboard=False,
        runtime_env=runtime_env,
        log_to_driver=False,
        configure_logging=False,
        _node_ip_address="127.0.0.1",
    )
    return True


def shutdown_ray() -> None:
    ray.shutdown()
