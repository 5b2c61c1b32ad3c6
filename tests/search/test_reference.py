from __future__ import annotations

from pathlib import Path

from mpq.search.reference import config_reference_markdown, readme_section

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_reference_is_generated_and_current() -> None:
    expected = config_reference_markdown().strip("\n")
    assert readme_section(README.read_text()) == expected, (
        "run: mpq config-reference --readme README.md"
    )


def test_every_search_field_is_documented() -> None:
    text = config_reference_markdown()
    for field in (
        "name",
        "task_budget",
        "screen_budget",
        "ray.address",
        "tracking.uri",
        "constraints.max_success_drop",
        "latency.backend",
        "defaults.w_bits",
        "match",
    ):
        assert f"| `{field}` |" in text
