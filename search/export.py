"""Pick a configuration from a study and write it out: plain config, packed artifact, model card.

Rules for picking (all among feasible front trials, Optuna's ``best_trials``):

- ``trial``: the trial with that number (any complete trial);
- ``best``: the highest success, ties broken by smaller size;
- ``max_size_bytes`` / ``max_latency_ms``: the highest success within the budget;
- ``knee``: the front point nearest the utopia point after normalising each objective to
  [0, 1] over the front (Euclidean distance), a common reading of "the knee".
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from mpq.evaluators.apply import apply_config
from mpq.evaluators.artifact import pack_state, payload_bytes, unpack_state
from mpq.evaluators.model import build_model, load_state_dict
from mpq.search.config import SearchConfig
from mpq.search.pareto import format_speedup, front_trials
from mpq.spaces.discover import discover_layers
from mpq.spaces.io import dump_text, write_atomic
from mpq.spaces.space import QuantConfig

ARTIFACT = "model.mpq.pt"


def pick_trial(
    study: optuna.Study,
    trial: int | None = None,
    rule: str = "knee",
    max_size_bytes: int | None = None,
    max_latency_ms: float | None = None,
) -> FrozenTrial:
    """Choose one trial (see the module docstring). Raises ``ValueError`` when none fits."""
    if trial is not None:
        if not 0 <= trial < len(study.trials):
            raise ValueError(f"--trial {trial}: the study has trials 0..{len(study.trials) - 1}")
        t = study.trials[trial]
        if t.state != TrialState.COMPLETE:
            raise ValueError(f"--trial {trial} is {t.state.name.lower()}, not complete")
        return t
    front = front_trials(study)
    if not front:
        raise ValueError(f"study {study.study_name!r} has no feasible complete trial yet")
    pool = [
        t
        for t in front
        if (max_size_bytes is None or t.user_attrs.get("size_bytes", math.inf) <= max_size_bytes)
        and (max_latency_ms is None or t.user_attrs.get("latency_ms", math.inf) <= max_latency_ms)
    ]
    if not pool:
        raise ValueError(f"no front trial within size<={max_size_bytes} latency<={max_latency_ms}")
    if rule == "knee" and max_size_bytes is None and max_latency_ms is None:
        return _knee(study, pool)
    return max(
        pool, key=lambda t: (t.user_attrs.get("success", 0.0), -t.user_attrs.get("size_bytes", 0))
    )


def _knee(study: optuna.Study, pool: list[FrozenTrial]) -> FrozenTrial:
    signs = [1 if d.name == "MINIMIZE" else -1 for d in study.directions]
    rows = [[s * v for s, v in zip(signs, t.values, strict=True)] for t in pool]
    lo = [min(col) for col in zip(*rows, strict=True)]
    hi = [max(col) for col in zip(*rows, strict=True)]

    def dist(row: list[float]) -> float:
        return math.sqrt(
            sum(
                ((v - a) / (b - a) if b > a else 0.0) ** 2
                for v, a, b in zip(row, lo, hi, strict=True)
            )
        )

    return min(zip(pool, rows, strict=True), key=lambda pr: dist(pr[1]))[0]


def _aa(ref: dict[str, Any]) -> dict[str, Any]:
    return {k.removeprefix("aa_"): v for k, v in ref.items() if k.startswith("aa_speedup")}


def model_card(cfg: SearchConfig, study: optuna.Study, t: FrozenTrial, artifact_bytes: int) -> str:
    ref = study.user_attrs.get("float_reference", {})
    a = t.user_attrs
    info = a.get("latency_info", {})
    lines = [
        f"# {cfg.name}: trial {t.number}",
        "",
        f"Model `{cfg.model}`, task `{cfg.task}` ({cfg.task_budget} episodes per level, fixed "
        "evaluation seeds, the same for every configuration).",
        "",
        "| | float | this configuration |",
        "|---|---|---|",
        f"| task success (95% interval) | {ref.get('success', float('nan')):.3f} "
        f"({ref.get('success_lo', float('nan')):.3f}-{ref.get('success_hi', float('nan')):.3f}) "
        f"| {a.get('success', float('nan')):.3f} ({a.get('success_lo', float('nan')):.3f}-"
        f"{a.get('success_hi', float('nan')):.3f}) |",
        f"| size (bytes) | {ref.get('size_bytes', 0):,} | {a.get('size_bytes', 0):,} "
        f"({ref.get('size_bytes', 0) / max(a.get('size_bytes', 1), 1):.2f}x smaller) |",
    ]
    if a.get("latency_ms"):
        lines.append(
            f"| latency (ms, batch 1, median) | {ref.get('latency_ms', float('nan')):.3f} "
            f"| {a['latency_ms']:.3f} (speed-up {format_speedup(a)}) |"
        )
    lines += [
        "",
        f"Latency: backend `{cfg.latency.backend}`, {info.get('threads', '?')} thread(s), "
        f"float and this configuration interleaved over {info.get('visits', '?')} fresh-session "
        f"visit pairs of {info.get('runs', '?')} runs each in the node's exclusive timing slot "
        f"(speed-up: geometric mean over pairs, 95% interval), on {info.get('cpu', '?')} "
        f"[{info.get('isa', '?')}] ({info.get('versions', '?')}); the float model against a "
        f"fresh copy of itself read {format_speedup(_aa(ref))} (A/A). Latency in ms is the "
        "float latency over the speed-up.",
        f"Artifact `{ARTIFACT}`: {artifact_bytes:,} payload bytes (packed weights, scales, zero "
        "points, float tensors); load with `mpq.search.export.load_artifact`.",
        "",
        "Kernels that ran, and choices lowered to what runs:",
        "",
        "```json",
        json.dumps(
            {"kernels": a.get("kernels", {}), "fallbacks": a.get("fallbacks", {})}, indent=1
        ),
        "```",
    ]
    return "\n".join(lines) + "\n"


def export_trial(
    cfg: SearchConfig, study: optuna.Study, t: FrozenTrial, out_dir: Path
) -> dict[str, Any]:
    """Write config.yaml, config.json, the packed artifact and MODEL_CARD.md into ``out_dir``.

    Raises:
        ValueError: ``out_dir`` cannot be written (read-only, full disk); nothing half-written
            is left behind, and the study is only read.
    """
    config = QuantConfig.model_validate(t.user_attrs["config"])
    model = build_model(cfg.model, cfg.checkpoint)
    layers = discover_layers(model)
    state = pack_state(model, layers, config)
    nbytes = payload_bytes(state)
    reported = int(t.user_attrs.get("size_bytes", nbytes))
    if nbytes != reported:
        raise AssertionError(f"artifact payload {nbytes} bytes != reported size {reported}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / "config.yaml", dump_text(config, "c.yaml"))
        write_atomic(out_dir / "config.json", dump_text(config, "c.json"))
        buf = io.BytesIO()
        torch.save(state, buf)  # serialised in memory, so a full disk fails in plain file I/O
        write_atomic(out_dir / ARTIFACT, buf.getvalue())
        write_atomic(out_dir / "MODEL_CARD.md", model_card(cfg, study, t, nbytes))
    except OSError as exc:
        raise ValueError(f"export to {str(out_dir)!r} failed: {exc.strerror or exc}") from None
    return {
        "trial": t.number,
        "payload_bytes": nbytes,
        "reported_bytes": reported,
        "file_bytes": (out_dir / ARTIFACT).stat().st_size,
        "out_dir": str(out_dir),
    }


def load_artifact(
    path: str | Path,
    config: QuantConfig,
    model_spec: str,
    checkpoint: str | None = None,
    calibration: list[Any] | None = None,
) -> torch.nn.Module:
    """Rebuild a working quantized model from an exported artifact (``weights_only=True``).

    The packed weights are unpacked to exactly the simulated-quantized values; activation
    quantization from ``config`` is re-attached (static ranges need ``calibration``).
    """
    model = build_model(model_spec, checkpoint)
    layers = discover_layers(model)
    model.load_state_dict(unpack_state(load_state_dict(path), layers))
    return apply_config(model, config, calibration, layers=layers, quantize_weights=False)
