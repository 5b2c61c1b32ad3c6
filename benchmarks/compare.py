"""mpq's search against what users would pick instead, on the full space of an example.

    python benchmarks/compare.py [--config examples/babyai/tiny.yaml] [--budget 24]
        [--seeds 0 1 2] [--episodes 30] [--out DIR] [--again DIR2]

Every row is measured in this run with the same task (fixed evaluation seeds, ``--episodes``
per level), the same space and the same kernels (the config's latency backend, paired
speed-ups), at the same trial budget, three sampler seeds each:

- the one-shot allocators alone: uniform W8A8 and W4A8, the greedy sensitivity allocation
  (AIMET-AMP style) and the ILP allocation (HAWQ-V3 / ModelOpt AutoQuantize style: least summed
  per-layer KL within a size budget, scipy's milp) at 75/60/50% of the 8-bit size -- measured
  as the seed trials of the seeded studies;
- random search, NSGA-II, TPE and GP without seeds, and mpq's model-based sampler without
  seeds; NSGA-II and the model-based sampler seeded with those allocations (with screening).

Each run builds its own study (float reference, sensitivity and the kernel autotune on this
machine, as a user's run would). The space is too large to enumerate, so the reference front
is the union of every feasible
point any run measured (each normalised by its own study's float model: ``-success``,
``size / float size``, ``1 / paired speed-up``); each method's score is its hypervolume after
its first ``--budget`` trials as a share of the reference's. The gap closed is
``(share - best one-shot share) / (1 - best one-shot share)``. With ``--out``, the studies are
kept there and a rerun reuses the runs that finished (same config, budget, episodes and seed).

The one-shot rows take their points from the seeded runs (two variants x the seeds): their
min-max spans those studies, one configuration measured in each, so it shows the benchmark's
own noise. ``--again DIR2`` measures it directly: the ``--again-variants`` (random search by
default: the same configurations for a seed, whatever the measurements) are run a second time
into DIR2 and scored against the first runs' reference, outside it.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/_runs.py
NO_SEEDS = {"sensitivity": {"enabled": False}, "screen_budget": 0}
ALLOCATIONS = {
    "uniform_bits": [8, 4],
    "budgets": [0.75, 0.6, 0.5],
    "ilp_budgets": [0.75, 0.6, 0.5],
}
VARIANTS = {
    "random search": {"sampler": "random", **NO_SEEDS},
    "NSGA-II": {"sampler": "nsga2", **NO_SEEDS},
    "TPE": {"sampler": "tpe", **NO_SEEDS},
    "GP": {"sampler": "gp", **NO_SEEDS},
    "mpq model-based": {"sampler": "mpq", **NO_SEEDS},  # measures sensitivity, no seeds
    "NSGA-II seeded + screening": {"sampler": "nsga2", "sensitivity": ALLOCATIONS},
    "mpq model-based seeded + screening": {"sampler": "mpq", "sensitivity": ALLOCATIONS},
}
ONE_SHOT = {
    "uniform W8A8 alone": "uniform-8",
    "uniform W4A8 alone": "uniform-4",
    "greedy allocation alone (75/60/50%)": "greedy",
    "ILP allocation alone (75/60/50%)": "ilp",
}


def main() -> None:
    from _runs import run_or_reuse

    from mpq.search.cluster import ray_session
    from mpq.search.config import load_search_config
    from mpq.search.pareto import hypervolume_of, normalised_losses
    from mpq.search.record import StudyAttr, TrialRecord

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "examples/babyai/tiny.yaml"))
    p.add_argument("--budget", type=int, default=24, help="trials per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--episodes", type=int, default=30, help="task budget per level")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument(
        "--out", default=None, help="keep the studies here; a rerun reuses finished runs"
    )
    p.add_argument(
        "--again", default=None, help="run --again-variants a second time here (the A/A rows)"
    )
    p.add_argument(
        "--again-variants", nargs="+", default=["random search"], choices=list(VARIANTS)
    )
    args = p.parse_args()
    base = load_search_config(args.config, task_budget=args.episodes, screen_budget=10)

    def measure(names: list[str], root: Path, tag: str = "") -> dict[str, list]:  # type: ignore[type-arg]
        """Each variant at each seed: ``(study, wall seconds)``, run or reused from ``root``."""
        out: dict[str, list] = {name: [] for name in names}  # type: ignore[type-arg]
        for name in names:
            for seed in args.seeds:
                cfg = _variant(base, name, seed, args.budget, root)
                setup = {"budget": args.budget, "episodes": args.episodes, "seed": seed}
                out[name].append(run_or_reuse(cfg, setup))
                print(f"# {name} seed {seed}{tag}: {out[name][-1][1]:.0f} s", flush=True)
        return out

    def within(study) -> list:  # type: ignore[no-untyped-def, type-arg]
        """What a run measured within its budget, by trial number."""
        return [t for t in study.trials if t.number < args.budget]

    with tempfile.TemporaryDirectory() as tmp, ray_session(base):
        runs = measure(args.variants, Path(args.out or tmp))
        again = measure(args.again_variants, Path(args.again), " again") if args.again else {}
    some = next(iter(runs.values()))[0][0]
    objectives = list(some.user_attrs[StudyAttr.OBJECTIVES])
    first = {name: [within(s) for s, _ in studies] for name, studies in runs.items()}
    union = np.concatenate(
        [
            normalised_losses(s, ts)
            for name, studies in runs.items()
            for (s, _), ts in zip(studies, first[name], strict=True)
        ]
    )
    ref_hv = hypervolume_of(union, objectives)
    if ref_hv <= 0:
        raise SystemExit("no run measured a feasible point: no reference front to compare with")
    ref = some.user_attrs[StudyAttr.FLOAT_REFERENCE]
    print(
        f"\nFloat policy: success {ref['success']:.3f}, {ref['size_bytes']:,} bytes, "
        f"{ref['latency_ms']:.3f} ms ({base.latency.backend}, {base.latency.threads} thread). "
        f"Constraint: success >= float - {base.constraints.max_success_drop}. "
        f"{args.episodes} episodes per level; {args.budget} trials per run; sampler seeds "
        f"{args.seeds}. Reference: the union of {len(union)} feasible measured points, "
        f"hypervolume {ref_hv:.4f}.\n"
    )
    print(
        "| method | share of the reference front, mean (min-max) | gap closed | wall s per trial |"
    )
    print("|---|---|---|---|")
    shares: dict[str, list[float]] = {}
    seeded = [n for n in runs if VARIANTS[n]["sensitivity"] == ALLOCATIONS]
    for label, prefix in ONE_SHOT.items():
        by_seed = [
            [t for t in ts if TrialRecord.from_frozen(t).proposed_by.startswith(prefix)]
            for n in seeded
            for (s, _), ts in zip(runs[n], first[n], strict=True)
        ]
        studies = [s for n in seeded for s, _ in runs[n]]
        if by_seed and any(by_seed):
            shares[label] = [
                hypervolume_of(normalised_losses(s, ts), objectives) / ref_hv
                for s, ts in zip(studies, by_seed, strict=True)
            ]
    for name, studies in runs.items():
        shares[name] = [
            hypervolume_of(normalised_losses(s, ts), objectives) / ref_hv
            for (s, _), ts in zip(studies, first[name], strict=True)
        ]
    for name, studies in again.items():  # scored against the first runs' reference
        shares[f"{name}, measured again (A/A)"] = [
            hypervolume_of(normalised_losses(s, within(s)), objectives) / ref_hv
            for s, _ in studies
        ]
    one_shot = [statistics.mean(shares[k]) for k in ONE_SHOT if k in shares and "uniform" not in k]
    best_one_shot = max(one_shot, default=0.0)
    for label, v in shares.items():
        mean = statistics.mean(v)
        gap = (mean - best_one_shot) / (1 - best_one_shot) if label in runs and one_shot else None
        wall = (
            statistics.mean(w / len(s.trials) for s, w in runs[label]) if label in runs else None
        )
        print(
            f"| {label} | {mean:.3f} ({min(v):.3f}-{max(v):.3f}) | "
            f"{'' if gap is None else f'{gap:+.2f}'} | {'' if wall is None else f'{wall:.1f}'} |"
        )
    pairs: dict[str, list[tuple[float, float]]] = {o: [] for o in objectives}
    for studies in runs.values():
        for s, _ in studies:
            for t in s.trials:
                predicted = TrialRecord.from_frozen(t).predicted
                if predicted and t.values is not None:
                    for o, v in zip(objectives, t.values, strict=True):
                        if o == "success":  # the success model's: post-training, QAT or not
                            qat = t.user_attrs.get("qat") or {}
                            v = qat.get("ptq_success", v) if qat.get("steps") else v
                            pairs[o].append((predicted.get("ptq_success", predicted[o]), v))
                        else:
                            pairs[o].append((predicted[o], v))
    if any(pairs.values()):
        print("\nmpq model-based: predicted vs measured (Spearman rank correlation)")
        for o, xy in pairs.items():
            if len(xy) > 2:
                rho = spearmanr([x for x, _ in xy], [y for _, y in xy]).statistic
                print(f"- {o}: {rho:.3f} over {len(xy)} proposals")


def _variant(base, name: str, seed: int, trials: int, root: Path):  # type: ignore[no-untyped-def]
    """The run of variant ``name`` at ``seed``, its study named and kept by both."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    overrides = VARIANTS[name]
    data = base.model_dump()
    data.update(
        {
            "name": f"cmp-{slug}-{seed}",
            "seed": seed,
            "trials": trials,
            "output_dir": str(root / f"{slug}-{seed}"),
            "storage": None,
            "tracking": {"enabled": False},
        }
    )
    for k, v in overrides.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) else v
    return type(base).model_validate(data)


if __name__ == "__main__":
    main()
