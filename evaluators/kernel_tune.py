"""The kernel autotune: per layer, the fastest of the real kernels that run the same numerics.

A backend may run one choice on several kernels with the same numerics (``candidates``: on
ONNX Runtime a weight-only layer as a float MatMul of weights dequantized at load, or on
``MatMulNBits`` at accuracy level 1). Which is faster depends on the layer and the CPU: on an
AVX2 EPYC ``MatMulNBits`` int4 acc1 beat the float MatMul by 3-14% on the flagship's
memory-bound layers and was up to 2.2x slower on small ones. So it is measured, per target, as
torchao's ``autoquant`` times candidate kernels on recorded shapes, but in the whole model's
cache context: for each choice that has alternatives, the model with that choice on every layer
that offers it (the rest float) is lowered once per candidate, every layer forced onto that
candidate, and ONNX Runtime's profiler gives each layer's time per step (median of
``latency.runs`` steps).

NOTE: a profiled node time is not the whole story (on the tiny policy the profiler put
``MatMulNBits`` acc1 ahead on ``fuse`` and the GRU's input product, and the whole model on
those picks was 16% slower: 0.84x [0.80, 0.89]),
so the per-layer picks of each choice are checked end to end: the model with the choice on the
picked kernels against the same on the default kernels, with the latency protocol (paired,
fresh sessions, 95% interval). The picks are kept only where they are faster beyond that
interval (``rejected`` lists the others: the default runs there). The table is data (JSON),
keyed by the target like the latency table; ``PlannedBackend.tuned`` runs, per layer, the
fastest kernel kept, and each trial records which kernel ran and the measurement that chose it
(``LayerPlan.note``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from mpq.evaluators import timing_slot
from mpq.evaluators.backends.base import LayerPlan
from mpq.evaluators.backends.onnx_profile import layer_scopes, layer_us
from mpq.evaluators.latency import paired_speedup
from mpq.evaluators.latency_table import model_target
from mpq.spaces.space import LayerChoice, LayerOptions, QuantConfig


@dataclass(frozen=True)
class KernelTable:
    """Per layer, per kernel: profiled us per step in the whole model on ``target``."""

    target: dict[str, Any]
    kernel_us: dict[str, dict[str, float]] = field(default_factory=dict)
    # choice -> the end-to-end check of its picks: speedup (default kernels / picked), its
    # 95% interval, and whether the picks were kept
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: dict[str, list[str]] = field(default_factory=dict)  # layer -> kernels not kept
    # layer -> kernels tried but not measured (the export ruled them out for the layer, the
    # profiler gave the layer no node, or the kernel failed): never run, never re-tried
    unmeasured: dict[str, list[str]] = field(default_factory=dict)

    def usable(self) -> dict[str, dict[str, float]]:
        """``kernel_us`` less the rejected kernels: what ``PlannedBackend.tuned`` chooses from."""
        return {
            layer: {k: us for k, us in row.items() if k not in self.rejected.get(layer, ())}
            for layer, row in self.kernel_us.items()
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KernelTable:
        data = json.loads(text)
        return cls(
            data["target"],
            data["kernel_us"],
            data.get("checks", {}),
            data.get("rejected", {}),
            data.get("unmeasured", {}),
        )

    def matches(self, target: dict[str, Any]) -> bool:
        return all(self.target.get(k) == v for k, v in target.items())

    def covers(self, alternatives: dict[str, dict[LayerChoice, tuple[LayerPlan, ...]]]) -> bool:
        """Whether every candidate kernel of every layer's alternatives was tried (measured,
        or found not to run there): a resumed study keeps its table, so its trials keep their
        kernels."""
        return all(
            p.kernel in self.kernel_us.get(name, {}) or p.kernel in self.unmeasured.get(name, ())
            for name, by_choice in alternatives.items()
            for plans in by_choice.values()
            for p in plans
        )


def alternatives(
    backend: Any, layers: Any, options: dict[str, LayerOptions]
) -> dict[str, dict[LayerChoice, tuple[LayerPlan, ...]]]:
    """Layer -> choice -> candidate plans, for the choices of the space that have several."""
    out: dict[str, dict[LayerChoice, tuple[LayerPlan, ...]]] = {}
    for la in layers:
        for choice in options[la.name].choices():
            plans = backend.candidates(la, choice)
            if len(plans) > 1:
                out.setdefault(la.name, {})[choice] = plans
    return out


def tune_kernels(
    evaluator: Any,
    options: dict[str, LayerOptions],
    runs: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> KernelTable:
    """Time every candidate kernel of the space ``options`` in the whole model (see the module
    docstring); a candidate the model rules out for a layer (a fallback) is left unmeasured.

    Args:
        evaluator: an ``evaluators.evaluator.Evaluator`` (its untuned backend is used).
        runs: profiled steps per lowering (default: the spec's ``latency_runs``).
    """
    backend, layers, spec = evaluator.base_backend, evaluator.layers, evaluator.spec
    runs = spec.latency_runs if runs is None else runs
    alts = alternatives(backend, layers, options)
    choices = sorted({c for by in alts.values() for c in by}, key=lambda c: c.describe())
    groups = {c: {name: by[c] for name, by in alts.items() if c in by} for c in choices}
    jobs = []
    for choice, group in groups.items():
        for i in range(max(len(plans) for plans in group.values())):
            jobs.append((choice, {n: plans[i] for n, plans in group.items() if i < len(plans)}))
    scopes = layer_scopes(layers)
    measured: dict[str, dict[str, float]] = {}
    for done, (choice, forced) in enumerate(jobs):
        try:
            pins = {name: plan.kernel for name, plan in forced.items()}
            config = _everywhere(layers, choice, forced)
            lowered = _lower(evaluator, backend.pinned(pins), config)
            with timing_slot.exclusive():
                us = layer_us(
                    lowered.artifact, evaluator.example_inputs, runs, scopes, spec.latency_threads
                )
        except Exception:  # a candidate that fails here is never run: the default runs
            lowered, us = None, {}
        for name, plan in forced.items():
            if lowered is not None and lowered.kernels[name] == plan.kernel and name in us:
                measured.setdefault(name, {})[plan.kernel] = round(us[name], 2)
        if progress is not None:
            progress(done + 1, len(jobs))
    checks: dict[str, dict[str, Any]] = {}
    rejected: dict[str, list[str]] = {}
    for choice, group in groups.items():
        check = _check(evaluator, choice, group, measured)
        if check is None:
            continue
        checks[choice.describe()] = check
        if not check["kept"]:
            for name, plans in group.items():
                rejected.setdefault(name, []).extend(p.kernel for p in plans[1:])
    unmeasured = {}
    for name, by in alts.items():
        tried = {p.kernel for plans in by.values() for p in plans}
        if missing := sorted(tried - set(measured.get(name, {}))):
            unmeasured[name] = missing
    return KernelTable(model_target(evaluator), measured, checks, rejected, unmeasured)


def _everywhere(layers: Any, choice: LayerChoice, names: Any) -> QuantConfig:
    """``choice`` on the layers ``names``, the rest float."""
    return QuantConfig(
        layers={la.name: choice if la.name in names else LayerChoice() for la in layers}
    )


def _lower(evaluator: Any, backend: Any, config: QuantConfig) -> Any:
    spec = evaluator.spec
    with timing_slot.compute():
        return backend.lower(
            evaluator.model,
            evaluator.layers,
            config,
            evaluator.example_inputs,
            spec.latency_threads,
            calibration=evaluator.calibration,
            observer=spec.observer,
        )


def _check(
    evaluator: Any,
    choice: LayerChoice,
    group: dict[str, tuple[LayerPlan, ...]],
    measured: dict[str, dict[str, float]],
) -> dict[str, Any] | None:
    """The model with ``choice`` on the ``group`` layers on the kernels picked per layer
    against on the default ones (latency protocol); None where every pick is the default."""
    base = evaluator.base_backend
    tuned = base.tuned({name: measured.get(name, {}) for name in group})
    by_name = {la.name: la for la in evaluator.layers}
    if all(
        tuned.plan_layer(by_name[name], choice).kernel == plans[0].kernel
        for name, plans in group.items()
    ):
        return None
    config = _everywhere(evaluator.layers, choice, group)
    spec = evaluator.spec
    try:
        default, picked = _lower(evaluator, base, config), _lower(evaluator, tuned, config)
        with timing_slot.exclusive():
            paired = paired_speedup(
                default.new_runner,
                picked.new_runner,
                spec.latency_visits,
                spec.latency_runs,
                spec.latency_warmup,
                spec.latency_threads,
                base.device,
            )
    except Exception as exc:  # the picks do not run as a whole: the default kernels do
        return {"kept": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return {
        "speedup": round(paired.speedup, 4),
        "speedup_lo": round(paired.speedup_lo, 4),
        "speedup_hi": round(paired.speedup_hi, 4),
        "kept": paired.speedup_lo > 1.0,
    }


def reuse_or_tune(
    cached: str | None, evaluator: Any, options: dict[str, LayerOptions]
) -> KernelTable:
    """``cached`` (JSON) if it was measured on this target for this model and covers the space
    ``options``; otherwise a new table, measured here (empty, at no cost, where no choice of
    the space has two kernels)."""
    alts = alternatives(evaluator.base_backend, evaluator.layers, options)
    if cached:
        table = KernelTable.from_json(cached)
        if table.matches(model_target(evaluator)) and table.covers(alts):
            return table
    if not alts:
        return KernelTable(model_target(evaluator), {})
    return tune_kernels(evaluator, options)
