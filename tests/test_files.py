"""Files written whole, and output folders two studies share without overwriting each other."""

from __future__ import annotations

from pathlib import Path

from mpq.files import owned_folder, write_atomic


def test_a_second_study_in_the_same_output_folder_gets_folders_of_its_own(tmp_path: Path) -> None:
    first = owned_folder(tmp_path, "best", "study-a")
    assert first == tmp_path / "best"
    write_atomic(first / "MODEL_CARD.md", "a's card\n")
    assert owned_folder(tmp_path, "best", "study-a") == first  # its own again (resume)
    second = owned_folder(tmp_path, "best", "study-b")
    assert second == tmp_path / "best-study-b"
    assert (first / "MODEL_CARD.md").read_text() == "a's card\n"  # untouched


def test_a_folder_from_before_the_marks_is_left_alone(tmp_path: Path) -> None:
    write_atomic(tmp_path / "best" / "config.yaml", "old\n")  # no owner mark
    assert owned_folder(tmp_path, "best", "study-a") == tmp_path / "best-study-a"
    assert (tmp_path / "best" / "config.yaml").read_text() == "old\n"
