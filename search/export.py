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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from mpq.evaluators.apply import apply_config
from mpq.evaluators.artifact import pack_state, payload_bytes, unpack_state
from mpq.evaluators.inputs import call, session_feeds
from mpq.evaluators.model import build_model, load_state_dict
from mpq.files import write_atomic
from mpq.search.config import SearchConfig
from mpq.search.model_card import ARTIFACT, model_card
from mpq.search.pareto import format_success, front_trials
from mpq.search.record import Measurements, TrialRecord, loss_signs
from mpq.spaces.discover import discover_layers
from mpq.spaces.io import dump_text
from mpq.spaces.space import QuantConfig
from mpq.zoo import resolve_model


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
    size_cap = math.inf if max_size_bytes is None else max_size_bytes
    latency_cap = math.inf if max_latency_ms is None else max_latency_ms

    def within(m: Measurements) -> bool:
        size, latency = m.size_bytes, m.latency_ms
        return (math.inf if size is None else size) <= size_cap and (
            math.inf if latency is None else latency
        ) <= latency_cap

    pool = [t for t in front if within(TrialRecord.from_frozen(t).measurements)]
    if not pool:
        raise ValueError(f"no front trial within size<={max_size_bytes} latency<={max_latency_ms}")
    if rule == "knee" and max_size_bytes is None and max_latency_ms is None:
        return _knee(study, pool)

    def best(t: FrozenTrial) -> tuple[float, float]:
        m = TrialRecord.from_frozen(t).measurements
        return (m.success or 0.0, -(m.size_bytes or 0))

    return max(pool, key=best)


def pick_reason(
    study: optuna.Study,
    t: FrozenTrial,
    trial: int | None = None,
    rule: str = "knee",
    max_size_bytes: int | None = None,
    max_latency_ms: float | None = None,
) -> str:
    """Why ``pick_trial`` picked ``t``: the rule and the values it compared."""
    n = len(front_trials(study))
    success = TrialRecord.from_frozen(t).measurements.success or 0.0
    if trial is not None:
        return f"trial {trial} as asked (--trial)"
    if max_size_bytes is not None or max_latency_ms is not None:
        caps = " and ".join(
            c
            for c in (
                f"size <= {max_size_bytes:,} bytes" if max_size_bytes is not None else "",
                f"latency <= {max_latency_ms} ms" if max_latency_ms is not None else "",
            )
            if c
        )
        return f"the highest success ({success:.3f}) among the front points with {caps}"
    if rule == "knee":
        return (
            f"the knee of the front: of its {n} points, the nearest to the ideal point (the "
            "front's best success, size and latency) once each objective is scaled to [0, 1] "
            "over the front"
        )
    return f"the highest success ({success:.3f}) of the {n} front points, ties to the smaller"


def _knee(study: optuna.Study, pool: list[FrozenTrial]) -> FrozenTrial:
    signs = loss_signs(study.directions)
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


def export_trial(
    cfg: SearchConfig, study: optuna.Study, t: FrozenTrial, out_dir: Path, why: str = ""
) -> dict[str, Any]:
    """Write what ships for trial ``t`` into ``out_dir``:

    - ``model.onnx`` (ONNX Runtime backends): the deployable model whose bytes are the trial's
      size objective and whose latency it measured; plain ``onnxruntime`` runs it (no mpq, no
      torch). ``io.json`` names its inputs and outputs; ``example_inputs.npz`` and
      ``expected_outputs.npz`` hold one step and the simulated model's outputs for it;
    - ``config.yaml``/``config.json`` (as searched), ``ran_config.yaml`` (what runs);
    - ``model.mpq.pt``: the packed weights of what runs, and ``manifest.json`` (the model,
      calibration and why this trial): ``mpq.load(out_dir)`` rebuilds it in PyTorch;
    - ``MODEL_CARD.md``, with why this trial (``why``), the success confirmed on held-out
      episodes (``confirm_task``) and how to run it.

    Raises:
        ValueError: the deployable model does not have the trial's bytes or kernels (the
            lowering changed since: another mpq, onnxruntime or torch), or ``out_dir`` cannot
            be written (read-only, full disk); nothing half-written is left behind, the study
            only read.
    """
    from mpq.evaluators.evaluator import get_evaluator
    from mpq.search.worker import eval_spec

    record = TrialRecord.from_frozen(t)
    if record.config is None:
        raise ValueError(f"export of trial {t.number}: it has no configuration")
    config = record.config
    ev = get_evaluator(eval_spec(cfg))
    ev.pin_kernels(dict(record.kernels))  # the kernels the trial ran (same numerics)
    if record.qat.get("checkpoint"):  # the trial's QAT stage: its fine-tuned weights ship
        ev = ev.with_model(qat_model(cfg, ev.model, record))
    ran = ev.as_ran(config)
    deployable = ev.artifact(config)
    _check_same_as_trial(cfg, ev, record, deployable)
    state = pack_state(ev.model, ev.layers, ran)
    files = {
        "config.yaml": dump_text(config, "c.yaml").encode(),
        "config.json": dump_text(config, "c.json").encode(),
        "ran_config.yaml": dump_text(ran, "c.yaml").encode(),
        ARTIFACT: torch_bytes(state),
    }
    if deployable["artifact"] == "onnx":
        files.update(onnx_files(ev, config, ran))
    confirmed = confirm(cfg, ev, ran)
    io_spec = json.loads(files["io.json"]) if "io.json" in files else None
    card = model_card(cfg, study, t, deployable, confirmed, io_spec, why)
    files["MODEL_CARD.md"] = card.encode()
    files[MANIFEST] = (json.dumps(manifest(cfg, study, t, why), indent=1) + "\n").encode()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            write_atomic(out_dir / name, data)
    except OSError as exc:
        raise ValueError(f"export to {str(out_dir)!r} failed: {exc.strerror or exc}") from None
    return {
        "trial": t.number,
        "size_bytes": deployable["size_bytes"],
        "artifact": deployable["artifact"],
        "payload_bytes": payload_bytes(state),
        "confirmed": confirmed,
        "out_dir": str(out_dir),
    }


