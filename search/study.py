"""Create or resume the Optuna study; turn the space into distributions and back.

Each searched dimension of each layer (``spaces.space.DIMENSIONS``) is one parameter:
``<layer>.<dim>_rank`` for ordered ones (bits: the option's rank), ``<layer>.<dim>`` for the
others; dimensions with a single option are not searched. A fused group (the space's
``groups``) is one decision: its first layer's parameters, followed by the others. The study
lives in an RDB storage (SQLite by default) with heartbeats, so trials of a process that
died are found stale and failed instead of staying "running" forever.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution

from mpq.search.config import SearchConfig, masked_url
from mpq.search.hygiene import GRACE_PERIOD_S, HEARTBEAT_INTERVAL_S
from mpq.search.record import StudyAttr
from mpq.spaces.space import DIMENSIONS, Dimension, LayerOptions, QuantConfig


def param_name(layer: str, dim: Dimension) -> str:
    """``fuse.w_bits_rank`` for an ordered dimension (its value: the rank of the option, 0 =
    the smallest), ``fuse.granularity`` for an unordered one (its value: the option)."""
    return f"{layer}.{dim.name}_rank" if dim.ordered else f"{layer}.{dim.name}"


def _options(options: LayerOptions, dim: Dimension) -> tuple[Any, ...]:
    values = tuple(getattr(options, dim.name))
    return tuple(sorted(values)) if dim.ordered else values


def distributions(resolved: dict[str, LayerOptions]) -> dict[str, BaseDistribution]:
    """One Optuna parameter per searched dimension of each layer (one with a single option is
    not searched): ordered dimensions as integer ranks (``IntDistribution``), so samplers that
    model order (TPE, GP) see that 4 bits lies between 3 and 6; the others as categories."""
    out: dict[str, BaseDistribution] = {}
    for name, options in resolved.items():
        if _leader(name, options) != name:  # follows its fused group's first layer
            continue
        for dim in DIMENSIONS:
            values = _options(options, dim)
            if len(values) < 2:
                continue
            if dim.ordered:
                out[param_name(name, dim)] = IntDistribution(0, len(values) - 1)
            else:
                out[param_name(name, dim)] = CategoricalDistribution(list(values))
    return out


def config_from_params(resolved: dict[str, LayerOptions], params: dict[str, Any]) -> QuantConfig:
    """The configuration a trial's parameters stand for (unsearched dimensions: their option)."""
    layers = {}
    for name, options in resolved.items():
        pick = {}
        leader = _leader(name, options)
        for dim in DIMENSIONS:
            values = _options(options, dim)
            value = params.get(param_name(leader, dim), 0 if dim.ordered else values[0])
            pick[dim.name] = values[int(value)] if dim.ordered else value
        layers[name] = options.first(**pick)
    return QuantConfig(layers=layers)


def params_from_config(resolved: dict[str, LayerOptions], config: QuantConfig) -> dict[str, Any]:
    """The parameters of ``config`` (to enqueue it as a trial).

    Raises:
        ValueError: a choice of ``config`` is not an option of the space, or splits a fused
            group.
    """
    params: dict[str, Any] = {}
    for name, options in resolved.items():
        leader = _leader(name, options)
        if leader != name:
            if config.layers[name] != config.layers[leader]:
                raise ValueError(
                    f"seed config: layers[{name!r}] differs from layers[{leader!r}], the first "
                    "layer of its fused group (one decision)"
                )
            continue
        for dim in DIMENSIONS:
            values = _options(options, dim)
            value = getattr(config.layers[name], dim.name)
            if len(values) < 2:
                continue
            if value is None:  # not applicable to this choice (a group size without groups)
                value = values[0]
            if value not in values:
                raise ValueError(
                    f"seed config: layers[{name!r}].{dim.name}={value} not in the space"
                )
            params[param_name(name, dim)] = values.index(value) if dim.ordered else value
    return params


def _leader(name: str, options: LayerOptions) -> str:
    """The layer whose parameters decide ``name``'s choice: its fused group's first, or itself."""
    return options.fused_with or name


def make_sampler(cfg: SearchConfig) -> optuna.samplers.BaseSampler:
    """The config's sampler (``mpq``: the model-based one, bound to the space by the runner)."""
    if cfg.sampler == "mpq":
        from mpq.search.model_sampler import ModelBasedSampler

        c = cfg.constraints
        return ModelBasedSampler(
            seed=cfg.seed,
            max_success_drop=c.max_success_drop,
            max_size_bytes=c.max_size_bytes,
            max_latency_ms=c.max_latency_ms,
        )
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=cfg.population_size, seed=cfg.seed)
    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True, n_startup_trials=8)
    if cfg.sampler == "gp":
        return optuna.samplers.GPSampler(seed=cfg.seed)
    return optuna.samplers.RandomSampler(seed=cfg.seed)


