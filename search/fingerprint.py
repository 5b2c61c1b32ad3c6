"""A study's fingerprint: everything its figures depend on, so a resumed study never mixes
figures that mean different things.

Recorded once, when the study's first trial is set up (study user attribute ``fingerprint``);
``check`` compares it with the fingerprint of the search about to resume it and refuses, naming
every field that changed, before Ray starts. ``--new-study`` starts a study of its own instead
(the config's name with the new fingerprint's short hash), leaving the old one as it was.

``FIGURES_VERSION`` is the version of the objectives' definitions: it changes when what a
figure means changes (2: dynamic activation ranges per sample, as at batch 1; a study of an
earlier version carries no fingerprint and is refused on resume; 3: ONNX Runtime stores
embedding tables at their bits, ``GatherBlockQuantized``, so a configuration's bytes changed;
4: a recurrent module run one step per call runs its products on ``MatMulNBits`` and the
simulated model quantizes each product's own input, and weight-only layers ship their codes
dequantized at load instead of running ``MatMulNBits`` at accuracy level 1, so latency, bytes
and success changed; 5: the kernel autotune may run a weight-only layer on ``MatMulNBits``
with a float input where it measured it faster, so latency and, for asymmetric codes, bytes
may change).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpq.evaluators.cpu_isa import isa_summary
from mpq.evaluators.latency import cpu_model
from mpq.search.config import SearchConfig
from mpq.search.record import StudyAttr

FIGURES_VERSION = 5
# 2: ordered dimensions (bits) are integer ranks ``<layer>.<dim>_rank``; 1 (no key):
# categorical ``<layer>/<dim>``. A sampler cannot resume a study across encodings.
PARAMS_ENCODING = 2
ATTR = StudyAttr.FINGERPRINT


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over the model's state dict (names, dtypes, shapes and bytes), in order."""
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def fingerprint(cfg: SearchConfig, model: nn.Module) -> dict[str, Any]:
    """What this search's figures depend on (JSON data).

    The target is this machine's CPU for a local search, or the resources each trial asks of a
    cluster (the driver's CPU is not where a cluster's trials are timed).
    """
    if cfg.latency.agent is not None:  # timed there, whatever runs the search
        target = f"mpq agent {cfg.latency.agent}"
    elif cfg.ray.address is None:
        target = f"{cpu_model()}; {isa_summary()}"
    else:
        target = f"cluster resources {json.dumps(cfg.ray.resources_per_trial, sort_keys=True)}"
    return {
        "figures_version": FIGURES_VERSION,
        "params_encoding": PARAMS_ENCODING,
        "model": cfg.model,
        "weights_sha256": weights_sha256(model),
        "task": cfg.task,
        "calibration": cfg.calibration,
        "example_inputs": cfg.example_inputs,
        "observer": cfg.observer,
        "space_sha256": _sha(cfg.space.model_dump(mode="json")),
        "objectives": list(cfg.objectives),
        "task_budget": cfg.task_budget,
        "screen_budget": cfg.screen_budget,
        "latency": cfg.latency.model_dump(
            mode="json",
            include={
                "enabled",
                "backend",
                "threads",
                "runs",
                "visits",
                "predict_screen",
                "autotune",
            },
        ),
        "target": target,
    } | _optional(cfg)


def _optional(cfg: SearchConfig) -> dict[str, Any]:
    """Settings that enter the fingerprint only when set, so a study without them keeps its
    fingerprint: the QAT stage (it changes the success of the trials it runs on), the
    output(s) read, a close call's extra episodes."""
    out: dict[str, Any] = {}
    if cfg.refine_budget:
        out["refine_budget"] = cfg.refine_budget
    if cfg.qat.when != "never":
        qat = cfg.qat.model_dump(mode="json")
        if cfg.qat.record is None:  # added later: a study without them keeps its fingerprint
            del qat["record"], qat["rounds"]
        out["qat"] = qat
    if cfg.output is not None:
        out["output"] = cfg.output
    return out


def short_hash(fp: dict[str, Any]) -> str:
    return _sha(fp)[:8]


def differences(stored: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``field: old -> new`` for every field that differs (hashes shortened)."""

    def show(v: Any) -> str:
        return f"{v[:12]}..." if isinstance(v, str) and len(v) == 64 else json.dumps(v)

    keys = sorted(set(stored) | set(now))
    return [
        f"{k}: {show(stored.get(k))} -> {show(now.get(k))}"
        for k in keys
        if stored.get(k) != now.get(k)
    ]


def check(name: str, stored: dict[str, Any] | None, now: dict[str, Any], n_trials: int) -> None:
    """Raise ``ValueError`` when a study of ``n_trials`` trials would resume under ``now``.

    A study without a fingerprint is accepted only while it has measured nothing (no trial and
    no float reference: ``n_trials`` counts the reference as one).
    """
    if stored is None:
        if n_trials == 0:
            return
        raise ValueError(
            f"study {name!r} has {n_trials} trials measured before figures version "
            f"{FIGURES_VERSION} (no fingerprint): its figures are not comparable; "
            "use --new-study to start a new study beside it"
        )
    changed = differences(stored, now)
    if changed:
        raise ValueError(
            f"study {name!r} was measured under a different setup ({'; '.join(changed)}); "
            "use --new-study to start a new study beside it"
        )


def guard(study: Any, cfg: SearchConfig, model: nn.Module) -> None:
    """Check ``study`` against this search's fingerprint; record it on a study that has none."""
    now = fingerprint(cfg, model)
    stored = study.user_attrs.get(ATTR)
    check(study.study_name, stored, now, _measured(study))
    if stored is None:
        study.set_user_attr(ATTR, now)


def check_study(
    study: Any, cfg: SearchConfig, model: nn.Module, ignore: tuple[str, ...] = ()
) -> None:
    """``guard`` that writes nothing, for reading a study (export, fine-tuning, sync); the
    fields ``ignore`` are not compared."""
    stored = study.user_attrs.get(ATTR)
    now = fingerprint(cfg, model)
    if stored is not None:
        stored = {k: v for k, v in stored.items() if k not in ignore}
        now = {k: v for k, v in now.items() if k not in ignore}
    check(study.study_name, stored, now, _measured(study))


def check_stored(cfg: SearchConfig, model: nn.Module) -> None:
    """``guard`` without creating anything: for a study that already exists in the storage."""
    import optuna

    from mpq.search.storage import make_storage

    storage = make_storage(cfg.storage_url(), cfg.storage_retry_s)
    if cfg.name not in optuna.study.get_all_study_names(storage):
        return
    study = optuna.load_study(study_name=cfg.name, storage=storage)
    check(cfg.name, study.user_attrs.get(ATTR), fingerprint(cfg, model), _measured(study))


def _measured(study: Any) -> int:
    """Trials, plus one for a float reference measured before any trial."""
    return len(study.get_trials(deepcopy=False)) + (StudyAttr.FLOAT_REFERENCE in study.user_attrs)


def new_study_config(cfg: SearchConfig, model: nn.Module) -> SearchConfig:
    """The config of ``--new-study``: the name plus the fingerprint's short hash, and an output
    folder of its own below the old one (its storage, when the default, and ``best/`` too), so
    nothing of the old study is touched; the same flag finds it again (export, resume)."""
    name = f"{cfg.name}-{short_hash(fingerprint(cfg, model))}"
    return cfg.model_copy(update={"name": name, "output_dir": str(Path(cfg.output_dir) / name)})
