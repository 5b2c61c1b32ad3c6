"""Where a step's time goes: per ONNX op type, float / uniform int8 / the configuration found.

    python benchmarks/op_breakdown.py [--config examples/babyai/search.yaml]
        [--found mpq-runs/babyai-flagship-v1/best/ran_config.yaml] [--runs 300]

Each configuration is lowered exactly as a trial lowers it (``Evaluator.lower``: the deployable
ONNX file) and run at batch 1 on 1 thread. Per op type: the node time ONNX Runtime's profiler
reports, less the profiler's own cost per node, in microseconds per step. NOTE: the profiler
adds a roughly fixed cost to every node (a 0.4 ms step profiles at 1.1 ms), which would make
the many small glue nodes look expensive; that cost is measured on a chain of 100 one-element
``Neg`` nodes (what the profiler reports for a node that does almost nothing) and taken off
each node. Where the remainder still exceeds the unprofiled step it is scaled down to it;
"between nodes" is what the unprofiled step spends outside any node (scheduling, copies). The
totals are the median unprofiled step of a fresh session.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpq.evaluators.backends.onnx_profile import layer_scopes, owner, profile  # noqa: E402
from mpq.evaluators.evaluator import Evaluator  # noqa: E402
from mpq.evaluators.latency import cpu_model  # noqa: E402
from mpq.search.config import load_search_config  # noqa: E402
from mpq.search.worker import eval_spec  # noqa: E402
from mpq.spaces.space import LayerChoice, QuantConfig  # noqa: E402


def profiler_overhead_us(runs: int = 200) -> float:
    """What the profiler reports for a node that does almost nothing: a one-element ``Neg``."""
    from onnx import TensorProto, helper

    chain = [helper.make_node("Neg", [f"t{i}"], [f"t{i + 1}"]) for i in range(100)]
    graph = helper.make_graph(
        chain,
        "chain",
        [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("t100", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    _, per_type, nodes, _ = profile(
        model.SerializeToString(), {"t0": np.ones(1, np.float32)}, runs
    )
    return per_type["Neg"] / nodes["Neg"]


def breakdown(
    model_bytes: bytes,
    inputs: tuple[Any, ...],
    runs: int,
    overhead_us: float,
    scopes: dict[str, str],
) -> tuple[dict[str, float], dict[str, float]]:
    """(op type -> microseconds per step, with ``between nodes`` and ``total``; layer ->
    microseconds per step of the nodes whose scope ends with one of the layer's ``scopes``
    (scope -> layer: its module, or its own name for a recurrent product), the longest
    winning, as ``matmul_nodes`` maps them; a node ONNX Runtime fused into another keeps the
    first node's name, and a fused recurrent node counts under the module's first weight)."""
    step_us, per_type, nodes, per_node = profile(model_bytes, inputs, runs)
    out = {op: max(0.0, per_type[op] - overhead_us * nodes[op]) for op in per_type}
    scale = min(1.0, step_us / max(sum(out.values()), 1e-9))
    out = {op: us * scale for op, us in out.items()}
    out["between nodes"] = max(0.0, step_us - sum(out.values()))
    out["total"] = step_us
    by_layer: dict[str, float] = defaultdict(float)
    for node, us in per_node.items():
        layer = owner(node, scopes)
        if layer is not None:
            by_layer[layer] += max(0.0, us - overhead_us) * scale
    return out, by_layer


def configs(ev: Evaluator, found: Path | None) -> dict[str, QuantConfig]:
    out = {
        "float": QuantConfig.uniform(ev.layers, LayerChoice()),
        "uniform int8": QuantConfig.uniform(ev.layers, LayerChoice(w_bits=8, a_bits=8)),
    }
    if found is not None:
        out["found"] = QuantConfig.model_validate(yaml.safe_load(found.read_text()))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "examples/babyai/search.yaml"))
    p.add_argument("--found", type=Path, default=None, help="a ran_config.yaml (an export's)")
    p.add_argument("--runs", type=int, default=300)
    args = p.parse_args(argv)
    cfg = load_search_config(args.config)
    found = args.found
    if found is None:
        default = Path(cfg.output_dir) / "best" / "ran_config.yaml"
        found = default if default.is_file() else None
    ev = Evaluator(eval_spec(cfg))
    kernel_table = Path(cfg.output_dir) / "kernel_table.json"  # the study's kernel choices
    if kernel_table.is_file():
        ev.use_kernels(kernel_table.read_text())
    overhead = profiler_overhead_us()
    columns, per_layer, kernels = {}, {}, {}
    names = [la.name for la in ev.layers]
    scopes = layer_scopes(ev.layers)
    for name, config in configs(ev, found).items():
        lowered = ev.lower(config)
        assert lowered.artifact is not None, "op_breakdown needs the onnxruntime backend"
        columns[name], per_layer[name] = breakdown(
            lowered.artifact, ev.example_inputs, args.runs, overhead, scopes
        )
        kernels[name] = lowered.kernels
    ops = sorted(
        {op for col in columns.values() for op in col} - {"total", "between nodes"},
        key=lambda op: -columns["float"].get(op, 0.0),
    )
    table = Table(
        title=f"{cfg.name}: microseconds per step by op type (batch 1, 1 thread, {cpu_model()})"
    )
    table.add_column("op type")
    for name in columns:
        table.add_column(f"{name} (us)", justify="right")
    for op in [*ops, "between nodes", "total"]:
        table.add_row(op, *(f"{col.get(op, 0.0):.0f}" for col in columns.values()))
    console = Console(width=200)
    console.print(table)
    last = list(columns)[-1]
    layer_table = Table(title=f"per layer: microseconds per step, and the kernel of {last!r}")
    layer_table.add_column("layer")
    layer_table.add_column(f"kernel ({last})")
    for name in columns:
        layer_table.add_column(f"{name} (us)", justify="right")
    for la in names:
        cells = [f"{per_layer[n].get(la, 0.0):.0f}" for n in columns]
        layer_table.add_row(la, kernels[last][la], *cells)
    console.print(layer_table)
    print(f"profiler cost per node taken off: {overhead:.1f} us")
    if found is not None:
        print(f"found: {found}")


if __name__ == "__main__":
    main()
