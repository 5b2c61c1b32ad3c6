"""Bad input from outside, by class (docs/reliability.md): each test generates its cases
(hypothesis) rather than pinning one message per case.

1. A traceback instead of one line: whatever a user's callable raises.
2. Silently accepted: whatever a user's task returns.
3. Unclear or misleading: whatever is wrong in a space override or a config value.
4. Damage to earlier results: studies that share an output folder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpq.evaluators.callables import call_user
from mpq.evaluators.task import run_task
from mpq.files import owned_folder, write_atomic
from mpq.spaces.discover import discover_layers
from mpq.spaces.space import Override, SearchSpace
from tests.models import ConvNet

CASES = 150  # per test; the docs' table says so
EXCEPTIONS = st.sampled_from(
    [
        RuntimeError,
        ValueError,
        KeyError,
        TypeError,
        OSError,
        ZeroDivisionError,
        AssertionError,
        IndexError,
        NotImplementedError,
        MemoryError,
    ]
)


@settings(max_examples=CASES, deadline=None)
@given(kind=EXCEPTIONS, message=st.text(max_size=200))
def test_class_1_anything_a_user_callable_raises_is_one_line(
    kind: type[Exception], message: str
) -> None:
    def builder() -> None:
        raise kind(message)

    with pytest.raises(ValueError) as info:
        call_user(builder, "pkg.mod:build", "model")
    line = str(info.value)
    assert "\n" not in line and "\r" not in line  # one line, whatever the message holds
    assert line.startswith(f"model 'pkg.mod:build' raised {kind.__name__}")


VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-5, max_value=5),
    st.text(max_size=10),
    st.none(),
    st.booleans(),
    st.lists(st.floats(), max_size=3),
)


@settings(max_examples=CASES, deadline=None)
@given(success=VALUES, extra=VALUES, drop_success=st.booleans())
def test_class_2_a_task_result_is_accepted_only_when_it_is_a_success_rate(
    success: Any, extra: Any, drop_success: bool
) -> None:
    result = {"other": extra} if drop_success else {"success": success, "other": extra}

    def task(model: Any, budget: int) -> dict[str, Any]:
        return result

    valid = (
        not drop_success
        and all(
            not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v)
            for v in (success, extra)
        )
        and 0 <= success <= 1
    )
    if valid:
        assert run_task(task, None, 4, "pkg.mod:task")["success"] == float(success)  # type: ignore[arg-type]
        return
    with pytest.raises(ValueError) as info:
        run_task(task, None, 4, "pkg.mod:task")  # type: ignore[arg-type]
    line = str(info.value)
    assert "\n" not in line and line.startswith("task 'pkg.mod:task' returned ")


LAYERS = discover_layers(ConvNet())
FIELDS = st.sampled_from(["w_bits", "a_bits", "group_size"])


@settings(max_examples=CASES, deadline=None)
@given(
    field=FIELDS,
    values=st.lists(st.integers(min_value=-4, max_value=70), min_size=1, max_size=3, unique=True),
    glob=st.booleans(),
)
def test_class_3_a_bad_override_is_one_line_naming_where(
    field: str, values: list[int], glob: bool
) -> None:
    space = SearchSpace(overrides=(Override(match="conv*" if glob else "fc", **{field: values}),))
    try:
        space.resolve(LAYERS, "space.yaml: space")
    except ValueError as exc:
        line = str(exc)
        assert "\n" not in line and "errors.pydantic.dev" not in line
        assert line.startswith("space.yaml: space: overrides[")


BAD_CONFIG = st.sampled_from(
    [
        ("trials", 0),
        ("trials", "many"),
        ("task_budget", -1),
        ("sampler", "cmaes"),
        ("objectives", ["speed"]),
        ("constraints", {"max_success_drop": -0.1}),
        ("constraints", {"max_size_bytes": 0}),
        ("latency", {"backend": "tensorrt"}),
        ("ray", {"workers": 0}),
        ("qat", {"steps": 0}),
        ("qat", {"when": "always"}),
        ("space", {"groups": "conv1"}),
        ("observer", "kl"),
        ("bogus", 1),
    ]
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(bad=BAD_CONFIG)
def test_class_3_a_bad_config_value_is_one_line_naming_the_file_and_field(
    tmp_path: Path, bad: tuple[str, Any]
) -> None:
    from mpq.search.config import load_search_config

    key, value = bad
    data = {"name": "x", "model": "m:f", "task": "m:t", "calibration": "m:c", key: value}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError) as info:
        load_search_config(path)
    line = str(info.value)
    assert "\n" not in line and line.startswith(f"{path}: {key}")


@settings(
    max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(names=st.lists(st.sampled_from(["a", "b", "c", "a-b"]), min_size=1, max_size=8))
def test_class_4_studies_sharing_an_output_folder_never_overwrite_each_other(
    tmp_path_factory: pytest.TempPathFactory, names: list[str]
) -> None:
    base = tmp_path_factory.mktemp("shared")
    owner_of: dict[Path, str] = {}
    for name in names:  # each study in turn exports into the shared folder
        folder = owned_folder(base, "best", name)
        assert owner_of.setdefault(folder, name) == name  # never another study's folder
        write_atomic(folder / "MODEL_CARD.md", f"{name}\n")
    for folder, name in owner_of.items():
        assert (folder / "MODEL_CARD.md").read_text() == f"{name}\n"


def _hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_bad_runs_leave_a_finished_study_byte_identical(tmp_path: Path) -> None:
    """A finished study's folder (database, export, plots) is hashed; then each bad run
    against it ends in one line, exit 2, and every file is byte-identical afterwards."""
    from typer.testing import CliRunner

    from mpq.cli import app
    from mpq.search import plots
    from mpq.search.export import export_trial, pick_trial
    from mpq.spaces.space import LayerChoice, QuantConfig
    from tests.search.helpers import conv_config, measured_study

    cfg = conv_config(tmp_path)
    configs = [QuantConfig.uniform(LAYERS, LayerChoice(w_bits=b, a_bits=8)) for b in (8, 4)]
    study = measured_study(cfg, configs)
    export_trial(cfg, study, pick_trial(study), Path(cfg.output_dir) / "best")
    plots.write_all(study, Path(cfg.output_dir) / "plots")

    def config_file(file: str, **changes: Any) -> Path:
        data = conv_config(tmp_path, **changes).model_dump(mode="json", exclude_none=True)
        path = tmp_path / file
        path.write_text(yaml.safe_dump(data))
        return path

    good = config_file("good.yaml")
    bad_runs = [
        ["search", str(good), "--trials", "0"],
        ["search", str(good)],  # exists: --resume needed
        ["search", str(config_file("t.yaml", name="t", task="tests.models:stringly_task"))],
        [
            "search",
            str(
                config_file(
                    "o.yaml", name="o", space={"overrides": [{"match": "*", "w_bits": [1]}]}
                )
            ),
        ],
        ["search", str(config_file("d.yaml", name="d", constraints={"max_size_bytes": 10}))],
        ["search", str(config_file("k.yaml", task="tests.models:mlp_task")), "--resume"],
        ["export", str(good), "--trial", "999"],
        ["export", str(config_file("e.yaml", task="tests.models:mlp_task"))],
    ]
    before = _hashes(Path(cfg.output_dir))
    runner = CliRunner()
    for args in bad_runs:
        result = runner.invoke(app, args)
        lines = [ln for ln in result.output.splitlines() if ln.strip()]
        assert result.exit_code == 2 and len(lines) == 1, (args, result.output)
        assert lines[0].startswith("error: "), (args, result.output)
        assert _hashes(Path(cfg.output_dir)) == before, args


def test_bad_input_at_scale_ends_in_success_or_one_line(tmp_path: Path) -> None:
    """A few hundred of ``benchmarks/fuzz.py``'s generated cases (search configs, config
    texts, configuration files, checkpoints): never a traceback or a partial output folder."""
    import random

    import yaml

    from tests.fuzzing import GENERATORS, VALID, Case, run_case

    # the config every case mutates passes: the cases test what they claim, not the schema
    assert run_case(Case("config", yaml.safe_dump(VALID), "valid"), tmp_path / "valid") == "ok"
    rng = random.Random(20)
    seen = {"ok": 0, "one line": 0}
    for i in range(250):
        case = rng.choice(GENERATORS)(rng)
        seen[run_case(case, tmp_path / str(i))] += 1  # raises on anything else
    assert seen["one line"] > 100 and seen["ok"] > 0