def qat_model(cfg: SearchConfig, model: torch.nn.Module, record: TrialRecord) -> torch.nn.Module:
    """The fine-tuned float model of a trial's QAT stage (the study's ``qat/trial-N.pt``,
    loaded with ``weights_only=True``): exactly the bytes the trial measured (sha256 checked).

    Raises:
        ValueError: the checkpoint is missing, not the trial's (another study's, or changed
            since), or does not fit the model.
    """
    import copy
    import hashlib

    path = Path(cfg.output_dir) / str(record.qat["checkpoint"])
    where = f"export of trial {record.number}: its QAT weights {str(path)!r}"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{where} do not read: {exc.strerror or exc}") from None
    if record.qat.get("sha256") and hashlib.sha256(data).hexdigest() != record.qat["sha256"]:
        raise ValueError(f"{where} are not the ones the trial measured (sha256 differs)")
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        tuned = copy.deepcopy(model).float()  # the shadow trained in float32
        tuned.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001  unpickling, shapes: one line
        text = str(exc).strip()
        raise ValueError(
            f"{where} do not load: {text.splitlines()[0] if text else exc!r}"
        ) from None
    return tuned.eval()


def _check_same_as_trial(
    cfg: SearchConfig, ev: Any, record: TrialRecord, deployable: dict[str, Any]
) -> None:
    """Refuse an export whose kernels or bytes differ from what the trial measured."""
    if cfg.latency.enabled and record.config is not None:
        kernels = ev.lower(record.config).kernels
        trial_kernels = record.kernels or kernels
        changed = sorted(n for n in kernels if kernels[n] != trial_kernels.get(n))
        if changed:
            first = changed[0]
            raise ValueError(
                f"export of trial {record.number}: layer {first!r} would run on "
                f"{kernels[first]!r} here, the trial ran {trial_kernels.get(first)!r} "
                f"({len(changed)} layers differ): export on the target the trial was measured on"
            )
    reported = record.measurements.size_bytes or deployable["size_bytes"]
    if deployable["size_bytes"] != reported:
        raise ValueError(
            f"export of trial {record.number}: the {deployable['artifact']} artifact has "
            f"{deployable['size_bytes']:,} bytes, the trial measured {reported:,}: the lowering "
            "changed since the search (another mpq, onnxruntime or torch version?)"
        )


def describe_export(info: dict[str, Any], t: FrozenTrial) -> str:
    """One line on an export: what ships, its bytes, and success searched vs held out."""
    shipped = {"onnx": "model.onnx", "measure-only": "no deployable file (measure-only)"}
    line = (
        f"trial {info['trial']} exported to {info['out_dir']}: "
        f"{shipped.get(info['artifact'], 'packed artifact')} {info['size_bytes']:,} bytes "
        f"(the trial's size), success {format_success(t.user_attrs)} on the search's episodes"
    )
    if info["confirmed"]:
        line += f", {format_success(info['confirmed'])} on held-out episodes"
    return line


def torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)  # serialised in memory, so a full disk fails in plain file I/O
    return buf.getvalue()


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def onnx_files(ev: Any, config: QuantConfig, ran: QuantConfig) -> dict[str, bytes]:
    """``model.onnx``, its ``io.json``, one step of inputs and the simulated model's outputs."""
    lowered = ev.lower(config)
    session = lowered.module
    inputs = session_feeds(session, ev.example_inputs)
    with torch.inference_mode():
        simulated = call(ev.quantized(ran), ev.example_inputs)
    out_names = [o.name for o in session.get_outputs()]
    flat = [o.detach().numpy() for o in _tensors(simulated)]  # the exporter's flat order
    expected = dict(zip(out_names, flat, strict=False))
    io_spec = {
        "inputs": [
            {"name": n, "shape": list(v.shape), "dtype": str(v.dtype)} for n, v in inputs.items()
        ],
        "outputs": [
            {"name": n, "shape": list(v.shape), "dtype": str(v.dtype)} for n, v in expected.items()
        ],
        "note": "batch 1, one control step, as the latency was measured; the outputs in "
        "expected_outputs.npz are the simulated model's, whose success the trial measured",
    }
    return {
        "model.onnx": lowered.artifact,
        "io.json": (json.dumps(io_spec, indent=1) + "\n").encode(),
        "example_inputs.npz": _npz(inputs),
        "expected_outputs.npz": _npz(expected),
    }


def _tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output in order, nested tuples, lists and mappings flattened
    (a ``transformers`` ``ModelOutput``: its values that are set, as the exporter orders
    them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, tuple | list):
        return [t for o in out for t in _tensors(o)]
    return []


def confirm(cfg: SearchConfig, ev: Any, ran: QuantConfig) -> dict[str, float]:
    """Success of what runs on the held-out episodes of ``cfg.confirm_task`` (never the
    search's): the search's figure is the best of many noisy ones on the same episodes, so it is
    optimistic; this one is not. Empty when no confirmation task is configured."""
    from mpq.evaluators.callables import load_callable
    from mpq.evaluators.task import run_task

    if not cfg.confirm_task or cfg.confirm_budget <= 0:
        return {}
    task = load_callable(cfg.confirm_task, "confirm_task")
    with torch.inference_mode():
        return run_task(task, ev.quantized(ran), cfg.confirm_budget, cfg.confirm_task)


MANIFEST = "manifest.json"


def manifest(cfg: SearchConfig, study: optuna.Study, t: FrozenTrial, why: str) -> dict[str, Any]:
    """What ``mpq.load`` needs besides the packed weights: the model's builder and checkpoint,
    the calibration (static activation ranges), the observer; and where it came from."""
    return {
        "study": study.study_name,
        "trial": t.number,
        "why": why,
        "model": cfg.model,
        "checkpoint": cfg.checkpoint,
        "output": cfg.output,
        "calibration": cfg.calibration,
        "observer": cfg.observer,
        "artifact": ARTIFACT,
        "config": "ran_config.yaml",
    }


def load_export(path: str | Path) -> torch.nn.Module:
    """The quantized model of an export folder, in PyTorch (``mpq.load``): the packed weights
    (``weights_only=True``) unpacked to exactly the simulated-quantized values, the activation
    quantization of what ran re-attached (static ranges calibrated on the manifest's
    calibration).

    Raises:
        ValueError: not an export folder (no manifest), or its files do not load.
    """
    from mpq.evaluators.callables import load_callable
    from mpq.spaces.io import load_config

    folder = Path(path)
    try:
        info = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{str(folder)!r} is not an mpq export (no readable {MANIFEST}): {exc}"
        ) from None
    ran = load_config(folder / info["config"])
    static = any(c.act_mode == "static" or c.out_bits != 32 for c in ran.layers.values())
    calibration = list(load_callable(info["calibration"], "calibration")()) if static else None
    return load_artifact(
        folder / info["artifact"],
        ran,
        info["model"],
        info.get("checkpoint"),
        calibration,
        info.get("observer", "minmax"),
        _output(info.get("output")),
    )


def _output(value: Any) -> str | tuple[str, ...] | None:
    return tuple(value) if isinstance(value, list) else value


def load_artifact(
    path: str | Path,
    config: QuantConfig,
    model_spec: str,
    checkpoint: str | None = None,
    calibration: list[Any] | None = None,
    observer: str = "minmax",
    output: str | tuple[str, ...] | None = None,
) -> torch.nn.Module:
    """Rebuild a working quantized model from an exported artifact (``weights_only=True``).

    The packed weights are unpacked to exactly the simulated-quantized values; activation
    quantization from ``config`` is re-attached (static ranges need ``calibration``).
    """
    model = build_model(resolve_model(model_spec), checkpoint, output)
    layers = discover_layers(model)
    model.load_state_dict(unpack_state(load_state_dict(path), layers))
    return apply_config(
        model, config, calibration, observer, layers=layers, quantize_weights=False
    )
