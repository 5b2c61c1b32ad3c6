"""A benchmark's search runs kept in a folder, so that a rerun reuses the ones that finished."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

WALL_S = "benchmark:wall_s"  # a finished run's wall time, kept with its study
SETUP = "benchmark:setup"  # what a rerun must match to reuse it (budgets, seed, ...)


def run_or_reuse(cfg: Any, setup: list[float]) -> tuple[Any, float]:
    """One run from an empty ``cfg.output_dir``, or the finished one of the same ``setup``
    already there: ``(study, wall seconds)``."""
    import optuna

    from mpq.search.session import run_search

    if Path(cfg.output_dir, "study.db").exists():
        study = optuna.load_study(study_name=cfg.name, storage=cfg.storage_url())
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
