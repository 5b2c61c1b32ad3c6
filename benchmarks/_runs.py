"""A benchmark's search runs kept in a folder, so that a rerun reuses the ones that finished."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

WALL_S = "benchmark:wall_s"  # a finished run's wall time, kept with its study
SETUP = "benchmark:setup"  # what a rerun must match to reuse it


def run_or_reuse(cfg: Any, setup: dict[str, Any]) -> tuple[Any, float]:
    """One run from an empty ``cfg.output_dir``, or the finished one already there whose
    ``setup`` (the benchmark's own settings) and config (``config_digest``) match:
    ``(study, wall seconds)``."""
    import optuna

    from mpq.search.session import run_search

    setup = {**setup, "config": config_digest(cfg)}
    if Path(cfg.output_dir, "study.db").exists():
        try:
            study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url())
        except KeyError:
            raise SystemExit(f"{cfg.output_dir} holds another study than {cfg.name}") from None
        if WALL_S not in study.user_attrs:
            raise SystemExit(f"{cfg.output_dir} holds an unfinished run: remove it")
        if study.user_attrs.get(SETUP) != setup:
            raise SystemExit(
                f"{cfg.output_dir} holds a run of another setup ({study.user_attrs.get(SETUP)}, "
                f"not {setup}): remove it or pick another --out"
            )
        return study, float(study.user_attrs[WALL_S])
    start = time.perf_counter()
    result = run_search(cfg)
    if result.interrupted:
        raise SystemExit(f"interrupted: {cfg.output_dir} holds an unfinished run")
    result.study.set_user_attr(SETUP, setup)
    result.study.set_user_attr(WALL_S, time.perf_counter() - start)
    return result.study, float(result.study.user_attrs[WALL_S])


def config_digest(cfg: Any) -> str:
    """The run's config but for where it is kept: a rerun with another config or variant
    must not reuse it."""
    data = cfg.model_dump(mode="json", exclude={"output_dir"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
