"""A per-target latency table (per layer, per kernel) and the predictor that sums it.

    latency(config) ~= float_ms + sum over layers of delta_ms[layer][kernel_for(layer, choice)]

The entries are fitted to whole models: ``build_latency_table`` lowers and times (median of
``latency.runs`` calls after ``latency.warmup``, batch 1, as the trials are timed) the float
model, each uniform kernel and random configurations of the space, then solves the
least-squares problem above (ridge-regularised) for ``float_ms`` and the deltas.
Every timing is of the whole model, so each layer runs in the cache state a deployed model puts
it in. NOTE: timing one layer alone in a hot cache was off by 40-190% for weights that do not fit
in cache, and swapping one layer at a time into the float model is not additive either (a fully
4-bit MLP fits in cache where the float one does not); fitting over many mixed configurations
averages that in. The table is data (JSON), keyed by the target (CPU model, threads, backend,
kernel versions, model); a table of another target is refused, not used.
``benchmarks/latency_predictor.py`` reports the error on held-out random configurations.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mpq.evaluators import timing_slot
from mpq.evaluators.latency import cpu_model, device_name, kernel_versions, measure_latency
from mpq.spaces.space import LayerChoice, LayerOptions, QuantConfig


def target_key(backend: str, threads: int) -> dict[str, Any]:
    """What a latency figure depends on besides the model: where and how it ran (and on which
    GPU, for a GPU backend)."""
    from mpq.evaluators.backends import get_backend

    key = {
        "cpu": cpu_model(),
        "threads": threads,
        "backend": backend,
        "versions": kernel_versions(),
    }
    device = get_backend(backend).device
    if device != "cpu":
        key["device"] = device_name(device)
    return key


@dataclass(frozen=True)
class LatencyTable:
    target: dict[str, Any]
    float_ms: float
    delta_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> kernel -> ms

    def predict_ms(self, kernel_for: Callable[[Any, LayerChoice], str], layers, config) -> float:  # type: ignore[no-untyped-def]
        """``float_ms`` plus the delta of each layer's kernel (0 for a float layer).

        Raises:
            KeyError: a layer's kernel is not in the table (the table was built for a smaller
                space); the message names both.
        """
        total = self.float_ms
        for la in layers:
            kernel = kernel_for(la, config.layers[la.name])
            if kernel == self.float_kernel:
                continue
            row = self.delta_ms.get(la.name, {})
            if kernel not in row:
                raise KeyError(f"latency table has no {kernel!r} for layer {la.name!r}")
            total += row[kernel]
        return total

    def covers(self, kernel_for: Callable[[Any, LayerChoice], str], layers, options) -> bool:  # type: ignore[no-untyped-def]
        """Whether every (layer, kernel) the space ``options`` can ask for is in the table."""
        for la in layers:
            for choice in options[la.name].choices():
                kernel = kernel_for(la, choice)
                if kernel != self.float_kernel and kernel not in self.delta_ms.get(la.name, {}):
                    return False
        return True

    @property
    def float_kernel(self) -> str:
        return str(self.target.get("float_kernel", ""))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LatencyTable:
        data = json.loads(text)
        return cls(data["target"], float(data["float_ms"]), data["delta_ms"])

    def matches(self, target: dict[str, Any]) -> bool:
        return all(self.target.get(k) == v for k, v in target.items())


def _columns(backend: Any, layers: Any, options: dict[str, LayerOptions]) -> list[tuple[str, str]]:
    """Every (layer, kernel) the space can run other than float: the table's entries."""
    float_kernel = backend.kernel_for(layers[0], LayerChoice())
    columns: list[tuple[str, str]] = []
    for la in layers:
        for choice in options[la.name].choices():
            key = (la.name, backend.kernel_for(la, choice))
            if key[1] != float_kernel and key not in columns:
                columns.append(key)
    return columns


def _configs(
    backend: Any,
    layers: Any,
    options: dict[str, LayerOptions],
    kernels: set[str],
    samples: int,
    seed: int,
) -> list[QuantConfig]:
    """Float, each kernel everywhere it can run, then ``samples`` random configurations."""
    configs = [QuantConfig.uniform(layers, LayerChoice())]
    for kernel in sorted(kernels):
        pick = {}
        for la in layers:
            choices = options[la.name].choices()
            fits = [c for c in choices if backend.kernel_for(la, c) == kernel]
            pick[la.name] = fits[0] if fits else choices[0]
        configs.append(QuantConfig(layers=pick))
    rng = random.Random(seed)
    for _ in range(samples):
        pick = {la.name: rng.choice(options[la.name].choices()) for la in layers}
        configs.append(QuantConfig(layers=pick))
    return configs


