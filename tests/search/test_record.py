"""The typed trial record, read from trials built directly (Optuna's create_trial)."""

from __future__ import annotations

import pytest
from optuna.trial import TrialState, create_trial

from mpq.search.pareto import dominated
from mpq.search.record import Measurements, Stage, TrialRecord, feasible, loss_signs

ASKED = {"layers": {"fc": {"w_bits": 3}, "conv1": {"w_bits": 8, "a_bits": 8}}}
RAN = {"layers": {"fc": {"w_bits": 4}, "conv1": {"w_bits": 8, "a_bits": 8}}}


def _trial(**attrs):  # type: ignore[no-untyped-def]
    base = {
        "config": ASKED,
        "ran_config": RAN,
        "success": 0.9,
        "success_lo": 0.85,
        "success_hi": 0.95,
        "size_bytes": 1200,
        "latency_ms": 0.5,
        "speedup": 1.2,
        "episodes": 100,
        "success/GoTo": 0.8,
        "stage": "full",
        "constraints": [-0.1],
        "kernels": {"fc": "MATMULNBITS_4"},
        "seed": "greedy-50pct",
    }
    return create_trial(
        values=[0.9, 1200, 0.5], state=TrialState.COMPLETE, user_attrs=base | attrs
    )


def test_record_types_every_field() -> None:
    r = TrialRecord.from_frozen(_trial())
    assert r.config is not None and r.config.layers["fc"].w_bits == 3
    assert r.config_as_ran is not None and r.config_as_ran.layers["fc"].w_bits == 4
    assert r.mean_w_bits() == 6.0 and r.mean_w_bits(ran=False) == 5.5
    m = r.measurements
    assert (m.success, m.size_bytes, m.latency_ms, m.speedup, m.episodes) == (
        0.9,
        1200,
        0.5,
        1.2,
        100,
    )
    assert isinstance(m.size_bytes, int) and m.extra == {"success/GoTo": 0.8}
    assert m.compression(2400) == pytest.approx(2.0)
    assert r.stage == Stage.FULL and r.proposed_by == "greedy-50pct" and r.feasible
    assert r.kernels == {"fc": "MATMULNBITS_4"}


def test_record_of_a_search_proposed_failed_trial() -> None:
    t = create_trial(
        state=TrialState.FAIL, user_attrs={"fail_reason": "worker died: x", "config": ASKED}
    )
    r = TrialRecord.from_frozen(t)
    assert r.proposed_by == "search" and r.fail_reason == "worker died: x"
    assert r.values is None and r.ran_config is None and r.config_as_ran == r.config
    assert r.measurements == Measurements()


def test_feasibility_and_signs() -> None:
    assert feasible([]) and feasible([0.0, -1.0]) and not feasible([-1.0, 0.01])
    assert loss_signs(["maximize", "minimize"]) == [-1.0, 1.0]


@pytest.mark.parametrize(
    ("candidate", "expected"),
    [
        ((0.8, 1300.0), True),  # worse in both
        ((0.9, 1000.0), False),  # equal to a front point: not dominated
        ((0.95, 1300.0), False),  # better success, larger: a trade-off
        ((0.9, 1000.5), True),  # as good in success, larger
    ],
)
def test_dominated_uses_the_study_directions(
    candidate: tuple[float, float], expected: bool
) -> None:
    others = [(0.9, 1000.0), (0.7, 500.0)]
    assert dominated(candidate, others, ["maximize", "minimize"]) is expected
    assert dominated(candidate, [], ["maximize", "minimize"]) is False
