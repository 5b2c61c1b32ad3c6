"""The CLI, run in-process through typer's runner (real models, real files)."""

from __future__ import annotations

from pathlib import Path

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
