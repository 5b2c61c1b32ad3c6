"""The search's pure rules: paired latency, optimistic success, pruning after the screen."""

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
