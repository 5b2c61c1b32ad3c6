from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpq.evaluators.stats import paired_difference, wilson_interval
from mpq.evaluators.task import outcome_string, run_task


def test_models_that_agree_on_every_episode_differ_by_exactly_zero() -> None:
    assert paired_difference("1101", "1101") == (0.0, 0.0, 0.0)


def test_the_paired_interval_is_mcnemars_exact_one() -> None:
    # 100 episodes; a wins 9 of the 10 where they disagree: +0.08, and the exact binomial
    # interval on 9/10 (0.555, 0.997) maps to ((2p - 1) * 10 / 100)
    a = "1" * 85 + "1" * 9 + "0" + "0" * 5
    b = "1" * 85 + "0" * 9 + "1" + "0" * 5
    diff, lo, hi = paired_difference(a, b)
    assert diff == pytest.approx(0.08)
    assert lo == pytest.approx((2 * 0.5549839 - 1) * 0.1, abs=1e-6)
    assert hi == pytest.approx((2 * 0.9974714 - 1) * 0.1, abs=1e-6)
    assert 0 < lo < diff < hi  # beyond the noise of these episodes


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=300))
def test_the_paired_interval_holds_the_difference_and_is_antisymmetric(
    pairs: list[tuple[bool, bool]],
) -> None:
    a = "".join("1" if x else "0" for x, _ in pairs)
    b = "".join("1" if y else "0" for _, y in pairs)
    diff, lo, hi = paired_difference(a, b)
    assert diff == pytest.approx((a.count("1") - b.count("1")) / len(a))
    assert -1 <= lo <= diff <= hi <= 1
    back = paired_difference(b, a)
    assert back == pytest.approx((-diff, -hi, -lo))


def test_outcomes_of_other_episodes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"^paired_difference: 3 and 4 outcomes, not one episode"):
        paired_difference("101", "1011")


def test_a_task_reports_its_outcomes_as_a_string_and_bad_ones_in_one_line() -> None:
    def task(model: object, budget: int) -> dict[str, object]:
        return {"success": 0.5, "outcomes": [True, False, 1, 0]}

    assert run_task(task, None, 4)["outcomes"] == "1010"  # type: ignore[arg-type]
    for bad in ([2, 0], "10x", [], None):
        with pytest.raises(ValueError, match=r"^task returned outcomes that are not one 0/1"):
            outcome_string(bad)


def test_wilson_interval_is_exact_at_the_ends() -> None:
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
