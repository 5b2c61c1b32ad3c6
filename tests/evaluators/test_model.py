from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mpq.evaluators.callables import load_callable
from mpq.evaluators.model import build_model, load_state_dict
from mpq.evaluators.stats import wilson_interval
from mpq.evaluators.task import run_task
from tests.models import ConvNet


def test_builder_and_checkpoint(tmp_path: Path) -> None:
    ref = ConvNet()
    torch.save(ref.state_dict(), tmp_path / "ok.pt")
    model = build_model("tests.models:ConvNet", tmp_path / "ok.pt")
    assert torch.equal(model.fc.weight, ref.fc.weight)


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("touch /tmp/mpq-pwned",))


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    torch.save({"fc.weight": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt': refused by weights_only=True"):
        load_state_dict(tmp_path / "evil.pt")


def test_not_a_state_dict(tmp_path: Path) -> None:
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt': not a state_dict"):
        load_state_dict(tmp_path / "list.pt")


def test_checkpoint_that_does_not_match(tmp_path: Path) -> None:
    state = ConvNet().state_dict()
    state["fc.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="does not match model .*size mismatch for fc.weight"):
        build_model("tests.models:ConvNet", tmp_path / "shape.pt")
    del state["fc.weight"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"missing \['fc.weight'\]"):
        build_model("tests.models:ConvNet", tmp_path / "missing.pt")


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nope.pt': no such file"):
        build_model("tests.models:ConvNet", tmp_path / "nope.pt")


@pytest.mark.parametrize(
    "spec,message",
    [
        ("nosuchmodule:f", "module 'nosuchmodule' does not import"),
        ("tests.models:nope", "has no attribute 'nope'"),
        ("tests.models", "expected 'package.module:function'"),
        ("tests.models:ALL_MODELS", "'ALL_MODELS' is not callable"),
    ],
)
def test_bad_callable_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_callable(spec, "model")


def test_a_builder_that_raises_is_one_line_or_its_traceback_with_debug(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(
        ValueError,
        match=r"^model 'tests.models:raising_builder' raised RuntimeError: boom \(mpq --debug",
    ):
        build_model("tests.models:raising_builder")
    monkeypatch.setenv("MPQ_DEBUG", "1")
    with pytest.raises(RuntimeError, match="^boom\nsecond line"):
        build_model("tests.models:raising_builder")


def test_builder_must_return_a_module() -> None:
    with pytest.raises(ValueError, match="builder returned tuple, not nn.Module"):
        build_model("tests.models:example_inputs.__defaults__.__class__")


def test_task_result_is_checked() -> None:
    model = ConvNet()
    with pytest.raises(ValueError, match="task 'task' returned no 'success' metric"):
        run_task(lambda m, b: {"accuracy": 1.0}, model, 4)
    with pytest.raises(
        ValueError, match=r"^task 'm:t' returned success=nan, not a finite number$"
    ):
        run_task(lambda m, b: {"success": float("nan")}, model, 4, "m:t")
    with pytest.raises(ValueError, match=r"^task 'm:t' returned success='high', not a finite"):
        run_task(lambda m, b: {"success": "high"}, model, 4, "m:t")
    with pytest.raises(ValueError, match=r"^task 'm:t' returned success=1.5, outside \[0, 1\]"):
        run_task(lambda m, b: {"success": 1.5}, model, 4, "m:t")
    with pytest.raises(
        ValueError, match=r"^task 'm:t' raised ZeroDivisionError: division by zero"
    ):
        run_task(lambda m, b: {"success": 1 / 0}, model, 4, "m:t")
    assert run_task(lambda m, b: {"success": np.float32(0.5)}, model, 4) == {"success": 0.5}
    with pytest.raises(ValueError, match="budget=0 must be > 0"):
        run_task(lambda m, b: {"success": 1.0}, model, 0)
    assert run_task(lambda m, b: {"success": b / 10}, model, 4) == {"success": 0.4}


def test_wilson_interval() -> None:
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and 0.69 < lo < 0.73
