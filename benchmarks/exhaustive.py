"""How much of the true Pareto front each search finds, on a space small enough to enumerate.

    python benchmarks/exhaustive.py [--config examples/babyai/tiny.yaml] [--episodes 30]
        [--budgets 24 48] [--seeds 0 1 2]

The space: the embedded VLA policy with five layers searched (``fuse``, both ``memory_gru``
weights, ``ffn_in``, ``action_head``; weights 3, 4 or 8 bits, 8-bit activations) and every
other layer in float: 3^5 = 243 configurations. Step 1 measures all of them with the real
search (Ray workers, onnxruntime kernels, the task's fixed evaluation seeds): that is the
exhaustive front. Step 2 replays each sampler against that table (a tabular benchmark, as in
NAS-Bench: the sampler asks, the measured values answer), three seeds each, so every sampler
sees exactly the same measurements. Reported: the share of the exhaustive front's hypervolume
(same reference point and normalisation as ``search/pareto.py``) reached within each budget.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SEARCHED = ("fuse", "memory_gru.weight_ih_l0", "memory_gru.weight_hh_l0", "ffn_in", "action_head")
SAMPLERS = ("random", "nsga2", "tpe", "gp", "mpq")
KL_ONLY = "mpq-kl"  # the model-based sampler with its success model's sensitivity term alone


def main() -> None:
    from mpq.evaluators.evaluator import get_evaluator
    from mpq.search import rules
    from mpq.search import study as study_mod
    from mpq.search.config import load_search_config
    from mpq.search.model_sampler import PREDICTED
    from mpq.search.pareto import front_trials, hypervolume
    from mpq.search.record import SEARCH, StudyAttr, TrialAttr, TrialRecord
    from mpq.search.runner import bind_sampler, preflight
    from mpq.search.session import run_search
    from mpq.search.worker import eval_spec
    from mpq.spaces.space import QuantConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "examples/babyai/tiny.yaml"))
    p.add_argument("--episodes", type=int, default=30, help="task budget per level")
    p.add_argument("--budgets", type=int, nargs="+", default=[24, 48])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--layers", nargs="+", default=list(SEARCHED), help="the searched layers")
    p.add_argument("--out", default="mpq-runs/exhaustive", help="the measured study (resumed)")
    p.add_argument("--only", nargs="+", default=None, help="replay rows whose label has one")
    args = p.parse_args()
    space = {
        "defaults": {"w_bits": [32], "a_bits": [32]},
        "overrides": [{"match": n, "w_bits": [3, 4, 8], "a_bits": [8]} for n in args.layers],
    }
    # the measured study is kept in --out: a rerun resumes it and measures nothing
    cfg = load_search_config(
        args.config,
        task_budget=args.episodes,
        screen_budget=0,
        space=space,
        sampler="random",
        output_dir=args.out,
        storage=None,
        tracking={"enabled": False},
        sensitivity={
            "uniform_bits": [8, 4],
            "budgets": [0.75, 0.6, 0.5],
            "ilp_budgets": [0.75, 0.6, 0.5],
        },
    )
    resolved = preflight(cfg, "exhaustive")
    grid = []
    for combo in itertools.product([3, 4, 8], repeat=len(args.layers)):
        bits = dict(zip(args.layers, combo, strict=True))
        layers = {n: o.first(w_bits=bits.get(n, o.w_bits[0])) for n, o in resolved.items()}
        grid.append(("grid", QuantConfig(layers=layers)))
    # at most this many distinct seeds; a seed equal to another (or to a grid point) leaves
    # a trial to the random sampler, whose draw is a grid point: answered as a duplicate
    seeds = sum(len(x) for x in (cfg.sensitivity.uniform_bits, cfg.sensitivity.budgets))
    seeds += len(cfg.sensitivity.ilp_budgets)
    cfg = cfg.model_copy(update={"trials": len(grid) + seeds})
    full = run_search(cfg, resume=True, resolved=resolved, extra=grid).study

    table = {
        t.user_attrs[TrialAttr.CONFIG_KEY]: t
        for t in full.trials
        if t.state == TrialState.COMPLETE and TrialAttr.DUPLICATE_OF not in t.user_attrs
    }
    exhaustive_hv = hypervolume(full)
    ref = full.user_attrs[StudyAttr.FLOAT_REFERENCE]
    print(
        f"\n{len(table)} configurations measured ({args.episodes} episodes per level); float: "
        f"success {ref['success']:.3f}, {ref['size_bytes']:,} bytes, {ref['latency_ms']:.3f} ms. "
        f"Exhaustive front: {len(front_trials(full))} configurations, hypervolume "
        f"{exhaustive_hv:.4f} "
        "(reference: success 0, float size, 2x float latency; normalised by the float model).\n"
    )
    proposed = {t.number: TrialRecord.from_frozen(t).proposed_by for t in full.trials}
    seeds_of = {
        proposed[t.number]: t for t in full.trials if proposed[t.number] not in ("grid", SEARCH)
    }
    seed_params = [
        t.params for label, t in sorted(seeds_of.items()) if not label.startswith("ilp")
    ]
    ilp_params = [t.params for label, t in sorted(seeds_of.items()) if label.startswith("ilp")]
    dists = study_mod.distributions(resolved)
    evaluator = get_evaluator(eval_spec(cfg))

    def replay(sampler: str, seed: int, trials: int, enqueue: list) -> optuna.Study:  # type: ignore[type-arg]
        name = "mpq" if sampler == KL_ONLY else sampler
        made = study_mod.make_sampler(
            cfg.model_copy(update={"sampler": name, "seed": seed}), residual=sampler != KL_ONLY
        )
        study = optuna.create_study(directions=full.directions, sampler=made)
        study.set_user_attr(StudyAttr.OBJECTIVES, full.user_attrs[StudyAttr.OBJECTIVES])
        study.set_user_attr(StudyAttr.FLOAT_REFERENCE, ref)
        study.set_user_attr(StudyAttr.SENSITIVITY, full.user_attrs[StudyAttr.SENSITIVITY])
        bind_sampler(study, resolved, evaluator)
        for params in enqueue:
            study.enqueue_trial(params)
        for _ in range(trials):
            trial = study.ask(dists)
            config = study_mod.config_from_params(resolved, trial.params)
            key = config.key()
            trial.set_user_attr(
                TrialAttr.CONFIG, config.model_dump(mode="json", exclude_none=True)
            )
            trial.set_user_attr(TrialAttr.CONFIG_KEY, key)
            measured = table.get(key)
            if measured is None:  # failed when measured: failed here too
                study.tell(trial, state=TrialState.FAIL)
                continue
            constraints = measured.user_attrs[TrialAttr.CONSTRAINTS]
            for name, value in zip(rules.constraint_names(cfg), constraints, strict=True):
                trial.set_constraint(name, value)
            trial.set_user_attr(TrialAttr.CONSTRAINTS, constraints)
            study.tell(trial, measured.values)
        return study

    ref_objectives = list(full.user_attrs[StudyAttr.OBJECTIVES])
    budgets = sorted(args.budgets)
    header = " | ".join(f"share at {n} trials, mean (min-max)" for n in budgets)
    print(f"| search (seeds {args.seeds}) | {header} |")
    print("|---" * (len(budgets) + 1) + "|")
    for label, prefix in (
        ("uniform W8A8 alone", "uniform-8"),
        ("uniform W4A8 alone", "uniform-4"),
        ("greedy sensitivity alone (75/60/50%)", "greedy"),
        ("ILP sensitivity alone (75/60/50%)", "ilp"),
    ):
        trials = [t for k, t in seeds_of.items() if k.startswith(prefix)]
        share = hypervolume(full, trials) / exhaustive_hv
        print(f"| {label} | " + " | ".join(f"{share:.3f}" for _ in budgets) + " |")
    rows = {f"{s} (plain)": (s, []) for s in SAMPLERS}
    rows["mpq (plain), success from the sensitivity alone (no ridge correction)"] = (KL_ONLY, [])
    rows["NSGA-II seeded with greedy + uniform"] = ("nsga2", seed_params)
    rows["NSGA-II seeded with greedy + ILP + uniform"] = ("nsga2", seed_params + ilp_params)
    rows["mpq model-based, seeded with greedy + uniform"] = ("mpq", seed_params)
    rows["mpq model-based, seeded with greedy + ILP + uniform"] = ("mpq", seed_params + ilp_params)
    if args.only:
        rows = {k: v for k, v in rows.items() if any(x in k for x in args.only)}
    pairs: dict[str, dict[str, list[tuple[float, float]]]] = {
        kind: {o: [] for o in ref_objectives} for kind in ("mpq", KL_ONLY)
    }
    for label, (sampler, enqueue) in rows.items():
        shares = {n: [] for n in budgets}  # type: ignore[var-annotated]
        for seed in args.seeds:
            study = replay(sampler, seed, max(budgets), enqueue)
            for t in study.trials:
                predicted = t.system_attrs.get(PREDICTED)
                if predicted and t.values is not None:
                    for o, v in zip(ref_objectives, t.values, strict=True):
                        pairs[sampler][o].append((predicted[o], v))
            for n in budgets:
                first = [t for t in study.trials if t.number < n]
                shares[n].append(hypervolume(study, first) / exhaustive_hv)
        cells = " | ".join(
            f"{statistics.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})" for v in shares.values()
        )
        print(f"| {label} | {cells} |")
    for kind, title in (("mpq", "mpq model-based"), (KL_ONLY, "the same, sensitivity alone")):
        if not any(len(xy) > 2 for xy in pairs[kind].values()):
            continue
        print(f"\n{title}: predicted vs measured over its proposals (Spearman rank correlation)")
        for o, xy in pairs[kind].items():
            if len(xy) > 2:
                rho = spearmanr([x for x, _ in xy], [y for _, y in xy]).statistic
                print(f"- {o}: {rho:.3f} over {len(xy)} proposals")


if __name__ == "__main__":
    main()
