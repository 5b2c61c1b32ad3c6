"""Each example runs end to end on a tiny budget (the README's commands with smaller numbers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from mpq.search.session import run_session

ROOT = Path(__file__).resolve().parents[1]


def _tiny(tmp_path: Path, example: str, **changes: object) -> Path:
    data = yaml.safe_load((ROOT / "examples" / example).read_text())
    data.update(
        {
            "output_dir": str(tmp_path / "out"),
            "trials": 3,
            "latency": {"runs": 5, "warmup": 1},
            **changes,
        }
    )
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


BABYAI = {
    "task_budget": 3,
    "screen_budget": 0,
    "confirm_budget": 2,
    "sensitivity": {"budgets": [0.5]},
    "refine_budget": 0,
}


@pytest.mark.parametrize(
    "example,changes",
    [
        # the main job: the flagship policy (its 52 layers' sensitivity, about a minute on 2
        # cores, is left to the tiny policy's run below: the same code)
        # (and the model-based sampler would measure that sensitivity: NSGA-II here; the
        # sampler and the close calls' stage are tested in tests/search)
        ("babyai/search.yaml", {**BABYAI, "sensitivity": {"enabled": False}, "sampler": "nsga2"}),
        ("babyai/tiny.yaml", BABYAI),
        ("classifier/search.yaml", {"task_budget": 200}),
        ("transformer/search.yaml", {"task_budget": 8}),  # keyword inputs through the CLI path
    ],
)
def test_example_runs(ray_local: None, tmp_path: Path, example: str, changes: dict) -> None:
    console = Console(record=True, width=200)
    result = run_session(_tiny(tmp_path, example, **changes), resume=True, console=console)
    text = console.export_text()
    assert "Pareto front of" in text and "exported to" in text and "mpq ui" in text
    assert len([t for t in result.study.trials if t.state.is_finished()]) >= 3
    assert (tmp_path / "out" / "best" / "config.yaml").exists()
    plots = tmp_path / "out" / "plots"
    assert f"plots: {plots / 'pareto_front.png'}" in text  # written and pointed to
    assert all((plots / n).exists() for n in ("pareto_front.html", "bit_map.png"))
    assert "trial   0 " in text and "success " in text  # one line per finished trial
    if example.startswith("transformer"):  # the graph's inputs are the keywords' names
        io = json.loads((tmp_path / "out" / "best" / "io.json").read_text())
        assert [i["name"] for i in io["inputs"]] == ["input_ids", "attention_mask"]
        assert [o["shape"] for o in io["outputs"]] == [[1, 16, 512]]  # output: logits
    if example.startswith("babyai"):  # the deployable model and its held-out confirmation
        assert (tmp_path / "out" / "best" / "model.onnx").exists()
        assert "on held-out episodes" in text


@pytest.mark.parametrize("example", ["transformer/bert.yaml", "transformer/vit.yaml"])
def test_a_family_example_builds_covers_its_matrices_and_its_task_answers(example: str) -> None:
    """The BERT and ViT configs as a user runs them (their searches are in the README; the
    contract suite lowers both families): the model builds from the config, the space covers
    every weight matrix (ViT's class token and position table are added, not multiplied), and
    the task answers with per-input outcomes: the shipped checkpoints are trained (>= 0.9)."""
    from mpq.evaluators.evaluator import get_evaluator
    from mpq.search.config import load_search_config
    from mpq.search.runner import preflight
    from mpq.search.worker import eval_spec
    from mpq.spaces.discover import coverage

    cfg = load_search_config(ROOT / "examples" / example)
    assert preflight(cfg, example)
    evaluator = get_evaluator(eval_spec(cfg))
    left = {name for name, _ in coverage(evaluator.model, evaluator.layers).uncovered}
    assert left <= {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings"}
    result = evaluator.success(None, 16)
    assert result["success"] >= 0.9 and len(result["outcomes"]) == 16
    assert result["success"] == result["outcomes"].count("1") / 16
