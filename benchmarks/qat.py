"""What quantization-aware training wins back below 4 bits, on the example's own task.

    python benchmarks/qat.py [--config examples/babyai/tiny.yaml] [--bits 2 3 4]
        [--steps 200] [--episodes 100] [--group-size 32] [--data module:function]
        [--record module:function --rounds N]

For each uniform weight width (8-bit dynamic activations, blocks of ``--group-size``, as the
backend runs it: ``as_ran``), on the same evaluation episodes (the task's fixed seeds,
``--episodes`` per level): success after post-training quantization (PTQ), after one-step QAT,
after progressive QAT (8 -> 6 -> 4 -> 3 -> 2, the same total steps) and after QAT with learned
ranges (LSQ-style), each with its 95% interval and the time it took; the deployable bytes of
the configuration (unchanged by training) and how many times smaller than float it is. Then
the packing formula's ceiling: every weight at 2 bits in the largest block that divides it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from rich.progress import Progress

    from mpq.evaluators.evaluator import get_evaluator
    from mpq.evaluators.qat import QatSettings
    from mpq.evaluators.size import config_size
    from mpq.search.config import load_search_config
    from mpq.search.runner import preflight
    from mpq.search.worker import eval_spec
    from mpq.spaces.space import LayerChoice, QuantConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "examples/babyai/tiny.yaml"))
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--episodes", type=int, default=100, help="task budget per level")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--variants", nargs="+", default=["one-step", "progressive", "lsq"])
    p.add_argument(
        "--data", default=None, help="qat.data: module:function -> batches (default: calibration)"
    )
    p.add_argument(
        "--record", default=None, help="qat.record: module:function (model, round) -> batches"
    )
    p.add_argument("--rounds", type=int, default=0, help="qat.rounds (with --record)")
    args = p.parse_args()
    cfg = load_search_config(args.config, task_budget=args.episodes)
    preflight(cfg, str(args.config))
    ev = get_evaluator(eval_spec(cfg))
    ev.use_kernels(None)
    float_success = ev.success(None, args.episodes)
    float_bytes = ev.artifact(QuantConfig.uniform(ev.layers, LayerChoice()))["size_bytes"]
    common = {"steps": args.steps, "lr": args.lr, "data": args.data}
    common |= {"record": args.record, "rounds": args.rounds}
    variants = {
        "one-step": QatSettings(**common),
        "progressive": QatSettings(**common, progressive=True),
        "lsq": QatSettings(**common, lsq=True),
    }
    rows = []
    with Progress() as progress:
        for bits in args.bits:
            choice = LayerChoice(
                w_bits=bits, a_bits=8, granularity="per_group", group_size=args.group_size
            )
            config = QuantConfig.uniform(ev.layers, choice)
            ran = ev.as_ran(config)
            size = ev.artifact(config)["size_bytes"]
            ran_bits = sorted({c.w_bits for c in ran.layers.values()})
            row = {"bits": bits, "ran": ran_bits, "size": size, "x": float_bytes / size}
            row["ptq"] = ev.success(config, args.episodes)
            for name in args.variants:
                task = progress.add_task(f"{bits}-bit {name}", total=args.steps)
                start = time.perf_counter()
                tuned, _ = ev.finetuned(
                    config, variants[name], lambda n, _l, t=task: progress.update(t, completed=n)
                )
                row[name] = tuned.success(config, args.episodes)
                row[name]["seconds"] = time.perf_counter() - start
            rows.append(row)
    print(
        f"\n{cfg.model}: float success {_fmt(float_success)}, {float_bytes:,} bytes "
        f"({cfg.latency.backend}); {args.episodes} episodes per level, the same for every row; "
        f"QAT {args.steps} steps, lr {args.lr}, distillation (KL) on "
        f"{args.data or 'the calibration inputs'}"
        + (f", {args.rounds} rounds of {args.record}" if args.record else "")
        + ".\n"
    )
    head = " | ".join(f"{v} QAT (s)" for v in args.variants)
    print(f"| weights (as run) | deployable bytes | x smaller | PTQ | {head} |")
    print("|---" * (4 + len(args.variants)) + "|")
    for r in rows:
        cells = " | ".join(f"{_fmt(r[v])} ({r[v]['seconds']:.0f} s)" for v in args.variants)
        ran = "/".join(map(str, r["ran"]))
        print(
            f"| W{r['bits']}A8 g{args.group_size} ({ran}-bit) | {r['size']:,} | {r['x']:.1f} | "
            f"{_fmt(r['ptq'])} | {cells} |"
        )
    ceiling = {}
    for la in ev.layers:
        sizes = [g for g in (256, 128, 64, 32, 16) if la.reduction_size % g == 0]
        a_bits = 8 if la.takes_activations else 32
        ceiling[la.name] = (
            LayerChoice(w_bits=2, a_bits=a_bits, granularity="per_group", group_size=sizes[0])
            if sizes
            else LayerChoice(w_bits=2, a_bits=a_bits)
        )
    formula = config_size(ev.model, ev.layers, QuantConfig.uniform(ev.layers, LayerChoice()))
    low = config_size(ev.model, ev.layers, QuantConfig(layers=ceiling))
    print(
        f"\nPacking ceiling (the formula, every weight 2-bit in its largest block of 16-256): "
        f"{low.total_bytes:,} bytes of {formula.total_bytes:,} float = "
        f"{formula.total_bytes / low.total_bytes:.1f}x smaller (float parameters and scales "
        "that are not weights stay)."
    )


def _fmt(m: dict) -> str:  # type: ignore[type-arg]
    if "success_lo" in m:
        return f"{m['success']:.3f} ({m['success_lo']:.3f}-{m['success_hi']:.3f})"
    return f"{m['success']:.3f}"


if __name__ == "__main__":
    main()
