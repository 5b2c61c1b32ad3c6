"""Create or resume the Optuna study; turn the space into distributions and back.

Each searched dimension of each layer (``spaces.space.DIMENSIONS``) is one parameter:
``<layer>.<dim>_rank`` for ordered ones (bits: the option's rank), ``<layer>.<dim>`` for the
others; dimensions with a single option are not searched. A fused group (the space's
``groups``) is one decision: its first layer's parameters, followed by the others. The study
lives in an RDB storage (SQLite by default) with heartbeats, so trials of a process that
died are found stale and failed instead of staying "running" forever.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution

from mpq.search.config import SearchConfig
from mpq.search.record import StudyAttr
from mpq.search.storage import make_storage
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


def make_sampler(cfg: SearchConfig, residual: bool = True) -> optuna.samplers.BaseSampler:
    """The config's sampler (``mpq``: the model-based one, bound to the space by the runner;
    ``residual=False``: its success model without the ridge correction, for benchmarks)."""
    if cfg.sampler == "mpq":
        from mpq.search.model_sampler import ModelBasedSampler

        c = cfg.constraints
        return ModelBasedSampler(
            seed=cfg.seed,
            max_success_drop=c.max_success_drop,
            max_size_bytes=c.max_size_bytes,
            max_latency_ms=c.max_latency_ms,
            residual=residual,
            qat=cfg.qat.when == "infeasible",
        )
    if cfg.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=cfg.population_size, seed=cfg.seed)
    if cfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True, n_startup_trials=8)
    if cfg.sampler == "gp":
        return optuna.samplers.GPSampler(seed=cfg.seed)
    return optuna.samplers.RandomSampler(seed=cfg.seed)


def refuse_existing(cfg: SearchConfig, storage: optuna.storages.BaseStorage | None = None) -> None:
    """Raise ``ValueError`` when the study exists (a new search must not continue it
    silently); cheap, so ``mpq search`` checks it before starting Ray."""
    if storage is None and cfg.storage is None and not Path(cfg.output_dir, "study.db").exists():
        return  # no database yet: nothing to refuse (and none is created by looking)
    storage = storage or make_storage(cfg.storage_url(), cfg.storage_retry_s)
    if cfg.name in optuna.study.get_all_study_names(storage):
        raise ValueError(
            f"study {cfg.name!r} already exists in {cfg.storage_shown()}; "
            "use --resume to continue it or pick another name"
        )


def load_existing(cfg: SearchConfig) -> optuna.Study:
    """The study of ``cfg`` as stored, for reading it (export, fine-tuning, sync): nothing is
    created, and one measured under another setup (the fingerprint: model, task, space,
    budgets, backend) is refused, so nothing is written about it under the wrong name. Where
    its latency was timed (the fingerprint's target: a CPU, a cluster, an agent) is not
    checked: reading times nothing, and a study searched on a cluster is read from anywhere.

    Raises:
        ValueError: no such study, or its fingerprint differs from this config's.
    """
    from mpq.evaluators.evaluator import get_evaluator
    from mpq.search import fingerprint
    from mpq.search.worker import eval_spec

    missing = ValueError(f"no study {cfg.name!r} in {cfg.storage_shown()}: run mpq search first")
    if cfg.storage is None and not Path(cfg.output_dir, "study.db").exists():
        raise missing  # and no database created by looking
    storage = make_storage(cfg.storage_url(), cfg.storage_retry_s)
    if cfg.name not in optuna.study.get_all_study_names(storage):
        raise missing
    study = optuna.load_study(study_name=cfg.name, storage=storage, sampler=make_sampler(cfg))
    fingerprint.check_study(study, cfg, get_evaluator(eval_spec(cfg)).model, ignore=("target",))
    return study


def open_study(cfg: SearchConfig, resume: bool) -> optuna.Study:
    """Create the study; with ``resume``, continue it if it exists (else create it).

    Raises:
        ValueError: the study exists and ``resume`` is False (nothing is overwritten), or its
            objectives differ from the config's.
    """
    storage = make_storage(cfg.storage_url(), cfg.storage_retry_s)
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
