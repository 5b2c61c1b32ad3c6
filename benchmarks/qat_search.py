"""The search's front with its QAT stage off and on, at equal wall time.

    python benchmarks/qat_search.py [--config examples/babyai/tiny.yaml] [--time-budget-s 1200]
        [--seed 0]

Two searches of the example, identical but for ``qat.when`` (``never``, then ``infeasible``:
a trial whose post-training success misses the constraint while its optimistic figures would
reach the front is fine-tuned with the config's ``qat:`` settings, then evaluated again). Each
starts from an empty folder, with the same sampler seed, and gets the same ``time_budget_s``:
no trial starts after it (the ones running finish, so each run's wall time is printed). Both
are judged against the union of every feasible point the two measured (``-success``,
``size / float size``, ``1 / paired speed-up``: ``search/pareto.py``): each run's share of that
reference's hypervolume; then each front, with what QAT won back on its points.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ARMS = {"QAT stage off": "never", "QAT stage on": "infeasible"}


def main() -> None:
    from mpq.search.config import load_search_config
    from mpq.search.record import StudyAttr
    from mpq.search.session import run_search

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "examples/babyai/tiny.yaml"))
    p.add_argument("--time-budget-s", type=float, default=1200.0)
    p.add_argument("--seed", type=int, default=0, help="sampler seed (both runs)")
    p.add_argument("--out", default=None, help="keep the two studies here (default: temporary)")
    args = p.parse_args()
    base = load_search_config(args.config)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        for label, when in ARMS.items():
            data = base.model_dump()
            data |= {
                "name": f"{base.name}-qat-{when}",
                "seed": args.seed,
                "trials": 10_000,  # the time budget ends it
                "time_budget_s": args.time_budget_s,
                "output_dir": str(root / when),
                "storage": None,
                "tracking": {"enabled": False},
                "qat": {**data["qat"], "when": when},
            }
            start = time.perf_counter()
            study = run_search(type(base).model_validate(data)).study
            runs[label] = (study, time.perf_counter() - start)
            print(f"# {label}: {runs[label][1]:.0f} s", flush=True)
        _summary(base, args.time_budget_s, args.seed, runs)
        for label, (study, _) in runs.items():
            _front(label, study)
        ref = next(iter(runs.values()))[0].user_attrs[StudyAttr.FLOAT_REFERENCE]
        print(
            f"\nfloat: success {ref['success']:.3f}, {ref['size_bytes']:,} bytes; constraint: "
            f"success >= float - {base.constraints.max_success_drop}"
        )


def _summary(base: Any, budget_s: float, seed: int, runs: dict[str, tuple[Any, float]]) -> None:
    """Wall time, trials, QAT stages, front and share of the union's hypervolume per run."""
    from mpq.search.pareto import front_trials, hypervolume_of, normalised_losses
    from mpq.search.record import StudyAttr, TrialAttr

    objectives = list(next(iter(runs.values()))[0].user_attrs[StudyAttr.OBJECTIVES])
    union = np.concatenate([normalised_losses(s) for s, _ in runs.values()])
    ref_hv = hypervolume_of(union, objectives)
    q = base.qat
    print(
        f"\n{base.name}: time budget {budget_s:.0f} s per run, sampler {base.sampler} seed "
        f"{seed}, {base.task_budget} episodes per level; QAT stage: {q.steps} steps at lr "
        f"{q.lr}, data {q.data or 'calibration'}. Reference: the union of {len(union)} "
        f"feasible points, hypervolume {ref_hv:.4f}.\n"
    )
    print(
        "| run | wall s | trials finished | QAT stages (s in all) | front points (after QAT) "
        "| share of the reference |"
    )
    print("|---|---|---|---|---|---|")
    for label, (study, wall) in runs.items():
        finished = [t for t in study.trials if t.state.is_finished()]
        qat = [t.user_attrs[TrialAttr.QAT] for t in finished if TrialAttr.QAT in t.user_attrs]
        qat_s = sum(float(x.get("seconds", 0)) for x in qat)
        front = front_trials(study)
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
    from mpq.search.pareto import front_table

    print(f"\n{label}: the front, smallest first\n")
    print("| trial | success | size_bytes | speed-up | QAT (PTQ success before) |")
    print("|---|---|---|---|---|")
    for r in front_table(study).sort_values("size_bytes").to_dict("records"):
        qat = f"yes ({r['ptq_success']:.3f})" if r.get("qat_steps") else "no"
        interval = (
            f" ({r['success_lo']:.3f}-{r['success_hi']:.3f})"
            if r["success_lo"] is not None
            else ""
        )
        print(
            f"| {r['trial']} | {r['success']:.3f}{interval} | {r['size_bytes']:,} | "
            f"{r['speedup']:.2f}x | {qat} |"
        )


if __name__ == "__main__":
    main()