def make_storage(url: str, attempts: int = 5) -> optuna.storages.RDBStorage:
    """The study's RDB storage, with heartbeats.

    NOTE: two searches started at once on a new database race to create its schema (SQLAlchemy:
    "table studies already exists", or alembic's version row inserted twice). For SQLite the
    creation is serialised with a lock file next to the database; for other databases it is
    retried, and the winner's schema is then simply loaded.
    """
    engine = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
    lock = contextlib.nullcontext()
    if url.startswith("sqlite:///"):
        db = Path(url.removeprefix("sqlite:///"))
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"storage folder {str(db.parent)!r}: {exc.strerror or exc}") from None
        lock = _file_lock(db.with_name(f".{db.name}.lock"))
    try:
        with lock:
            return _connect(url, engine, attempts)
    except OSError as exc:  # the lock file: a read-only folder
        raise ValueError(f"storage {masked_url(url)}: {exc.strerror or exc}") from None
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
        raise ValueError(f"storage {masked_url(url)}: {root_cause(exc)}") from None


def root_cause(exc: BaseException) -> str:
    """The innermost error's first line (SQLite's "unable to open database file", not
    Optuna's "e.g. exceeding max length" guess around it)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


def _connect(url: str, engine: dict[str, Any], attempts: int) -> optuna.storages.RDBStorage:
    """The RDB storage, retried while another process is creating the same schema."""
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=HEARTBEAT_INTERVAL_S,
                grace_period=GRACE_PERIOD_S,
            )
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as exc:
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


def refuse_existing(cfg: SearchConfig, storage: optuna.storages.BaseStorage | None = None) -> None:
    """Raise ``ValueError`` when the study exists (a new search must not continue it
    silently); cheap, so ``mpq search`` checks it before starting Ray."""
    if storage is None and cfg.storage is None and not Path(cfg.output_dir, "study.db").exists():
        return  # no database yet: nothing to refuse (and none is created by looking)
    storage = storage or make_storage(cfg.storage_url())
    if cfg.name in optuna.study.get_all_study_names(storage):
        raise ValueError(
            f"study {cfg.name!r} already exists in {cfg.storage_shown()}; "
            "use --resume to continue it or pick another name"
        )


def load_existing(cfg: SearchConfig) -> optuna.Study:
    """The study of ``cfg`` as stored, for reading it (export, fine-tuning, sync): nothing is
    created, and one measured under another setup (the fingerprint: model, task, space,
    budgets, backend, CPU) is refused, so nothing is written about it under the wrong name.

    Raises:
        ValueError: no such study, or its fingerprint differs from this config's.
    """
    from mpq.evaluators.evaluator import get_evaluator
    from mpq.search import fingerprint
    from mpq.search.worker import eval_spec

    missing = ValueError(f"no study {cfg.name!r} in {cfg.storage_shown()}: run mpq search first")
    if cfg.storage is None and not Path(cfg.output_dir, "study.db").exists():
        raise missing  # and no database created by looking
    storage = make_storage(cfg.storage_url())
    if cfg.name not in optuna.study.get_all_study_names(storage):
        raise missing
    study = optuna.load_study(study_name=cfg.name, storage=storage, sampler=make_sampler(cfg))
    fingerprint.check_study(study, cfg, get_evaluator(eval_spec(cfg)).model)
    return study


def open_study(cfg: SearchConfig, resume: bool) -> optuna.Study:
    """Create the study; with ``resume``, continue it if it exists (else create it).

    Raises:
        ValueError: the study exists and ``resume`` is False (nothing is overwritten), or its
            objectives differ from the config's.
    """
    storage = make_storage(cfg.storage_url())
    if not resume:
        refuse_existing(cfg, storage)
    study = optuna.create_study(
        storage=storage,
        study_name=cfg.name,
        directions=cfg.directions,
        sampler=make_sampler(cfg),
        load_if_exists=True,
    )
    stored = study.user_attrs.get(StudyAttr.OBJECTIVES)
    if stored is None:
        study.set_user_attr(StudyAttr.OBJECTIVES, list(cfg.objectives))
        # Optuna's own names for the values: optuna-dashboard and trials_dataframe show them
        study.set_metric_names(list(cfg.objectives))
    elif list(stored) != list(cfg.objectives):
        raise ValueError(
            f"study {cfg.name!r} has objectives {stored}, config {list(cfg.objectives)}"
        )
    return study
