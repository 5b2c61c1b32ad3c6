"""Load: a search of many cheap trials with 2 Ray workers and MLflow tracking on.

    python benchmarks/load.py [--trials 200] [--workers 1 2] [--config SEARCH.yaml]

Model: the tests' small ConvNet, task: agreement with the float model on 32 inputs, latency off
(the point is the orchestration). Reports trials per minute, the orchestration overhead per trial
(wall time x workers / trials, minus the time spent inside the evaluation itself: Optuna ask/
tell, Ray scheduling and transfer, MLflow logging), and whether the MLflow run count equals the
Optuna trial count at the end. With ``--config`` (e.g. ``examples/babyai/search.yaml``) the
same figures for a real search: trials per hour, and orchestration overhead as a share of the
wall time per trial (wall x workers / trials; the evaluation time counts both stages).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from mpq.search.config import SearchConfig, load_search_config
    from mpq.search.record import TrialAttr
    from mpq.search.session import run_search
    from mpq.search.tracking import Tracker

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--workers", type=int, nargs="+", default=[2])
    p.add_argument("--config", default=None, help="a search config instead of the cheap one")
    args = p.parse_args()
    print(
        "| search | trials | workers | wall s | trials/hour | eval s/trial (mean) | "
        "overhead s/trial (share) | duplicates answered | MLflow runs = Optuna trials |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            common = {
                "trials": args.trials,
                "output_dir": tmp,
                "ray": {"workers": workers},
                "tracking": {"enabled": True},
            }
            if args.config:
                cfg = load_search_config(args.config, **common)
            else:
                cfg = SearchConfig.model_validate({**CHEAP, **common})
            start = time.perf_counter()
            study = run_search(cfg).study
            wall = time.perf_counter() - start
            finished = [t for t in study.trials if t.state.is_finished()]
            evaluated = [
                t.user_attrs["eval_s"]
                for t in finished
                if "eval_s" in t.user_attrs and TrialAttr.DUPLICATE_OF not in t.user_attrs
            ]
            tracker = Tracker(cfg)  # the runs MLflow holds for the study's trials
            tracker.load_runs(study.study_name)
            runs = tracker.runs
            per_trial = wall * workers / len(finished)
            overhead = per_trial - statistics.mean(evaluated)
            dups = sum(TrialAttr.DUPLICATE_OF in t.user_attrs for t in finished)
            print(
                f"| {cfg.name} | {len(finished)} | {workers} | {wall:.0f} | "
                f"{len(finished) / wall * 3600:.0f} | {statistics.mean(evaluated):.3f} | "
                f"{overhead:.3f} ({100 * overhead / per_trial:.0f}%) | {dups} | "
                f"{len(runs)} = {len(finished)}: {len(runs) == len(finished)} |",
                flush=True,
            )


CHEAP = {
    "name": "load",
    "model": "tests.models:build_convnet",
    "task": "tests.models:convnet_task",
    "calibration": "tests.models:convnet_calibration",
    "objectives": ["success", "size_bytes"],
    "task_budget": 32,
    "sampler": "random",
    "latency": {"enabled": False},
    "sensitivity": {"enabled": False},
    "space": {"defaults": {"w_bits": [2, 3, 4, 5, 6, 8, 32], "a_bits": [8, 32]}},
}


if __name__ == "__main__":
    main()
