from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mpq.cli import app
from mpq.evaluators.artifact import unpack_state
from mpq.evaluators.quantize import fake_quantize_weight
from mpq.search.export import ARTIFACT
from mpq.spaces.discover import discover_layers
from mpq.spaces.io import load_config
from mpq.spaces.space import LayerChoice, QuantConfig
from tests.models import ConvNet, Mlp
from tests.search.helpers import conv_config, measured_study

runner = CliRunner()
W2 = LayerChoice(w_bits=2, a_bits=8, granularity="per_group", group_size=16)
MLP = {
    "model": "tests.models:build_mlp",
    "task": "tests.models:mlp_task",
    "calibration": "tests.models:mlp_calibration",
}


def _write(tmp_path: Path, **overrides: object) -> Path:
    cfg = conv_config(tmp_path, **overrides)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def test_finetune_a_trial_recovers_success_and_exports_what_it_trained(
    tmp_path: Path,
) -> None:
    cfg = conv_config(tmp_path, qat={"steps": 60, "lr": 1e-3}, task_budget=256, **MLP)
    config = QuantConfig.uniform(discover_layers(Mlp()), W2)
    study = measured_study(cfg, [config])
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = tmp_path / "ft"
    result = runner.invoke(app, ["finetune", str(path), "--trial", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    info = yaml.safe_load((out / "qat.json").read_text())
    ptq = study.trials[0].user_attrs["success"]
    assert info["ptq"]["success"] == pytest.approx(ptq)  # the same episodes as the trial
    assert info["qat"]["success"] > info["ptq"]["success"]
    assert len(info["loss"]) == 60 and info["steps"] == 60
    # what ships: the trial's bytes, and codes that follow the formula on the trained weights
    assert info["size_bytes"] == (out / "model.onnx").stat().st_size
    assert info["size_bytes"] == study.trials[0].user_attrs["size_bytes"]
    trained = torch.load(out / "finetuned.pt", weights_only=True)
    packed = unpack_state(torch.load(out / ARTIFACT, weights_only=True))
    ran = load_config(out / "ran_config.yaml")
    for la in discover_layers(Mlp()):
        name, c = f"{la.module}.{la.param}", ran.layers[la.name]
        assert c.w_bits == 2  # MatMulNBits runs 2 bits: trained as it runs
        expected = fake_quantize_weight(
            trained[name], c.w_bits, c.granularity, c.group_size, c.symmetric
        )
        torch.testing.assert_close(packed[name], expected)
    assert (out / "qat_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "after 60 QAT steps" in result.output


def test_finetune_names_bad_input_in_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path)
    result = runner.invoke(app, ["finetune", str(path)])
    assert result.exit_code == 2
    assert "finetune: give --trial N or --config FILE (one of them)" in result.output
    result = runner.invoke(app, ["finetune", str(path), "--trial", "3", "--steps", "0"])
    assert result.exit_code == 2 and "steps" in result.output and "Traceback" not in result.output
    qc = tmp_path / "q.yaml"
    config = QuantConfig.uniform(discover_layers(ConvNet()), LayerChoice(w_bits=2, a_bits=8))
    qc.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    bad = _write(tmp_path, qat={"steps": 2, "step": "tests.models:no_such_step"})
    result = runner.invoke(app, ["finetune", str(bad), "--config", str(qc)])
    assert result.exit_code == 2
    assert "qat.step 'tests.models:no_such_step'" in result.output
