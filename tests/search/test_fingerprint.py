"""A study's fingerprint: recorded once, and a resume under another setup is refused."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch

from mpq.search import fingerprint
from mpq.search.storage import make_storage
from tests.models import build_convnet
from tests.search.helpers import conv_config


def _study(tmp_path: Path, name: str = "conv") -> optuna.Study:
    storage = make_storage(f"sqlite:///{tmp_path / 'study.db'}")
    return optuna.create_study(study_name=name, storage=storage, load_if_exists=True)


def test_recorded_once_then_checked(tmp_path: Path) -> None:
    cfg = conv_config(tmp_path)
    model = build_convnet()
    study = _study(tmp_path)
    fingerprint.guard(study, cfg, model)
    stored = study.user_attrs[fingerprint.ATTR]
    assert stored["figures_version"] == fingerprint.FIGURES_VERSION
    assert stored["task"] == "tests.models:convnet_task"
    study.add_trial(optuna.trial.create_trial(value=1.0))
    fingerprint.guard(study, cfg, model)  # same setup: accepted
    changed = conv_config(tmp_path, task_budget=64, latency={"backend": "torch-eager"})
    with pytest.raises(
        ValueError,
        match=r"study 'conv' was measured under a different setup \(latency: .*"
        r"\"backend\": \"onnxruntime\".* -> .*\"torch-eager\".*; task_budget: 32 -> 64\); "
        r"use --new-study to start a new study beside it",
    ):
        fingerprint.guard(study, changed, model)
    assert study.user_attrs[fingerprint.ATTR] == stored  # nothing rewritten


def test_weights_and_space_are_part_of_it(tmp_path: Path) -> None:
    cfg = conv_config(tmp_path)
    model = build_convnet()
    base = fingerprint.fingerprint(cfg, model)
    with torch.no_grad():
        model.fc.weight[0, 0] += 1e-3
    other = conv_config(tmp_path, space={"defaults": {"w_bits": [4, 8, 32]}})
    changed = fingerprint.differences(base, fingerprint.fingerprint(other, model))
    assert [c.split(":")[0] for c in changed] == ["space_sha256", "weights_sha256"]


def test_a_study_without_fingerprint_is_refused_once_it_has_trials(tmp_path: Path) -> None:
    cfg = conv_config(tmp_path)
    study = _study(tmp_path)
    study.add_trial(optuna.trial.create_trial(value=1.0))
    with pytest.raises(
        ValueError,
        match=rf"study 'conv' has 1 trials measured before figures version "
        rf"{fingerprint.FIGURES_VERSION} \(no fingerprint\)",
    ):
        fingerprint.guard(study, cfg, build_convnet())
    fresh = _study(tmp_path, "fresh")
    fingerprint.guard(fresh, cfg, build_convnet())  # no trial yet: recorded
    assert fingerprint.ATTR in fresh.user_attrs


def test_weights_hash_covers_every_state_dtype() -> None:
    """0-d buffers (BatchNorm's num_batches_tracked), ints and bools hash too."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    model.register_buffer("mask", torch.ones(3, dtype=torch.bool))
    first = fingerprint.weights_sha256(model)
    model[1].num_batches_tracked += 1
    assert fingerprint.weights_sha256(model) != first


def test_the_qat_stage_is_part_of_it_only_when_on(tmp_path: Path) -> None:
    model = build_convnet()
    base = fingerprint.fingerprint(conv_config(tmp_path), model)
    off = fingerprint.fingerprint(conv_config(tmp_path, qat={"steps": 9}), model)
    assert off == base  # QAT settings without the stage change no trial's figures
    on = fingerprint.fingerprint(conv_config(tmp_path, qat={"when": "infeasible"}), model)
    assert [c.split(":")[0] for c in fingerprint.differences(base, on)] == ["qat"]
    # the fields added later (on-policy recording) enter only when set: older studies resume
    assert set(on["qat"]) == {
        "steps", "lr", "progressive", "lsq", "loss", "step", "data", "seed", "when"
    }  # fmt: skip
    record = {"when": "infeasible", "record": "m:f", "rounds": 2}
    recorded = fingerprint.fingerprint(conv_config(tmp_path, qat=record), model)
    assert recorded["qat"]["record"] == "m:f" and recorded["qat"]["rounds"] == 2
