"""Export round trip: trial -> config + packed artifact -> the trial's size and outputs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mpq.cli import app
from mpq.evaluators.apply import apply_config
from mpq.evaluators.model import load_state_dict
from mpq.search.export import ARTIFACT, export_trial, load_artifact, pick_trial
from mpq.spaces.discover import discover_layers
from mpq.spaces.io import load_config, read_data
from mpq.spaces.space import LayerChoice, QuantConfig
from tests.models import build_convnet, convnet_calibration
from tests.search.helpers import conv_config, measured_study


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Trials built directly from real measurements (no Ray search): a static int8 model,
    a 4-bit one, a 3-bit one (runs as 4 on MatMulNBits) with float activations, a mixed one."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = conv_config(tmp)
    layers = discover_layers(build_convnet())
    uniform = [
        LayerChoice(w_bits=8, a_bits=8, act_mode="static"),
        LayerChoice(w_bits=4, a_bits=8),
        LayerChoice(w_bits=3),
    ]
    configs = [QuantConfig.uniform(layers, c) for c in uniform]
    mixed = dict(configs[1].layers) | {"fc": LayerChoice(w_bits=2), "conv1": LayerChoice()}
    configs.append(QuantConfig(layers=mixed))
    return cfg, measured_study(cfg, configs)


def test_export_round_trip(searched, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """What ships is what was measured: the .onnx file has the trial's size objective in bytes,
    the packed artifact rebuilds the model that ran (whose success the trial measured)."""
    cfg, study = searched
    trial = pick_trial(study, rule="knee")
    out = tmp_path / "out"
    info = export_trial(cfg, study, trial, out)
    assert info["artifact"] == "onnx"
    assert (out / "model.onnx").stat().st_size == trial.user_attrs["size_bytes"]
    assert info["size_bytes"] == trial.user_attrs["size_bytes"]
    config = load_config(out / "config.yaml")
    assert config == load_config(out / "config.json")
    assert config.model_dump(mode="json", exclude_none=True) == trial.user_attrs["config"]
    ran = load_config(out / "ran_config.yaml")
    assert ran.model_dump(mode="json", exclude_none=True) == trial.user_attrs["ran_config"]
    card = (out / "MODEL_CARD.md").read_text()
    assert "| task success, search episodes" in card and f"{info['size_bytes']:,}" in card
    calib = convnet_calibration()
    loaded = load_artifact(out / ARTIFACT, ran, cfg.model, calibration=calib)
    rebuilt = apply_config(build_convnet(), ran, calib)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        assert torch.allclose(loaded(x), rebuilt(x), atol=1e-5)
    state = load_state_dict(out / ARTIFACT)  # plain tensors: weights_only=True
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    import mpq  # the documented way: the folder alone

    with torch.inference_mode():
        assert torch.equal(mpq.load(out)(x), loaded(x))
    with pytest.raises(ValueError, match=r"is not an mpq export \(no readable manifest.json\)"):
        mpq.load(tmp_path)


_PLAIN_ONNXRUNTIME = """
import sys
for blocked in ("torch", "mpq", "optuna", "ray", "mlflow"):  # none of these may be needed
    sys.modules[blocked] = None
import json
import numpy as np
import onnxruntime as ort
folder = sys.argv[1]
spec = json.load(open(f"{folder}/io.json"))
session = ort.InferenceSession(f"{folder}/model.onnx", providers=["CPUExecutionProvider"])
inputs = np.load(f"{folder}/example_inputs.npz")
expected = np.load(f"{folder}/expected_outputs.npz")
outs = session.run(None, {i["name"]: inputs[i["name"]] for i in spec["inputs"]})
for o, want in zip(outs, spec["outputs"]):
    ref = expected[want["name"]]
    err = float(np.abs(o - ref).max()) / max(float(np.abs(ref).max()), 1e-12)
    print(want["name"], list(o.shape), f"{err:.2e}")
