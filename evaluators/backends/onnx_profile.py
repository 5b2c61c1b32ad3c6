"""Per-node and per-layer time of an ONNX model on ONNX Runtime's profiler, batch 1, 1 thread.

Used by the kernel autotune (``kernel_tune``: which of a layer's kernels is fastest in the
whole model) and by ``benchmarks/op_breakdown.py`` (where a step's time goes). A node's time is
its ``*_kernel_time`` event; a node is a layer's when its name sits in the layer's scope (the
exporter names nodes ``/fuse/MatMul``; a node ONNX Runtime fused into another keeps the first
node's name with a suffix: ``/fuse/MatMul/MatMulAddFusion``).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from mpq.evaluators.inputs import Inputs, session_feeds


def session(model_bytes: bytes, profile_dir: str | None = None, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session (profiling into ``profile_dir`` when given)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if profile_dir is not None:
        options.enable_profiling = True
        options.profile_file_prefix = f"{profile_dir}/p"
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def node_events(
    model_bytes: bytes,
    inputs: Inputs,
    runs: int,
    threads: int = 1,
) -> list[dict[str, Any]]:
    """The profiler's node events of ``runs`` steps on a new session (its first steps
    included: skip them to leave the warm-up out)."""
    with tempfile.TemporaryDirectory() as tmp:
        prof = session(model_bytes, tmp, threads)
        fed = session_feeds(prof, inputs)
        for _ in range(runs):
            prof.run(None, fed)
        events = json.loads(Path(prof.end_profiling()).read_text())
    return [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


def profile(
    model_bytes: bytes, inputs: Inputs, runs: int
) -> tuple[float, dict[str, float], dict[str, float], dict[str, float]]:
    """(median unprofiled step in us, op type -> profiled node us per step, op type -> nodes
    per step, node name -> profiled us per step)."""
    plain = session(model_bytes)
    fed = session_feeds(plain, inputs)
    for _ in range(20):
        plain.run(None, fed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        plain.run(None, fed)
        times.append(time.perf_counter() - start)
    del plain
    per_type: dict[str, float] = defaultdict(float)
    per_node: dict[str, float] = defaultdict(float)
    nodes: Counter[str] = Counter()
    for e in node_events(model_bytes, fed, runs):
        per_type[e["args"]["op_name"]] += e["dur"] / runs
        per_node[e["name"].removesuffix("_kernel_time")] += e["dur"] / runs
        nodes[e["args"]["op_name"]] += 1
    counts = {k: v / runs for k, v in nodes.items()}
    return statistics.median(times) * 1e6, per_type, counts, per_node


def layer_scopes(layers: Any) -> dict[str, str]:
    """Scope -> layer: a module's scope counts under its first weight; a recurrent product
    (``StepwiseRecurrent``'s ``weight_ih_l0`` Linear) has its own."""
    scopes: dict[str, str] = {}
    for la in layers:
        scopes.setdefault(la.module, la.name)
    return scopes | {la.name: la.name for la in layers}


def owner(node: str, scopes: dict[str, str]) -> str | None:
    """The layer whose scope a node's name sits in (the longest scope wins), or None."""
    parts = node.lstrip("/").split("/")
    for end in range(len(parts) - 1, 0, -1):
        scope = ".".join(parts[:end])
        owners = [k for k in scopes if scope == k or scope.endswith(f".{k}")]
        if owners:
            return scopes[max(owners, key=len)]
    return None


def layer_us(
    model_bytes: bytes,
    inputs: tuple[Any, ...],
    runs: int,
    scopes: dict[str, str],
    threads: int = 1,
) -> dict[str, float]:
    """Layer -> median over ``runs`` steps of its nodes' summed profiled time (us per step):
    the layer in the cache state the whole model puts it in."""
    per_step: dict[str, list[float]] = defaultdict(lambda: [0.0] * runs)
    seen: Counter[str] = Counter()
    for e in node_events(model_bytes, inputs, runs + 5, threads):
        node = e["name"].removesuffix("_kernel_time")
        step = seen[node]
        seen[node] += 1
        layer = owner(node, scopes)
        if layer is not None and 5 <= step < runs + 5:  # the first 5 steps warm up
            per_step[layer][step - 5] += e["dur"]
    return {layer: statistics.median(steps) for layer, steps in per_step.items()}
