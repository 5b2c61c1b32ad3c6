"""The CLI, run in-process through typer's runner (real models, real files)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from mpq.cli import app
from mpq.spaces.io import load_space

runner = CliRunner()


def test_space_prints_layers_and_writes_a_space_that_loads(tmp_path: Path) -> None:
    out = tmp_path / "space.yaml"
    result = runner.invoke(app, ["space", "babyai-untrained", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "memory_gru.weight_hh_l0" in result.output and "attention_in_proj" in result.output
    assert load_space(out).defaults.w_bits == (2, 3, 4, 6, 8, 32)


def test_space_bad_model_is_one_line() -> None:
    result = runner.invoke(app, ["space", "nosuch.module:build"])
    assert result.exit_code == 2
    assert "module 'nosuch.module' does not import" in result.output


def test_space_with_a_space_file(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("overrides:\n  - match: fusee\n    w_bits: [8]\n")
    result = runner.invoke(app, ["space", "tests.models:ConvNet", "--space", str(p)])
    assert result.exit_code == 2
    assert "unknown layer 'fusee'" in result.output


def test_help() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "space" in result.output


def test_search_with_a_bad_config_is_one_line(tmp_path: Path) -> None:
    p = tmp_path / "search.yaml"
    p.write_text("name: x\nmodel: babyai\ntask: m:t\ncalibration: m:c\nobjectives: [speed]\n")
    result = runner.invoke(app, ["search", str(p)])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "search.yaml: objectives.0: Input should be" in lines[0]


def test_search_with_a_missing_config(tmp_path: Path) -> None:
    result = runner.invoke(app, ["search", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "nope.yaml: cannot read" in result.output


def test_export_with_no_study_yet(tmp_path: Path) -> None:
    p = tmp_path / "search.yaml"
    p.write_text(
        f"name: empty\nmodel: tests.models:build_convnet\ntask: tests.models:convnet_task\n"
        f"calibration: tests.models:convnet_calibration\noutput_dir: {tmp_path}\n"
    )
    result = runner.invoke(app, ["export", str(p), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no study 'empty' in sqlite:///" in result.output
    assert "run mpq search first" in result.output and not (tmp_path / "study.db").exists()


def test_search_with_fallback_disabled_and_a_choice_without_kernel(tmp_path: Path) -> None:
    p = tmp_path / "search.yaml"
    p.write_text(
        "name: strict\nmodel: tests.models:build_convnet\ntask: tests.models:convnet_task\n"
        "calibration: tests.models:convnet_calibration\n"
        f"output_dir: {tmp_path / 'out'}\nlatency: {{allow_fallback: false}}\n"
        "space: {defaults: {w_bits: [16, 32]}, skip: ['conv*']}\n"
    )
    result = runner.invoke(app, ["search", str(p)])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert (
        f"{p}: space: layer 'fc' w16 a32: backend 'onnxruntime' cannot run it as asked "
        "(w16 -> float32: float16 has no faster CPU kernel) and latency.allow_fallback is false"
        in lines[0]
    )
    assert not (tmp_path / "out").exists()  # nothing written


def test_allocate_writes_a_configuration_that_fits(tmp_path: Path) -> None:
    from mpq.evaluators.model import build_model
    from mpq.evaluators.size import config_size
    from mpq.spaces.discover import discover_layers
    from mpq.spaces.io import load_config

    p = tmp_path / "search.yaml"
    p.write_text(
        "name: alloc\nmodel: tests.models:build_convnet\ntask: tests.models:convnet_task\n"
        f"calibration: tests.models:convnet_calibration\noutput_dir: {tmp_path / 'out'}\n"
        "space: {defaults: {w_bits: [2, 4, 8, 32]}}\n"
    )
    out = tmp_path / "alloc.yaml"
    sizes = {}
    for budget in ("1.0", "0.5"):
        result = runner.invoke(app, ["allocate", str(p), "--budget", budget, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert f"ilp at {float(budget):g} of the 8-bit size:" in result.output
        model = build_model("tests.models:build_convnet")
        layers = discover_layers(model)
        config = load_config(out)
        config.check(layers)
        sizes[budget] = config_size(model, layers, config).total_bytes
        assert f"{sizes[budget]:,} bytes" in result.output
    assert sizes["0.5"] < sizes["1.0"]
    bad = runner.invoke(app, ["allocate", str(p), "--method", "knapsack"])
    assert bad.exit_code == 2
    assert "allocation method 'knapsack' not in ['greedy', 'ilp']" in bad.output


def test_space_shows_fused_groups(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("groups:\n  - [conv1, conv2]\n")
    result = runner.invoke(
        app, ["space", "tests.models:ConvNet", "--space", str(p)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    row = next(ln for ln in result.output.splitlines() if "conv2 " in ln)
    assert row.rstrip(" │").endswith("conv1")  # conv2 follows conv1's decision


def _conv_yaml(tmp_path: Path) -> Path:
    p = tmp_path / "search.yaml"
    p.write_text(
        "name: conv\nmodel: tests.models:build_convnet\ntask: tests.models:convnet_task\n"
        f"calibration: tests.models:convnet_calibration\noutput_dir: {tmp_path / 'out'}\n"
    )
    return p


def test_a_bad_flag_is_named_as_the_flag_not_the_file(tmp_path: Path) -> None:
    p = _conv_yaml(tmp_path)
    result = runner.invoke(app, ["search", str(p), "--trials", "0"])
    assert result.exit_code == 2
    assert "--trials: Input should be greater than or equal to 1" in result.output
    result = runner.invoke(app, ["search", str(p), "--sampler", "cmaes"])
    assert result.exit_code == 2 and "--sampler: Input should be" in result.output
    result = runner.invoke(app, ["search", str(p), "--time-budget-s", "0"])
    assert result.exit_code == 2
    assert "--time-budget-s: Input should be greater than 0" in result.output


def test_an_existing_study_is_refused_before_ray_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mpq.search import session
    from mpq.search.study import open_study

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started for a search that had to be refused")

    monkeypatch.setattr(session, "run_search", no_ray)  # the one that starts Ray
    p = _conv_yaml(tmp_path)
    open_study(session.build_config(p), resume=False)
    result = runner.invoke(app, ["search", str(p)])
    assert result.exit_code == 2
    assert "study 'conv' already exists" in result.output and "use --resume" in result.output


def test_flags_override_the_config_for_this_run(tmp_path: Path) -> None:
    from mpq.search.session import build_config

    p = _conv_yaml(tmp_path)
    cfg = build_config(
        p,
        tracking=False,
        trials=5,
        workers=1,
        task_budget=7,
        sampler="mpq",
        seed=3,
        output_dir=str(tmp_path / "elsewhere"),
        tracking_uri="http://127.0.0.1:1",
    )
    assert (cfg.trials, cfg.ray.workers, cfg.task_budget, cfg.sampler, cfg.seed) == (
        5,
        1,
        7,
        "mpq",
        3,
    )
    assert cfg.output_dir == str(tmp_path / "elsewhere") and not cfg.tracking.enabled
    assert cfg.tracking.uri == "http://127.0.0.1:1"
    assert build_config(p).trials == 24  # the file's own values otherwise


def test_a_raising_builder_is_one_line_and_debug_shows_the_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MPQ_DEBUG", "")  # restored (unset) after the test: --debug sets it
    result = runner.invoke(app, ["space", "tests.models:raising_builder"])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "raised RuntimeError: boom" in lines[0]
    result = runner.invoke(app, ["--debug", "space", "tests.models:raising_builder"])
    assert isinstance(result.exception, RuntimeError)  # the user's own exception, traceback


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    p = _conv_yaml(tmp_path)
    (tmp_path / "out").write_text("not a folder")
    result = runner.invoke(app, ["search", str(p)])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"output_dir '{tmp_path / 'out'}' is a file" in lines[0]


def test_a_storage_that_cannot_open_is_one_line_with_the_real_cause(tmp_path: Path) -> None:
    p = _conv_yaml(tmp_path)
    (tmp_path / "out" / "study.db").mkdir(parents=True)  # sqlite cannot open a folder
    result = runner.invoke(app, ["search", str(p), "--resume"])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unable to open database file" in lines[0], result.output
    assert "exceeding max length" not in result.output
