"""mpq's search against what users would pick instead, on the embedded VLA policy.

    python benchmarks/compare.py [--budgets 24 48] [--seeds 0 1 2] [--episodes 50]

Rows, all measured in this run with the same task (fixed evaluation seeds, `--episodes` per
level), the same space and the same kernels (onnxruntime, batch 1, 1 thread):

- float; uniform W8A8; uniform W4A8; the greedy sensitivity allocation (HAWQ-V2/V3- and
  AIMET-AMP-style: lower the layer with the least KL increase per byte saved until the model
  fits) at 75/60/50% of the 8-bit size -- these are the seed trials of the mpq study;
- random search, plain NSGA-II and TPE without seeds, and mpq (sensitivity-seeded NSGA-II with
  screening), each at the same trial budget.

For each search: hypervolume of its feasible front after the first N trials for each budget N
(a study run to the largest budget; its first N trials are what a run of N trials would have
done with the same seed), reference point: success 0, float size, 2x float latency, objectives
normalised by the float model; the smallest feasible model and the best feasible paired
speed-up, trials, episodes spent and wall time. The seed configurations alone (greedy, uniform)
are scored the same way, each as a front of its own.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from optuna.trial import TrialState

from mpq.search.cluster import ray_session
from mpq.search.config import load_search_config
from mpq.search.pareto import hypervolume
from mpq.search.record import SEARCH, StudyAttr, TrialRecord
from mpq.search.session import run_search

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "random search": {"sampler": "random", "sensitivity": {"enabled": False}, "screen_budget": 0},
    "NSGA-II (plain)": {"sampler": "nsga2", "sensitivity": {"enabled": False}, "screen_budget": 0},
    "TPE (plain)": {"sampler": "tpe", "sensitivity": {"enabled": False}, "screen_budget": 0},
    "mpq (seeded NSGA-II + screening)": {},
}


def run_variant(base, overrides: dict, seed: int, trials: int, out: Path):  # type: ignore[no-untyped-def]
    data = base.model_dump()
    data.update(
        {
            "name": f"cmp-{abs(hash((str(overrides), seed))) % 10**8}",
            "seed": seed,
            "trials": trials,
            "output_dir": str(out),
            "storage": None,
            "tracking": {"enabled": False},
        }
    )
    for k, v in overrides.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) else v
    cfg = type(base).model_validate(data)
    start = time.perf_counter()
    study = run_search(cfg).study
    return study, time.perf_counter() - start


def feasible(t) -> bool:  # type: ignore[no-untyped-def]
    return TrialRecord.from_frozen(t).feasible


def row_of(t, ref) -> str:  # type: ignore[no-untyped-def]
    a = t.user_attrs
    return (
        f"{a['success']:.3f} ({a.get('success_lo', 0):.3f}-{a.get('success_hi', 0):.3f}) | "
        f"{ref['size_bytes'] / a['size_bytes']:.2f}x | {a.get('speedup', 0):.3f}x"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "examples/babyai/search.yaml"))
    p.add_argument("--budgets", type=int, nargs="+", default=[24, 48])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--episodes", type=int, default=50, help="task budget per level")
    args = p.parse_args()
    base = load_search_config(args.config, task_budget=args.episodes, screen_budget=10)
    base = base.model_copy(update={"population_size": 8})
    trials = max(args.budgets)
    results: dict[str, list] = {k: [] for k in VARIANTS}  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory() as tmp, ray_session(base):
        for name, overrides in VARIANTS.items():
            for seed in args.seeds:
                study, wall = run_variant(
                    base, overrides, seed, trials, Path(tmp) / f"{name}{seed}"
                )
                results[name].append((study, wall))
                print(
                    f"# {name} seed {seed}: hv {hypervolume(study):.4f} in {wall:.0f}s", flush=True
                )
    seeded = [s for s, _ in results["mpq (seeded NSGA-II + screening)"]]
    ref = seeded[0].user_attrs[StudyAttr.FLOAT_REFERENCE]
    print(
        f"\nFloat policy: success {ref['success']:.3f} ({ref['success_lo']:.3f}-"
        f"{ref['success_hi']:.3f}), {ref['size_bytes']:,} bytes, {ref['latency_ms']:.3f} ms "
        f"(onnxruntime, 1 thread). Constraint: success >= float - "
        f"{base.constraints.max_success_drop}. {args.episodes} episodes per level.\n"
    )
    print("| configuration | success (95% CI) | size ratio | speed-up (paired) |")
    print("|---|---|---|---|")
    for t in seeded[0].trials:
        proposed_by = TrialRecord.from_frozen(t).proposed_by
        if proposed_by != SEARCH and t.state == TrialState.COMPLETE:
            print(f"| {proposed_by} | {row_of(t, ref)} |")
    budgets = sorted(args.budgets)
    print(
        f"\n| search (seeds {args.seeds}) | "
        + " | ".join(f"hypervolume at {n} trials, mean (min-max)" for n in budgets)
        + " | smallest feasible: success, size ratio, speed-up | best feasible speed-up | "
        "trials complete/pruned/failed | episodes | wall s per trial |"
    )
    print("|---" * (len(budgets) + 6) + "|")
    for label, prefix in SEED_ROWS.items():  # the seed configurations alone
        hvs = [
            hypervolume(
                s,
                [t for t in s.trials if TrialRecord.from_frozen(t).proposed_by.startswith(prefix)],
            )
            for s in seeded
        ]
        cells = " | ".join(_spread(hvs) for _ in budgets)
        print(f"| {label} | {cells} | | | | | |")
    for name, runs in results.items():
        cells = " | ".join(
            _spread([hypervolume(s, _first(s, n)) for s, _ in runs]) for n in budgets
        )
        study = runs[0][0]
        feas = [t for t in study.trials if t.state == TrialState.COMPLETE and feasible(t)]
        small = min(feas, key=lambda t: t.user_attrs["size_bytes"]) if feas else None
        fast = max((t.user_attrs.get("speedup", 0) for t in feas), default=0)
        states = [t.state for t in study.trials]
        counts = "/".join(
            str(states.count(s)) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        )
        episodes = statistics.mean(
            sum(int(t.user_attrs.get("episodes", 0)) for t in s.trials) for s, _ in runs
        )
        per_trial = statistics.mean(w / len(s.trials) for s, w in runs)
        print(
            f"| {name} | {cells} | {row_of(small, ref) if small else 'none'} | {fast:.2f}x | "
            f"{counts} | {episodes:.0f} | {per_trial:.1f} |"
        )


SEED_ROWS = {
    "uniform W8A8 alone": "uniform-8",
    "uniform W4A8 alone": "uniform-4",
    "greedy sensitivity allocation alone (75/60/50%)": "greedy",
}


def _first(study, n: int):  # type: ignore[no-untyped-def]
    """The trials a run of ``n`` trials would have finished: the first ``n`` by number."""
    return [t for t in study.trials if t.number < n]


def _spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})"


if __name__ == "__main__":
    main()