def _timed_design(
    evaluator: Any,
    configs: list[QuantConfig],
    columns: list[tuple[str, str]],
    runs: int,
    warmup: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The least-squares problem: a row per configuration (1 where a layer runs a column's
    kernel, and the intercept), and its timed median in ms."""
    backend, layers, spec = evaluator.backend, evaluator.layers, evaluator.spec
    index = {key: i for i, key in enumerate(columns)}
    design = np.zeros((len(configs), len(columns) + 1))
    measured = np.zeros(len(configs))
    for row, config in enumerate(configs):
        design[row, -1] = 1.0
        for la in layers:
            key = (la.name, backend.kernel_for(la, config.layers[la.name]))
            if key in index:
                design[row, index[key]] = 1.0
        lowered = backend.lower(
            evaluator.model,
            layers,
            config,
            evaluator.example_inputs,
            spec.latency_threads,
            calibration=evaluator.calibration,
        )
        with timing_slot.exclusive():  # the node to itself while timing (as trials are)
            timing = measure_latency(
                lowered.run, warmup, runs, spec.latency_threads, backend.device
            )
        measured[row] = timing.median_ms
        if progress is not None:
            progress(row + 1, len(configs))
    return design, measured


def build_latency_table(
    evaluator: Any,
    options: dict[str, LayerOptions],
    runs: int | None = None,
    warmup: int | None = None,
    samples: int | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> LatencyTable:
    """Fit the table to whole-model timings of configurations of the space ``options``.

    Args:
        evaluator: an ``evaluators.evaluator.Evaluator`` or anything with its ``model``,
            ``layers``, ``backend``, ``example_inputs``, ``calibration`` and ``spec``.
        options: the resolved space: per layer, the options that may be chosen.
        runs, warmup: timed and untimed calls per configuration (default: the spec's
            ``latency_runs`` and ``latency_warmup``, as the trials are timed).
        samples: random configurations timed (default: twice the table's entries plus 8).
    """
    backend, layers, spec = evaluator.backend, evaluator.layers, evaluator.spec
    runs = spec.latency_runs if runs is None else runs
    warmup = spec.latency_warmup if warmup is None else warmup
    columns = _columns(backend, layers, options)
    n_samples = samples if samples is not None else 2 * len(columns) + 8
    configs = _configs(backend, layers, options, {k for _, k in columns}, n_samples, seed)
    design, measured = _timed_design(evaluator, configs, columns, runs, warmup, progress)
    coef = _ridge(design, measured)
    delta: dict[str, dict[str, float]] = {}
    for (name, kernel), value in zip(columns, coef[:-1], strict=True):
        delta.setdefault(name, {})[kernel] = float(value)
    float_kernel = backend.kernel_for(layers[0], LayerChoice())
    target = {**model_target(evaluator), "float_kernel": float_kernel, "samples": len(configs)}
    return LatencyTable(target, float(coef[-1]), delta)


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float = 1e-3) -> np.ndarray:
    """Least squares with a small ridge on the deltas (not the intercept): a delta no sample
    separates from another stays near 0 instead of trading off against it."""
    penalty = np.sqrt(alpha) * np.eye(x.shape[1])
    penalty[-1, -1] = 0.0
    a = np.vstack([x, penalty])
    b = np.concatenate([y, np.zeros(x.shape[1])])
    return np.linalg.lstsq(a, b, rcond=None)[0]


def model_target(evaluator: Any) -> dict[str, Any]:
    """The target (``target_key``) and the model (builder and checkpoint) a table is of."""
    spec = evaluator.spec
    model = f"{spec.model}@{spec.checkpoint or 'default'}"
    return {**target_key(spec.backend, spec.latency_threads), "model": model}


def reuse_or_build(
    cached: str | None, evaluator: Any, options: dict[str, LayerOptions]
) -> LatencyTable:
    """``cached`` (JSON) if it was built on this target for this model and covers the space
    ``options``; otherwise a new table, measured here."""
    if cached:
        table = LatencyTable.from_json(cached)
        if table.matches(model_target(evaluator)) and table.covers(
            evaluator.backend.kernel_for, evaluator.layers, options
        ):
            return table
    return build_latency_table(evaluator, options)
