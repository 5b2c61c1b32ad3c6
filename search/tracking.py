"""MLflow tracking: one run per study, one run per trial beside it (tagged with the study's run,
not nested: the runs table shows the trials), ``MlflowClient`` only.

Trials are keyed by the tag ``mpq_trial`` (the Optuna trial number), so logging is idempotent:
``sync`` (and every resume) back-fills the trials that have no run yet, e.g. after the tracking
server was down. Tracking never stops the search: an outage (MLflow, network or OS errors from
the client's calls) is reported once, the trial stays in Optuna storage, and the run is
back-filled later. What is logged is built before any call, outside that guard, so a bug in mpq
surfaces as itself and never passes for an outage.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import optuna
import requests
import sqlalchemy.exc
import yaml
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from mpq.search.config import SearchConfig, masked_url
from mpq.search.pareto import front_table, front_trials, hypervolume_history
from mpq.search.record import Measurements, StudyAttr, TrialAttr, TrialRecord
from mpq.spaces.space import DIMENSIONS, QuantConfig

STUDY_TAG, TRIAL_TAG, KIND_TAG = "mpq_study", "mpq_trial", "mpq_kind"
ENDED_BY = "ended_by"  # the study's run: trial budget, time budget or interrupted (last run)
_MAX_BATCH = 100
# what an unreachable or failing tracking store raises from MlflowClient's calls (a SQL store
# raises SQLAlchemy's own errors when its database is down)
OUTAGE_ERRORS = (
    MlflowException,
    requests.exceptions.RequestException,
    sqlalchemy.exc.SQLAlchemyError,
    OSError,
)
_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}
T = TypeVar("T")


def config_params(config: QuantConfig | None, prefix: str = "") -> dict[str, str]:
    """``<prefix><layer>.<dim>`` for every dimension (``spaces.space.DIMENSIONS``) that
    applies to the layer's choice, plus ``mean_w_bits`` and ``layers_at_w<b>``."""
    if config is None:
        return {}
    out: dict[str, str] = {}
    for name, choice in config.layers.items():
        for dim in DIMENSIONS:
            value = getattr(choice, dim.name)
            if value is not None:  # None: not applicable (a group size without groups)
                out[f"{prefix}{name}.{dim.name}"] = str(value)
    if config.mean_w_bits is not None:
        out[f"{prefix}mean_w_bits"] = f"{config.mean_w_bits:.3f}"
    for b, n in sorted(Counter(c.w_bits for c in config.layers.values()).items()):
        out[f"{prefix}layers_at_w{b}"] = str(n)
    return out


def flat_params(record: TrialRecord) -> dict[str, str]:
    """Per-layer choices as asked (``fuse.w_bits=3``) and, for a trial lowered to the
    backend's kernels, as they ran (``ran.fuse.w_bits=4``), their summaries, and who proposed
    the trial."""
    out = config_params(record.config)
    out.update(config_params(record.ran_config, prefix="ran."))  # only where it was lowered
    out["proposed_by"] = record.proposed_by
    for key, value in record.predicted.items():  # the model-based sampler's prediction
        out[f"predicted.{key}"] = f"{value:.6g}"
    if record.duplicate_of is not None:
        out[TrialAttr.DUPLICATE_OF] = str(record.duplicate_of)
    if record.config is not None:
        out[TrialAttr.CONFIG_KEY] = record.config.key()
    return out


def trial_metrics(record: TrialRecord, float_size_bytes: float | None) -> dict[str, float]:
    """Every numeric figure of the trial, plus ``compression`` (float bytes / bytes)."""
    out = record.measurements.as_metrics()
    compression = record.measurements.compression(float_size_bytes)
    if compression is not None:
        out["compression"] = compression
    return {k.replace("/", "."): v for k, v in out.items()}


@dataclass(frozen=True)
class TrialRun:
    """What one trial's MLflow run holds, built before any MLflow call."""

    number: int
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    texts: dict[str, str] = field(default_factory=dict)  # artifact file -> its text
    status: str = "FAILED"


