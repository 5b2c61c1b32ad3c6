"""The search's front with its QAT stage off and on, at equal wall time.

    python benchmarks/qat_search.py [--config examples/babyai/tiny.yaml] [--time-budget-s 1200]
        [--seed 0] [--qat-steps 1000 250] [--trial-timeout-s S] [--out DIR]

Searches of the example, identical but for ``qat.when`` (``never``; then ``infeasible``, once
per ``--qat-steps`` value: a trial whose post-training success misses the constraint while its
optimistic figures would reach the front is fine-tuned with the config's ``qat:`` settings at
that many steps, then evaluated again). Each starts from an empty folder, with the same sampler
seed, and gets the same ``time_budget_s``: no trial starts after it (the ones running finish,
so each run's wall time is printed). All are judged against the union of every feasible point
they measured (``-success``, ``size / float size``, ``1 / paired speed-up``:
``search/pareto.py``): each run's share of that reference's hypervolume; then each front, with
what QAT won back on its points. With ``--out``, a rerun reuses the runs that finished there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/_runs.py


def main() -> None:
    from _runs import run_or_reuse

    from mpq.search.config import load_search_config
    from mpq.search.record import StudyAttr

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "examples/babyai/tiny.yaml"))
    p.add_argument("--time-budget-s", type=float, default=1200.0)
    p.add_argument("--seed", type=int, default=0, help="sampler seed (every run)")
    p.add_argument(
        "--qat-steps",
        type=int,
        nargs="+",
        default=None,
        help="one QAT-on run per value (default: the config's qat.steps)",
    )
    p.add_argument(
        "--trial-timeout-s",
        type=float,
        default=None,
        help="each stage's time limit, every run (default: the config's trial_timeout_s)",
    )
    p.add_argument(
        "--out", default=None, help="keep the studies here; a rerun reuses finished runs"
    )
    args = p.parse_args()
    base = load_search_config(args.config)
    arms = {"QAT stage off": ("never", base.qat.steps)}
    for steps in args.qat_steps or [base.qat.steps]:
        arms[f"QAT stage on, {steps} steps"] = ("infeasible", steps)
    timeout_s = base.trial_timeout_s if args.trial_timeout_s is None else args.trial_timeout_s
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        for label, (when, steps) in arms.items():
            # the config's own steps keep the plain name: a rerun with more values reuses it
            tag = when if steps == base.qat.steps or when == "never" else f"{when}-{steps}"
            data = base.model_dump()
            data |= {
                "name": f"{base.name}-qat-{tag}",
                "seed": args.seed,
                "trials": 10_000,  # the time budget ends it
                "time_budget_s": args.time_budget_s,
                "trial_timeout_s": timeout_s,
                "output_dir": str(root / tag),
                "storage": None,
                "tracking": {"enabled": False},
                "qat": {**data["qat"], "when": when, "steps": steps},
            }
            setup = {"time_budget_s": args.time_budget_s, "seed": args.seed}
            runs[label] = run_or_reuse(type(base).model_validate(data), setup)
            print(f"# {label}: {runs[label][1]:.0f} s", flush=True)
        _summary(base, args.time_budget_s, args.seed, timeout_s, runs)
        for label, (study, _) in runs.items():
            _front(label, study)
        ref = next(iter(runs.values()))[0].user_attrs[StudyAttr.FLOAT_REFERENCE]
        print(
            f"\nfloat: success {ref['success']:.3f}, {ref['size_bytes']:,} bytes; constraint: "
            f"success >= float - {base.constraints.max_success_drop}"
        )


def _summary(
    base: Any, budget_s: float, seed: int, timeout_s: float, runs: dict[str, tuple[Any, float]]
) -> None:
    """Wall time, trials, QAT stages, front and share of the union's hypervolume per run."""
    from mpq.search.pareto import front_trials, hypervolume_of, normalised_losses
    from mpq.search.record import StudyAttr, TrialAttr

    objectives = list(next(iter(runs.values()))[0].user_attrs[StudyAttr.OBJECTIVES])
    union = np.concatenate([normalised_losses(s) for s, _ in runs.values()])
    ref_hv = hypervolume_of(union, objectives)
    q = base.qat
    print(
        f"\n{base.name}: time budget {budget_s:.0f} s per run, sampler {base.sampler} seed "
        f"{seed}, {base.task_budget} episodes per level, a stage's time limit {timeout_s:.0f} "
        f"s; QAT stage: lr {q.lr}, data "
        f"{q.data or 'calibration'}. Reference: the union of {len(union)} "
        f"feasible points, hypervolume {ref_hv:.4f}.\n"
    )
    print(
        "| run | wall s | trials finished | QAT stages (s in all) | front points (after QAT) "
        "| share of the reference |"
    )
    print("|---|---|---|---|---|---|")
    for label, (study, wall) in runs.items():
        finished = [t for t in study.trials if t.state.is_finished()]
        own = [t for t in finished if TrialAttr.DUPLICATE_OF not in t.user_attrs]  # not copies
        qat = [t.user_attrs[TrialAttr.QAT] for t in own if TrialAttr.QAT in t.user_attrs]
        qat_s = sum(float(x.get("seconds", 0)) for x in qat)
        front = [t for t in front_trials(study) if TrialAttr.DUPLICATE_OF not in t.user_attrs]
        tuned = sum(1 for t in front if t.user_attrs.get(TrialAttr.QAT, {}).get("steps"))
        share = hypervolume_of(normalised_losses(study), objectives) / ref_hv if ref_hv else 0
        print(
            f"| {label} | {wall:.0f} | {len(finished)} | {len(qat)} ({qat_s:.0f}) | "
            f"{len(front)} ({tuned}) | {share:.3f} |"
        )
        for x in qat:
            if x.get("failed"):
                print(f"  QAT failed: {x['failed']}")


def _front(label: str, study: Any) -> None:
    """The run's front, smallest first, with the PTQ success of points QAT fine-tuned."""
    from mpq.search.pareto import format_speedup, format_success, front_table

    print(f"\n{label}: the front, smallest first\n")
    print("| trial | success | size_bytes | speed-up (95%) | QAT (PTQ success before) |")
    print("|---|---|---|---|---|")
    table = front_table(study)
    if table.empty:
        print("| (no feasible point) | | | | |")
        return
    for row in table.sort_values("size_bytes").to_dict("records"):
        r = {k: (None if pd.isna(v) else v) for k, v in row.items()}  # a column's NaN: absent
        qat = f"yes ({r['ptq_success']:.3f})" if r.get("qat_steps") else "no"
        print(
            f"| {r['trial']} | {format_success(r)} | {r['size_bytes']:,} | "
            f"{format_speedup(r)} | {qat} |"
        )


if __name__ == "__main__":
    main()
