"""How well the per-layer latency table predicts whole-model latency on real kernels.

    python benchmarks/latency_predictor.py [--configs 20] [--runs 50]

For each model: build the table (``evaluators/latency_table.py``: every layer on every kernel
its space can ask for, timed inside the whole model), then draw random configurations of the
space, predict their latency by summing the table, lower and measure them (median of
``--runs``), and print the mean and max absolute error of the prediction, in ms and in %.
onnxruntime backend, batch 1, 1 thread.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from benchmarks.kernels import MLP, ConvEncoder
    from mpq.evaluators.backends import get_backend
    from mpq.evaluators.latency import cpu_model, kernel_versions, measure_latency
    from mpq.evaluators.latency_table import build_latency_table
    from mpq.spaces.discover import discover_layers
    from mpq.spaces.space import LayerOptions, QuantConfig
    from mpq.zoo.babyai import build_policy
    from mpq.zoo.babyai.task import calibration_batches, example_inputs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", type=int, default=20)
    p.add_argument("--runs", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    options = LayerOptions(w_bits=(2, 3, 4, 8, 32), a_bits=(8, 32))
    cases = {
        "mlp-4x1024": (MLP().eval(), (torch.randn(1, 1024),), None),
        "conv-encoder-96px": (ConvEncoder().eval(), (torch.rand(1, 3, 96, 96),), None),
        "babyai-policy": (build_policy(), example_inputs(), calibration_batches(4)),
    }
    print(f"CPU: {cpu_model()}; {kernel_versions()}; onnxruntime backend, 1 thread, batch 1\n")
    print(
        "| model | table entries | build s | float ms | mean abs error ms (%) | "
        "max abs error ms (%) |"
    )
    print("|---|---|---|---|---|---|")
    backend = get_backend("onnxruntime")
    for name, (model, x, calibration) in cases.items():
        layers = discover_layers(model)
        ev = SimpleNamespace(
            backend=backend,
            layers=layers,
            model=model,
            example_inputs=x,
            calibration=calibration or [x],
            spec=SimpleNamespace(
                backend="onnxruntime",
                latency_threads=1,
                latency_warmup=10,
                latency_runs=args.runs,
                model=name,
                checkpoint=None,
            ),
        )
        space = {
            la.name: options
            if la.takes_activations
            else LayerOptions(w_bits=options.w_bits, a_bits=(32,))
            for la in layers
        }
        start = time.perf_counter()
        table = build_latency_table(ev, space, runs=args.runs)
        build_s = time.perf_counter() - start
        rng = random.Random(0)
        errors, rel = [], []
        for _ in range(args.configs):
            config = QuantConfig(
                layers={la.name: rng.choice(space[la.name].choices()) for la in layers}
            )
            predicted = table.predict_ms(backend.kernel_for, layers, config)
            run = backend.lower(model, layers, config, x, 1, calibration=ev.calibration).run
            measured = measure_latency(run, 10, args.runs, 1).median_ms
            errors.append(abs(predicted - measured))
            rel.append(abs(predicted - measured) / measured)
        entries = sum(len(v) for v in table.delta_ms.values())
        print(
            f"| {name} | {entries} | {build_s:.0f} | {table.float_ms:.3f} | "
            f"{statistics.mean(errors):.3f} ({100 * statistics.mean(rel):.1f}%) | "
            f"{max(errors):.3f} ({100 * max(rel):.1f}%) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
