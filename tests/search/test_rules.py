"""The search's pure rules: paired latency, optimistic success, pruning after the screen, close
calls."""

from __future__ import annotations

import pytest

from mpq.search import rules
from tests.search.helpers import conv_config


def test_paired_latency_is_float_latency_over_speedup() -> None:
    out = rules.paired_latency({"speedup": 1.25, "latency_ms": 9.0}, 2.0)
    assert out["latency_ms"] == pytest.approx(1.6)
    assert rules.paired_latency({"latency_ms": 9.0}, 2.0)["latency_ms"] == 9.0


def test_success_upper_prefers_the_tasks_own_interval() -> None:
    assert rules.success_upper({"success": 0.5, "success_hi": 0.61}, 8) == 0.61
    assert 0.5 < rules.success_upper({"success": 0.5}, 8) < 1.0  # Wilson over 8 episodes


def test_prune_after_screen(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = conv_config(tmp_path, screen_budget=8)  # max_success_drop 0.05 by default
    hopeless = {"success": 0.0, "success_hi": 0.2, "size_bytes": 10, "latency_ms": 1.0}
    assert rules.prune_after_screen(cfg, hopeless, 0.9, [])
    hopeful = {"success": 0.8, "success_hi": 0.99, "size_bytes": 100, "latency_ms": 1.0}
    assert not rules.prune_after_screen(cfg, hopeful, 0.9, [])
    better = (0.99, 50.0, 0.5)  # finished: more success, smaller, faster
    assert rules.prune_after_screen(cfg, hopeful, 0.9, [better])
    assert rules.constraint_names(cfg) == ["success_drop"]


def test_a_close_call_is_an_interval_that_holds_the_threshold(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = conv_config(tmp_path, refine_budget=64)  # threshold: 0.9 - 0.05 = 0.85
    assert rules.close_call(cfg, {"success": 0.86, "success_lo": 0.80, "success_hi": 0.92}, 0.9)
    assert rules.close_call(cfg, {"success": 0.84, "success_lo": 0.80, "success_hi": 0.85}, 0.9)
    assert not rules.close_call(cfg, {"success": 0.9, "success_lo": 0.86, "success_hi": 0.95}, 0.9)
    assert not rules.close_call(cfg, {"success": 0.7, "success_lo": 0.6, "success_hi": 0.84}, 0.9)
    # without the task's own interval: Wilson's over task_budget (32) episodes
    assert rules.close_call(cfg, {"success": 0.875}, 0.9)
    assert not rules.close_call(conv_config(tmp_path), {"success": 0.875}, 0.9)  # off


def test_refine_budget_needs_a_success_constraint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="refine_budget=8 needs constraints.max_success_drop"):
        conv_config(tmp_path, refine_budget=8, constraints={"max_success_drop": None})
