"""``mpq finetune``: quantization-aware training of one configuration of a study, measured on
the study's own task and exported like a trial.

The configuration is a trial's (``--trial N``: its kernels pinned, so what is trained is what
the trial ran) or a file's. Success before (post-training quantization) and after (QAT) is
measured on the same evaluation episodes (the task's fixed seeds, ``task_budget`` per level);
the fine-tuned model is lowered with the same kernels, so its deployable bytes are the
configuration's (checked) and its latency is the trial's (the same graph and kernels, other
weight values). Written to ``out``: ``model.onnx`` (ONNX Runtime backends), the packed
artifact, the fine-tuned float checkpoint (``finetuned.pt``, ``weights_only`` loadable),
the configurations, ``qat.json`` (settings, loss per step, stages, time, success before and
after) and ``qat_loss.png``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from mpq.evaluators.qat import QatResult, QatSettings
from mpq.files import write_atomic
from mpq.search.config import SearchConfig
from mpq.search.export import ARTIFACT, onnx_files, torch_bytes
from mpq.search.record import TrialRecord
from mpq.spaces.io import dump_text
from mpq.spaces.space import QuantConfig

SUCCESS_KEYS = ("success", "success_lo", "success_hi", "episodes")


def finetune_config(
    cfg: SearchConfig,
    config: QuantConfig,
    settings: QatSettings,
    out_dir: Path,
    kernels: dict[str, str] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune ``config``, measure success before and after, write the export to ``out_dir``.

    Raises:
        ValueError: bad settings or data, a loss that is not finite, a fine-tuned artifact
            whose bytes differ from the configuration's, or an ``out_dir`` that cannot be
            written (nothing half-written is left).
    """
    from mpq.evaluators.artifact import pack_state
    from mpq.evaluators.evaluator import get_evaluator
    from mpq.search.worker import eval_spec

    ev = get_evaluator(eval_spec(cfg))
    ev.pin_kernels(dict(kernels or {}))
    config.check(ev.layers, "finetune: config")
    ran = ev.as_ran(config)
    before = ev.artifact(config)
    ptq = _success(ev.success(config, cfg.task_budget))
    tuned, result = ev.finetuned(config, settings, on_step)
    after = tuned.artifact(config)
    if after["size_bytes"] != before["size_bytes"]:
        raise ValueError(
            f"finetune: the fine-tuned artifact has {after['size_bytes']:,} bytes, the "
            f"configuration {before['size_bytes']:,}: the packing must not depend on values"
        )
    qat = _success(tuned.success(config, cfg.task_budget))
    info = {
        "settings": settings.model_dump(mode="json"),
        "ptq": ptq,
        "qat": qat,
        "size_bytes": after["size_bytes"],
        "artifact": after["artifact"],
        "steps": len(result.losses),
        "seconds": round(result.seconds, 2),
        "stages": [
            {"w_bits": {str(k): v for k, v in s["w_bits"].items()}, "steps": s["steps"]}
            for s in result.stages
        ],
        "loss": result.losses,
        "kernels": dict(tuned.lower(config).kernels) if cfg.latency.enabled else {},
    }
    files = {
        "config.yaml": dump_text(config, "c.yaml").encode(),
        "ran_config.yaml": dump_text(ran, "c.yaml").encode(),
        ARTIFACT: torch_bytes(pack_state(tuned.model, tuned.layers, ran)),
        "finetuned.pt": torch_bytes(tuned.model.state_dict()),
        "qat.json": (json.dumps(info, indent=1) + "\n").encode(),
        "qat_loss.png": loss_plot_png(result, ptq, qat),
    }
    if after["artifact"] == "onnx":
        files.update(onnx_files(tuned, config, ran))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            write_atomic(out_dir / name, data)
    except OSError as exc:
        raise ValueError(
            f"finetune: writing {str(out_dir)!r} failed: {exc.strerror or exc}"
        ) from None
    return {**info, "out_dir": str(out_dir)}


def trial_config(study: optuna.Study, number: int) -> tuple[QuantConfig, dict[str, str]]:
    """Trial ``number``'s configuration and the kernels it ran.

    Raises:
        ValueError: no such trial, or it has no configuration.
    """
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise ValueError(f"finetune: study {study.study_name!r} has no trial {number}")
    record = TrialRecord.from_frozen(trials[number])
    if record.config is None:
        raise ValueError(f"finetune: trial {number} has no configuration")
    return record.config, dict(record.kernels)


def _success(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(metrics[k]) for k in SUCCESS_KEYS if k in metrics}


def loss_plot_png(result: QatResult, ptq: dict[str, float], qat: dict[str, float]) -> bytes:
    """The loss per step (log scale), the progressive stages shaded and labelled by their
    lowest width, success before and after in the title."""
    import io

    from mpq.search.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    start = 0
    for i, stage in enumerate(result.stages):
        end = start + stage["steps"]
        if len(result.stages) > 1:
            ax.axvspan(start, end, color=("#eef2f7" if i % 2 else "#f7f7f7"), lw=0)
            low = min(stage["w_bits"])
            ax.text(
                (start + end) / 2,
                1.0,
                f"{low}-bit",
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=8,
                color="#555",
            )
        start = end
    steps = range(1, len(result.losses) + 1)
    ax.plot(steps, result.losses, color="#1f77b4", lw=1, label="loss per step")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (log)")
    title = (
        f"QAT: success {ptq.get('success', float('nan')):.3f} (PTQ) -> "
        f"{qat.get('success', float('nan')):.3f} after {len(result.losses)} steps, "
        f"{result.seconds:.0f} s"
    )
    ax.set_title(title, fontsize=10, pad=14 if len(result.stages) > 1 else 6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def describe(info: dict[str, Any]) -> str:
    """One line: success before and after with intervals, bytes, time, where it went."""

    def fmt(m: dict[str, float]) -> str:
        if "success_lo" in m:
            return f"{m['success']:.3f} ({m['success_lo']:.3f}-{m['success_hi']:.3f})"
        return f"{m.get('success', float('nan')):.3f}"

    return (
        f"success {fmt(info['ptq'])} after post-training quantization -> {fmt(info['qat'])} "
        f"after {info['steps']} QAT steps ({info['seconds']:.0f} s); {info['size_bytes']:,} "
        f"bytes (unchanged); written to {info['out_dir']}"
    )
