"""What runs on a worker for one trial: measure one configuration. No Ray here.

The cluster module (``search/cluster.py``) sends these functions to Ray workers; they take and
return plain data (JSON strings, dicts), so they run the same in a test without Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from enum import StrEnum
from typing import Any

from mpq.evaluators.evaluator import EvalSpec, finite_or_error, get_evaluator
from mpq.evaluators.kernel_tune import reuse_or_tune
from mpq.evaluators.latency_table import LatencyTable, reuse_or_build
from mpq.search.config import SearchConfig
from mpq.spaces.space import LayerOptions, QuantConfig
from mpq.zoo import resolve_model


class ArtifactFigures(StrEnum):
    """How a trial's size, proxy and latency are obtained in one worker call."""

    MEASURED = "measured"  # lowered to the backend's kernels: the deployable artifact
    PREDICTED = "predicted"  # formula size, simulation, latency from the latency table
    NONE = "none"  # not in this call (the task episodes only)


def eval_spec(cfg: SearchConfig) -> EvalSpec:
    """The evaluator's settings out of a search config (plain data, sent to workers)."""
    return EvalSpec(
        model=resolve_model(cfg.model),
        task=cfg.task,
        calibration=cfg.calibration,
        checkpoint=cfg.checkpoint,
        output=cfg.output,
        example_inputs=cfg.example_inputs,
        backend=cfg.latency.backend,
        observer=cfg.observer,
        latency_threads=cfg.latency.threads,
        latency_warmup=cfg.latency.warmup,
        latency_runs=cfg.latency.runs,
        latency_visits=cfg.latency.visits,
        measure_latency=cfg.latency.enabled,
        allow_fallback=cfg.latency.allow_fallback,
        latency_agent=cfg.latency.agent,
        latency_agent_token=os.environ.get("MPQ_AGENT_TOKEN") if cfg.latency.agent else None,
        latency_agent_timeout_s=cfg.trial_timeout_s,
    )


def evaluate_trial(
    spec: EvalSpec,
    config_json: str,
    artifact: ArtifactFigures,
    episodes: int,
    memory_mb: int | None = None,
    latency_table: str | None = None,
    kernel_table: str | None = None,
) -> dict[str, Any]:
    """One worker call of a trial: its artifact figures (``artifact``), then ``episodes`` of
    the task (success with its interval).

    With ``memory_mb``, the worker may grow its address space by at most that much during the
    call (``RLIMIT_AS``, restored after): an allocation past it raises instead of taking the
    machine down. ``kernel_table`` (the autotune's, JSON) picks each layer's kernel.

    Raises:
        ValueError: a measurement came back non-finite (the trial fails with that reason).
    """
    start = time.perf_counter()
    table = LatencyTable.from_json(latency_table) if latency_table else None
    with _memory_limit(memory_mb):
        evaluator = get_evaluator(spec)
        evaluator.use_kernels(kernel_table)
        config = QuantConfig.model_validate_json(config_json)
        out: dict[str, Any] = {}
        if artifact == ArtifactFigures.PREDICTED:
            out.update(evaluator.screen(config, table))
        elif artifact == ArtifactFigures.MEASURED:
            out.update(evaluator.screen(config))
        if episodes > 0:
            out.update(evaluator.success(config, episodes))
            out["episodes"] = episodes
    out["eval_s"] = time.perf_counter() - start
    finite_or_error(out, ("success",) if episodes > 0 else ("size_bytes",))
    return out


QAT_WEIGHTS = "qat_weights"  # a QAT stage's result: the fine-tuned state dict (torch.save bytes)


def qat_trial(
    spec: EvalSpec,
    config_json: str,
    artifact: ArtifactFigures,
    episodes: int,
    settings_json: str,
    memory_mb: int | None = None,
    latency_table: str | None = None,
    kernel_table: str | None = None,
) -> dict[str, Any]:
    """A trial's QAT stage on a worker: fine-tune the configuration as it runs
    (``Evaluator.finetuned``), then measure the fine-tuned model like ``evaluate_trial``: its
    artifact figures (``artifact``) and ``episodes`` of the task. Returns the figures, a
    ``qat`` record (steps, seconds, first and last loss) and the fine-tuned weights
    (``QAT_WEIGHTS``: the driver keeps them for the export).

    Raises:
        ValueError: training failed (a loss that is not finite), the fine-tuned artifact's bytes
            differ from the configuration's, or a measurement came back non-finite.
    """
    import io

    import torch

    from mpq.evaluators.qat import QatSettings

    start = time.perf_counter()
    with _memory_limit(memory_mb):
        evaluator = get_evaluator(spec)
        evaluator.use_kernels(kernel_table)
        config = QuantConfig.model_validate_json(config_json)
        settings = QatSettings.model_validate_json(settings_json)
        tuned, result = evaluator.finetuned(config, settings)
        out: dict[str, Any] = {}
        if artifact == ArtifactFigures.MEASURED:
            out.update(tuned.screen(config))
        if spec.measure_latency:
            before, after = evaluator.artifact(config), tuned.artifact(config)
            if after["size_bytes"] != before["size_bytes"]:
                raise ValueError(
                    f"QAT: the fine-tuned artifact has {after['size_bytes']:,} bytes, the "
                    f"configuration {before['size_bytes']:,}"
                )
        out.update(tuned.success(config, episodes))
        out["episodes"] = episodes
    out["qat"] = {  # TrialAttr.QAT, completed by the driver
        "steps": len(result.losses),
        "seconds": round(result.seconds, 2),
        "loss_first": result.losses[0],
        "loss_last": result.losses[-1],
        "progressive": settings.progressive,
        "lsq": settings.lsq,
    }
    buf = io.BytesIO()
    torch.save(tuned.model.state_dict(), buf)
    out[QAT_WEIGHTS] = buf.getvalue()
    out["eval_s"] = time.perf_counter() - start
    finite_or_error(out, ("success",))
    return out


def build_table(
    spec: EvalSpec,
    options_json: str,
    cached_json: str | None = None,
    kernel_table: str | None = None,
) -> str:
    """The latency table (JSON), built where the trials run (the target), on the kernels of
    ``kernel_table``; ``cached_json`` is kept when it was built on this target for this
    space."""
    evaluator = get_evaluator(spec)
    evaluator.use_kernels(kernel_table)
    return reuse_or_build(cached_json, evaluator, _options(options_json)).to_json()


def tune_table(spec: EvalSpec, options_json: str, cached_json: str | None = None) -> str:
    """The kernel autotune's table (JSON), measured where the trials run (the target);
    ``cached_json`` is kept when it was measured on this target for this space."""
    return reuse_or_tune(cached_json, get_evaluator(spec), _options(options_json)).to_json()


def _options(options_json: str) -> dict[str, LayerOptions]:
    raw = json.loads(options_json)
    return {name: LayerOptions.model_validate(o) for name, o in raw.items()}


@contextlib.contextmanager
def _memory_limit(memory_mb: int | None) -> Iterator[None]:
    if not memory_mb:
        yield
        return
    import resource

    old = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        vm_kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmSize:"))
    limit = vm_kb * 1024 + memory_mb * 1024 * 1024
    if old[1] != resource.RLIM_INFINITY:
        limit = min(limit, old[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)
