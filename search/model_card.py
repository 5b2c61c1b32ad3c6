"""``MODEL_CARD.md`` of an export: what ships, its figures beside float's, how they were
measured, the kernels that ran (and the QAT stage, where it ran)."""

from __future__ import annotations

import json
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from mpq.search.config import SearchConfig
from mpq.search.pareto import aa_speedup, format_speedup, format_success
from mpq.search.record import StudyAttr, TrialAttr

ARTIFACT = "model.mpq.pt"


_SHIPPED = {
    "onnx": "`model.onnx` (plain onnxruntime runs it; inputs and outputs in `io.json`)",
    "measure-only": "none: backend `{backend}` is measure-only; size is the packing formula of "
    "what ran",
    "none": "none: no backend measured this study; size is mpq's packing formula",
}


def model_card(
    cfg: SearchConfig,
    study: optuna.Study,
    t: FrozenTrial,
    deployable: dict[str, Any],
    confirmed: dict[str, float] | None = None,
    io_spec: dict[str, Any] | None = None,
    why: str = "",
) -> str:
    """``MODEL_CARD.md``: what ships, why this trial, its figures beside float's, how they
    were measured, and how to run it (plain onnxruntime, or PyTorch through ``mpq.load``)."""
    ref = dict(study.user_attrs.get(StudyAttr.FLOAT_REFERENCE, {}))
    a = t.user_attrs
    shipped = _SHIPPED[deployable["artifact"]].format(backend=cfg.latency.backend)
    refined = a.get(TrialAttr.REFINED, {})
    episodes = (
        f"{cfg.task_budget} episodes per level, fixed evaluation seeds, the same for every "
        "configuration"
        + (
            f"; a close call, this trial's success is of the first "
            f"{cfg.task_budget + cfg.refine_budget} (it read {refined['success_before']:.3f} on "
            f"{cfg.task_budget})"
            if "success_before" in refined
            else ""
        )
    )
    lines = [
        f"# {cfg.name}: trial {t.number}",
        "",
        f"Model `{cfg.model}`, task `{cfg.task}` ({episodes}). Every figure below is of the "
        f"model that ships, as it runs (`ran_config.yaml`); deployable file: {shipped}.",
        "",
        *([f"Why this trial: {why}.", ""] if why else []),
        *_figures_table(cfg, ref, a, confirmed),
        "",
        "The search's success is the best of many noisy estimates on the same episodes, so it "
        "leans optimistic; the held-out row is measured once, on episodes the search never saw."
        if confirmed
        else "No held-out confirmation: set `confirm_task` and `confirm_budget` in the config.",
        "",
        *_qat_note(a.get(TrialAttr.QAT, {})),
        _latency_note(cfg, ref, a.get(TrialAttr.LATENCY_INFO, {})),
        f"The configuration as searched asked for {a.get('asked_size_bytes', 0):,} bytes.",
        "",
        *how_to_run(io_spec),
        "Kernels that ran, and choices lowered to what runs:",
        "",
        "```json",
        json.dumps({k: a.get(k, {}) for k in (TrialAttr.KERNELS, TrialAttr.FALLBACKS)}, indent=1),
        "```",
    ]
    return "\n".join(lines) + "\n"


def how_to_run(io_spec: dict[str, Any] | None) -> list[str]:
    """The card's "How to run it": plain onnxruntime with the file's own input and output
    names and shapes (``io.json``), and PyTorch through ``mpq.load``."""
    lines = ["## How to run it", ""]
    if io_spec:
        ins = ", ".join(f"`{i['name']}` {i['dtype']} {i['shape']}" for i in io_spec["inputs"])
        outs = ", ".join(f"`{o['name']}` {o['dtype']} {o['shape']}" for o in io_spec["outputs"])
        lines += [
            "With plain onnxruntime (no mpq, no torch):",
            "",
            "```python",
            "import numpy as np, onnxruntime as ort",
            'session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])',
            'step = dict(np.load("example_inputs.npz"))  # one control step, batch 1',
            "outputs = session.run(None, step)  # in io.json's order",
            "```",
            "",
            f"Inputs: {ins}. Outputs: {outs}. One call is one control step at batch 1, as the "
            "latency was measured; a stateful policy returns its next state among the outputs, "
            "to pass back as the matching input at the next step. `expected_outputs.npz` holds "
            "the outputs of `example_inputs.npz` (the simulated model's: a check that the file "
            "runs as measured).",
            "",
        ]
    lines += [
        f"In PyTorch, from the packed weights (`{ARTIFACT}`, loaded with `weights_only=True`):",
        "",
        "```python",
        "import mpq",
        'model = mpq.load("<this folder>")  # the quantized model as it ran, activations too',
        "```",
        "",
    ]
    return lines


def _qat_note(qat: dict[str, Any]) -> list[str]:
    """The QAT stage's lines of the model card (none where it did not run)."""
    if not qat.get("checkpoint"):
        return []
    return [
        f"Fine-tuned with quantization-aware training in the search: {qat.get('steps')} steps "
        f"({qat.get('seconds', 0):.0f} s, progressive: {qat.get('progressive')}, learned "
        f"ranges: {qat.get('lsq')}); success {qat.get('ptq_success', float('nan')):.3f} after "
        "post-training quantization alone. The weights that ship are the fine-tuned ones, "
        "quantized by the same formula and packing.",
        "",
    ]


def _figures_table(
    cfg: SearchConfig, ref: dict[str, Any], a: dict[str, Any], confirmed: dict[str, float] | None
) -> list[str]:
    """The card's table: success (search and held-out), size, latency; float beside."""
    lines = [
        "| | float | this configuration |",
        "|---|---|---|",
        "| task success, search episodes (95% interval) | "
        f"{format_success(ref)} | {format_success(a)} |",
    ]
    if confirmed:
        lines.append(
            f"| task success, held-out episodes ({cfg.confirm_budget} per level, "
            f"`{cfg.confirm_task}`) | | {format_success(confirmed)} |"
        )
    ratio = ref.get("size_bytes", 0) / max(a.get("size_bytes", 1), 1)
    lines.append(
        f"| size (bytes of what ships) | {ref.get('size_bytes', 0):,} | "
        f"{a.get('size_bytes', 0):,} (compression {ratio:.2f}x) |"
    )
    if a.get("latency_ms"):
        lines.append(
            f"| latency (ms, batch 1) | {ref.get('latency_ms', float('nan')):.3f} "
            f"| {a['latency_ms']:.3f} (speed-up {format_speedup(a)}) |"
        )
    return lines


def _latency_note(cfg: SearchConfig, ref: dict[str, Any], info: dict[str, Any]) -> str:
    """How the latency was measured: backend, threads, visits, CPU, the A/A check."""
    return (
        f"Latency: backend `{cfg.latency.backend}`, {info.get('threads', '?')} thread(s), "
        f"float and this configuration interleaved over {info.get('visits', '?')} fresh-session "
        f"visit pairs of {info.get('runs', '?')} runs each in the node's exclusive timing slot "
        f"(speed-up: geometric mean over pairs, 95% interval), on {info.get('cpu', '?')} "
        f"[{info.get('isa', '?')}] ({info.get('versions', '?')}); the float model against a "
        f"fresh copy of itself read {format_speedup(aa_speedup(ref))} (A/A). Latency in ms is the "
        "float latency over the speed-up."
    )