"""


def test_exported_onnx_runs_on_plain_onnxruntime(searched, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A fresh interpreter with only onnxruntime and numpy (torch, mpq blocked) runs the
    deployable file and reproduces the outputs of the simulated model the trial measured."""
    import subprocess
    import sys

    cfg, study = searched
    for rule in ("knee", "best"):
        out = tmp_path / rule
        export_trial(cfg, study, pick_trial(study, rule=rule), out)
        proc = subprocess.run(
            [sys.executable, "-c", _PLAIN_ONNXRUNTIME, str(out)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = [line.split() for line in proc.stdout.splitlines()]
        assert rows and all(float(r[-1]) <= 2e-3 for r in rows), proc.stdout
        # the model card's snippet runs as written, in the folder, without torch or mpq
        card = (out / "MODEL_CARD.md").read_text()
        snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
        blocked = 'import sys\nfor m in ("torch", "mpq"):\n    sys.modules[m] = None\n'
        check = "\nassert len(outputs) == len(session.get_outputs())\n"
        proc = subprocess.run(
            [sys.executable, "-c", blocked + snippet + check],
            cwd=out,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_cli_apply_gives_the_same_size(searched, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, study = searched
    trial = pick_trial(study, rule="best")
    export_trial(cfg, study, trial, tmp_path / "e")
    result = CliRunner().invoke(
        app,
        [
            "apply",
            str(tmp_path / "e" / "config.yaml"),
            cfg.model,
            "--out",
            str(tmp_path / "again.pt"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"{trial.user_attrs['asked_size_bytes']:,} bytes" in result.output
    assert f"payload {trial.user_attrs['asked_size_bytes']:,} bytes" in result.output


def test_pick_rules(searched) -> None:  # type: ignore[no-untyped-def]
    _, study = searched
    front = study.best_trials
    best = pick_trial(study, rule="best")
    assert best.values[0] == max(t.values[0] for t in front)
    small = min(t.user_attrs["size_bytes"] for t in front)
    within = pick_trial(study, max_size_bytes=small)
    assert within.user_attrs["size_bytes"] == small
    with pytest.raises(ValueError, match="no front trial within size<=10"):
        pick_trial(study, max_size_bytes=10)
    with pytest.raises(ValueError, match="--trial 999: the study has trials 0.."):
        pick_trial(study, trial=999)
    from mpq.search.export import pick_reason

    n = len(front)
    assert pick_reason(study, best, rule="best") == (
        f"the highest success ({best.values[0]:.3f}) of the {n} front points, ties to the smaller"
    )
    assert pick_reason(study, within, max_size_bytes=small).endswith(f"size <= {small:,} bytes")
    assert pick_reason(study, best, rule="knee").startswith(f"the knee of the front: of its {n}")


def test_cli_export_says_why_and_writes_under_the_output_folder(searched) -> None:  # type: ignore[no-untyped-def]
    import yaml

    cfg, _ = searched
    path = Path(cfg.output_dir) / "search.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["export", str(path), "--rule", "best"])
    assert result.exit_code == 0, result.output
    assert "the highest success" in result.output
    chosen = int(result.output.split("picked trial ", 1)[1].split(":", 1)[0])
    out = Path(cfg.output_dir) / "export" / f"trial-{chosen}"
    assert "Why this trial: the highest success" in (out / "MODEL_CARD.md").read_text()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_export_folder_is_a_clear_error(searched, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, study = searched
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    with pytest.raises(ValueError, match="export to .* failed"):
        export_trial(cfg, study, pick_trial(study), ro)


def test_unwritable_export_folder_even_as_root(searched) -> None:  # type: ignore[no-untyped-def]
    cfg, study = searched
    with pytest.raises(ValueError, match="export to '/proc/self/mpq-export' failed"):
        export_trial(cfg, study, pick_trial(study), Path("/proc/self/mpq-export"))


_FULL_DISK = """
import resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
import optuna
from mpq.search.config import SearchConfig
from mpq.search.export import export_trial, pick_trial
from mpq.search.study import open_study
cfg = SearchConfig.model_validate_json(sys.argv[1])
study = open_study(cfg, resume=True)
trial = pick_trial(study)
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))  # the disk is 'full' past 2000 bytes
try:
    export_trial(cfg, study, trial, Path(sys.argv[2]))
except ValueError as exc:
    print(exc)
    sys.exit(3)
"""


def test_export_to_a_full_disk_is_a_clear_error(searched, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    cfg, study = searched
    before = [(t.number, t.state, t.values) for t in study.trials]
    out = tmp_path / "full"
    proc = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, cfg.model_dump_json(), str(out)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "export to" in proc.stdout and "File too large" in proc.stdout
    assert not list(out.glob(".*.tmp")) and not (out / ARTIFACT).exists()
    study2 = type(study)(study.study_name, study._storage)
    assert [(t.number, t.state, t.values) for t in study2.trials] == before


def test_exported_config_is_plain_data(searched, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, study = searched
    export_trial(cfg, study, pick_trial(study), tmp_path / "p")
    data = read_data(tmp_path / "p" / "config.yaml")
    assert isinstance(data, dict) and QuantConfig.model_validate(data)
    assert "!!python" not in (tmp_path / "p" / "config.yaml").read_text()


def test_an_export_under_another_task_is_refused(searched) -> None:  # type: ignore[no-untyped-def]
    """The study's fingerprint is the rule: no path writes a model card naming a task the
    figures were not measured with."""
    from mpq.search.study import load_existing

    cfg, _ = searched
    other = cfg.model_copy(update={"task": "tests.models:mlp_task"})
    with pytest.raises(ValueError, match=r"was measured under a different setup \(task: "):
        load_existing(other)