def trial_run(study_name: str, parent_id: str, t: FrozenTrial, ref: dict[str, Any]) -> TrialRun:
    """The run of trial ``t``: tags (state, feasibility, reasons), params, metrics, files."""
    record = TrialRecord.from_frozen(t)
    tags = {
        STUDY_TAG: study_name,
        TRIAL_TAG: str(record.number),
        KIND_TAG: "trial",
        # not MLflow's parentRunId: nested runs are folded under their parent in the runs
        # table, and a person looking at a study wants its trials in view, sortable
        STUDY_RUN_TAG: parent_id,
        "state": record.state.name.lower(),
        "feasible": str(record.feasible).lower(),
        "on_front": "false",
    }
    if record.fail_reason:
        tags[TrialAttr.FAIL_REASON] = record.fail_reason[:5000]
    if record.fallbacks:
        tags["kernel_fallbacks"] = json.dumps(record.fallbacks)[:5000]
    texts = {}
    if record.config is not None:
        config = record.config.model_dump(mode="json", exclude_none=True)
        texts["config.yaml"] = yaml.safe_dump(config, sort_keys=False)
        texts["config.json"] = json.dumps(config, indent=1)
    if record.ran_config is not None:
        ran = record.ran_config.model_dump(mode="json", exclude_none=True)
        texts["ran_config.yaml"] = yaml.safe_dump(ran, sort_keys=False)
    if record.kernels:
        kernels = {
            TrialAttr.KERNELS: dict(record.kernels),
            TrialAttr.FALLBACKS: dict(record.fallbacks),
            "latency": dict(record.latency_info),
        }
        texts["kernels.json"] = json.dumps(kernels, indent=1)
    metrics = trial_metrics(record, Measurements.from_attrs(ref).size_bytes)
    if record.qat.get("checkpoint"):  # the QAT stage: success before it, its cost
        tags["qat"] = "true"
        for key in ("ptq_success", "steps", "seconds", "loss_first", "loss_last"):
            if isinstance(record.qat.get(key), int | float):
                metrics[f"qat_{key}"] = float(record.qat[key])
    if record.refined:  # a close call: what the full budget said before it was decided
        tags["close_call"] = "true"
        for key in ("success_before", "success_lo_before", "success_hi_before"):
            if isinstance(record.refined.get(key), int | float):
                metrics[key] = float(record.refined[key])
    status = _STATUS.get(record.state, "FAILED")
    return TrialRun(record.number, tags, flat_params(record), metrics, texts, status)


def study_params(cfg: SearchConfig, ref: dict[str, Any]) -> dict[str, str]:
    """The parent run's params: what the study searched, how, and on which target."""
    return {
        "sampler": cfg.sampler,
        "backend": cfg.latency.backend,
        "model": cfg.model,
        "task": cfg.task,
        "objectives": ",".join(cfg.objectives),
        "task_budget": str(cfg.task_budget),
        "screen_budget": str(cfg.screen_budget),
        "latency_threads": str(cfg.latency.threads),
        "seed": str(cfg.seed),
        "target": str((ref.get("latency_info") or {}).get("cpu", "unknown")),
    }


def study_metrics(ref: dict[str, Any]) -> dict[str, float]:
    """The float reference's figures, as ``float.<name>``."""
    metrics = Measurements.from_attrs(ref).as_metrics()
    return {f"float.{k.replace('/', '.')}": v for k, v in metrics.items()}


STUDY_RUN_TAG = "mpq_study_run"  # a trial's run -> its study's run
# MLflow 3's experiment type (the UI reads it: runs table, not the GenAI traces view)
EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT = "mlflow.experimentKind", "custom_model_development"


