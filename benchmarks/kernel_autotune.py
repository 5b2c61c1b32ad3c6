"""The kernel autotune: per layer, which kernel ran fastest, and what it buys end to end.

    python benchmarks/kernel_autotune.py [--config examples/babyai/search.yaml]
        [--choice w4-a32-g32] [--runs 50]

For one choice of a search config's model (default: weight-only 4-bit, blocks of 32, the
choice with two kernels on ONNX Runtime: a float MatMul of weights dequantized at load, or
``MatMulNBits`` with a float input), ``evaluators/kernel_tune.py`` times every candidate of
every layer inside the whole model (the choice everywhere, each layer forced onto one
candidate; ONNX Runtime's profiler, median of ``--runs`` steps). The table prints each layer's
candidates, the one that runs and the end-to-end check of the picks (kept only where faster
than the default kernels beyond the latency protocol's interval); then the uniform
configuration is measured with the latency protocol (paired with float, fresh sessions, 95%
interval) on the default kernels and on the tuned ones, side by side in one run. Batch 1,
1 thread.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpq.evaluators.evaluator import Evaluator  # noqa: E402
from mpq.evaluators.kernel_tune import tune_kernels  # noqa: E402
from mpq.evaluators.latency import cpu_model  # noqa: E402
from mpq.search.config import load_search_config  # noqa: E402
from mpq.search.worker import eval_spec  # noqa: E402
from mpq.spaces.space import LayerChoice, LayerOptions, QuantConfig  # noqa: E402


def parse_choice(text: str) -> LayerChoice:
    """``w4-a32-g32`` -> 4-bit weights, 32-bit activations, blocks of 32 (``g0``: per
    channel)."""
    parts = dict((p[0], int(p[1:])) for p in text.split("-"))
    g = parts.get("g", 32)
    granularity = {"granularity": "per_group", "group_size": g} if g else {}
    return LayerChoice(w_bits=parts["w"], a_bits=parts.get("a", 32), **granularity)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "examples/babyai/search.yaml"))
    p.add_argument("--choice", default="w4-a32-g32")
    p.add_argument("--runs", type=int, default=50)
    args = p.parse_args(argv)
    cfg = load_search_config(args.config)
    ev = Evaluator(eval_spec(cfg))
    choice = parse_choice(args.choice)
    groups = {"group_size": (choice.group_size,)} if choice.group_size else {}
    one = LayerOptions(
        w_bits=(choice.w_bits,),
        a_bits=(choice.a_bits,),
        granularity=(choice.granularity,),
        **groups,
    )
    options = {la.name: one for la in ev.layers}
    table = tune_kernels(ev, options, runs=args.runs)
    config = QuantConfig(layers={la.name: one.choices()[0] for la in ev.layers})
    console = Console(width=200)
    out = Table(
        title=f"{cfg.name}: {choice.describe()}, us per step in the whole model "
        f"(batch 1, 1 thread, {cpu_model()})"
    )
    out.add_column("layer")
    kernels = sorted({k for row in table.kernel_us.values() for k in row})
    for k in kernels:
        out.add_column(k, justify="right")
    out.add_column("runs")
    tuned = ev.base_backend.tuned(table.usable())
    for la in ev.layers:
        row = table.kernel_us.get(la.name)
        if not row:
            continue
        picked = tuned.plan_layer(la, config.layers[la.name]).kernel
        out.add_row(la.name, *(f"{row[k]:.1f}" if k in row else "" for k in kernels), picked)
    console.print(out)
    for choice_name, check in table.checks.items():
        kept = "kept" if check["kept"] else "rejected: the default kernels run"
        console.print(
            f"end-to-end check of the picks for {choice_name}: {check['speedup']:.2f}x "
            f"[{check['speedup_lo']:.2f}, {check['speedup_hi']:.2f}] over the default kernels "
            f"({kept})"
        )
    summary = Table(title="the uniform configuration, latency protocol (paired with float)")
    for col in ("kernels", "step ms", "speed-up", "95% interval"):
        summary.add_column(col)
    for label, kernel_json in (("default", None), ("autotuned", table.to_json())):
        ev.use_kernels(kernel_json)
        m = ev.latency(config)
        summary.add_row(
            label,
            f"{m['latency_ms']:.2f}",
            f"{m['speedup']:.2f}x",
            f"[{m['speedup_lo']:.2f}, {m['speedup_hi']:.2f}]",
        )
    console.print(summary)


if __name__ == "__main__":
    main()
