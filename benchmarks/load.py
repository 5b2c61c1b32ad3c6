"""Load: a search of many cheap trials with 2 Ray workers and MLflow tracking on.

    python benchmarks/load.py [--trials 200] [--workers 2]

Model: the tests' small ConvNet, task: agreement with the float model on 32 inputs, latency off
(the point is the orchestration). Reports trials per minute, the orchestration overhead per trial
(wall time x workers / trials, minus the time spent inside the evaluation itself: Optuna ask/
tell, Ray scheduling and transfer, MLflow logging), and whether the MLflow run count equals the
Optuna trial count at the end.
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
    import ray
    from mlflow.tracking import MlflowClient

    from mpq.search.config import SearchConfig
    from mpq.search.runner import Runner, init_ray
    from mpq.search.tracking import Tracker

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SearchConfig.model_validate(
            {
                "name": "load",
                "model": "tests.models:build_convnet",
                "task": "tests.models:convnet_task",
                "calibration": "tests.models:convnet_calibration",
                "objectives": ["success", "size_bytes"],
                "task_budget": 32,
                "trials": args.trials,
                "sampler": "random",
                "output_dir": tmp,
                "latency": {"enabled": False},
                "sensitivity": {"enabled": False},
                "ray": {"workers": args.workers},
                "space": {"defaults": {"w_bits": [2, 3, 4, 5, 6, 8, 32], "a_bits": [8, 32]}},
            }
        )
        init_ray(cfg)
        tracker = Tracker(cfg)
        start = time.perf_counter()
        runner = Runner(cfg, on_trial=tracker.on_trial)
        runner.prepare()
        tracker.start(runner.study)
        study = runner.run().study
        tracker.finish(study)
        wall = time.perf_counter() - start
        ray.shutdown()
        finished = [t for t in study.trials if t.state.is_finished()]
        evaluated = [
            t.user_attrs["eval_s"]
            for t in finished
            if "eval_s" in t.user_attrs and "duplicate_of" not in t.user_attrs
        ]
        client = MlflowClient(cfg.tracking_uri())
        exp = client.get_experiment_by_name("load")
        runs = client.search_runs(
            [exp.experiment_id], "tags.mpq_kind = 'trial'", max_results=10000
        )
        per_trial = wall * args.workers / len(finished)
        print(
            "| trials | workers | wall s | trials/min | eval s/trial (mean) | "
            "overhead s/trial | duplicates answered | MLflow runs = Optuna trials |"
        )
        print("|---|---|---|---|---|---|---|---|")
        dups = sum("duplicate_of" in t.user_attrs for t in finished)
        print(
            f"| {len(finished)} | {args.workers} | {wall:.0f} | {len(finished) / wall * 60:.0f} | "
            f"{statistics.mean(evaluated):.3f} | {per_trial - statistics.mean(evaluated):.3f} | "
            f"{dups} | {len(runs)} = {len(finished)}: {len(runs) == len(finished)} |"
        )


if __name__ == "__main__":
    main()
