"""MLflow tracking: one parent run per study, one nested run per trial (``MlflowClient`` only).

Trials are keyed by the tag ``mpq_trial`` (the Optuna trial number), so logging is idempotent:
``sync`` (and every resume) back-fills the trials that have no run yet, e.g. after the tracking
server was down. Tracking never stops the search: an outage is logged once, the trial stays in
Optuna storage, and the run is back-filled later.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from mpq.search.config import SearchConfig
from mpq.search.pareto import front_table, front_trials, hypervolume_history

logging.getLogger("mlflow").setLevel(logging.WARNING)
STUDY_TAG, TRIAL_TAG, KIND_TAG = "mpq_study", "mpq_trial", "mpq_kind"
_MAX_BATCH = 100


def flat_params(trial: FrozenTrial) -> dict[str, str]:
    """Readable per-layer choices and summaries: ``fuse.w_bits=4``, ``mean_w_bits=5.2``."""
    layers = trial.user_attrs.get("config", {}).get("layers", {})
    out: dict[str, str] = {}
    for name, choice in layers.items():
        for dim in ("w_bits", "a_bits", "granularity", "group_size", "symmetric", "act_mode"):
            if dim in choice:
                out[f"{name}.{dim}"] = str(choice[dim])
    bits = [int(c.get("w_bits", 32)) for c in layers.values()]
    if bits:
        out["mean_w_bits"] = f"{sum(bits) / len(bits):.3f}"
        for b, n in sorted(Counter(bits).items()):
            out[f"layers_at_w{b}"] = str(n)
    for key in ("seed", "duplicate_of", "config_key"):
        if key in trial.user_attrs:
            out[key] = str(trial.user_attrs[key])
    return out


def trial_metrics(trial: FrozenTrial, ref: dict[str, Any]) -> dict[str, float]:
    a = trial.user_attrs
    out = {
        k: float(v)
        for k, v in a.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k != "duplicate_of"
    }
    if a.get("size_bytes") and ref.get("size_bytes"):
        out["compression_ratio"] = float(ref["size_bytes"]) / float(a["size_bytes"])
    return {k.replace("/", "."): v for k, v in out.items()}


class Tracker:
    """Logs a study to MLflow; every call survives a tracking outage."""

    def __init__(self, cfg: SearchConfig, console: Console | None = None) -> None:
        self.cfg = cfg
        self.console = console or Console(stderr=True)
        self.uri = cfg.tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        self.parent_id: str | None = None
        self.runs: dict[int, str] = {}
        self.down = False
        self.experiment_id: str | None = None
        try:
            self.experiment_id = self._experiment()
        except Exception as exc:  # noqa: BLE001  MLflow raises many types when a store is down
            if cfg.tracking.required:
                raise ValueError(
                    f"tracking uri {self.uri!r} does not answer: {_line(exc)}"
                ) from None
            self._outage(exc)

    def _experiment(self) -> str:
        exp = self.client.get_experiment_by_name(self.cfg.name)
        if exp is not None:
            return str(exp.experiment_id)
        location = None
        if self.uri.startswith("sqlite:"):
            location = (Path(self.cfg.output_dir).resolve() / "mlartifacts").as_uri()
        return str(self.client.create_experiment(self.cfg.name, artifact_location=location))

    def _outage(self, exc: BaseException) -> None:
        if not self.down:
            self.console.print(
                f"[yellow]tracking unavailable[/] ({_line(exc)}); trials stay in "
                "Optuna storage and are back-filled by resume or `mpq sync`"
            )
        self.down = True

    def _guard(self, fn: Any, *args: Any) -> Any:
        try:
            if self.experiment_id is None:
                self.experiment_id = self._experiment()
            out = fn(*args)
        except Exception as exc:  # noqa: BLE001
            self._outage(exc)
            return None
        if self.down:
            self.down = False
            self.console.print("[green]tracking back[/]")
        return out

    # -- study --------------------------------------------------------------------------------
    def start(self, study: optuna.Study) -> None:
        self._guard(self._start, study)

    def load_runs(self, study: optuna.Study) -> None:
        """Find the study's parent run and the trials that already have runs."""
        assert self.experiment_id is not None
        query = f"tags.{STUDY_TAG} = '{study.study_name}'"
        for r in self.client.search_runs([self.experiment_id], query, max_results=50000):
            if r.data.tags.get(KIND_TAG) == "study":
                self.parent_id = r.info.run_id
            elif TRIAL_TAG in r.data.tags:
                self.runs[int(r.data.tags[TRIAL_TAG])] = r.info.run_id

    def _start(self, study: optuna.Study) -> None:
        assert self.experiment_id is not None
        self.load_runs(study)
        if self.parent_id is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=study.study_name,
                tags={STUDY_TAG: study.study_name, KIND_TAG: "study"},
            )
            self.parent_id = run.info.run_id
            cfg = self.cfg
            params = {
                "sampler": cfg.sampler,
                "backend": cfg.latency.backend,
                "model": cfg.model,
                "task": cfg.task,
                "objectives": ",".join(cfg.objectives),
                "task_budget": str(cfg.task_budget),
                "screen_budget": str(cfg.screen_budget),
                "latency_threads": str(cfg.latency.threads),
                "seed": str(cfg.seed),
            }
            ref = study.user_attrs.get("float_reference", {})
            info = ref.get("latency_info") or {}
            params["target"] = str(info.get("cpu", "unknown"))
            self._log(
                self.parent_id,
                params,
                {
                    f"float.{k.replace('/', '.')}": float(v)
                    for k, v in ref.items()
                    if isinstance(v, int | float)
                },
                {},
            )
        self._backfill(study)

    def _backfill(self, study: optuna.Study) -> None:
        for t in study.get_trials(deepcopy=False):
            if t.state.is_finished() and t.number not in self.runs:
                self._trial(study, t)

    def on_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.parent_id is None:
            self._guard(self._start, study)
            return  # _start back-fills every finished trial, this one included
        self._guard(self._trial, study, trial)

    def _trial(self, study: optuna.Study, t: FrozenTrial) -> bool:
        assert self.experiment_id is not None and self.parent_id is not None
        if t.number in self.runs:
            return True
        feasible = all(c <= 0 for c in t.user_attrs.get("constraints", [0.0]))
        tags = {
            STUDY_TAG: study.study_name,
            TRIAL_TAG: str(t.number),
            KIND_TAG: "trial",
            "mlflow.parentRunId": self.parent_id,
            "state": t.state.name.lower(),
            "feasible": str(feasible).lower(),
            "on_front": "false",
        }
        if "fail_reason" in t.user_attrs:
            tags["fail_reason"] = str(t.user_attrs["fail_reason"])[:5000]
        if "fallbacks" in t.user_attrs:
            tags["kernel_fallbacks"] = json.dumps(t.user_attrs["fallbacks"])[:5000]
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{t.number}", tags=tags)
        rid = run.info.run_id
        ref = study.user_attrs.get("float_reference", {})
        self._log(rid, flat_params(t), trial_metrics(t, ref), {})
        config = t.user_attrs.get("config")
        if config:
            self.client.log_text(rid, yaml.safe_dump(config, sort_keys=False), "config.yaml")
            self.client.log_text(rid, json.dumps(config, indent=1), "config.json")
        if "kernels" in t.user_attrs:
            self.client.log_dict(
                rid,
                {
                    "kernels": t.user_attrs["kernels"],
                    "fallbacks": t.user_attrs.get("fallbacks", {}),
                    "latency": t.user_attrs.get("latency_info", {}),
                },
                "kernels.json",
            )
        status = (
            "FINISHED"
            if t.state == TrialState.COMPLETE
            else ("KILLED" if t.state == TrialState.PRUNED else "FAILED")
        )
        self.client.set_terminated(rid, status)
        self.runs[t.number] = rid
        return True

    def _log(
        self, rid: str, params: dict[str, str], metrics: dict[str, float], tags: dict[str, str]
    ) -> None:
        p = [Param(k[:250], v[:6000]) for k, v in params.items()]
        m = [Metric(k[:250], v, 0, 0) for k, v in metrics.items()]
        t = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, max(len(p), len(m), len(t), 1), _MAX_BATCH):
            self.client.log_batch(
                rid,
                metrics=m[i : i + _MAX_BATCH],
                params=p[i : i + _MAX_BATCH],
                tags=t[i : i + _MAX_BATCH],
            )

    # -- end of study -------------------------------------------------------------------------
    def finish(self, study: optuna.Study) -> None:
        """Back-fill, tag the front, log hypervolume, the front table and the plots."""
        from mpq.search import plots

        # NOTE: the figures are drawn outside the outage guard: a bug in them must surface,
        # not pass for a tracking outage.
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            front_table(study).to_csv(out / "pareto_front.csv", index=False)
            plots.write_all(study, out)
            self._guard(self._finish, study, out)

    def _finish(self, study: optuna.Study, artifacts: Path) -> None:
        if self.parent_id is None:
            self._start(study)
        self._backfill(study)
        assert self.parent_id is not None
        front = {t.number for t in front_trials(study)}
        for number, rid in self.runs.items():
            self.client.set_tag(rid, "on_front", str(number in front).lower())
        history = hypervolume_history(study)
        metrics = [Metric("hypervolume", hv, 0, n) for n, hv in history]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.parent_id, metrics=metrics[i : i + 1000])
        self.client.log_artifacts(self.parent_id, str(artifacts))
        self.client.set_tag(self.parent_id, "trials", str(len(study.trials)))
        self.client.set_terminated(self.parent_id, "FINISHED")

    def confirm(self, study: optuna.Study, number: int, metrics: dict[str, float]) -> None:
        """Log an exported trial's held-out confirmation on its run (``confirm_*`` metrics)."""
        self._guard(self._confirm, study, number, metrics)

    def _confirm(self, study: optuna.Study, number: int, metrics: dict[str, float]) -> None:
        if number not in self.runs:
            self.load_runs(study)
        rid = self.runs.get(number)
        if rid is None:
            return
        for k, v in metrics.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                self.client.log_metric(rid, f"confirm_{k}".replace("/", "."), float(v))
        self.client.set_tag(rid, "exported", "true")


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def sync(cfg: SearchConfig, study: optuna.Study, console: Console | None = None) -> int:
    """Back-fill every finished trial that has no MLflow run; returns how many were added."""
    tracker = Tracker(cfg, console)
    tracker._guard(tracker.load_runs, study)
    before = len(tracker.runs)
    tracker.start(study)
    tracker.finish(study)
    if tracker.down:
        raise ValueError(f"tracking uri {tracker.uri!r} does not answer")
    return len(tracker.runs) - before