class Tracker:
    """Logs a study to MLflow; every call survives a tracking outage."""

    def __init__(self, cfg: SearchConfig, console: Console | None = None) -> None:
        self.cfg = cfg
        self.console = console or Console(stderr=True)
        self.uri = cfg.tracking_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        self.parent_id: str | None = None
        self.runs: dict[int, str] = {}
        self.partial: dict[int, str] = {}  # trial -> run created but not fully logged
        self.down = False
        self.missed = False  # trials that an outage kept out of MLflow, not back-filled yet
        self.experiment_id: str | None = None
        try:
            self.experiment_id = self._experiment()
        except OUTAGE_ERRORS as exc:
            if cfg.tracking.required:
                raise ValueError(
                    f"tracking uri {masked_url(self.uri)!r} does not answer: {_line(exc)}"
                ) from None
            self._outage(exc)

    def _experiment(self) -> str:
        """The study's experiment, created where missing, typed as model development (MLflow
        3 opens an experiment without a type in its GenAI view: traces, not runs)."""
        exp = self.client.get_experiment_by_name(self.cfg.name)
        if exp is not None:
            if exp.tags.get(EXPERIMENT_KIND_TAG) != MODEL_DEVELOPMENT:
                self.client.set_experiment_tag(
                    exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT
                )
            return str(exp.experiment_id)
        location = None
        if self.uri.startswith("sqlite:"):
            location = (Path(self.cfg.output_dir).resolve() / "mlartifacts").as_uri()
        return str(
            self.client.create_experiment(
                self.cfg.name,
                artifact_location=location,
                tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT},
            )
        )

    def _outage(self, exc: BaseException) -> None:
        if not self.down:
            self.console.print(
                f"[yellow]tracking unavailable[/] ({_line(exc)}); trials stay in "
                "Optuna storage and are back-filled by resume or `mpq sync`"
            )
        self.down = True
        self.missed = True

    def _guard(self, fn: Callable[..., T], *args: Any) -> T | None:
        """``fn(*args)`` (MLflow client calls only); an outage is reported once, None back."""
        try:
            if self.experiment_id is None:
                self.experiment_id = self._experiment()
            out = fn(*args)
        except OUTAGE_ERRORS as exc:
            self._outage(exc)
            return None
        if self.down:
            self.down = False
            self.console.print("[green]tracking back[/]")
        return out

    def _experiment_id(self) -> str:
        if self.experiment_id is None:
            raise RuntimeError("tracking: no MLflow experiment (called outside the guard)")
        return self.experiment_id

    # -- study --------------------------------------------------------------------------------
    def start(self, study: optuna.Study, searching: bool = False) -> None:
        """Find or create the study's parent run, then back-fill every finished trial;
        ``searching``: a run of the search begins, so what ended the last one (``ended_by``)
        no longer holds and is removed until this one ends."""
        ref = dict(study.user_attrs.get(StudyAttr.FLOAT_REFERENCE, {}))
        params, metrics = study_params(self.cfg, ref), study_metrics(ref)
        self._guard(self._parent, study.study_name, params, metrics)
        if searching and self.parent_id is not None and not self.down:
            self._guard(self._clear_ended_by, self.parent_id)
        self._backfill(study)

    def _clear_ended_by(self, run_id: str) -> None:
        if ENDED_BY in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, ENDED_BY)

    def _parent(self, study_name: str, params: dict[str, str], metrics: dict[str, float]) -> None:
        self.load_runs(study_name)
        if self.parent_id is None:
            run = self.client.create_run(
                self._experiment_id(),
                run_name=study_name,
                tags={STUDY_TAG: study_name, KIND_TAG: "study"},
            )
            self.parent_id = run.info.run_id
            self._log(self.parent_id, params, metrics)

    def load_runs(self, study_name: str) -> None:
        """Find the study's parent run and the trials that already have runs."""
        query = f"tags.{STUDY_TAG} = '{study_name}'"
        for r in self.client.search_runs([self._experiment_id()], query, max_results=50000):
            if r.data.tags.get(KIND_TAG) == "study":
                self.parent_id = r.info.run_id
            elif TRIAL_TAG in r.data.tags:
                self.runs[int(r.data.tags[TRIAL_TAG])] = r.info.run_id

    def _backfill(self, study: optuna.Study) -> None:
        for t in study.get_trials(deepcopy=False):
            if self.down or self.parent_id is None:
                return
            if t.state.is_finished() and t.number not in self.runs:
                self._trial(study, t)

    def on_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.parent_id is None:
            self.start(study)  # back-fills every finished trial, this one included
            return
        self._trial(study, trial)
        if self.missed and not self.down:  # back after an outage: what it missed, now
            self.missed = False
            self._guard(self.load_runs, study.study_name)  # and what another search logged
            self._backfill(study)

    def _trial(self, study: optuna.Study, t: FrozenTrial) -> None:
        if t.number in self.runs or self.parent_id is None:
            return
        ref = dict(study.user_attrs.get(StudyAttr.FLOAT_REFERENCE, {}))
        self._guard(self._log_trial, trial_run(study.study_name, self.parent_id, t, ref))

    def _log_trial(self, run: TrialRun) -> None:
        name = f"trial-{run.number}"
        rid_s = self.partial.get(run.number)  # created, then an outage mid-log: finish that one
        if rid_s is None:
            rid = self.client.create_run(self._experiment_id(), run_name=name, tags=run.tags)
            rid_s = self.partial[run.number] = rid.info.run_id
        self._log(rid_s, run.params, run.metrics)
        for path, text in run.texts.items():
            self.client.log_text(rid_s, text, path)
        self.client.set_terminated(rid_s, run.status)
        self.runs[run.number] = rid_s
        self.partial.pop(run.number, None)

    def _log(self, rid: str, params: dict[str, str], metrics: dict[str, float]) -> None:
        p = [Param(k[:250], v[:6000]) for k, v in params.items()]
        m = [Metric(k[:250], v, 0, 0) for k, v in metrics.items()]
        for i in range(0, max(len(p), len(m), 1), _MAX_BATCH):
            batch_p, batch_m = p[i : i + _MAX_BATCH], m[i : i + _MAX_BATCH]
            self.client.log_batch(rid, metrics=batch_m, params=batch_p, tags=[])

    # -- end of study -------------------------------------------------------------------------
    def finish(
        self,
        study: optuna.Study,
        plot_paths: list[Path] | None = None,
        interrupted: bool = False,
        status: str | None = "FINISHED",
        out_of_time: bool = False,
    ) -> None:
        """Back-fill, tag the front, log hypervolume, the front table and the plots (the
        files ``plot_paths``, else made here); tag what ended this run of the search
        (``ended_by``: ``trial budget``, ``time budget`` before the trial budget, or
        ``interrupted``)."""
        import shutil
        import tempfile

        from mpq.search import plots

        self.start(study)
        front = {t.number for t in front_trials(study)}
        history = [Metric("hypervolume", hv, 0, n) for n, hv in hypervolume_history(study)]
        with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as drawn:
            out = Path(tmp)  # what is logged: the table and the PNGs, nothing else
            front_table(study).to_csv(out / "pareto_front.csv", index=False)
            made = plot_paths if plot_paths is not None else plots.write_all(study, Path(drawn))
            for path in made:  # PNGs: MLflow's artifact viewer runs no plotly (HTML: blank)
                if path.suffix == ".png":
                    shutil.copy(path, out / path.name)
            if self.parent_id is not None and not self.down:
                if interrupted:  # Ctrl-C: not a finished study
                    status = "KILLED"
                ended = "interrupted" if interrupted else "time budget" if out_of_time else None
                ended = ended or ("trial budget" if status == "FINISHED" else None)
                self._guard(self._finish, front, history, out, len(study.trials), status, ended)

    def _finish(
        self,
        front: set[int],
        history: list[Metric],
        artifacts: Path,
        n: int,
        status: str | None,
        ended_by: str | None,
    ) -> None:
        parent = self.parent_id
        if parent is None:
            raise RuntimeError("tracking: finish without a parent run")
        for number, rid in self.runs.items():
            self.client.set_tag(rid, "on_front", str(number in front).lower())
        for i in range(0, len(history), 1000):
            self.client.log_batch(parent, metrics=history[i : i + 1000])
        self.client.log_artifacts(parent, str(artifacts))
        self.client.set_tag(parent, "trials", str(n))
        if ended_by is not None:
            self.client.set_tag(parent, ENDED_BY, ended_by)
        if status is not None:
            self.client.set_terminated(parent, status)

    def finetuned(
        self, study: optuna.Study, info: dict[str, Any], trial: int | None, png: Path
    ) -> None:
        """Log an ``mpq finetune`` as a run tagged with the study's: the loss curve as a
        metric per step, the plot and ``qat.json``."""
        self.start(study)
        if self.parent_id is None or self.down:
            return
        run = finetune_run(info, trial)
        run.tags |= {STUDY_TAG: study.study_name, STUDY_RUN_TAG: self.parent_id}
        self._guard(self._log_finetune, run, info["loss"], png)

    def _log_finetune(self, run: TrialRun, losses: list[float], png: Path) -> None:
        name = "finetune" + ("" if run.number < 0 else f"-trial-{run.number}")
        rid = self.client.create_run(self._experiment_id(), run_name=name, tags=run.tags)
        rid_s = rid.info.run_id
        self._log(rid_s, run.params, run.metrics)
        loss = [Metric("qat_loss", v, 0, i + 1) for i, v in enumerate(losses)]
        for i in range(0, len(loss), 1000):
            self.client.log_batch(rid_s, metrics=loss[i : i + 1000])
        for path, text in run.texts.items():
            self.client.log_text(rid_s, text, path)
        self.client.log_artifact(rid_s, str(png))
        self.client.set_terminated(rid_s, run.status)

    def confirm(self, study: optuna.Study, number: int, metrics: dict[str, float]) -> None:
        """Log an exported trial's held-out confirmation on its run (``confirm_*`` metrics)."""
        measured = Measurements.from_attrs(metrics).as_metrics()
        values = {f"confirm_{k}".replace("/", "."): v for k, v in measured.items()}
        self._guard(self._confirm, study.study_name, number, values)

    def _confirm(self, study_name: str, number: int, values: dict[str, float]) -> None:
        if number not in self.runs:
            self.load_runs(study_name)
        rid = self.runs.get(number)
        if rid is None:
            return
        for k, v in values.items():
            self.client.log_metric(rid, k, v)
        self.client.set_tag(rid, "exported", "true")


