"""Create or resume the Optuna study; turn the space into distributions and back.

Each searched dimension of each layer is one categorical parameter named ``<layer>/<dim>``
(``fuse/w_bits``); dimensions with a single option are not searched. The study lives in an RDB
storage (SQLite by default) with heartbeats, so trials of a process that died are found stale
and failed instead of staying "running" forever.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.distributions import BaseDistribution, CategoricalDistribution

from mpq.search.config import SearchConfig
from mpq.spaces.space import LayerChoice, LayerOptions, QuantConfig

# NOTE: heartbeats are marked experimental and "meant for Study.optimize"; the runner records
# them itself for its ask/tell trials, which is what makes stale trials detectable.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
DIMS = ("w_bits", "a_bits", "granularity", "symmetric", "act_mode")
HEARTBEAT_INTERVAL_S = 2
GRACE_PERIOD_S = 8


def distributions(resolved: dict[str, LayerOptions]) -> dict[str, BaseDistribution]:
    out: dict[str, BaseDistribution] = {}
    for name, options in resolved.items():
        for dim in DIMS:
            values = getattr(options, dim)
            if len(values) > 1:
                out[f"{name}/{dim}"] = CategoricalDistribution(list(values))
    return out


def config_from_params(resolved: dict[str, LayerOptions], params: dict[str, Any]) -> QuantConfig:
    layers = {}
    for name, options in resolved.items():
        pick = {dim: params.get(f"{name}/{dim}", getattr(options, dim)[0]) for dim in DIMS}
        pick["group_size"] = options.group_size if pick["granularity"] == "per_group" else None
        layers[name] = LayerChoice(**pick)
    return QuantConfig(layers=layers)


def params_from_config(resolved: dict[str, LayerOptions], config: QuantConfig) -> dict[str, Any]:
    params = {}
    for key, dist in distributions(resolved).items():
        name, dim = key.rsplit("/", 1)
        value = getattr(config.layers[name], dim)
        if value not in dist.choices:  # type: ignore[attr-defined]
            raise ValueError(f"seed config: layers[{name!r}].{dim}={value} not in the space")
        params[key] = value
    return params


def make_sampler(cfg: SearchConfig) -> optuna.samplers.BaseSampler:
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
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = _file_lock(db.with_name(f".{db.name}.lock"))
    with lock:
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


def open_study(cfg: SearchConfig, resume: bool) -> optuna.Study:
    """Create the study; with ``resume``, continue it if it exists (else create it).

    Raises:
        ValueError: the study exists and ``resume`` is False (nothing is overwritten), or its
            objectives differ from the config's.
    """
    storage = make_storage(cfg.storage_url())
    names = optuna.study.get_all_study_names(storage)
    if cfg.name in names and not resume:
        raise ValueError(
            f"study {cfg.name!r} already exists in {cfg.storage_url()}; "
            "use --resume to continue it or pick another name"
        )
    study = optuna.create_study(
        storage=storage,
        study_name=cfg.name,
        directions=cfg.directions,
        sampler=make_sampler(cfg),
        load_if_exists=True,
    )
    stored = study.user_attrs.get("objectives")
    if stored is None:
        study.set_user_attr("objectives", list(cfg.objectives))
    elif list(stored) != list(cfg.objectives):
        raise ValueError(
            f"study {cfg.name!r} has objectives {stored}, config {list(cfg.objectives)}"
        )
    return study


def objective_values(cfg: SearchConfig, metrics: dict[str, Any]) -> list[float]:
    return [float(metrics[o]) for o in cfg.objectives]


def constraint_values(
    cfg: SearchConfig, metrics: dict[str, Any], float_success: float
) -> dict[str, float]:
    """Named constraint values; <= 0 is satisfied (Optuna's ``Trial.set_constraint``)."""
    c = cfg.constraints
    out = {}
    if c.max_success_drop is not None:
        out["success_drop"] = float(float_success - c.max_success_drop - metrics["success"])
    if c.max_size_bytes is not None:
        out["size_budget"] = float(metrics["size_bytes"] - c.max_size_bytes)
    if c.max_latency_ms is not None and "latency_ms" in metrics:
        out["latency_budget"] = float(metrics["latency_ms"] - c.max_latency_ms)
    return out
