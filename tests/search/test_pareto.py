"""Front and hypervolume on trials built directly (Optuna's create_trial), not by a search."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from mpq.search.pareto import front_table, front_trials, hypervolume, hypervolume_history
from mpq.search.plots import bit_map, front_frame


def _study(
    points: list[tuple[float, float, float, float]], extra: dict[int, dict] | None = None
) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    study.set_user_attr("objectives", ["success", "size_bytes", "latency_ms"])
    study.set_user_attr("float_reference", {"success": 1.0, "size_bytes": 1000, "latency_ms": 2.0})
    for i, (success, size, latency, drop) in enumerate(points):
        t = create_trial(
            values=[success, size, latency],
            state=TrialState.COMPLETE,
            params={"fc/w_bits": 4},
            distributions={"fc/w_bits": CategoricalDistribution([4, 8])},
            user_attrs={
                "success": success,
                "size_bytes": size,
                "latency_ms": latency,
                "constraints": [drop],
                "config": {"layers": {"fc": {"w_bits": 4}}},
                **(extra or {}).get(i, {}),
            },
            system_attrs={"constraints": [drop]},
        )
        study.add_trial(t)
    return study


def test_front_excludes_dominated_and_infeasible() -> None:
    study = _study(
        [
            (0.9, 500, 1.0, -1),  # front
            (0.8, 600, 1.5, -1),  # dominated by 0
            (1.0, 900, 1.8, -1),  # front
            (0.99, 100, 0.5, 1),  # would dominate, but infeasible
        ]
    )
    assert [t.number for t in front_trials(study)] == [0, 2]
    table = front_table(study)
    assert list(table["trial"]) == [0, 2]
    assert table["compression"].tolist() == pytest.approx([2.0, 1000 / 900])


def test_hypervolume_grows_with_a_better_point() -> None:
    base = hypervolume(_study([(0.9, 500, 1.0, -1)]))
    # box of (-0.9, 0.5, 0.5) to reference (0, 1, 2): 0.9 * 0.5 * 1.5
    assert base == pytest.approx(0.9 * 0.5 * 1.5)
    better = hypervolume(_study([(0.9, 500, 1.0, -1), (0.95, 400, 1.0, -1)]))
    assert better > base
    history = hypervolume_history(_study([(0.5, 900, 1.9, -1), (0.9, 500, 1.0, -1)]))
    assert history[0][1] < history[1][1]


def test_plot_frames() -> None:
    study = _study([(0.9, 500, 1.0, -1), (0.8, 600, 1.5, -1), (0.95, 900, 1.2, -1)])
    df = front_frame(study)
    assert df["on_front"].tolist() == [True, False, True]
    assert df["kind"].tolist() == ["Pareto front", "other trials", "Pareto front"]
    # what each front point leads on (a 2-axis projection alone would not tell)
    assert df["leads"].tolist() == ["smallest, fastest", "", "most successful"]
    assert df["bits"].tolist()[0] == "w 1x4 | a 1x32"
    assert bit_map(study).to_dict() == {"trial 0": {"fc": 4}, "trial 2": {"fc": 4}}


def test_plots_without_latency(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from mpq.search.plots import write_all

    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("objectives", ["success", "size_bytes"])
    study.set_user_attr("float_reference", {"success": 1.0, "size_bytes": 1000})
    study.add_trial(
        create_trial(
            values=[0.9, 500],
            state=TrialState.COMPLETE,
            user_attrs={
                "success": 0.9,
                "size_bytes": 500,
                "config": {"layers": {"fc": {"w_bits": 4}}},
            },
        )
    )
    names = {p.name for p in write_all(study, tmp_path)}
    assert {"pareto_front.html", "pareto_front.png", "bit_map.png"} <= names


def test_one_way_to_write_success_and_speedup() -> None:
    from mpq.search.pareto import format_speedup, format_success

    assert format_success({"success": 0.9731, "success_lo": 0.951, "success_hi": 0.985}) == (
        "0.973 (0.951-0.985)"
    )
    assert format_success({"success": 0.5, "success_lo": None}) == "0.500"  # a task without
    assert format_success({}) == "n/a"
    assert format_speedup({"speedup": 1.2094, "speedup_lo": 0.9708, "speedup_hi": 1.5066}) == (
        "1.209x [0.971, 1.507]"
    )
    assert format_speedup({"speedup": None}) == "n/a"


def test_hypervolume_of_no_trials_is_zero() -> None:
    """An empty selection (a seed label no trial carries) is no front, not the whole study."""
    study = _study([(0.9, 500, 1.0, -1)])
    assert hypervolume(study, []) == 0.0 and hypervolume(study) > 0.0


def test_a_search_point_dominates_a_seed_beyond_noise_only_on_paired_episodes() -> None:
    from mpq.search.pareto import seed_dominations

    points = [(0.9, 500, 1.0, -1), (0.9, 400, 0.9, -1), (0.92, 450, 1.0, -1)]
    seed_outcomes = "1" * 90 + "0" * 10
    extra = {
        0: {"seed": "greedy-50pct", "outcomes": seed_outcomes},
        1: {"outcomes": seed_outcomes},  # the same episodes won: exactly equal success
        2: {"outcomes": "1" * 90 + "1" * 2 + "0" * 8},  # +2 points, within noise
    }
    study = _study(points, extra)
    rows = {r["trial"]: r for r in seed_dominations(study)}
    assert set(rows) == {1, 2}
    assert rows[2]["success_diff"] == pytest.approx(0.02)
    assert rows[2]["success_lo_diff"] < 0 and not rows[2]["beyond_noise"]  # 2 of 2 episodes
    r = rows[1]
    assert r["seed_trial"] == 0 and r["seed"] == "greedy-50pct"
    assert (r["success_diff"], r["success_lo_diff"], r["success_hi_diff"]) == (0.0, 0.0, 0.0)
    assert r["beyond_noise"] and r["size_ratio"] == pytest.approx(500 / 400)
    # one episode lost, another won: the same success, no longer beyond noise
    extra[1] = {"outcomes": "1" * 89 + "0" + "1" + "0" * 9}
    r = next(r for r in seed_dominations(_study(points, extra)) if r["trial"] == 1)
    assert r["success_diff"] == 0.0 and r["success_lo_diff"] < 0 and not r["beyond_noise"]
    assert not r["non_inferior"]  # 1 of 2 disagreements on 100 episodes: lower end -0.0195


def test_non_inferiority_is_the_paired_lower_end_within_the_margin() -> None:
    """On 400 episodes, one disagreement each way is non-inferior within a point (lower end
    -0.005), six lost ones are not (-0.015)."""
    from mpq.search.pareto import NON_INFERIORITY_MARGIN, seed_dominations
    from mpq.search.session import domination_lines

    seed = "1" * 380 + "0" * 20
    points = [(0.95, 500, 1.0, -1), (0.95, 400, 0.9, -1), (0.95, 450, 0.8, -1)]
    extra = {
        0: {"seed": "uniform-8bit", "outcomes": seed},
        1: {"outcomes": "1" * 379 + "0" + "1" + "0" * 19},  # one lost, one won
        2: {"outcomes": "1" * 374 + "0" * 26},  # six lost (its success refined elsewhere)
    }
    study = _study(points, extra)
    rows = {r["trial"]: r for r in seed_dominations(study)}
    assert rows[1]["success_diff"] == 0.0 and not rows[1]["beyond_noise"]
    assert -NON_INFERIORITY_MARGIN <= rows[1]["success_lo_diff"] < 0 and rows[1]["non_inferior"]
    assert rows[2]["success_lo_diff"] < -NON_INFERIORITY_MARGIN and not rows[2]["non_inferior"]
    assert not any(r["non_inferior"] for r in seed_dominations(study, margin=0.001))
    lines = {line.split()[1]: line for line in domination_lines(study)[1:]}
    assert lines["1"].endswith("within noise; non-inferior (lower end >= -0.010)")
    assert lines["2"].endswith("over 400 episodes, within noise")


def test_pruned_trials_are_plotted_at_their_screening_figures(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from mpq.search.plots import PRUNED, write_all

    study = _study([(0.9, 500, 1.0, -1)])
    study.add_trial(
        create_trial(
            state=TrialState.PRUNED,
            user_attrs={"success": 0.2, "size_bytes": 300, "latency_ms": 0.8, "stage": "screen"},
        )
    )
    df = front_frame(study)
    assert df["kind"].tolist() == ["Pareto front", PRUNED]
    assert df["success"].tolist() == [0.9, 0.2]
    paths = write_all(study, tmp_path / "plots", min_success=0.85)
    assert all(p.stat().st_size > 1000 for p in paths)


def test_one_line_per_finished_trial() -> None:
    from mpq.search.session import trial_line

    study = _study(
        [(0.9, 500_000, 1.0, -1), (0.5, 400_000, 0.9, 1)],
        {
            0: {
                "seed": "greedy-50pct",
                "success_lo": 0.85,
                "success_hi": 0.94,
                "speedup": 2.0,
                "speedup_lo": 1.9,
                "speedup_hi": 2.1,
            }
        },
    )
    study.set_user_attr("float_reference", {"success": 1.0, "size_bytes": 1_000_000})
    line = trial_line(study, study.trials[0])
    assert line.startswith("trial   0 greedy-50pct")
    assert "success 0.900 (0.850-0.940)" in line and "0.50 MB (2.0x)" in line
    assert "speed-up 2.000x [1.900, 2.100]" in line and line.endswith("[complete]")
    assert trial_line(study, study.trials[1]).endswith("[complete, infeasible]")