def finetune_run(info: dict[str, Any], trial: int | None) -> TrialRun:
    """The run of one ``mpq finetune``: its settings, the loss per step, success before and
    after, time and bytes (tagged with the study's run)."""
    settings = {f"qat.{k}": str(v) for k, v in info["settings"].items()}
    metrics = {f"ptq_{k}": v for k, v in info["ptq"].items()}
    metrics |= {f"qat_{k}": v for k, v in info["qat"].items()}
    metrics |= {"qat_seconds": info["seconds"], "size_bytes": float(info["size_bytes"])}
    tags = {KIND_TAG: "finetune", "out_dir": info["out_dir"]}
    if trial is not None:
        tags[TRIAL_TAG + "_finetuned"] = str(trial)
    texts = {"qat.json": json.dumps({k: v for k, v in info.items() if k != "loss"}, indent=1)}
    return TrialRun(-1 if trial is None else trial, tags, settings, metrics, texts, "FINISHED")


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def sync(cfg: SearchConfig, study: optuna.Study, console: Console | None = None) -> int:
    """Back-fill every finished trial that has no MLflow run; returns how many were added."""
    tracker = Tracker(cfg, console)
    tracker._guard(tracker.load_runs, study.study_name)
    before = len(tracker.runs)
    tracker.finish(study, status=None)  # the study's run keeps its state (KILLED, RUNNING)
    if tracker.down:
        raise ValueError(f"tracking uri {masked_url(tracker.uri)!r} does not answer")
    return len(tracker.runs) - before
