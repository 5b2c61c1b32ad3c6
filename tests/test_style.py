"""The project's lint rules (ruff: E, W, F, I, B, UP; line length 99) hold for the whole tree."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff comes with the [test] extra")
def test_ruff_check() -> None:
    result = subprocess.run(
        ["ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:]


def _imports(path: Path) -> set[str]:
    """Top-level package names a module imports (anywhere in it, lazy imports included)."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


PACKAGES = ("spaces", "evaluators", "search", "mpq")


def test_ray_and_mlflow_stay_in_their_modules() -> None:
    """STYLE.md: Ray is driven from search/cluster.py only, MLflow from search/tracking.py."""
    allowed = {"ray": {"search/cluster.py"}, "mlflow": {"search/tracking.py"}}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            for lib, homes in allowed.items():
                assert lib not in _imports(path) or rel in homes, f"{rel} imports {lib}"


def test_imports_go_one_way() -> None:
    """spaces imports neither evaluators nor search; evaluators does not import search."""
    import re

    for package, banned in (("spaces", ("evaluators", "search")), ("evaluators", ("search",))):
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text()
            for other in banned:
                assert not re.search(rf"mpq\.{other}\b", text), f"{path} imports mpq.{other}"
